"""How well each open-set score and the fitted temperature do, measured by cross-fitting.

Open-set scores (engine.openset) are measured by leaving each source out in turn: its column goes, its
originals are the unknowns, and its references shape nothing (not even the "mahalanobis" covariance,
refitted per round, nor, in dataset and combined modes, the nearest-neighbour slots: `Rescore`).
Temperatures are measured by ECE.

Both are cross-fitted on two folds (`make_folds`): by description when there are enough descriptions
(a description's originals never straddle folds, since they share references), else by image,
stratified by source. A figure that cannot be measured is None with a `not_measured` reason, never a
fallback number such as an AUROC of 0.5.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from engine.calibration import DEFAULT_TEMPERATURE
from engine.metrics import (accuracy, binary_auroc, expected_calibration_error, negative_log_likelihood,
                            open_set_figures, reliability_table, softmax)
from engine.openset import (DEFAULT_OPEN_SET_SCORE, FALSE_REJECT, OPEN_SET_SCORES, FeatureContext,
                            false_reject_threshold, fit_temperature, mahalanobis_scores, score_definitions)

# Reported beside AUROC per open-set score, per left-out source and as their mean (engine.metrics):
# OSCR, true-negative rate on unknowns at 95% of knowns accepted, correct classification at 5% FPR.
LITERATURE_FIGURES = ("oscr", "tnr_at_tpr95", "ccr_at_fpr5")
MIN_DESCRIPTION_FOLDS = 4  # fewer distinct descriptions than this: folds by image instead
FOLD_SEED = 0
# The score matrix with only the sources `keep` enrolled (columns in that order). Where a source's references
# also shape the others' scores (dataset and combined modes: its resyntheses fill nearest-neighbour slots),
# the caller recomputes it, so that a left-out source shapes nothing; else the columns are taken as they are.
Rescore = Callable[[list[int]], np.ndarray]

# ---------------------------------------------------------------------------------------------- folds

def _folds(groups: np.ndarray) -> np.ndarray:
    """Two folds by group (description), alternating over the sorted group ids."""
    unique = np.unique(groups)
    fold_of = {g: i % 2 for i, g in enumerate(unique)}
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def _image_folds(labels: np.ndarray, seed: int) -> np.ndarray:
    """Two folds by image, stratified by source: each source's originals shuffled (seeded) and dealt
    alternately; the deal continues across sources so that odd counts do not all land in fold 0."""
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(labels), dtype=np.int64)
    dealt = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        folds[idx] = (dealt + np.arange(len(idx))) % 2
        dealt += len(idx)
    return folds


def _split_sources(folds: np.ndarray, labels: np.ndarray) -> list:
    """Sources with at least 2 originals that a fold lacks."""
    return [int(c) for c in np.unique(labels) if (labels == c).sum() >= 2 and len(np.unique(folds[labels == c])) < 2]


def make_folds(labels: np.ndarray, groups: np.ndarray, seed: int = FOLD_SEED,
               min_groups: int = MIN_DESCRIPTION_FOLDS) -> tuple[np.ndarray, dict]:
    """Two cross-fitting folds for any dataset, and how they were made.

    By description when there are at least `min_groups` descriptions and every source (with 2+
    originals) has originals in both folds; otherwise by image, stratified by source (seeded).
    """
    labels, groups = np.asarray(labels, int), np.asarray(groups)
    n_groups = int(len(np.unique(groups)))
    if n_groups >= min_groups:
        folds = _folds(groups)
        if not _split_sources(folds, labels):
            return folds, {"by": "description", "descriptions": n_groups}
        why = "alternate descriptions would leave a source's originals all in one fold"
    else:
        why = f"only {n_groups} distinct description(s) (fewer than {min_groups})"
    folds = _image_folds(labels, seed)
    return folds, {"by": "image", "stratified_by": "source", "seed": seed, "descriptions": n_groups,
                   "why": why, "caveat": "originals of one description share their references across folds, "
                                         "so figures may be somewhat optimistic"}


def _base_values(name: str, sub: np.ndarray, keep: list[int], context: FeatureContext | None) -> np.ndarray:
    """The raw value of score `name` per query with only the `keep` sources enrolled."""
    if name in ("margin", "best-score"):
        return sub.max(1)
    # the feature-based scores are only asked for with a context (_score_figures)
    if name == "max-similarity":
        assert context is not None
        return context.candidate_sims[:, keep].reshape(len(sub), -1).max(1, initial=-np.inf)
    if name in ("knn-density", "knn-density-margin"):
        assert context is not None
        predicted = np.asarray(keep)[sub.argmax(1)]
        return context.density[np.arange(len(sub)), predicted]
    if name == "mahalanobis":
        if context is None or context.groups is None:
            raise ValueError("the mahalanobis score needs a FeatureContext from feature_context()")
        return mahalanobis_scores(context, keep)
    raise ValueError(f"unknown open-set score {name!r} (choose from {', '.join(OPEN_SET_SCORES)})")


def _floors(values: np.ndarray, predicted: np.ndarray, correct: np.ndarray, classes: int, frr: float,
            per_source: bool) -> tuple[np.ndarray | None, list[int]]:
    """Per query class c in 0..classes-1, the threshold rejecting at most `frr` of `values` over correctly
    attributed queries (of c when `per_source`); a class without any falls back to the pooled one
    (returned in the list). None when no query at all was correctly attributed."""
    ok = correct & np.isfinite(values)
    if not ok.any():
        return None, []
    pooled = false_reject_threshold(values[ok], frr)
    if not per_source:
        return np.full(classes, pooled), []
    floors, missing = np.full(classes, pooled), []
    for c in range(classes):
        hits = ok & (predicted == c)
        if hits.any():
            floors[c] = false_reject_threshold(values[hits], frr)
        else:
            missing.append(c)
    return floors, missing


def _round(name: str, scores: np.ndarray, labels: np.ndarray, folds: np.ndarray, s: int, names: list[str],
           frr: float, context: FeatureContext | None,
           rescore: Rescore | None = None) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    """Source s left out: the round's figures, cross-fitted decision values (< 0: unknown) and which
    known originals the remaining sources attribute correctly (None, None when not measured)."""
    keep = [c for c in range(len(names)) if c != s]
    sub = rescore(keep) if rescore is not None else scores[:, keep]
    known, unknown = labels != s, labels == s
    if not unknown.any():
        return {"auroc": None, "not_measured": f"no originals of {names[s]} to act as unknowns"}, None, None
    if not known.any():
        return {"auroc": None, "not_measured": "no originals of the remaining sources"}, None, None
    mapped = np.array([keep.index(c) if c != s else -1 for c in labels])
    predicted = sub.argmax(1)
    correct = known & (predicted == mapped)
    values = _base_values(name, sub, keep, context)
    per_source = OPEN_SET_SCORES[name][1]
    decision = np.empty(len(labels))
    pooled_for = []
    for f in np.unique(folds):
        fit, apply = known & (folds != f), folds == f
        floors, missing = _floors(values[fit], predicted[fit], correct[fit], len(keep), frr, per_source)
        if floors is None:
            return {"auroc": None, "not_measured": f"fold {f}: no correctly attributed known original in the "
                                                   f"other fold to fit a threshold on"}, None, None
        pooled_for += [f"fold {f}: {names[keep[c]]}" for c in missing]
        decision[apply] = values[apply] - floors[predicted[apply]]
    auroc = binary_auroc(unknown, -decision)
    ok = known & (decision >= 0)
    out: dict[str, Any] = {
        "auroc": None if not np.isfinite(auroc) else auroc,
        "unknowns": int(unknown.sum()), "knowns": int(known.sum()),  # what the round's figures rest on
        "unknown_rejected": float((decision[unknown] < 0).mean()),
        "known_false_reject": float((decision[known] < 0).mean()),
        "known_accuracy_accepted": accuracy(mapped[ok], predicted[ok]) if ok.any() else None,
        "unknown_rejected_at_frr": float((decision[unknown] < false_reject_threshold(decision[known], frr)).mean()),
        # the open-set literature's figures over the same cross-fitted decision values (engine.metrics)
        **open_set_figures(correct[known], decision[known], decision[unknown]),
    }
    if pooled_for:
        out["pooled_threshold_for"] = pooled_for  # no correctly attributed original of theirs to fit one
    return out, decision, correct


def _score_figures(name: str, scores: np.ndarray, labels: np.ndarray, folds: np.ndarray, names: list[str],
                   frr: float, context: FeatureContext | None, rescore: Rescore | None = None) -> dict:
    kind = {"threshold": "per source" if OPEN_SET_SCORES[name][1] else "one for all"}
    if OPEN_SET_SCORES[name][0] and context is None:
        return {**kind, "auroc": None, "not_measured": "needs the features (CLIP vectors), not only the score matrix",
                "per_source": {}}
    per_source, pooled = {}, []
    for s, source in enumerate(names):
        figures, decision, correct = _round(name, scores, labels, folds, s, names, frr, context, rescore)
        per_source[source] = figures
        if decision is not None:
            pooled.append((decision, labels == s, correct))
    measured = {k: v for k, v in per_source.items() if v.get("auroc") is not None}
    if not measured:
        reasons = sorted({f"{k}: {v['not_measured']}" for k, v in per_source.items() if "not_measured" in v})
        return {**kind, "auroc": None, "not_measured": "; ".join(reasons) or "no left-out source could be scored",
                "per_source": per_source, "target_false_reject": frr}
    decision, unknown, correct = map(np.concatenate, zip(*pooled))
    known = ~unknown
    # As near `frr` of the known queries rejected as a finite set allows (never more): one shared offset on the
    # pooled cross-fitted values; `known_rejected` says the share it has.
    offset = false_reject_threshold(decision[known], frr)
    kept = known & (decision >= offset)
    accepted = known & (decision >= 0)
    rounds = list(measured.values())
    out = {
        **kind,
        "target_false_reject": frr,
        "auroc": float(np.mean([v["auroc"] for v in rounds])),
        "pooled_auroc": _finite(binary_auroc(unknown, -decision)),
        "unknown_rejected_at_frr": float((decision[unknown] < offset).mean()),
        "at_exact_false_reject": {
            "offset": offset,
            "known_rejected": float((decision[known] < offset).mean()),
            "known_accuracy_accepted": float(correct[kept].mean()) if kept.any() else None,
            "unknown_rejected": float((decision[unknown] < offset).mean())},
        "known_false_reject": float((decision[known] < 0).mean()),
        "known_accuracy_accepted": float(correct[accepted].sum() / accepted.sum()) if accepted.any() else None,
        "known_accuracy_overall": float(correct[accepted].sum() / known.sum()),
        "unknown_rejected": float(np.mean([v["unknown_rejected"] for v in rounds])),
        **{k: _mean_measured([v.get(k) for v in rounds]) for k in LITERATURE_FIGURES},
        "per_source": per_source,
    }
    if len(measured) < len(per_source):
        out["partial"] = f"mean over {len(measured)} of {len(per_source)} left-out sources (others not measured)"
    return out


def _mean_measured(values: list) -> float | None:
    """Mean over the rounds that have the figure; None when none has it."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _finite(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def choose_open_set_score(figures: dict[str, dict], preference: tuple[str, ...] = tuple(OPEN_SET_SCORES)) -> str | None:
    """The best measured score: highest mean AUROC, then most unknowns rejected at the target false-reject
    rate (both to 3 decimals), then the earlier in `preference`. None when none was measured."""
    measured = [n for n in preference if n in figures and figures[n].get("auroc") is not None]
    if not measured:
        return None
    return max(measured, key=lambda n: (round(figures[n]["auroc"], 3),
                                        round(figures[n].get("unknown_rejected_at_frr") or 0.0, 3),
                                        -preference.index(n)))


