"""Steps 3 and 4 of a request: the stored references of a description, and the ranking of one query.

Functions of a Workspace; `engine.request` drives them. The calibration's open-set precision matrix
is read here (a file beside the store's config, named by its content).
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from engine.attribute import Attribution, Candidates, Plan, Query, rank, verdict
from engine.calibration import Calibration, content_name, mahalanobis_open_set
from engine.errors import SourceError
from index.errors import StoreInputError
from index.keys import normalise_description, sha256_text

if TYPE_CHECKING:
    from engine.workspace import Workspace


def candidates(ws: "Workspace", text: str, plan: Plan) -> Candidates:
    """The stored references of `text` under `plan` (resyntheses, and labelled originals if asked)."""
    started = time.perf_counter()
    store = ws.store
    digest = sha256_text(normalise_description(text))
    description_id = store.find_description_id(text)
    ids = [s.id for s in plan.sources]
    rows = store.resyntheses(description_id, ids) if description_id else []
    found = Candidates(dict(plan.select(rows, digest)))
    if plan.options.original_refs:
        for row in store.originals(ids, plan.options.original_refs + 1):  # +1: the query may be one
            found.originals.setdefault(row.source, []).append(row)
    ws._time("lookup", started)
    return found


def neighbours(ws: "Workspace", vector: np.ndarray, plan: Plan, file_hash: str) -> dict[str, list]:
    """Per source, its references among the query's nearest stored vectors (any description): the
    zero-generation answer of the dataset search."""
    roles = ("resynthesis", "original") if plan.options.original_refs else ("resynthesis",)
    found = ws.store.nearest(vector, plan.options.neighbours, [s.id for s in plan.sources], roles, file_hash)
    out: dict[str, list] = {}
    for ref, _ in found:
        out.setdefault(ref.source, []).append(ref)
    return out


def score(ws: "Workspace", query: Query, text: str, origin: str, vector: np.ndarray, plan: Plan,
          found: Candidates, counts: tuple[int, int, dict[str, str]] = (0, 0, {})) -> Attribution:
    """Rank the sources for one embedded query against its candidates."""
    started = time.perf_counter()
    store = ws.store
    per_source = plan.references(found, query.file_hash) if plan.options.mode != "dataset" else {}
    description_refs = dict(per_source)
    if plan.options.mode in ("dataset", "combined"):
        for name, rows in neighbours(ws, vector, plan, query.file_hash).items():
            seen = {r.vector_id for r in per_source.get(name, ())}
            per_source[name] = per_source.get(name, []) + [r for r in rows if r.vector_id not in seen]
    ids = np.array([r.vector_id for rows in per_source.values() for r in rows], np.int64)
    sims, hits = store.search(np.asarray(vector, np.float32)[None, :], ids)
    similarity = dict(zip(hits[0].tolist(), sims[0].tolist()))
    per_source = {name: [r for r in rows if r.vector_id in similarity]  # removed meanwhile: not evidence
                  for name, rows in per_source.items()}
    values = {name: np.array([similarity[r.vector_id] for r in rows]) for name, rows in per_source.items()}
    calibration, stale = ws.calibration, calibration_stale(ws)
    scores, unknown = rank(values, {n: len(r) for n, r in per_source.items()}, plan.options.aggregation, calibration)
    open_set = (open_set_value(ws, vector, {n: r for n, r in per_source.items() if r}, calibration, description_refs)
                if calibration.fitted and calibration.open_set and not stale and scores
                and not plan.options.original_refs else None)  # fitted on resyntheses alone
    answer, evidence = verdict(scores, calibration, stale, open_set)
    ws._time("search", started)
    cached, generated, failed = counts
    if not scores and failed:  # nothing could be scored because sources failed: not an answer
        raise SourceError(", ".join(sorted(failed)), "; ".join(sorted(set(failed.values()))))
    return Attribution(
        query=query.label, description=text, description_from=origin,
        predicted=scores[0].source if scores else None,
        margin=(scores[0].score - scores[1].score) if len(scores) > 1 else None,
        scores=scores, missing=sorted({s.name for s in plan.sources} - {x.source for x in scores}),
        unknown=answer == "unknown", calibrated=calibration.fitted and not stale, cached=cached,
        generated=generated, failed={k: v for k, v in failed.items() if k not in {x.source for x in scores}},
        verdict=answer, evidence=evidence)


def calibration_stale(ws: "Workspace") -> str | None:
    """Why the stored calibration no longer applies (sources added or removed since), or None."""
    calibration = ws.calibration
    fitted_on = calibration.notes.get("store_sources") if calibration.fitted else None
    if fitted_on is None:
        return None
    now = {s.name: s.fingerprint for s in ws.sources()}
    # a list of names (older calibrations), or name -> fingerprint: a source re-added under the same
    # name with another model is a change too
    same = set(now) == set(fitted_on) if isinstance(fitted_on, list) else now == fitted_on
    if not same:
        return "calibration is stale (sources changed since `resynth calibrate`): run it again"
    return None


class PrecisionFile:
    """The open-set precision matrix a calibration names, read once per name (None if gone or altered)."""

    def __init__(self, store):
        self.store = store  # its root and dim are read at each use (a re-embed changes dim)
        self._lock = threading.Lock()
        self._kept: tuple[str | None, np.ndarray | None] = (None, None)

    def get(self, name: str) -> np.ndarray | None:
        with self._lock:
            if self._kept[0] == name:
                return self._kept[1]
        path = self.store.root / name
        try:
            matrix = np.load(path, allow_pickle=False)
            ok = path.name == content_name(matrix) and matrix.shape == (self.store.dim, self.store.dim)
        except Exception:  # missing, empty, truncated, not an array: untrusted, the fallback decides
            ok, matrix = False, None
        matrix = matrix if ok else None
        with self._lock:
            self._kept = (name, matrix)
        return matrix


def open_set_value(ws: "Workspace", vector: np.ndarray, per_source: dict[str, list], calibration: Calibration,
                   description_refs: dict[str, list]) -> float | None:
    """The calibrated feature-based open-set value of a query ("mahalanobis"), or None without one.
    Means are taken over each source's resyntheses of the query's description, what the calibration
    was fitted on; sources with none (dataset neighbours only, chosen for being close to the query,
    would flatter it) are left out, and with none at all there is no value."""
    name = calibration.open_set.get("precision_file") if calibration.open_set.get("score") == "mahalanobis" else None
    precision = ws.precision.get(name) if name else None
    if precision is None:
        return None
    refs = {source: rows for source, rows in description_refs.items() if rows and source in per_source}
    if not refs:
        return None
    store = ws.store
    ids = np.array([r.vector_id for rows in refs.values() for r in rows], np.int64)
    try:
        matrix = dict(zip(ids.tolist(), store.vectors(ids)))
    except StoreInputError:  # removed meanwhile
        present = store.present(ids)
        matrix = dict(zip(present.tolist(), store.vectors(present)))
    vectors = {source: np.array([matrix[r.vector_id] for r in rows if r.vector_id in matrix])
               for source, rows in refs.items()}
    value, _ = mahalanobis_open_set(np.asarray(vector, np.float32), vectors, precision)
    return value
