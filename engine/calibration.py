"""Turning per-source scores into probabilities and an "unknown source" decision.

A store may carry a calibration (fitted on held-out data by `resynth calibrate`): a softmax
temperature, one open-set threshold shared by every source (`open_set`, the default) and per-source score
thresholds as its fallback. Without one, probabilities use a default
temperature and are marked uncalibrated, and no query is ever called unknown. A calibration that does
not apply to a query (stale, or fitted with another mode or aggregation) is treated as none (`applying`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from engine.options import Options

DEFAULT_TEMPERATURE = 0.01  # cosine scores differ in the second decimal; 1.0 would be near-uniform
# Options a calibration is fitted with (its notes) that change the scores it thresholds: a query run with
# another value is scored on another scale, so the fitted temperature and thresholds do not apply to it.
# (notes key, the Options field, the flag that sets it, how a sentence names a value, the value of a
# calibration that does not record it: calibrate has always fitted on resyntheses alone, so original_refs 0;
# the modes whose scores it changes: --neighbours is how many stored references a dataset or combined score
# is taken over, --references how many of the description's resyntheses a resynthesis or combined one is)
FITTED_WITH = (("mode", "mode", "--mode", "in {} mode", None, None),
               ("aggregation", "aggregation", "--aggregation", "with --aggregation {}", None, None),
               ("original_refs", "original_refs", "--original-refs", "with --original-refs {}", 0, None),
               ("neighbours", "neighbours", "--neighbours", "with --neighbours {}", None, ("dataset", "combined")),
               ("per_source", "references", "--references", "with --references {}", None,
                ("resynthesis", "combined")))


@dataclass
class Calibration:
    temperature: float = DEFAULT_TEMPERATURE
    thresholds: dict[str, float] = field(default_factory=dict)  # accept source s only if its score >= this
    fitted: bool = False
    notes: dict = field(default_factory=dict)  # what it was fitted on, and its measured figures
    # A feature-based open-set score, when one is applied instead of `thresholds`: {"score": "mahalanobis",
    # "threshold": float, "precision_file": name of the .npy of shared_precision in the store}. Empty: none.
    open_set: dict = field(default_factory=dict)
    # The "real" (not generated) rule, when real camera images were given to `resynth calibrate`:
    # {"threshold", "k", "references_file" (their vectors, a .npy in the store), "references", "measured"}.
    real: dict = field(default_factory=dict)
    # Why a fitted calibration does not apply to this query (set by `applying`, never stored): the
    # probabilities then come from the default temperature and no threshold is applied.
    why_not: str | None = None

    @classmethod
    def from_dict(cls, data: dict | None) -> "Calibration":
        if not data:
            return cls()
        return cls(float(data.get("temperature", DEFAULT_TEMPERATURE)),
                   {k: float(v) for k, v in data.get("thresholds", {}).items()},
                   bool(data.get("fitted", False)), dict(data.get("notes", {})), dict(data.get("open_set", {})),
                   dict(data.get("real", {})))

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("why_not")  # per query, not part of what was fitted
        return out

    def applying(self, stale: str | None, options: "Options | None" = None) -> "Calibration":
        """This calibration, for a query run with `options`, if it applies to it;
        else the uncalibrated rule (default temperature, no threshold, `fitted` False) saying why in
        `why_not`: a stale calibration, or one fitted with another option of FITTED_WITH (mode, aggregation,
        number of neighbours or of references), whose temperature and thresholds were measured on another
        scale of scores."""
        if not self.fitted:
            return self
        why = stale
        for key, attr, flag, text, unrecorded, modes in FITTED_WITH if why is None and options is not None else ():
            fitted, asked = self.notes.get(key, unrecorded), getattr(options, attr, None)
            if modes is not None and getattr(options, "mode", None) not in modes:
                continue
            if fitted is not None and asked is not None and fitted != asked:
                why = (f"calibrated {text.format(fitted)}; this query ran {text.format(asked)}: "
                       + (f"run `resynth calibrate` with {flag} {asked}" if key != "original_refs" else
                          "calibrate fits on resyntheses alone, so its thresholds do not apply here"))
                break
        return Calibration(why_not=why) if why else self

    def probabilities(self, scores: dict[str, float]) -> dict[str, float]:
        """Temperature-scaled softmax over the scored sources."""
        if not scores:
            return {}
        names = list(scores)
        logits = np.array([scores[n] for n in names], dtype=np.float64) / self.temperature
        weights = np.exp(logits - logits.max())
        return dict(zip(names, (weights / weights.sum()).tolist()))

    def is_unknown(self, source: str | None, score: float | None) -> bool:
        """True when the best source's score falls below that source's acceptance threshold, or is nan (a
        non-number, e.g. from an overflowing embedding, reaches no threshold: `nan < t` is False)."""
        if source is None or score is None:
            return True
        threshold = self.thresholds.get(source)
        return threshold is not None and not score >= threshold

    def is_unknown_value(self, value: float | None) -> bool | None:
        """With a feature-based open-set score fitted (`open_set`), True when the query's value of it (e.g.
        mahalanobis_open_set) falls below its threshold; None when no such score is fitted."""
        threshold = self.open_set.get("threshold") if self.fitted else None
        if threshold is None:
            return None
        return value is None or not np.isfinite(value) or value < float(threshold)


    def is_real(self, value: float | None) -> bool | None:
        """With a fitted "real" rule, True when the query's real_value exceeds its threshold; None without one."""
        threshold = self.real.get("threshold") if self.fitted else None
        if threshold is None or value is None or not np.isfinite(value):
            return None
        return bool(value > float(threshold))