def leave_one_source_out(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, names: list[str],
                         frr: float = FALSE_REJECT, context: FeatureContext | None = None,
                         score_names: list[str] | None = None, seed: int = FOLD_SEED,
                         headline: str = "margin", rescore: Rescore | None = None) -> dict:
    """Every open-set score, each source left out in turn, cross-fitted over `make_folds`.

    The top-level figures are those of `headline` (default "margin": per-source thresholds, what
    fit_thresholds gives a Calibration; the evaluation report passes DEFAULT_OPEN_SET_SCORE), or of
    "margin" when `headline` needs features and no `context` is given. `scores[name]` holds every
    score's figures; `best_measured_score` names the best measured here. `rescore` (see Rescore) gives
    each round's matrix where the left-out source's references shape the others' scores.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, int)
    folds, fold_info = make_folds(labels, groups, seed)
    base = {"target_false_reject": frr, "folds": fold_info, "default_score": DEFAULT_OPEN_SET_SCORE,
            "score_definitions": score_definitions()}
    if len(names) < 2:
        return {**base, "auroc": None, "per_source": {}, "scores": {}, "headline_score": None,
                "best_measured_score": None,
                "not_measured": f"{len(names)} source(s): leaving one out needs at least 2"}
    chosen = score_names or list(OPEN_SET_SCORES)
    cached = {}

    def once(keep: list[int]) -> np.ndarray:  # each round's matrix computed once for every score
        if tuple(keep) not in cached:
            cached[tuple(keep)] = rescore(keep) if rescore is not None else scores[:, keep]
        return cached[tuple(keep)]

    figures = {n: _score_figures(n, scores, labels, folds, names, frr, context, once) for n in chosen}
    if headline not in figures or (OPEN_SET_SCORES[headline][0] and context is None):
        headline = "margin" if "margin" in figures else chosen[0]
    return {**base, **figures[headline], "headline_score": headline,
            "best_measured_score": choose_open_set_score(figures),
            "scores": figures}


def calibration_report(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, bins: int = 10,
                       seed: int = FOLD_SEED) -> dict:
    """ECE with the default temperature and with a cross-fitted one (folds from `make_folds`), plus the
    reliability tables. The cross-fitted figures are None with `not_measured` when a fold has nothing
    to fit a temperature on."""
    labels = np.asarray(labels, int)
    folds, fold_info = make_folds(labels, groups, seed)
    default = softmax(scores, DEFAULT_TEMPERATURE)
    out: dict[str, Any] = {
        "default_temperature": DEFAULT_TEMPERATURE,
        "folds": fold_info,
        "cross_fitted_temperatures": [],
        "fitted_temperature_all": fit_temperature(scores, labels) if len(labels) else None,
        "ece_default": expected_calibration_error(labels, default, bins) if len(labels) else None,
        "nll_default": negative_log_likelihood(labels, default) if len(labels) else None,
        "reliability_default": reliability_table(labels, default, bins),
    }
    fitted = np.empty_like(scores, dtype=np.float64)
    reason = None if len(np.unique(folds)) == 2 else f"{len(labels)} original(s): two folds need at least 2"
    for f in (0, 1):
        if reason:
            break
        train, test = folds != f, folds == f
        out["cross_fitted_temperatures"].append(fit_temperature(scores[train], labels[train]))
        fitted[test] = softmax(scores[test], out["cross_fitted_temperatures"][-1])
    if reason:
        return {**out, "ece_calibrated": None, "nll_calibrated": None, "reliability_calibrated": [],
                "not_measured": reason}
    return {**out, "ece_calibrated": expected_calibration_error(labels, fitted, bins),
            "nll_calibrated": negative_log_likelihood(labels, fitted),
            "reliability_calibrated": reliability_table(labels, fitted, bins)}
