"""How the K similarities between a query and one source's resyntheses become that source's score."""
from __future__ import annotations

import numpy as np

AGGREGATIONS = ("max", "mean", "knn", "softmax")
# Defaults chosen by `resynth evaluate` on the tiny zoo (README, "Method variants"): more
# resyntheses per source helped most (K=1/2/3: 92.9/97.8/99.2%), and mean-like aggregation beat max.
DEFAULT_AGGREGATION = "knn"
DEFAULT_PER_SOURCE = 3  # K: resyntheses generated per source for a new description (the cost)
DEFAULT_REFERENCES = 64  # stored resyntheses compared per source (the evidence): generous, never K
KNN_K = 3  # neighbours averaged by "knn"
SOFTMAX_TEMPERATURE = 0.05  # on cosine similarities, which live in [-1, 1]


MISSING = -np.inf  # a source with no reference for a query cannot win it


def aggregate(similarities: np.ndarray, method: str = "max") -> float:
    """Max (best match), mean, mean of the top-3 (kNN), or a softmax-weighted mean: `aggregate_masked`
    on one row, so the engine and the score matrices share one implementation."""
    sims = np.asarray(similarities, dtype=np.float64).ravel()
    if sims.size == 0:
        raise ValueError("no similarities to aggregate")
    return float(aggregate_masked(sims[None], np.ones((1, sims.size), bool), method)[0])


def aggregate_masked(values: np.ndarray, mask: np.ndarray, method: str) -> np.ndarray:
    """The aggregation over the last axis, vectorised; entries outside `mask` do not exist.

    Rows with no entry get MISSING.
    """
    count = mask.sum(axis=-1)
    present = np.where(mask, values, -np.inf)
    best = present.max(axis=-1, initial=-np.inf)
    if method == "max":
        out = best
    elif method == "mean":
        out = np.where(mask, values, 0.0).sum(axis=-1) / np.maximum(count, 1)
    elif method == "knn":
        top = -np.sort(-present, axis=-1)[..., :KNN_K]
        kept = np.isfinite(top)
        out = np.where(kept, top, 0.0).sum(axis=-1) / np.maximum(kept.sum(axis=-1), 1)
    elif method == "softmax":
        with np.errstate(invalid="ignore"):
            weights = np.where(mask, np.exp((values - best[..., None]) / SOFTMAX_TEMPERATURE), 0.0)
            out = (weights * np.where(mask, values, 0.0)).sum(axis=-1) / np.maximum(weights.sum(axis=-1), 1e-300)
    else:
        raise ValueError(f"unknown aggregation {method!r} (choose from {', '.join(AGGREGATIONS)})")
    return np.where(count > 0, out, MISSING)
