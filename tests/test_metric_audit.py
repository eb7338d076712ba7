"""An outside check of the figures resynth reports: each metric against a reference written from its
definition, on adversarial inputs (ties, infinities, tiny and one-sided samples). Pure numpy, fast."""
from __future__ import annotations

import numpy as np
import pytest

from engine import metrics as m
from engine.crossfit import leave_one_source_out
from engine.evaluation.report import markdown, summary
from engine.openset import false_reject_threshold, fit_open_set_thresholds, fit_thresholds


def _auroc_by_pairs(positive: np.ndarray, score: np.ndarray) -> float:
    """P(positive > negative) over every pair, ties half, nan as -inf: the Mann-Whitney definition."""
    s = np.where(np.isnan(score), -np.inf, score)
    p, n = s[positive], s[~positive]
    wins = (p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()
    return float(wins / (len(p) * len(n)))


def test_auroc_equals_the_pair_definition_on_adversarial_scores():
    rng = np.random.default_rng(1)
    big = np.finfo(np.float64).max
    pools = [np.array([0.0, 1.0, 2.0]), np.array([0.3]), np.array([-np.inf, np.inf, 0.0, 1.0, np.nan]),
             np.array([big, np.inf, -np.inf, -big])]  # the largest finite value is below +inf, not tied with it
    checked = 0
    for trial in range(400):
        n = int(rng.integers(2, 12))
        positive = np.r_[True, False, rng.random(n - 2) < 0.5]
        score = rng.choice(pools[trial % len(pools)], n)
        assert m.binary_auroc(positive, score) == pytest.approx(_auroc_by_pairs(positive, score), abs=1e-12), score
        checked += 1
    assert checked == 400


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 19, 20, 30, 50, 101])
def test_a_fitted_threshold_rejects_at_most_the_false_reject_rate(n):
    """--false-reject is the share of genuine queries a threshold may reject: on the originals it was fitted
    on, never more (linear interpolation rejected 1 of 2, 1 of 3, 2 of 30)."""
    best = np.linspace(1.0, 2.0, n)
    scores, labels = np.c_[best, np.zeros(n)], np.zeros(n, int)
    for frr in (0.0, 0.05, 0.1, 0.5):
        allowed = np.floor(frr * n + 1e-9) / n
        assert (best < fit_thresholds(scores, labels, frr)[0]).mean() <= allowed
        assert (best < fit_open_set_thresholds(scores, labels, ["a", "b"], "best-score", frr)["a"]).mean() <= allowed
        t = false_reject_threshold(best, frr)
        kept = np.sort(best)[min(int(np.floor(frr * n + 1e-9)), n - 1)]  # the lowest value kept
        # the tightest such threshold, placed in the gap below that value: a query recomputed a hair lower
        # than its fitted value (float32) is not refused
        assert (best < t).mean() <= allowed and (best < t).sum() == (best < kept).sum() and t < kept


def test_false_reject_threshold_with_ties_and_infinities():
    assert 1.0 - 1e-5 < false_reject_threshold(np.array([1.0, 1.0, 1.0, 2.0]), 0.5) < 1.0  # a tie is kept whole
    assert 1.0 - 1e-5 < false_reject_threshold(np.r_[-np.inf, np.arange(39.0)], 0.05) < 1.0  # -inf and 0 may go
    assert false_reject_threshold(np.array([-np.inf, -np.inf, 0.0]), 0.5) == -np.inf  # no nan from -inf - -inf
    assert np.isnan(false_reject_threshold(np.array([]), 0.05))


def test_wilson_interval_from_its_definition():
    """The interval's ends are the p with |p_hat - p| = z sqrt(p (1 - p) / n) (the score test inverted)."""
    z = 1.959963984540054
    for hits, n in ((3, 3), (0, 3), (59, 60), (1, 2), (57, 60), (0, 1), (500, 1000)):
        lo, hi = m.wilson_interval(hits, n)
        assert 0 <= lo <= hits / n <= hi <= 1
        for end in (lo, hi):
            if 0 < end < 1:
                assert abs(hits / n - end) == pytest.approx(z * np.sqrt(end * (1 - end) / n), abs=1e-9)
    assert m.wilson_interval(3, 3)[0] == pytest.approx(0.4385, abs=1e-4)  # 100% of 3 supports only >= 44%
    assert m.wilson_interval(0, 0) is None


