"""Unknown sources and calibrated confidence, fitted on score matrices of labelled originals.

* Per-source acceptance thresholds: a query predicted as s is accepted only if its score reaches the
  score that `frr` of s's own correctly attributed originals fall below (so about that share of
  genuine queries is falsely rejected). Measured by leaving each source out in turn.
* Temperature: the softmax temperature minimising held-out negative log-likelihood; measured by ECE
  with two-fold cross-fitting over descriptions (a description's originals never straddle folds).
"""
from __future__ import annotations

import numpy as np

from engine.calibration import DEFAULT_TEMPERATURE
from engine.evaluation.metrics import (accuracy, binary_auroc, expected_calibration_error,
                                       negative_log_likelihood, reliability_table, softmax)

FALSE_REJECT = 0.05
TEMPERATURES = np.exp(np.linspace(np.log(1e-6), np.log(10.0), 500))


def fit_thresholds(scores: np.ndarray, labels: np.ndarray, frr: float = FALSE_REJECT) -> dict[int, float]:
    """Per predicted class: the `frr` quantile of the best score over its correctly attributed queries."""
    predicted, best = scores.argmax(1), scores.max(1)
    out = {}
    for c in range(scores.shape[1]):
        hits = best[(predicted == c) & (labels == c) & np.isfinite(best)]
        if hits.size:
            out[c] = float(np.quantile(hits, frr))
    return out


def acceptance_margin(scores: np.ndarray, thresholds: dict[int, float]) -> np.ndarray:
    """Best score minus its predicted source's threshold: below 0 means "unknown source"."""
    predicted, best = scores.argmax(1), scores.max(1)
    floor = np.array([thresholds.get(int(c), -np.inf) for c in predicted])
    return best - floor


def _folds(groups: np.ndarray) -> np.ndarray:
    """Two folds by group (description), alternating over the sorted group ids."""
    unique = np.unique(groups)
    fold_of = {g: i % 2 for i, g in enumerate(unique)}
    return np.array([fold_of[g] for g in groups])


def leave_one_source_out(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, names: list[str],
                         frr: float = FALSE_REJECT) -> dict:
    """For each source in turn: drop its column, its originals become unknowns; thresholds are fitted
    on one fold of the known originals and applied to the other (and both folds of the unknowns)."""
    folds = _folds(groups)
    per_source, pooled_margin, pooled_unknown, pooled_correct = {}, [], [], []
    accepted_ok = accepted = known_total = rejected_known = 0
    for s, name in enumerate(names):
        keep = [c for c in range(len(names)) if c != s]
        sub = scores[:, keep]
        known = labels != s
        mapped = np.array([keep.index(c) if c != s else -1 for c in labels])
        margin = np.empty(len(labels))
        for f in (0, 1):
            fit = known & (folds != f)
            thresholds = fit_thresholds(sub[fit], mapped[fit], frr)
            apply = folds == f
            margin[apply] = acceptance_margin(sub[apply], thresholds)
        unknown = ~known
        auroc = binary_auroc(unknown, -margin)
        ok = known & (margin >= 0)
        correct = sub.argmax(1) == mapped
        per_source[name] = {
            "auroc": auroc,
            "unknown_rejected": float((margin[unknown] < 0).mean()),
            "known_false_reject": float((margin[known] < 0).mean()),
            "known_accuracy_accepted": accuracy(mapped[ok], sub[ok].argmax(1)) if ok.any() else None,
        }
        pooled_margin.append(margin)
        pooled_unknown.append(unknown)
        pooled_correct.append(known & correct)
        accepted_ok += int((ok & correct).sum())
        accepted += int(ok.sum())
        known_total += int(known.sum())
        rejected_known += int((known & (margin < 0)).sum())
    aurocs = [v["auroc"] for v in per_source.values() if np.isfinite(v["auroc"])]
    margin, unknown, correct = map(np.concatenate, (pooled_margin, pooled_unknown, pooled_correct))
    # Exactly `frr` of the known queries rejected: one shared offset on the pooled cross-fitted margins.
    offset = float(np.quantile(margin[~unknown], frr)) if (~unknown).any() else 0.0
    kept = ~unknown & (margin >= offset)
    return {
        "target_false_reject": frr,
        "auroc": float(np.mean(aurocs)) if aurocs else None,
        "pooled_auroc": binary_auroc(unknown, -margin),
        "at_exact_false_reject": {
            "offset": offset,
            "known_accuracy_accepted": float(correct[kept].mean()) if kept.any() else None,
            "unknown_rejected": float((margin[unknown] < offset).mean()) if unknown.any() else None},
        "known_false_reject": rejected_known / known_total if known_total else None,
        "known_accuracy_accepted": accepted_ok / accepted if accepted else None,
        "known_accuracy_overall": accepted_ok / known_total if known_total else None,
        "unknown_rejected": float(np.mean([v["unknown_rejected"] for v in per_source.values()])),
        "per_source": per_source,
    }


def fit_temperature(scores: np.ndarray, labels: np.ndarray) -> float:
    """Grid search over log T of the cross-entropy against Platt-smoothed targets.

    Plain NLL on a set the method gets entirely right is minimised by T -> 0 (probability 1 for every
    answer); smoothing the targets by 1/(n+2), as Platt scaling does, keeps T finite on small sets
    and vanishes as the set grows.
    """
    labels = np.asarray(labels, int)
    n, classes = scores.shape
    eps = 1.0 / (n + 2)
    targets = np.full(scores.shape, eps / classes)
    targets[np.arange(n), labels] += 1.0 - eps
    finite = np.isfinite(scores)
    losses = []
    for t in TEMPERATURES:
        logp = np.log(np.clip(softmax(scores, t), 1e-300, 1.0))
        losses.append(-(targets * np.where(finite, logp, 0.0)).sum() / n)
    return float(TEMPERATURES[int(np.argmin(losses))])


def calibration_report(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, bins: int = 10) -> dict:
    """ECE with the default temperature and with a cross-fitted one, plus the reliability table."""
    folds = _folds(groups)
    fitted = np.empty_like(scores, dtype=np.float64)
    temperatures = []
    for f in (0, 1):
        train, test = folds != f, folds == f
        if not test.any():
            continue
        t = fit_temperature(scores[train], labels[train]) if train.any() else DEFAULT_TEMPERATURE
        temperatures.append(t)
        fitted[test] = softmax(scores[test], t)
    default = softmax(scores, DEFAULT_TEMPERATURE)
    return {
        "default_temperature": DEFAULT_TEMPERATURE,
        "cross_fitted_temperatures": temperatures,
        "fitted_temperature_all": fit_temperature(scores, labels),
        "ece_default": expected_calibration_error(labels, default, bins),
        "ece_calibrated": expected_calibration_error(labels, fitted, bins),
        "nll_default": negative_log_likelihood(labels, default),
        "nll_calibrated": negative_log_likelihood(labels, fitted),
        "reliability_default": reliability_table(labels, default, bins),
        "reliability_calibrated": reliability_table(labels, fitted, bins),
    }
