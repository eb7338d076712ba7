"""The scoring rule as a score matrix: every labelled original against its sources' resyntheses.

The engine's rule (engine.attribute.Plan's references, engine.aggregate's one aggregation) on
precomputed features: each variant gathers just the (query, reference) pairs that count, in float64,
instead of a store round trip per query. Calibration (engine.fitting) and evaluation score with it;
tests/test_evaluation.py proves it reproduces Workspace.attribute prediction by prediction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.aggregate import DEFAULT_AGGREGATION, DEFAULT_REFERENCES, MISSING, aggregate_masked  # noqa: F401

DISTANCES = ("cosine", "euclidean")


@dataclass(frozen=True)
class Variant:
    """One way of turning a query's resyntheses into per-source scores."""

    layer: str = "final"
    distance: str = "cosine"
    aggregation: str = DEFAULT_AGGREGATION
    per_source: int = DEFAULT_REFERENCES  # references compared per source (the engine's `references`)
    fewshot: bool = False  # also use every *other* labelled original of a source as its reference

    @property
    def name(self) -> str:
        text = f"{self.layer}/{self.distance}/{self.aggregation}/K={self.per_source}"
        return text + ("+refs" if self.fewshot else "")


def similarity(queries: np.ndarray, references: np.ndarray, distance: str) -> np.ndarray:
    """Larger is closer: cosine similarity, or minus the euclidean distance."""
    if distance == "cosine":
        return queries @ references.T
    if distance == "euclidean":
        squared = (queries ** 2).sum(1)[:, None] + (references ** 2).sum(1)[None, :] - 2 * queries @ references.T
        return -np.sqrt(np.maximum(squared, 0.0))
    raise ValueError(f"unknown distance {distance!r} (choose from {', '.join(DISTANCES)})")


def _paired(queries: np.ndarray, references: np.ndarray, distance: str) -> np.ndarray:
    """queries (n, d) against references (n, sources, K, d), each query with its own references."""
    dots = np.einsum("nd,nckd->nck", queries, references)
    return _from_dots(dots, (queries ** 2).sum(1)[:, None, None], (references ** 2).sum(-1), distance)


def _shared(queries: np.ndarray, references: np.ndarray, distance: str) -> np.ndarray:
    """queries (n, d) against references (sources, W, d) shared by every query."""
    dots = np.einsum("nd,cwd->ncw", queries, references)
    return _from_dots(dots, (queries ** 2).sum(1)[:, None, None], (references ** 2).sum(-1)[None], distance)


def _from_dots(dots: np.ndarray, q2: np.ndarray, r2: np.ndarray, distance: str) -> np.ndarray:
    if distance == "cosine":
        return dots
    if distance == "euclidean":
        return -np.sqrt(np.maximum(q2 + r2 - 2 * dots, 0.0))
    raise ValueError(f"unknown distance {distance!r} (choose from {', '.join(DISTANCES)})")


def padded_references(references: list[list[np.ndarray]], per_source: int) -> np.ndarray:
    """(originals, sources, K) resynthesis indices, -1 where a source offers fewer than K."""
    sources = len(references[0]) if references else 0
    out = np.full((len(references), sources, per_source), -1, dtype=np.int64)
    for i, per in enumerate(references):
        for c, idx in enumerate(per):
            take = idx[:per_source]
            out[i, c, :len(take)] = take
    return out


def score_matrix(originals: np.ndarray, resyntheses: np.ndarray, references: list[list[np.ndarray]],
                 variant: Variant, orig_source: np.ndarray | None = None, train: np.ndarray | None = None,
                 rows: np.ndarray | None = None, chunk: int = 256) -> np.ndarray:
    """(len(rows), sources) scores. With `variant.fewshot`, the originals in `train` (default: all)
    of each source join its references; a query never references itself (leave-one-out)."""
    rows = np.arange(len(originals)) if rows is None else np.asarray(rows)
    originals, resyntheses = np.asarray(originals, np.float64), np.asarray(resyntheses, np.float64)
    sources = len(references[0]) if references else 0
    padded = padded_references([references[i] for i in rows], variant.per_source)
    if variant.fewshot:
        assert orig_source is not None, "variant.fewshot needs orig_source"
        pool = np.arange(len(originals)) if train is None else np.asarray(train)
        members = [pool[orig_source[pool] == c] for c in range(sources)]
        width = max((len(m) for m in members), default=0)
        ref_index = np.full((sources, width), -1, dtype=np.int64)
        for c, m in enumerate(members):
            ref_index[c, :len(m)] = m
    out = np.empty((len(rows), sources))
    for start in range(0, len(rows), chunk):
        block = rows[start:start + chunk]
        idx = padded[start:start + chunk]
        # only the pairs that count: (block, sources, K) gathered references, not a full query x set product
        values = _paired(originals[block], resyntheses[np.maximum(idx, 0)], variant.distance)
        mask = idx >= 0
        if variant.fewshot and width:
            extra = _shared(originals[block], originals[np.maximum(ref_index, 0)], variant.distance)
            extra_mask = (ref_index[None] >= 0) & (ref_index[None] != block[:, None, None])
            values = np.concatenate([values, extra], axis=2)
            mask = np.concatenate([mask, extra_mask], axis=2)
        out[start:start + chunk] = aggregate_masked(values, mask, variant.aggregation)
    return out