def _report(labels: np.ndarray, scores: np.ndarray, names: list[str]) -> dict:
    """Just enough of a report for markdown() and summary(), around one classification report."""
    section = {"variant": "final/cosine/knn/K=3", "layer": "final", "distance": "cosine", "aggregation": "knn",
               "per_source": 3, "fewshot": False, **m.classification_report(labels, scores, names)}
    calibration = {"default_temperature": 0.01, "ece_default": 0.1, "ece_calibrated": None, "nll_default": 1.0,
                   "nll_calibrated": None, "not_measured": "few"}
    return m.json_safe({"dataset": {"originals": len(labels), "resyntheses": 9, "descriptions": 1, "sources": names,
                                    "max_per_source": 3, "layers": ["final"], "primary_layer": "final",
                                    "chance": 1 / len(names)},
                        "resynthesis_default": section, "best_variant": section,
                        "best_resynthesis_only": section["variant"], "variants": [section] * 7, "factor_means": {},
                        "fewshot": {"shots": [], "methods": {}, "draws": 1}, "calibration": calibration})


def test_the_report_says_what_a_rate_rests_on_and_never_prints_nan():
    """100% on 3 images is shown with its count and interval; an undefined AUROC (a source with no originals,
    so no positives) is "–", never nan or 0.500; the best variant is flagged as picked on the same data."""
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.7, 0.3, 0.0], [0.1, 0.9, 0.0], [0.6, 0.4, 0.0]])
    report = _report(labels, scores, ["a", "b", "c ünï"])
    section = report["resynthesis_default"]
    assert section["per_source_queries"] == {"a": 3, "b": 2, "c ünï": 0} and section["correct"] == 4
    assert section["per_source_ci95"]["c ünï"] is None and section["auroc"]["c ünï"] is None
    text = markdown(report)
    assert "| a | 3 | 100.0% | 43.9–100.0% |" in text
    assert "| c ünï | 0 | – | – | – |" in text
    assert "(4 of 5, 95% CI 37.6–96.4%)" in text and "optimistic" in text
    assert "nan" not in text.lower() and "nan" not in summary(report).lower()
    assert "95% CI 37.6–96.4%" in summary(report)
    report["dataset"]["originals_per_source"] = {"a": 3, "b": 2, "c ünï": 0}
    assert summary(report).startswith("5 originals, 2 sources (of 3 candidate sources),")  # as report.md counts
    import json
    json.loads(json.dumps(report, allow_nan=False))  # valid JSON: no NaN token anywhere


def test_a_source_name_with_a_bar_keeps_the_tables_aligned():
    labels, scores = np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]])
    text = markdown(_report(labels, scores, ["a|b", "c"]))
    confusion = [line for line in text.splitlines() if line.startswith("| true")][0]
    assert confusion == "| true \\ predicted | a\\|b | c |"
    row = [line for line in text.splitlines() if line.startswith("| a")][0]
    assert row.replace("\\|", "").count("|") == 6  # five cells, the name's bar escaped


def test_the_operating_point_reports_the_false_reject_it_actually_has():
    """The "exactly 5% of knowns rejected" operating point can only be at most 5% on a finite set: it says
    the share it has, and never exceeds the target."""
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(3), 9)  # 18 knowns per round, 54 pooled: 5% is 2.7 of them
    scores = rng.normal(0.5, 0.05, size=(27, 3))
    scores[np.arange(27), labels] += 0.1
    result = leave_one_source_out(scores, labels, np.arange(27) % 9, ["a", "b", "c"], frr=0.05)
    exact = result["at_exact_false_reject"]
    # 54 pooled knowns, 5% is 2.7: at most 2 may go (1 here: a query is tied with itself across two rounds)
    assert 0 < exact["known_rejected"] <= 2 / 54 and exact["known_rejected"] * 54 == pytest.approx(1)
    text = markdown({**_report(labels, scores, ["a", "b", "c"]), "open_set": result})
    assert "at most 5.0% (here 1.9%) of known" in text
    assert "| a (9 / 18) |" in text and result["per_source"]["a"]["unknowns"] == 9  # what each round rests on


