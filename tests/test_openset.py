"""Unknown sources and calibration on any dataset: folds, open-set scores, and figures that say why
they could not be measured instead of printing a stand-in number (synthetic features, no models)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.calibration import DEFAULT_TEMPERATURE
from engine.crossfit import calibration_report, choose_open_set_score, leave_one_source_out, make_folds
from engine.evaluation.protocol import open_set_context, run_protocol
from engine.evaluation.report import json_safe, markdown, summary
from engine.labelled import EvalSet
from engine.openset import DEFAULT_OPEN_SET_SCORE, OPEN_SET_SCORES, feature_context, fit_open_set_thresholds
from engine.scoring import Variant, padded_references, score_matrix

NAMES = ["a", "b", "c", "d"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def one_description_set(per_source: int = 30, refs: int = 4, dim: int = 16, seed: int = 0,
                        sources: list[str] = NAMES, with_originals: list[str] | None = None) -> tuple[EvalSet, tuple]:
    """The issue's held-out set in miniature: ONE description, several sources, many originals each.

    Every image is the description's content plus its generator's fingerprint plus noise, so a source
    is recognisable but not trivially (the originals' seeds differ from the references')."""
    rng = np.random.default_rng(seed)
    content = rng.normal(size=dim) * 6.0  # content dominates, as with one description
    prints = rng.normal(size=(len(sources), dim))
    with_originals = sources if with_originals is None else with_originals
    orig_source = np.repeat([sources.index(s) for s in with_originals], per_source)
    res_source = np.repeat(np.arange(len(sources)), refs)
    originals = _unit(content + prints[orig_source] + rng.normal(size=(len(orig_source), dim)) * 1.1)
    resyntheses = _unit(content + prints[res_source] + rng.normal(size=(len(res_source), dim)) * 1.1)
    n, r = len(orig_source), len(res_source)
    evalset = EvalSet(
        sources=list(sources), orig_source=orig_source, orig_desc=np.zeros(n, int),
        orig_hash=[f"o{i}" for i in range(n)], orig_path=[f"o{i}.png" for i in range(n)],
        res_source=res_source, res_desc=np.zeros(r, int), res_seed=np.tile(np.arange(refs), len(sources)),
        res_original=np.full(r, -1), res_hash=[f"r{j}" for j in range(r)], res_path=[f"r{j}.png" for j in range(r)],
        descriptions=["portrait of an old man with a beard"])
    return evalset, (originals.astype(np.float32), resyntheses.astype(np.float32))


def _scores(evalset: EvalSet, features: tuple, variant: Variant = Variant("final", "cosine", "knn", 3)):
    originals, resyntheses = features
    references = evalset.references()
    scores = score_matrix(originals, resyntheses, references, variant, orig_source=evalset.orig_source)
    return scores, open_set_context(evalset, originals, resyntheses, references, variant.per_source)


# ----------------------------------------------------------------------------------------------- folds

def test_folds_by_image_when_one_description():
    labels = np.repeat(np.arange(4), [7, 6, 1, 5])
    folds, info = make_folds(labels, np.zeros(len(labels), int))
    assert info["by"] == "image" and "1 distinct description" in info["why"]
    for c in (0, 1, 3):  # every source with 2+ originals is in both folds, about half each
        own = folds[labels == c]
        assert set(own) == {0, 1} and abs(int((own == 0).sum()) * 2 - len(own)) <= 1
    assert abs(int(folds.sum()) * 2 - len(labels)) <= 1  # odd counts do not all land in fold 0
    again, _ = make_folds(labels, np.zeros(len(labels), int))
    assert (again == folds).all()  # deterministic (seeded)
    other, _ = make_folds(labels, np.zeros(len(labels), int), seed=1)
    assert not (other == folds).all()


def test_folds_by_description_when_enough():
    labels = np.repeat(np.arange(3), 8)
    groups = np.tile(np.arange(8), 3)
    folds, info = make_folds(labels, groups)
    assert info == {"by": "description", "descriptions": 8}
    for g in range(8):  # a description never straddles folds
        assert len(set(folds[groups == g])) == 1
    # enough descriptions, but source 2 has all its originals in even descriptions: by image instead
    groups = np.concatenate([np.arange(8), np.arange(8), np.array([0, 2, 4, 6, 0, 2, 4, 6])])
    folds, info = make_folds(labels, groups)
    assert info["by"] == "image" and "one fold" in info["why"]
    assert all(set(folds[labels == c]) == {0, 1} for c in range(3))


# ------------------------------------------------------------------------------- one-description data

def test_one_description_open_set_is_measured():
    """The issue: one description, 4 sources. Every left-out source and every score is measured, and
    no figure is the 0.5 of thresholds that were never fitted."""
    evalset, features = one_description_set()
    scores, context = _scores(evalset, features)
    labels = evalset.orig_source
    assert (scores.argmax(1) == labels).mean() > 0.6  # closed set works on these features
    result = leave_one_source_out(scores, labels, evalset.orig_desc, NAMES, context=context)
    assert result["folds"]["by"] == "image"
    assert set(result["scores"]) == set(OPEN_SET_SCORES)
    for name, figures in result["scores"].items():
        assert figures["auroc"] is not None and "not_measured" not in figures, name
        assert figures["auroc"] != pytest.approx(0.5, abs=1e-9), name
        assert set(figures["per_source"]) == set(NAMES)
        for source, v in figures["per_source"].items():
            assert v["auroc"] is not None and v["auroc"] != 0.5, (name, source)
        assert 0 <= figures["unknown_rejected_at_frr"] <= 1
        assert figures["known_false_reject"] < 0.5  # thresholds were fitted: knowns are mostly accepted
    assert result["headline_score"] == "margin"  # what fit_thresholds gives a Calibration, unless asked
    assert result["auroc"] == result["scores"]["margin"]["auroc"] > 0.6
    chosen = leave_one_source_out(scores, labels, evalset.orig_desc, NAMES, context=context,
                                  headline=DEFAULT_OPEN_SET_SCORE)
    assert chosen["headline_score"] == DEFAULT_OPEN_SET_SCORE
    assert chosen["auroc"] == chosen["scores"][DEFAULT_OPEN_SET_SCORE]["auroc"] > 0.6
    assert result["best_measured_score"] in OPEN_SET_SCORES
    # The old behaviour: every margin +inf because one fold had no known original to fit on.
    assert np.isfinite(result["at_exact_false_reject"]["offset"])


def test_one_description_calibration_is_fitted():
    evalset, features = one_description_set()
    scores, _ = _scores(evalset, features)
    report = calibration_report(scores, evalset.orig_source, evalset.orig_desc)
    assert report["folds"]["by"] == "image" and len(report["cross_fitted_temperatures"]) == 2
    assert all(t != DEFAULT_TEMPERATURE for t in report["cross_fitted_temperatures"])
    assert report["ece_calibrated"] is not None and report["ece_calibrated"] != pytest.approx(report["ece_default"])
    assert report["ece_calibrated"] < report["ece_default"]


def test_protocol_report_on_one_description_set():
    evalset, features = one_description_set(per_source=16)
    report = run_protocol(evalset, {"final": features}, "final", draws=1, progress=False)
    o = report["open_set"]
    assert o["auroc"] is not None and 0 <= o["auroc"] <= 1 and set(o["per_source"]) == set(NAMES)
    assert o["default_score"] == o["headline_score"] == DEFAULT_OPEN_SET_SCORE
    assert o["best_measured_score"] in o["scores"] and o["auroc"] == o["scores"][DEFAULT_OPEN_SET_SCORE]["auroc"]
    assert all(f["auroc"] is not None for f in o["scores"].values())
    assert report["calibration"]["ece_calibrated"] != report["calibration"]["ece_default"]
    text, short = markdown(json_safe(report)), summary(json_safe(report))
    assert "folds of images stratified by source" in text and "| knn-density |" in text
    assert "not measured" not in text and "not measured" not in short
    assert "unknown source (" in short


# ------------------------------------------------------------------------------------ not measurable

def test_a_source_without_originals_is_not_measured_and_says_why():
    evalset, features = one_description_set(with_originals=["a", "b", "c"])
    scores, context = _scores(evalset, features)
    result = leave_one_source_out(scores, evalset.orig_source, evalset.orig_desc, NAMES, context=context)
    d = result["per_source"]["d"]
    assert d["auroc"] is None and "no originals of d" in d["not_measured"]
    assert result["auroc"] is not None and "3 of 4" in result["partial"]
    text = markdown(_minimal_report(result))
    assert "| d | not measured (no originals of d to act as unknowns) |" in text


def test_too_few_sources_or_originals_are_not_measured():
    result = leave_one_source_out(np.array([[0.5], [0.6]]), np.array([0, 0]), np.zeros(2, int), ["a"])
    assert result["auroc"] is None and "at least 2" in result["not_measured"]
    assert "AUROC not measured (1 source(s)" in summary(_minimal_report(result))
    assert "Unknown-source rejection: not measured" in markdown(_minimal_report(result))
    calibration = calibration_report(np.array([[0.9, 0.1]]), np.array([0]), np.zeros(1, int))
    assert calibration["ece_calibrated"] is None and "at least 2" in calibration["not_measured"]
    report = _minimal_report(result, calibration)
    assert "-> not measured (1 original(s)" in summary(report)
    assert "0.500" not in summary(report) and "0.500" not in markdown(report)


def test_feature_scores_need_features():
    evalset, features = one_description_set()
    scores, _ = _scores(evalset, features)
    result = leave_one_source_out(scores, evalset.orig_source, evalset.orig_desc, NAMES)
    assert result["headline_score"] == "margin" and result["auroc"] is not None
    for name, (needs_features, _, _) in OPEN_SET_SCORES.items():
        figures = result["scores"][name]
        assert (figures["auroc"] is None) == needs_features
        if needs_features:
            assert "needs the features" in figures["not_measured"]


# ------------------------------------------------------------------------------------ parts by hand

def test_feature_context_by_hand():
    originals = np.array([[1.0, 0.0], [0.0, 1.0]])
    angles = np.array([0.0, 0.3, 0.6, 1.2, 1.5])
    resyntheses = np.stack([np.cos(angles), np.sin(angles)], 1)
    res_source = np.array([0, 0, 0, 1, 1])
    candidates = np.array([[[0, -1], [3, -1]], [[1, 2], [4, -1]]])
    # query 0 shares its bytes with resynthesis 0: never its reference, never in its density
    ctx = feature_context(originals, resyntheses, res_source, candidates, orig_ids=np.array([7, 8]),
                          res_ids=np.array([7, 1, 2, 3, 4]), k=2)
    assert ctx.candidate_sims[0, 0, 0] == -np.inf and ctx.candidate_sims[0, 0, 1] == -np.inf
    assert ctx.candidate_sims[1, 0].tolist() == pytest.approx([np.sin(0.3), np.sin(0.6)])
    assert ctx.density[0].tolist() == pytest.approx([(np.cos(0.3) + np.cos(0.6)) / 2, (np.cos(1.2) + np.cos(1.5)) / 2])
    assert ctx.density[1, 0] == pytest.approx((np.sin(0.6) + np.sin(0.3)) / 2)


def test_choose_open_set_score():
    figures = {"margin": {"auroc": 0.80, "unknown_rejected_at_frr": 0.3},
               "best-score": {"auroc": 0.80, "unknown_rejected_at_frr": 0.3},
               "knn-density": {"auroc": 0.8002, "unknown_rejected_at_frr": 0.5},
               "max-similarity": {"auroc": None, "not_measured": "why"}}
    assert choose_open_set_score(figures) == "knn-density"  # AUROC tie to 3 decimals: more rejected
    figures["knn-density"]["unknown_rejected_at_frr"] = 0.3
    assert choose_open_set_score(figures) == "margin"  # full tie: the earlier in preference
    assert choose_open_set_score({"margin": {"auroc": None}}) is None
    assert DEFAULT_OPEN_SET_SCORE in OPEN_SET_SCORES


def test_open_set_thresholds_for_a_calibration():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.1], [0.2, 0.6], [0.1, 0.5], [0.4, 0.3]])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert fit_open_set_thresholds(scores, labels, ["a", "b"], "margin", frr=0.0) == pytest.approx(
        {"a": 0.7, "b": 0.5}, abs=1e-5)
    # one threshold for every source: the lowest correctly attributed best score of any source
    assert fit_open_set_thresholds(scores, labels, ["a", "b"], "best-score", frr=0.0) == pytest.approx(
        {"a": 0.5, "b": 0.5}, abs=1e-5)
    with pytest.raises(ValueError):
        fit_open_set_thresholds(scores, labels, ["a", "b"], "knn-density")
    with pytest.raises(ValueError):  # the default is feature-based: a Calibration applies it itself
        fit_open_set_thresholds(scores, labels, ["a", "b"], DEFAULT_OPEN_SET_SCORE)


def test_padded_candidates_follow_the_engine_k():
    evalset, features = one_description_set(refs=4)
    _, context = _scores(evalset, features, Variant("final", "cosine", "knn", 2))
    assert context.candidate_sims.shape == (evalset.n_originals, 4, 2)
    assert padded_references(evalset.references(), 2).shape == (evalset.n_originals, 4, 2)


def _minimal_report(open_set: dict, calibration: dict | None = None) -> dict:
    """Just enough of a report for markdown() and summary()."""
    engine = {"variant": "final/cosine/knn/K=3", "accuracy": 1.0, "macro_accuracy": 1.0, "top3_accuracy": 1.0,
              "macro_auroc": None, "per_source": {}, "auroc": {}, "confusion": {"labels": [], "matrix": []}}
    calibration = calibration or calibration_report(np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]),
                                                    np.array([0, 1, 0]), np.zeros(3, int))
    return json_safe({"dataset": {"originals": 2, "resyntheses": 2, "descriptions": 1, "sources": ["a"],
                                  "max_per_source": 1, "layers": ["final"], "primary_layer": "final", "chance": 1.0},
                      "resynthesis_default": engine, "best_variant": engine, "best_resynthesis_only": engine["variant"],
                      "variants": [], "factor_means": {}, "fewshot": {"shots": [], "methods": {}, "draws": 1},
                      "open_set": open_set, "calibration": calibration})


# ------------------------------------------------------------------------------ the "mahalanobis" score

def nuisance_set(per_source: int = 30, refs: int = 16, dim: int = 24, nuisance: int = 6, seed: int = 0,
                 twin: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One description, four sources whose images vary most along shared nuisance directions, each
    source with its own spread there (0.5x to 3x), and differ only slightly elsewhere (the fingerprint).

    A cosine to the nearest source is dominated by the nuisance, so an unknown sits inside a diffuse
    source's cloud (the failure of "best-score" on the real-weight GAN sets); `twin`: source a has
    source b's fingerprint, so with a left out nothing can tell its originals from b's."""
    rng = np.random.default_rng(seed)
    content = rng.normal(size=dim) * 6.0
    prints = np.zeros((4, dim))
    prints[:, nuisance:] = rng.normal(size=(4, dim - nuisance)) * 0.6
    if twin:
        prints[0] = prints[1]
    spread = np.array([0.5, 1.0, 2.0, 3.0])

    def draw(source: np.ndarray) -> np.ndarray:
        x = content + prints[source] + rng.normal(size=(len(source), dim)) * 0.25
        x[:, :nuisance] += rng.normal(size=(len(source), nuisance)) * spread[source, None]
        return _unit(x)

    orig_source, res_source = np.repeat(np.arange(4), per_source), np.repeat(np.arange(4), refs)
    return draw(orig_source), draw(res_source), orig_source, res_source


