"""Steps 3 and 4 of a request: the stored references of a description, and the ranking of one query.

Functions of a Workspace; `engine.request` drives them. The calibration's open-set precision matrix
is read here (a file beside the store's config, named by its content).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

import numpy as np

from engine.attribute import Attribution, Candidates, Plan, Query, rank, verdict
from engine.calibration import Calibration, content_name, mahalanobis_open_set
from engine.errors import BudgetExceeded, OverBudget, SourceError
from index.errors import StoreInputError
from index.keys import normalise_description, sha256_text

if TYPE_CHECKING:
    from engine.provenance import Provenance
    from engine.workspace import Workspace

CLOSEST = 3  # stored references listed per scored source (`closest`), best first
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")


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


def neighbours_many(ws: "Workspace", vectors: np.ndarray, plan: Plan, file_hashes: list[str]) -> list[dict]:
    """`neighbours` of queries arriving together, found by one search call (Store.nearest_many)."""
    roles = ("resynthesis", "original") if plan.options.original_refs else ("resynthesis",)
    found = ws.store.nearest_many(np.asarray(vectors, np.float32), plan.options.neighbours,
                                  [s.id for s in plan.sources], roles, list(file_hashes))
    out: list[dict[str, list]] = []
    for hits in found:
        out.append({})
        for ref, _ in hits:
            out[-1].setdefault(ref.source, []).append(ref)
    return out


def mode_of(plan: Plan) -> str:
    """The mode a request runs in: the one asked for, except that combined mode over LoRAs of one base (with
    or without the base itself) runs as resynthesis. Such sources differ only in how they render a given
    description, so only resyntheses of the query's description separate them; stored neighbours of other
    descriptions add content-matched noise (docs/method.md, "LoRAs of one base": 51 against 45 of 72 right)."""
    kinds, paths = {s.kind for s in plan.sources}, {s.path for s in plan.sources}
    if plan.options.mode == "combined" and "lora" in kinds and kinds <= {"lora", "diffusers"} and len(paths) == 1:
        return "resynthesis"
    return plan.options.mode


def score(ws: "Workspace", query: Query, text: str, origin: str, vector: np.ndarray, plan: Plan,
          found: Candidates, counts: tuple[int, int, dict[str, str]] = (0, 0, {}),
          near: dict[str, list] | None = None, evidence_checks: bool = True) -> Attribution:
    """Rank the sources for one embedded query against its candidates (`near`: its `neighbours`, when
    the caller searched for a batch at once). `evidence_checks` False: the ranking alone, without the real
    verdict and the redraw of a file's recipe (adaptive generation's rounds only need the ranking, and a
    redraw there made the final answer report its own redraw as cached)."""
    started = time.perf_counter()
    store = ws.store
    per_source = plan.references(found, query.file_hash) if plan.options.mode != "dataset" else {}
    description_refs = dict(per_source)
    if mode_of(plan) != "resynthesis":
        for name, rows in (near if near is not None else neighbours(ws, vector, plan, query.file_hash)).items():
            seen = {r.vector_id for r in per_source.get(name, ())}
            per_source[name] = per_source.get(name, []) + [r for r in rows if r.vector_id not in seen]
    ids = np.array([r.vector_id for rows in per_source.values() for r in rows], np.int64)
    sums = {r.vector_id: r.checksum for rows in per_source.values() for r in rows}  # each vector checked
    sims, hits = store.search(np.asarray(vector, np.float32)[None, :], ids, sums)
    similarity = dict(zip(hits[0].tolist(), sims[0].tolist()))
    per_source = {name: [r for r in rows if r.vector_id in similarity]  # removed meanwhile: not evidence
                  for name, rows in per_source.items()}
    values = {name: np.array([similarity[r.vector_id] for r in rows]) for name, rows in per_source.items()}
    calibration, stale = ws.calibration, calibration_stale(ws)
    scores, unknown = rank(values, {n: len(r) for n, r in per_source.items()}, plan.options.aggregation,
                           calibration := calibration.applying(stale, plan.options))  # stale, other mode: none
    open_set = (open_set_value(ws, vector, {n: r for n, r in per_source.items() if r}, calibration, description_refs)
                if calibration.fitted and calibration.open_set and not stale and scores
                and not plan.options.original_refs else None)  # fitted on resyntheses alone
    answer, evidence = verdict(scores, calibration, stale, open_set)
    evidence["mode"] = mode_of(plan)
    unread = unreadable_rules(ws, calibration) if calibration.fitted and not stale and scores else []
    if unread:  # the rule falls back (or is left out) as for no file: said, not silent
        evidence["unread"] = unread
    real = (real_evidence(ws, vector, query.file_hash, plan, calibration)
            if evidence_checks and scores and calibration.fitted and calibration.real and not stale else None)
    if real is not None:  # the known/unknown decision stays stated beside it
        evidence["real"] = real
        if real["real"]:
            evidence["open_set_verdict"], answer = answer, "real"
    cached, generated, failed = counts
    if not scores and failed:  # nothing could be scored because sources failed: not an answer
        why = {message.removeprefix(f"source {name!r}: ") for name, message in failed.items()}  # said once
        if all(isinstance(message, OverBudget) for message in failed.values()):  # the user's limit, not theirs
            raise BudgetExceeded(f"no source could be scored within --max-cost: {'; '.join(sorted(why))} "
                                 f"({', '.join(sorted(failed))})")
        raise SourceError(", ".join(sorted(failed)), "; ".join(sorted(why)))
    predicted = scores[0].source if scores else None
    claim = provenance_claim(ws, query.provenance, predicted, {s.source for s in scores}) if evidence_checks else None
    if claim is not None:
        from engine.provenance import reproduce

        claim["reproduction"] = reproduce.check(ws, query, claim, vector, plan)
        claim["conclusion"] = reproduce.conclusion(claim, predicted)
        evidence["provenance"] = claim
    near = closest({s.source: [(similarity[r.vector_id], r.image_id) for r in per_source[s.source]]
                    for s in scores})
    ws._time("search", started)
    return Attribution(
        query=query.label, description=text, description_from=origin,
        predicted=predicted,
        margin=(scores[0].score - scores[1].score) if len(scores) > 1 else None,
        scores=scores, missing=sorted({s.name for s in plan.sources} - {x.source for x in scores}),
        unknown={"unknown": True, "known": False}.get(answer), calibrated=calibration.fitted and not stale,
        cached=cached, generated=generated,
        failed={k: v for k, v in failed.items() if k not in {x.source for x in scores}},
        degraded={k: v.removeprefix(f"source {k!r}: ") for k, v in failed.items() if k in {x.source for x in scores}},
        verdict=answer, evidence=evidence, provenance=provenance_dict(query.provenance), closest=near)


def provenance_dict(provenance: "Provenance | None") -> dict:
    """The query's provenance in its stable shape; for a query built without reading a file, the empty one."""
    from engine.provenance import Provenance

    if provenance is None:
        provenance = Provenance(notes=("no file was read for this query",))
    return provenance.to_dict()