def content_name(matrix: np.ndarray) -> str:
    """File name of an array named by its content: a config that names it can tell it was altered."""
    import hashlib

    data = np.ascontiguousarray(matrix, np.float32)
    return f"open-set-{hashlib.sha256(data.tobytes()).hexdigest()[:16]}.npy"


def save_array_atomic(folder, matrix: np.ndarray) -> str:
    """Write `matrix` (float32) under its content name in `folder`, atomically; returns the name."""
    import os
    from pathlib import Path

    data = np.ascontiguousarray(matrix, np.float32)
    name = content_name(data)
    target = Path(folder) / name
    tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, data, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    from index.sharing import share

    share(tmp)  # in a team's store folder: the group's to read, whatever this user's umask
    os.replace(tmp, target)
    return name


# --------------------------------------------------------------- the "mahalanobis" open-set score
# Measured best on leave-one-source-out (engine.crossfit): reference sets differ in spread and in
# which directions they vary, so a cosine to the nearest source rewards an unknown that sits in a diffuse
# source's cloud; one covariance of the references around their own (source, description) means weighs a
# query's offset by how references of one source and description actually vary.

def shared_precision(groups: list[np.ndarray]) -> np.ndarray:
    """Inverse of one Ledoit-Wolf-shrunk covariance of every reference around its group's mean.

    `groups`: (members, dim) L2-normalised reference vectors of one (source, description) each; groups
    of one vector carry no spread and are skipped. Without any spread at all, the identity (the score
    is then the squared Euclidean distance to the nearest group mean)."""
    from sklearn.covariance import LedoitWolf

    groups = [np.asarray(g, np.float64) for g in groups if len(g)]
    if not groups:
        raise ValueError("no reference vectors to fit a covariance on")
    deviations = [g - g.mean(0) for g in groups if len(g) > 1]
    if not deviations:
        return np.eye(groups[0].shape[1])
    covariance = LedoitWolf(assume_centered=True).fit(np.concatenate(deviations)).covariance_
    return np.linalg.pinv(covariance, hermitian=True)


def whitening(precision: np.ndarray) -> np.ndarray:
    """L with L @ L.T == precision (symmetric, PSD): (x @ L) - (m @ L) has the Mahalanobis norm of x - m,
    so many queries against many means cost one matrix product each, not one per pair."""
    w, v = np.linalg.eigh((precision + precision.T) / 2)
    return v * np.sqrt(np.clip(w, 0.0, None))