def test_few_shot_baselines_survive_a_candidate_source_without_originals():
    """A generator enrolled but absent from the labelled set (no originals) must not silently empty the
    baseline comparison; a source with too few originals for any k says so in the report."""
    from engine.evaluation.baselines import available_shots, draw_split, run_fewshot
    from engine.evaluation.report import fewshot_table
    from engine.scoring import Variant

    labels = np.repeat([0, 1, 2], 6)  # source 3 has no originals
    assert available_shots(labels, 4) == [1, 2, 5]
    train, test = draw_split(labels, 4, 2, np.random.default_rng(0))
    assert len(train) == 6 and len(test) == 12
    rng = np.random.default_rng(0)
    originals, resyntheses = rng.normal(size=(18, 8)), rng.normal(size=(8, 8))
    references = [[np.array([c * 2, c * 2 + 1]) for c in range(4)] for _ in labels]
    result = run_fewshot(originals, resyntheses, references, labels, 4, Variant(per_source=2), draws=1, shots=[1],
                         progress=False)["clean"]
    assert result["methods"]["nearest-centroid"]["1"]["runs"] == 1
    assert available_shots(np.array([0, 0, 0, 1]), 2) == []
    text = fewshot_table({"shots": [], "methods": {}, "draws": 1, "not_measured": "x"})
    assert "not measured" in text


def test_tied_best_scores_are_counted_and_said():
    """All scores equal (a broken embedder, a constant output): argmax gives every query to the first source,
    whose accuracy then reads 100%. The report counts the ties and says how they were broken."""
    labels = np.array([0, 0, 1, 1, 2])
    scores = np.full((5, 3), 0.5)
    scores[4] = [0.1, 0.2, 0.9]
    report = _report(labels, scores, ["a", "b", "c"])
    section = report["resynthesis_default"]
    assert section["tied_best"] == 4 and section["per_source"]["a"] == 1.0
    assert "4 of 5 originals had two or more sources tied for the best score" in markdown(report)
    assert m.classification_report(labels[4:], scores[4:], ["a", "b", "c"])["tied_best"] == 0
    # unscored sources (-inf) tied at the bottom are no tie for the best
    unscored = np.array([[0.4, -np.inf, -np.inf]])
    assert m.classification_report(np.array([0]), unscored, ["a", "b", "c"])["tied_best"] == 0


def test_a_nan_score_is_never_accepted_as_known():
    from engine.calibration import Calibration

    calibration = Calibration(thresholds={"a": 0.5}, fitted=True)
    assert calibration.is_unknown("a", float("nan")) and calibration.is_unknown("a", 0.4)
    assert not calibration.is_unknown("a", 0.5) and not calibration.is_unknown("b", float("nan"))


def test_constant_features_give_a_report_not_a_traceback():
    """A broken embedder (every vector the same): every figure is at chance and says so, nothing raises
    (scikit-learn's nearest centroid refuses zero-variance features: that baseline is "not measured")."""
    from engine.evaluation.protocol import run_protocol
    from tests.test_openset import one_description_set

    evalset, (originals, _) = one_description_set(per_source=3, refs=2)
    same = np.tile(originals[:1], (len(originals), 1))
    report = run_protocol(evalset, {"final": (same, same[:len(evalset.res_hash)])}, "final", draws=1, progress=False)
    assert report["resynthesis_default"]["tied_best"] == len(originals)
    assert report["resynthesis_default"]["accuracy"] == pytest.approx(0.25)
    assert "tied for the best score" in markdown(report) and "nan" not in markdown(report).lower()