def _nuisance_open_set(twin: bool = False) -> dict:
    originals, resyntheses, orig_source, res_source = nuisance_set(twin=twin)
    references = [[np.flatnonzero(res_source == c) for c in range(4)] for _ in orig_source]
    scores = score_matrix(originals, resyntheses, references, Variant("final", "cosine", "knn", 16))
    context = feature_context(originals, resyntheses, res_source, padded_references(references, 16))
    return leave_one_source_out(scores, orig_source, np.zeros(len(orig_source), int), NAMES, context=context)


def test_mahalanobis_measured_and_high_where_best_score_fails():
    o = _nuisance_open_set()
    maha, best = o["scores"]["mahalanobis"], o["scores"]["best-score"]
    assert o["folds"]["by"] == "image"  # one description
    assert maha["auroc"] is not None and maha["auroc"] > 0.9
    assert all(v["auroc"] > 0.8 for v in maha["per_source"].values())
    assert best["auroc"] < 0.7 and maha["auroc"] - best["auroc"] > 0.2  # not a set any score passes
    assert maha["unknown_rejected_at_frr"] > best["unknown_rejected_at_frr"]
    assert o["best_measured_score"] == "mahalanobis"


def test_mahalanobis_cannot_tell_a_twin_source():
    """Control: with a left out, its originals are b's in distribution; a score that saw a's references
    (or its labels) would still flag them. Its round must not."""
    o = _nuisance_open_set(twin=True)
    per_source = o["scores"]["mahalanobis"]["per_source"]
    assert per_source["a"]["auroc"] < 0.6
    assert per_source["d"]["auroc"] > 0.9  # the distinct sources are still told apart