def neighbour_score_matrix(originals: np.ndarray, resyntheses: np.ndarray, res_source: np.ndarray,
                           orig_hash: list[str], res_hash: list[str], sources: int, neighbours: int,
                           aggregation: str, references: list[list[np.ndarray]] | None = None,
                           per_source: int = 0, chunk: int = 256) -> np.ndarray:
    """The engine's dataset mode (Workspace.neighbours): each original's `neighbours` nearest resyntheses of
    any description (never its own bytes), aggregated per source. With `references` (EvalSet.references())
    it is the combined mode: those neighbours joined with the first `per_source` resyntheses of the
    original's own description, each counted once. A source with none of either: MISSING."""
    originals, resyntheses = np.asarray(originals, np.float64), np.asarray(resyntheses, np.float64)
    res_source = np.asarray(res_source)
    by_hash: dict[str, list[int]] = {}
    for j, h in enumerate(res_hash):
        by_hash.setdefault(h, []).append(j)
    out = np.empty((len(originals), sources))
    for start in range(0, len(originals), chunk):
        sims = originals[start:start + chunk] @ resyntheses.T
        for i in range(len(sims)):
            sims[i, by_hash.get(orig_hash[start + i], [])] = -np.inf
        k = min(neighbours, sims.shape[1])
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        mask = np.zeros(sims.shape, bool)
        np.put_along_axis(mask, top, True, axis=1)
        if references is not None:
            for i in range(len(sims)):
                for idx in references[start + i]:
                    mask[i, idx[:per_source]] = True
        mask &= np.isfinite(sims)
        for c in range(sources):
            columns = res_source == c
            out[start:start + chunk, c] = aggregate_masked(sims[:, columns], mask[:, columns], aggregation)
    return out


def dataset_score_matrix(originals: np.ndarray, resyntheses: np.ndarray, res_source: np.ndarray,
                         orig_hash: list[str], res_hash: list[str], sources: int, neighbours: int,
                         aggregation: str, chunk: int = 256) -> np.ndarray:
    """The engine's dataset mode: see neighbour_score_matrix."""
    return neighbour_score_matrix(originals, resyntheses, res_source, orig_hash, res_hash, sources, neighbours,
                                  aggregation, chunk=chunk)


def adaptive_score_matrix(originals: np.ndarray, resyntheses: np.ndarray, references: list[list[np.ndarray]],
                          variant: Variant, budget: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """The engine's adaptive resynthesis (Workspace.resynthesize_adaptive) on a set whose references are
    ordered by seed: every source starts with its first reference; while more than one source scores
    within `margin` of the best, each of those gets its next one, up to `budget` per source.
    Returns the final scores and the generations each query cost (references used)."""
    originals, resyntheses = np.asarray(originals, np.float64), np.asarray(resyntheses, np.float64)
    sources = len(references[0]) if references else 0
    out = np.full((len(originals), sources), MISSING)
    cost = np.zeros(len(originals), np.int64)
    for i, per_source in enumerate(references):
        sims = [originals[i] @ resyntheses[idx[:budget]].T if len(idx) else np.zeros(0) for idx in per_source]
        used = np.array([min(1, len(s)) for s in sims])
        for _ in range(budget - 1):
            scores = np.array([aggregate_masked(s[None, :u], np.ones((1, u), bool), variant.aggregation)[0]
                               if u else MISSING for s, u in zip(sims, used)])
            best = scores.max()
            close = [c for c in range(sources) if np.isfinite(scores[c]) and best - scores[c] <= margin]
            grow = [c for c in close if used[c] < len(sims[c])]
            if len(close) <= 1 or not grow:
                break
            used[grow] += 1
        out[i] = [aggregate_masked(s[None, :u], np.ones((1, u), bool), variant.aggregation)[0] if u else MISSING
                  for s, u in zip(sims, used)]
        cost[i] = used.sum()
    return out, cost