def closest(similarities: dict[str, list[tuple[float, int]]], n: int = CLOSEST) -> dict[str, list[dict]]:
    """Per source, its n most similar scored references as {image_id, similarity}, best first, from the
    (similarity, image id) pairs scoring computed: no search and no catalog read (the references carry
    their image ids)."""
    return {name: [{"image_id": int(image_id), "similarity": round(float(sim), 6)}
                   for sim, image_id in sorted(pairs, key=lambda p: (-p[0], p[1]))[:n]]
            for name, pairs in similarities.items()}


def reference_file(store, image_id: int) -> Path | None:
    """The file of a stored image (a resynthesis or a labelled original) by its image id, or None when
    there is no such image or its file is gone. The path comes from the catalog, never from the caller:
    an HTTP client names an id, and only files the store records can be answered."""
    if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)) or not 0 < int(image_id) < 2 ** 63:
        return None
    return store.image_file(int(image_id))


def provenance_claim(ws: "Workspace", provenance: "Provenance | None", predicted: str | None,
                     scored: set[str]) -> dict | None:
    """What the file's metadata claims about its model, matched against the enrolled sources:
    {claims, enrolled, by, agrees}, or None when the metadata names no model (`score` adds the redraw
    from the file's recipe, `reproduction`, and a one-sentence `conclusion`). `agrees` compares the
    claimed source with the resynthesis ranking's best (null when the claim names no enrolled source,
    or one this request did not score); the ranking is never changed by it."""
    meta = provenance.metadata if provenance is not None else None
    if meta is None or not (meta.model_name or meta.model_hash):
        return None
    enrolled, by = match_source(ws.sources(), meta.model_name, meta.model_hash)
    agrees = None if enrolled is None or predicted is None or enrolled not in scored else enrolled == predicted
    return {"claims": meta.model_name or meta.model_hash, "enrolled": enrolled, "by": by, "agrees": agrees}