def test_mahalanobis_never_sees_the_left_out_source():
    from engine.openset import mahalanobis_scores

    originals, resyntheses, orig_source, res_source = nuisance_set()
    candidates = padded_references([[np.flatnonzero(res_source == c) for c in range(4)]] * len(orig_source), 16)
    before = mahalanobis_scores(feature_context(originals, resyntheses, res_source, candidates), [1, 2, 3])
    moved = resyntheses.copy()
    moved[res_source == 0] = _unit(np.random.default_rng(5).normal(size=((res_source == 0).sum(), moved.shape[1])))
    after = mahalanobis_scores(feature_context(originals, moved, res_source, candidates), [1, 2, 3])
    assert after == pytest.approx(before)
    with_a = mahalanobis_scores(feature_context(originals, moved, res_source, candidates), [0, 1, 2, 3])
    assert not np.allclose(with_a, before)


def test_mahalanobis_at_attribute_time_equals_the_evaluation():
    """engine.calibration's per-query function (what the engine would apply) gives the evaluation's value,
    and a Calibration carrying its threshold decides with it."""
    from engine.calibration import Calibration, mahalanobis_open_set
    from engine.openset import fit_mahalanobis

    originals, resyntheses, orig_source, res_source = nuisance_set()
    references = [[np.flatnonzero(res_source == c) for c in range(4)] for _ in orig_source]
    scores = score_matrix(originals, resyntheses, references, Variant("final", "cosine", "knn", 16))
    context = feature_context(originals, resyntheses, res_source, padded_references(references, 16))
    precision, threshold = fit_mahalanobis(context, scores, orig_source, frr=0.05)
    correct = scores.argmax(1) == orig_source
    for i in (0, 45, 119):
        value, source = mahalanobis_open_set(originals[i] * 3.0, {n: resyntheses[res_source == c]
                                                                  for c, n in enumerate(NAMES)}, precision)
        evaluated = -min(((originals[i] - resyntheses[res_source == c].mean(0)) @ precision
                          @ (originals[i] - resyntheses[res_source == c].mean(0))) for c in range(4))
        assert value == pytest.approx(evaluated) and source in NAMES
    values = np.array([mahalanobis_open_set(q, {n: resyntheses[res_source == c] for c, n in enumerate(NAMES)},
                                            precision)[0] for q in originals])
    assert (values[correct] < threshold).mean() == pytest.approx(0.05, abs=0.02)
    calibration = Calibration.from_dict({"fitted": True, "open_set": {"score": "mahalanobis", "threshold": threshold}})
    assert Calibration.from_dict(calibration.to_dict()) == calibration
    assert calibration.is_unknown_value(threshold - 1.0) and not calibration.is_unknown_value(threshold + 1.0)
    assert calibration.is_unknown_value(None) and calibration.is_unknown_value(-np.inf)
    assert Calibration().is_unknown_value(-1e9) is None  # uncalibrated: never a verdict from this score
    assert mahalanobis_open_set(originals[0], {}, precision) == (-np.inf, None)


