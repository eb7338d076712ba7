"""Unknown sources and calibrated confidence: what `resynth calibrate` fits on labelled originals.

* Open-set scores (`OPEN_SET_SCORES`): ways to say "none of the enrolled sources made this image".
  Each is a value per query (larger = more like a known source) turned into a decision by a threshold
  fitted on correctly attributed known originals: one per predicted source (a "margin" score) or one
  for all. "mahalanobis" (the default) also needs the references' shared precision (`fit_mahalanobis`).
* Temperature: the softmax temperature minimising a smoothed negative log-likelihood (`fit_temperature`).

How well each does is measured by cross-fitting, each source left out in turn: engine.crossfit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.calibration import shared_precision, whitening
from engine.metrics import softmax

FALSE_REJECT = 0.05
TEMPERATURES = np.exp(np.linspace(np.log(1e-6), np.log(10.0), 500))
DENSITY_K = 5  # neighbours of the kNN density over a source's references

# name -> (needs the features, threshold per predicted source, what it is)
OPEN_SET_SCORES = {
    "margin": (False, True, "best per-source score (the engine's aggregation) against the predicted "
                            "source's own threshold"),
    "best-score": (False, False, "best per-source score against one threshold for every source"),
    "max-similarity": (True, False, "best similarity to any single remaining reference of the query, "
                                    "one threshold"),
    "knn-density": (True, False, f"mean similarity to the {DENSITY_K} nearest of all references (every "
                                 "description) of the predicted source, one threshold"),
    "knn-density-margin": (True, True, f"mean similarity to the {DENSITY_K} nearest references of the "
                                       "predicted source against that source's own threshold"),
    "mahalanobis": (True, False, "best over sources of minus the squared Mahalanobis distance to the mean of "
                                 "the query's candidate references of that source, one shrunk covariance of "
                                 "the enrolled sources' references around their own means, one threshold"),
}
# Measured (leave-one-source-out, cross-fitted, mean AUROC over left-out sources; 13 cells = 5 sets x the
# zoo CLIP's middle block and final layer, plus a trained DINOv2-small on 3 of them, as in
# scripts/bench_modes.py: zoo 12/8/1 descriptions, heldout_gans one-description and labels; the evaluation's
# own score matrix and feature_context). Mean over sets, each set's mean over its features:
#   mahalanobis 0.847, best-score 0.818, max-similarity 0.809, knn-density 0.807, margin 0.778,
#   knn-density-margin 0.771. One-description real-weight GAN set: mahalanobis 0.637 / 0.625 / 0.784
#   (CLIP middle / final / DINOv2) against best-score 0.638 / 0.598 / 0.703; labels GAN set 0.641 / 0.619 /
#   0.798 against 0.594 / 0.587 / 0.701; the zoo sets 0.970-0.992 against 0.938-0.988. "mahalanobis" is the
#   best or within 0.001 of it in every cell, and better by a paired bootstrap 95% interval with DINOv2 on
#   all three sets (+0.06 to +0.10); it never reaches 0.8 on the one-description set (0.784 at best).
# "mahalanobis" is therefore the default: `resynth calibrate` fits its precision matrix and threshold
# (runner.fit_calibration, fit_mahalanobis) and the engine applies it to the query's vector and the
# references it compared it with (engine.calibration.mahalanobis_open_set), with "best-score"
# thresholds kept as the fallback of an older calibration.
DEFAULT_OPEN_SET_SCORE = "mahalanobis"
# the thresholds `resynth calibrate` keeps in Calibration.thresholds, applied where the default score has
# no value (an older calibration, an unreadable precision file): engine.fitting.fit_calibration
CALIBRATE_FALLBACK_SCORE = "best-score"


def score_definitions() -> dict[str, str]:
    """What each open-set score is, and which of them `resynth calibrate` fits (from the constants above,
    so the report cannot name another)."""
    role = {DEFAULT_OPEN_SET_SCORE: "the default: what `resynth calibrate` fits and `resynth attribute` applies",
            CALIBRATE_FALLBACK_SCORE: "`resynth calibrate` also fits it as the fallback where the default has "
                                      "no value"}
    return {n: v[2] + (f" ({role[n]})" if n in role else "") for n, v in OPEN_SET_SCORES.items()}


def false_reject_threshold(values: np.ndarray, frr: float) -> float:
    """The highest threshold (accept a value >= it) that rejects at most `frr` of `values`: the value at
    position floor(frr * n) in ascending order, so a genuine query is refused no more often than
    --false-reject promises on the originals it was fitted on (an interpolated quantile rejected 1 of 2,
    1 of 3, 2 of 30 at 5%). Ties are kept or rejected together; nan for no values.

    The threshold lies a hair below that value (a millionth of it, at most half way to the next lower one), never
    on it: attribute recomputes a query's value (float32 features, the precision matrix as saved) and an
    original exactly on the threshold came out 5e-8 lower and was refused (1 of 15 at 5%). Half the gap moved
    cross-fitted figures by up to 0.03 AUROC; a hair moves none."""
    ordered = np.sort(np.asarray(values, np.float64).ravel())
    if not ordered.size:
        return float("nan")
    at = min(int(np.floor(frr * ordered.size + 1e-9)), ordered.size - 1)
    chosen = float(ordered[at])
    if not np.isfinite(chosen):
        return chosen
    margin = 1e-6 * max(1.0, abs(chosen))
    below = float(ordered[at - 1]) if at > 0 else -np.inf
    if np.isfinite(below) and below < chosen:
        margin = min(margin, (chosen - below) / 2)
    return chosen - margin


def fit_thresholds(scores: np.ndarray, labels: np.ndarray, frr: float = FALSE_REJECT) -> dict[int, float]:
    """Per predicted class: the `frr` threshold (false_reject_threshold) of the best score over its correctly
    attributed queries."""
    predicted, best = scores.argmax(1), scores.max(1)
    out = {}
    for c in range(scores.shape[1]):
        hits = best[(predicted == c) & (labels == c) & np.isfinite(best)]
        if hits.size:
            out[c] = false_reject_threshold(hits, frr)
    return out


def fit_open_set_thresholds(scores: np.ndarray, labels: np.ndarray, names: list[str],
                            score: str = "best-score", frr: float = FALSE_REJECT) -> dict[str, float]:
    """Per source name, the threshold on its best score that applies `score` through
    engine.calibration.Calibration.thresholds (accept source s only if its score >= thresholds[s]).

    "margin": each source's own `frr` threshold (fit_thresholds); "best-score": one `frr` threshold over
    every correctly attributed original, the same for every source. Feature-based scores cannot be
    expressed as thresholds on the score matrix and raise ValueError."""
    if score == "margin":
        return {names[c]: t for c, t in fit_thresholds(scores, labels, frr).items()}
    if score == "best-score":
        predicted, best = scores.argmax(1), scores.max(1)
        hits = best[(predicted == np.asarray(labels)) & np.isfinite(best)]
        return {n: false_reject_threshold(hits, frr) for n in names} if hits.size else {}
    raise ValueError(f"open-set score {score!r} is not a threshold on the best score (use margin or best-score)")


def fit_mahalanobis(context: FeatureContext, scores: np.ndarray, labels: np.ndarray,
                    frr: float = FALSE_REJECT) -> tuple[np.ndarray, float | None]:
    """What a Calibration needs to apply "mahalanobis" (Calibration.open_set): the shared precision over
    every enrolled source's references, and one threshold, the `frr` threshold (false_reject_threshold) over the
    correctly attributed labelled originals (None when none is), as "best-score" fits its own."""
    keep = list(range(scores.shape[1]))
    _, _, groups = _mahalanobis_parts(context)
    precision = shared_precision([members for _, members in groups])
    values = mahalanobis_scores(context, keep)
    hits = values[(np.asarray(scores).argmax(1) == np.asarray(labels)) & np.isfinite(values)]
    return precision, false_reject_threshold(hits, frr) if hits.size else None


def acceptance_margin(scores: np.ndarray, thresholds: dict[int, float]) -> np.ndarray:
    """Best score minus its predicted source's threshold: below 0 means "unknown source"."""
    predicted, best = scores.argmax(1), scores.max(1)
    floor = np.array([thresholds.get(int(c), -np.inf) for c in predicted])
    return best - floor


