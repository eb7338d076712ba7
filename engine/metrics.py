"""Classification and calibration metrics in plain numpy, so every reported figure is auditable here.

Labels are integer class indices 0..C-1; score matrices are (n, C) with larger = more likely and
-inf for a class that could not be scored for that query.
"""
from __future__ import annotations

import math

import numpy as np


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    return float((labels == predicted).mean()) if labels.size else float("nan")


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> list[float] | None:
    """95% Wilson score interval of a proportion (None for n = 0): what a rate measured on n queries can
    support. Unlike the normal approximation it does not collapse at 0% or 100%: 3 of 3 is 43.9-100%."""
    if n <= 0:
        return None
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == n else min(1.0, centre + half)]


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, int), np.asarray(predicted, int)), 1)
    return matrix


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """Recall of every class (nan for a class with no queries)."""
    totals = matrix.sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(matrix) / totals, np.nan)


def macro_accuracy(matrix: np.ndarray) -> float:
    """Mean of per-class accuracies: every source weighs the same, whatever its number of queries."""
    values = per_class_accuracy(matrix)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def top_k_accuracy(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of queries whose true class is among the k best scores, ties broken as argmax breaks them (the
    lower class index first), so that top-1 equals `accuracy` of the argmax."""
    labels, scores = np.asarray(labels, int), np.asarray(scores, np.float64)
    true = scores[np.arange(len(labels)), labels]
    index = np.arange(scores.shape[1])[None, :]
    ahead = (scores > true[:, None]) | ((scores == true[:, None]) & (index < labels[:, None]))
    return float((ahead.sum(axis=1) < k).mean()) if len(labels) else float("nan")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (what the Mann-Whitney statistic needs); vectorised, as
    the one-vs-rest AUROC calls it once per source (a Python loop took 30 s for 2000 sources x 4000 queries)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of the last member of each group of equal values
    return (last - (counts - 1) / 2)[inverse.reshape(-1)]


def binary_auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties count half."""
    positive, score = np.asarray(positive, bool), np.asarray(score, np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # nan ranks as -inf; +-inf stay themselves (mapping them to the largest finite values tied them with those)
    ranks = _average_ranks(np.where(np.isnan(score), -np.inf, score))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def one_vs_rest_auroc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per class c: AUROC of scores[:, c] separating queries of c from all others."""
    labels = np.asarray(labels, int)
    return np.array([binary_auroc(labels == c, scores[:, c]) for c in range(scores.shape[1])])


# ------------------------------------------------------------------ open-set figures (known vs unknown)
# Scores: larger = more "known". A threshold t accepts every query with score >= t, so queries tied at t
# are accepted or rejected together; the thresholds swept are "above every score" (accept nothing) and
# every distinct score value. nan scores count as -inf (accepted only when everything is); +-inf are
# ordinary values.

def _open_set_sweep(known_correct: np.ndarray, known_scores: np.ndarray,
                    unknown_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per threshold, highest first ("above every score", then every distinct score): how many knowns,
    correctly classified knowns and unknowns have a score >= it."""
    known = np.nan_to_num(np.asarray(known_scores, np.float64), nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    unknown = np.nan_to_num(np.asarray(unknown_scores, np.float64), nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    correct = np.asarray(known_correct, bool)
    if correct.shape != known.shape:
        raise ValueError("known_correct and known_scores must have the same length")
    values, where = np.unique(np.concatenate([known, unknown]), return_inverse=True)
    where = where.reshape(-1)
    n = len(values)
    k_at = np.bincount(where[:len(known)], minlength=n)[::-1]
    c_at = np.bincount(where[:len(known)], weights=correct.astype(np.float64), minlength=n)[::-1]
    u_at = np.bincount(where[len(known):], minlength=n)[::-1]
    zero = np.zeros(1)
    return (np.concatenate([zero, np.cumsum(k_at)]), np.concatenate([zero, np.cumsum(c_at)]),
            np.concatenate([zero, np.cumsum(u_at)]))


def oscr(known_correct: np.ndarray, known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Open-Set Classification Rate (Dhamija, Guenther & Boult, NeurIPS 2018): the area under the curve of
    the correct classification rate (knowns correctly classified *and* accepted, over all knowns) against
    the false positive rate (unknowns accepted, over all unknowns), sweeping the threshold from +inf down.
    Consecutive points are joined by straight lines (trapezoids), so a known tied with an unknown counts
    half, as in binary_auroc: with every known correctly classified OSCR equals the known-vs-unknown AUROC;
    its maximum is the closed-set accuracy of the knowns. nan when there are no knowns or no unknowns."""
    known_scores = np.asarray(known_scores)
    n_known, n_unknown = known_scores.size, np.asarray(unknown_scores).size
    if n_known == 0 or n_unknown == 0:
        return float("nan")
    _, correct, unknown = _open_set_sweep(known_correct, known_scores, unknown_scores)
    ccr, fpr = correct / n_known, unknown / n_unknown
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2))


def _needed(rate: float, n: int, at_least: bool) -> int:
    """How many of n a rate asks for: at least ceil(rate*n), or at most floor(rate*n) (float-safe)."""
    if not 0 <= rate <= 1:
        raise ValueError(f"a rate must be within 0..1, not {rate}")
    return int(math.ceil(rate * n - 1e-9)) if at_least else int(math.floor(rate * n + 1e-9))


def tnr_at_tpr(known_scores: np.ndarray, unknown_scores: np.ndarray, tpr: float = 0.95) -> float:
    """True negative rate on the unknowns (share with score < t) at the highest threshold t that accepts at
    least `tpr` of the knowns (score >= t). Unknowns tied with t are accepted (false positives): ties never
    flatter the figure. 1 - the FPR@95TPR of OpenOOD and scikit-learn's roc_curve. nan when either side is
    empty."""
    known, unknown = np.asarray(known_scores), np.asarray(unknown_scores)
    if known.size == 0 or unknown.size == 0:
        return float("nan")
    accepted, _, false_pos = _open_set_sweep(np.zeros(known.size, bool), known, unknown)
    i = int(np.argmax(accepted >= _needed(tpr, known.size, at_least=True)))  # the first (highest) such t
    return float((unknown.size - false_pos[i]) / unknown.size)


def ccr_at_fpr(known_correct: np.ndarray, known_scores: np.ndarray, unknown_scores: np.ndarray,
               fpr: float = 0.05) -> float:
    """Correct classification rate of the knowns (correctly classified and score >= t, over all knowns) at
    the lowest threshold t that accepts at most `fpr` of the unknowns. Unknowns tied with t are accepted,
    so a tie can keep t above a known (never flatters the figure); with fewer than 1/fpr unknowns only
    t above every unknown qualifies. nan when either side is empty."""
    known, unknown = np.asarray(known_scores), np.asarray(unknown_scores)
    if known.size == 0 or unknown.size == 0:
        return float("nan")
    _, correct, false_pos = _open_set_sweep(known_correct, known, unknown)
    i = int(np.nonzero(false_pos <= _needed(fpr, unknown.size, at_least=False))[0][-1])  # the last (lowest)
    return float(correct[i] / known.size)


def open_set_figures(known_correct: np.ndarray, known_scores: np.ndarray, unknown_scores: np.ndarray) -> dict:
    """OSCR, TNR at 95% TPR and CCR at 5% FPR of one known/unknown split (None where not defined)."""
    return {"oscr": _clean(oscr(known_correct, known_scores, unknown_scores)),
            "tnr_at_tpr95": _clean(tnr_at_tpr(known_scores, unknown_scores, 0.95)),
            "ccr_at_fpr5": _clean(ccr_at_fpr(known_correct, known_scores, unknown_scores, 0.05))}


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of scores / temperature; -inf scores get probability 0."""
    logits = np.asarray(scores, np.float64) / temperature
    logits = logits - np.max(logits, axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """ECE: confidence-vs-accuracy gap of the top class, averaged over equal-width confidence bins."""
    table = reliability_table(labels, probabilities, bins)
    n = sum(row["count"] for row in table)
    return float(sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table if row["count"]) / n)


def reliability_table(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> list[dict]:
    """Per confidence bin (lo, hi]: count, mean confidence and accuracy of the top class."""
    labels, probabilities = np.asarray(labels, int), np.asarray(probabilities, np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        mask = which == b
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(mask.sum()),
                      "confidence": float(confidence[mask].mean()) if mask.any() else 0.0,
                      "accuracy": float(correct[mask].mean()) if mask.any() else 0.0})
    return table


def negative_log_likelihood(labels: np.ndarray, probabilities: np.ndarray) -> float:
    labels = np.asarray(labels, int)
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


def classification_report(labels: np.ndarray, scores: np.ndarray, names: list[str]) -> dict:
    """Every closed-set figure of one score matrix: accuracy, macro, per source, top-3, confusion, AUROC, with
    the counts and 95% Wilson intervals a reader needs to judge a rate (100% of 3 is not 100% of 300)."""
    labels = np.asarray(labels, int)
    predicted = np.argmax(scores, axis=1)
    matrix = confusion_matrix(labels, predicted, len(names))
    per_source = per_class_accuracy(matrix)
    aurocs = one_vs_rest_auroc(labels, scores)
    totals, hits = matrix.sum(axis=1), np.diag(matrix)
    return {
        "queries": int(len(labels)),
        "accuracy": accuracy(labels, predicted),
        "correct": int(hits.sum()),
        "accuracy_ci95": wilson_interval(int(hits.sum()), int(len(labels))),
        # queries whose best score two or more sources share: argmax gives them to the first listed
        "tied_best": int(((scores == scores.max(axis=1, keepdims=True)).sum(axis=1) > 1).sum()) if len(labels) else 0,
        "macro_accuracy": macro_accuracy(matrix),
        # with 3 sources or fewer every true source is in the top 3: 100% by construction, not a measurement
        "top3_accuracy": top_k_accuracy(labels, scores, 3) if len(names) > 3 else None,
        "per_source": {n: _clean(v) for n, v in zip(names, per_source)},
        "per_source_queries": {n: int(t) for n, t in zip(names, totals)},
        "per_source_ci95": {n: wilson_interval(int(h), int(t)) for n, h, t in zip(names, hits, totals)},
        "auroc": {n: _clean(v) for n, v in zip(names, aurocs)},
        "macro_auroc": _clean(np.nanmean(aurocs)) if np.isfinite(aurocs).any() else None,
        "confusion": {"labels": list(names), "matrix": matrix.tolist()},
    }


def _clean(value: float) -> float | None:
    """JSON-safe: nan becomes None."""
    return None if value is None or not np.isfinite(value) else float(value)


def json_safe(value):
    """nan/inf become None (JSON has no nan); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