def mahalanobis_values(queries: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(n, groups) minus the squared Mahalanobis distance of each L2-normalised query to each group mean
    (larger = more like that source); NaN means (a source with no reference) give -inf."""
    lower = whitening(precision)
    qw = np.asarray(queries, np.float64) @ lower
    mw = np.asarray(means, np.float64) @ lower
    values = -((qw[:, None, :] - mw[None]) ** 2).sum(-1)
    return np.where(np.isfinite(values), values, -np.inf)


def mahalanobis_open_set(query: np.ndarray, references: dict[str, np.ndarray],
                         precision: np.ndarray) -> tuple[float, str | None]:
    """The open-set value of one query and the source that gives it: the best over sources of minus the
    squared Mahalanobis distance to the mean of the (L2-normalised) references the engine compared the
    query with for that source. Compare the value with Calibration.open_set["threshold"]."""
    names = [n for n, r in references.items() if len(r)]
    if not names:
        return -np.inf, None
    q = np.asarray(query, np.float64)
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    means = np.stack([_unit(references[n]).mean(0) for n in names])
    values = mahalanobis_values(q[None], means, precision)[0]
    best = int(values.argmax())
    return float(values[best]), names[best]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------- the "real" (not generated) rule
# A query is "real" when it is nearer the real references than the generated ones: the mean cosine to its
# REAL_K nearest real images minus the mean cosine to its REAL_K nearest stored generated images (any
# source, any description: resyntheses and labelled originals), above a threshold fitted so that at most
# `false_reject` of the labelled generated originals would be called real.
REAL_K = 3
SELF = 1 - 1e-6  # a reference this similar is the query's own image: no image is evidence for itself


def nearest_mean(queries: np.ndarray, references: np.ndarray, k: int = REAL_K,
                 exclude: np.ndarray | None = None) -> np.ndarray:
    """Per query, the mean cosine to its k nearest references (fewer when fewer remain), leaving out the
    pairs `exclude` marks (n, m) and any reference identical to the query; -inf with none left."""
    q, r = _unit(queries), _unit(references)
    if not len(r):
        return np.full(len(q), -np.inf)
    sims = q @ r.T
    mask = sims >= SELF if exclude is None else (exclude | (sims >= SELF))
    sims = np.where(mask, -np.inf, sims)
    top = -np.sort(-sims, axis=1)[:, :min(k, sims.shape[1])]
    finite = np.isfinite(top)
    count = finite.sum(1)
    total = np.where(finite, top, 0.0).sum(1)
    return np.where(count > 0, total / np.maximum(count, 1), -np.inf)


def real_values(queries: np.ndarray, real: np.ndarray, generated: np.ndarray, k: int = REAL_K,
                exclude_generated: np.ndarray | None = None) -> np.ndarray:
    """How much nearer each query is to the real references than to the generated ones (larger = more real)."""
    return nearest_mean(queries, real, k) - nearest_mean(queries, generated, k, exclude_generated)


def fit_real_threshold(generated_values: np.ndarray, real_values_: np.ndarray,
                       false_reject: float = 0.05) -> dict:
    """The threshold above which a query is called real: the (1 - false_reject) quantile of the labelled
    generated originals' values; with the measured shares (real images leave-one-out, in-sample for the
    generated ones, whose quantile it is)."""
    gen = np.asarray(generated_values, np.float64)
    gen = gen[np.isfinite(gen)]
    real = np.asarray(real_values_, np.float64)
    if not len(gen) or not len(real):
        raise ValueError("the real rule needs generated and real values")
    threshold = float(np.quantile(gen, 1 - false_reject, method="higher"))
    return {"threshold": threshold, "measured": {
        "real_images": int(len(real)), "generated_images": int(len(gen)),
        "real_called_real": float(np.mean(real > threshold)),
        "generated_called_real": float(np.mean(gen > threshold))}}