@dataclass
class FeatureContext:
    """What the feature-based open-set scores need beyond the score matrix (all per original query)."""

    candidate_sims: np.ndarray  # (n, sources, K) similarity to each of its candidate references, -inf none
    density: np.ndarray  # (n, sources) mean similarity to the DENSITY_K nearest references of each source
    # "mahalanobis": unit query vectors, and per source the distinct candidate sets (reference groups)
    queries: np.ndarray | None = None  # (n, dim)
    group_of: np.ndarray | None = None  # (n, sources) index into groups of the query's candidates, -1 none
    groups: list[tuple[int, np.ndarray]] | None = None  # (source, (members, dim) unit reference vectors) per
    # distinct candidate set


def _mahalanobis_parts(context: FeatureContext) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    """The context's queries, group_of and groups, which the "mahalanobis" score needs."""
    if context.queries is None or context.group_of is None or context.groups is None:
        raise ValueError("the mahalanobis score needs a FeatureContext from feature_context()")
    return context.queries, context.group_of, context.groups


def feature_context(originals: np.ndarray, resyntheses: np.ndarray, res_source: np.ndarray,
                    candidates: np.ndarray, orig_ids: np.ndarray | None = None, res_ids: np.ndarray | None = None,
                    sources: int | None = None, k: int = DENSITY_K, chunk: int = 1024) -> FeatureContext:
    """`candidates`: (n, sources, K) resynthesis indices the engine compares query i with (-1 none), as
    scoring.padded_references gives; `orig_ids`/`res_ids`: file identities (equal ids = the same bytes,
    never a reference of that query). Cosine similarity on L2-normalised vectors, in query chunks."""
    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    q, r = unit(originals), unit(resyntheses)
    candidates, res_source = np.asarray(candidates), np.asarray(res_source)
    n = len(q)
    sources = candidates.shape[1] if sources is None else sources
    cand = np.full(candidates.shape, -np.inf)
    density = np.full((n, sources), -np.inf)
    members = [np.flatnonzero(res_source == c) for c in range(sources)]
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        sims = q[rows] @ r.T
        if orig_ids is not None and res_ids is not None:
            sims = np.where(np.asarray(orig_ids)[rows, None] == np.asarray(res_ids)[None], -np.inf, sims)
        idx = candidates[rows]
        cand[rows] = np.where(idx >= 0, np.take_along_axis(sims, np.maximum(idx, 0).reshape(len(idx), -1), 1)
                              .reshape(idx.shape), -np.inf)
        for c, m in enumerate(members):
            if not len(m):
                continue
            top = -np.sort(-sims[:, m], axis=1)[:, :k]
            kept = np.isfinite(top)
            density[rows, c] = np.where(kept.any(1), np.where(kept, top, 0).sum(1) / np.maximum(kept.sum(1), 1),
                                        -np.inf)
    group_of, groups = reference_groups(candidates, r)
    return FeatureContext(cand, density, q, group_of, groups)