# ------------------------------------------------------------ the open-set literature's figures per score

def test_literature_figures_per_score_and_round():
    """OSCR, TNR@TPR95 and CCR@FPR5 beside the AUROC: per left-out source, their mean per score, the
    headline's at the top, and in report.md and the summary."""
    from engine.crossfit import LITERATURE_FIGURES

    evalset, features = one_description_set(per_source=16)
    report = run_protocol(evalset, {"final": features}, "final", draws=1, progress=False)
    o = report["open_set"]
    for name, figures in o["scores"].items():
        rounds = [v for v in figures["per_source"].values() if v.get("auroc") is not None]
        for key in LITERATURE_FIGURES:
            values = [v[key] for v in rounds]
            assert all(0 <= x <= 1 for x in values), (name, key)
            assert figures[key] == pytest.approx(np.mean(values)), (name, key)
        for v in rounds:  # OSCR never beats the AUROC when some knowns are misclassified
            assert v["oscr"] <= v["auroc"] + 1e-12, name
    assert all(o[k] == o["scores"][o["headline_score"]][k] for k in LITERATURE_FIGURES)
    text, short = markdown(json_safe(report)), summary(json_safe(report))
    assert "OSCR | TNR@TPR95 | CCR@FPR5" in text and "Dhamija" in text
    assert f"OSCR {o['oscr']:.3f}" in short and "TNR@TPR95 " in short and "CCR@FPR5 " in short


