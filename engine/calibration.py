"""Turning per-source scores into probabilities and an "unknown source" decision.

A store may carry a calibration (fitted on held-out data by `resynth calibrate`): a softmax
temperature and per-source acceptance thresholds. Without one, probabilities use a default
temperature and are marked uncalibrated, and no query is ever called unknown.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

DEFAULT_TEMPERATURE = 0.01  # cosine scores differ in the second decimal; 1.0 would be near-uniform


@dataclass
class Calibration:
    temperature: float = DEFAULT_TEMPERATURE
    thresholds: dict[str, float] = field(default_factory=dict)  # accept source s only if its score >= this
    fitted: bool = False
    notes: dict = field(default_factory=dict)  # what it was fitted on, and its measured figures

    @classmethod
    def from_dict(cls, data: dict | None) -> "Calibration":
        if not data:
            return cls()
        return cls(float(data.get("temperature", DEFAULT_TEMPERATURE)),
                   {k: float(v) for k, v in data.get("thresholds", {}).items()},
                   bool(data.get("fitted", False)), dict(data.get("notes", {})))

    def to_dict(self) -> dict:
        return asdict(self)

    def probabilities(self, scores: dict[str, float]) -> dict[str, float]:
        """Temperature-scaled softmax over the scored sources."""
        if not scores:
            return {}
        names = list(scores)
        logits = np.array([scores[n] for n in names], dtype=np.float64) / self.temperature
        weights = np.exp(logits - logits.max())
        return dict(zip(names, (weights / weights.sum()).tolist()))

    def is_unknown(self, source: str | None, score: float | None) -> bool:
        """True when the best source's score falls below that source's acceptance threshold."""
        if source is None or score is None:
            return True
        threshold = self.thresholds.get(source)
        return threshold is not None and score < threshold