def reference_groups(candidates: np.ndarray,
                     references: np.ndarray) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Per source, the distinct sets of references the queries are compared with (a description's
    resyntheses), and which set is each query's: what the "mahalanobis" score takes means over."""
    n, sources = candidates.shape[:2]
    group_of = np.full((n, sources), -1, dtype=np.int64)
    groups: list[tuple[int, np.ndarray]] = []
    seen: dict[tuple[int, tuple[int, ...]], int] = {}
    for c in range(sources):
        for i in range(n):
            members = tuple(sorted(int(j) for j in candidates[i, c] if j >= 0))
            if not members:
                continue
            if (c, members) not in seen:
                seen[(c, members)] = len(groups)
                groups.append((c, references[list(members)]))
            group_of[i, c] = seen[(c, members)]
    return group_of, groups


def mahalanobis_scores(context: FeatureContext, keep: list[int]) -> np.ndarray:
    """(n,) the "mahalanobis" value with only `keep` enrolled: the covariance is fitted on the kept
    sources' references alone, so a left-out source never shapes it."""
    unit_queries, group_of, groups = _mahalanobis_parts(context)
    kept = [g for g, (c, _) in enumerate(groups) if c in keep]
    if not kept:
        return np.full(len(unit_queries), -np.inf)
    lower = whitening(shared_precision([groups[g][1] for g in kept]))
    queries = unit_queries @ lower
    means = np.stack([g[1].mean(0) for g in groups]) @ lower
    out = np.full(len(queries), -np.inf)
    for c in keep:
        rows = np.flatnonzero(group_of[:, c] >= 0)
        distance = ((queries[rows] - means[group_of[rows, c]]) ** 2).sum(1)
        out[rows] = np.maximum(out[rows], -distance)
    return out

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


