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
    """Share of queries whose true class is among the k best scores (ties broken against the truth)."""
    labels, scores = np.asarray(labels, int), np.asarray(scores, np.float64)
    true = scores[np.arange(len(labels)), labels]
    better = (scores > true[:, None]).sum(axis=1)
    return float((better < k).mean()) if len(labels) else float("nan")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (what the Mann-Whitney statistic needs)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def binary_auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties count half."""
    positive, score = np.asarray(positive, bool), np.asarray(score, np.float64)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    finite = np.where(np.isfinite(score), score, np.where(score > 0, np.finfo(np.float64).max,
                                                           np.finfo(np.float64).min))
    ranks = _average_ranks(finite)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def one_vs_rest_auroc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per class c: AUROC of scores[:, c] separating queries of c from all others."""
    labels = np.asarray(labels, int)
    return np.array([binary_auroc(labels == c, scores[:, c]) for c in range(scores.shape[1])])


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
    """Every closed-set figure of one score matrix: accuracy, macro, per source, top-3, confusion, AUROC."""
    labels = np.asarray(labels, int)
    predicted = np.argmax(scores, axis=1)
    matrix = confusion_matrix(labels, predicted, len(names))
    per_source = per_class_accuracy(matrix)
    aurocs = one_vs_rest_auroc(labels, scores)
    return {
        "queries": int(len(labels)),
        "accuracy": accuracy(labels, predicted),
        "macro_accuracy": macro_accuracy(matrix),
        "top3_accuracy": top_k_accuracy(labels, scores, 3),
        "per_source": {n: _clean(v) for n, v in zip(names, per_source)},
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