def model_stem(model_name: str) -> str:
    """A metadata model name without folders and weight-file suffix, lower case ("SDXL/base.safetensors" -> "base")."""
    name = PureWindowsPath(PurePosixPath(model_name.strip()).name).name.lower()
    for suffix in MODEL_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def match_source(sources, model_name: str | None, model_hash: str | None) -> tuple[str | None, str | None]:
    """(enrolled source name, "name" or "hash") the metadata's model names, or (None, None).

    By name (case-insensitive): a source named as the model (with or without folders and suffix), else
    the longest source name contained in the model's name, else a source whose name contains the model's
    (at least 4 characters). By hash, when no name matches: the A1111 short hash (the first 10 hex digits
    of the weight file's SHA-256, AutoV2) equal to the prefix of a source's fingerprint or, for a
    single-file checkpoint source, of its file's SHA-256 (hashed once per process)."""
    if model_name:
        full, stem = model_name.strip().lower(), model_stem(model_name)
        names = {s.name.lower(): s.name for s in sources}
        for key in (full, stem):
            if key in names:
                return names[key], "name"
        inside = sorted((n for n in names if n and n in stem), key=len, reverse=True)
        if inside:
            return names[inside[0]], "name"
        around = sorted((n for n in names if len(stem) >= 4 and stem in n), key=len)
        if around:
            return names[around[0]], "name"
    digest = (model_hash or "").strip().lower()
    if len(digest) >= 8 and all(c in "0123456789abcdef" for c in digest):
        for s in sources:
            if s.fingerprint.lower().startswith(digest):
                return s.name, "hash"
        from index.filehash import file_sha256

        for s in sources:
            if s.kind == "single-file" and s.path:
                try:
                    if file_sha256(Path(s.path)).startswith(digest):
                        return s.name, "hash"
                except OSError:
                    continue
    return None, None


_REAL_FILES: dict[tuple[str, str], np.ndarray | None] = {}
_REAL_LOCK = threading.Lock()


def real_references(store, name: str) -> np.ndarray | None:
    """The real references' vectors a calibration names (read once per store and name); None if the file is
    gone, altered (its name is its content's hash) or of another dimension."""
    key = (str(store.root), name)
    with _REAL_LOCK:
        if key in _REAL_FILES:
            return _REAL_FILES[key]
    try:
        matrix = np.load(store.root / PurePosixPath(name).name, allow_pickle=False)
        ok = content_name(matrix) == PurePosixPath(name).name and matrix.ndim == 2 and matrix.shape[1] == store.dim
    except Exception:  # missing, truncated, not an array: no real verdict
        ok, matrix = False, None
    with _REAL_LOCK:
        _REAL_FILES[key] = matrix if ok else None
    return _REAL_FILES[key]


def real_evidence(ws: "Workspace", vector: np.ndarray, file_hash: str, plan: Plan,
                  calibration: Calibration) -> dict | None:
    """The calibrated "real" rule for one query (engine.calibration): {real, value, threshold, nearest_real,
    nearest_generated, k}, or None when its references file is unusable or nothing generated is stored."""
    from engine.calibration import REAL_K, nearest_mean

    rule = calibration.real
    real = real_references(ws.store, str(rule.get("references_file", "")))
    if real is None:
        return None
    k = int(rule.get("k", REAL_K))
    found = ws.store.nearest(np.asarray(vector, np.float32), k, [s.id for s in plan.sources],
                             ("resynthesis", "original"), file_hash)
    if not found:
        return None
    generated = float(np.mean([sim for _, sim in found]))
    nearest_real = float(nearest_mean(np.asarray(vector, np.float64)[None], real, k)[0])
    value = nearest_real - generated
    return {"real": bool(calibration.is_real(value)), "value": round(value, 6),
            "threshold": round(float(rule["threshold"]), 6), "nearest_real": round(nearest_real, 6),
            "nearest_generated": round(generated, 6), "k": k}


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


def unreadable_rules(ws: "Workspace", calibration: Calibration) -> list[str]:
    """The fitted rules whose file beside store.json is missing, damaged or unreadable to this user, each
    with what answers instead (read once per process and name: cheap per query)."""
    out = []
    rule = calibration.open_set
    precision = rule.get("precision_file") if rule.get("score") == "mahalanobis" else None
    if precision and ws.precision.get(str(precision)) is None:
        out.append(f"{precision} (the open-set rule: the score thresholds decided instead)")
    references = calibration.real.get("references_file") if calibration.real else None
    if references and real_references(ws.store, str(references)) is None:
        out.append(f"{references} (the real-image rule: no real verdict)")
    return out


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