def test_oscr_equals_auroc_when_every_known_is_correct():
    """A score matrix whose true column is always the best: in each round every known is correctly
    attributed, so its OSCR is its known-vs-unknown AUROC, and both are below 1 (the unknowns overlap)."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 20)
    scores = rng.uniform(0, 1, (len(labels), 4))
    scores[np.arange(len(labels)), labels] = scores.max(1) + rng.uniform(0, 0.3, len(labels))
    result = leave_one_source_out(scores, labels, np.zeros(len(labels), int), NAMES, score_names=["best-score"])
    rounds = result["scores"]["best-score"]["per_source"].values()
    assert all(v["oscr"] == pytest.approx(v["auroc"]) for v in rounds)
    assert all(v["auroc"] < 1 for v in rounds) and result["oscr"] == pytest.approx(result["auroc"])


def test_literature_figures_absent_when_not_measured():
    result = leave_one_source_out(np.array([[0.5], [0.6]]), np.array([0, 0]), np.zeros(2, int), ["a"])
    assert result.get("oscr") is None
    evalset, features = one_description_set(with_originals=["a", "b", "c"])
    scores, context = _scores(evalset, features)
    result = leave_one_source_out(scores, evalset.orig_source, evalset.orig_desc, NAMES, context=context)
    assert "oscr" not in result["per_source"]["d"] and result["oscr"] is not None
    text = markdown(_minimal_report(result))
    assert "| d | not measured (no originals of d to act as unknowns) | – | – | – | – | – | – |" in text


def test_a_left_out_source_fills_no_neighbour_slot():
    """In dataset and combined modes a source's resyntheses take nearest-neighbour slots from the others: left
    out, it must shape nothing, so each round rescores without it (its columns alone were dropped)."""
    from engine.fitting import engine_scores, fit_calibration, without_sources

    evalset, features = one_description_set(per_source=8, refs=6)
    variant = Variant("store", "cosine", "knn", 3)
    everyone = list(range(len(NAMES)))
    for mode in ("dataset", "combined"):
        scores = engine_scores(evalset, features, variant, mode, neighbours=6)
        assert np.array_equal(engine_scores(*without_sources(evalset, features, everyone), variant, mode, 6), scores)
        alone = engine_scores(*without_sources(evalset, features, [1, 2, 3]), variant, mode, 6)
        assert not np.allclose(alone, scores[:, 1:])  # "a" took slots the others now fill
        moved = (features[0], features[1].copy())
        moved[1][evalset.res_source == 0] *= -1  # "a" moved away: nothing of a round without it may change
        assert np.array_equal(engine_scores(*without_sources(evalset, moved, [1, 2, 3]), variant, mode, 6), alone)
    # calibrate's figure is the rescored one (on this set 0.893; dropping columns alone said 0.802)
    scores = engine_scores(evalset, features, variant, "dataset", 6)
    rescored = leave_one_source_out(scores, evalset.orig_source, evalset.orig_desc, NAMES, headline="best-score",
                                    rescore=lambda keep: engine_scores(*without_sources(evalset, features, keep),
                                                                       variant, "dataset", 6))
    sliced = leave_one_source_out(scores, evalset.orig_source, evalset.orig_desc, NAMES, headline="best-score")
    calibration, _ = fit_calibration(evalset, features, variant, mode="dataset", neighbours=6)
    assert calibration.notes["open_set_auroc"] == pytest.approx(rescored["auroc"]) != pytest.approx(sliced["auroc"])
