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


def aggregate(similarities: np.ndarray, method: str = "max") -> float:
    """Max (best match), mean, mean of the top-3 (kNN), or a softmax-weighted mean."""
    sims = np.asarray(similarities, dtype=np.float64)
    if sims.size == 0:
        raise ValueError("no similarities to aggregate")
    if method == "max":
        return float(sims.max())
    if method == "mean":
        return float(sims.mean())
    if method == "knn":
        return float(np.sort(sims)[::-1][:KNN_K].mean())
    if method == "softmax":
        weights = np.exp((sims - sims.max()) / SOFTMAX_TEMPERATURE)
        return float((weights * sims).sum() / weights.sum())
    raise ValueError(f"unknown aggregation {method!r} (choose from {', '.join(AGGREGATIONS)})")
