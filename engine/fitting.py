"""Calibration: a temperature, the open-set decision and per-source thresholds, fitted on labelled
originals scored by the engine's own rule (engine.scoring) in the mode it will attribute with.

`calibrate` fits on a workspace's store (or a manifest embedded with its embedder) and saves the
result in the store; the evaluation protocol (engine.evaluation) measures with the same functions.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.calibration import Calibration, save_array_atomic
from engine.crossfit import calibration_report, leave_one_source_out
from engine.errors import UserError
from engine.labelled import EvalSet, FeatureCache, against_store, embed_paths, from_manifest, from_store
from engine.metrics import json_safe
from engine.openset import (CALIBRATE_FALLBACK_SCORE, DEFAULT_OPEN_SET_SCORE, FALSE_REJECT, OPEN_SET_SCORES,
                            FeatureContext, feature_context, fit_mahalanobis, fit_open_set_thresholds,
                            fit_temperature)
from engine.options import Options
from engine.scoring import Variant, neighbour_score_matrix, padded_references, score_matrix

if TYPE_CHECKING:
    from engine.embed import Embedder
    from engine.workspace import Workspace


def calibrate(ws: "Workspace", manifest: str | os.PathLike | None = None, options: Options | None = None,
              false_reject: float = 0.05, strict: bool = False) -> Calibration:
    """Fit on labelled originals (the store's own, or a manifest's embedded with the store's embedder)
    and save the calibration in the store.

    A manifest's sources must all be the store's (a threshold for a source the store does not have
    would never apply, and its originals would shape the others'): otherwise one UserError naming them.
    Originals that cannot be scored are skipped, or refused with `strict`; `notes["used"]` says what
    was used and what was skipped, and why."""
    options = options or Options()
    if not 0 < false_reject < 1:
        raise UserError(f"--false-reject is a fraction between 0 and 1, not {false_reject:g} (5% is 0.05)")
    store_names = {s.name for s in ws.store.sources()}
    if manifest is not None:
        # originals without resyntheses in the manifest are kept: the store may have theirs
        evalset, fitted_on = from_manifest(Path(manifest), strict=False, keep_lonely=True), str(manifest)
        stored_spelling(evalset, store_names)
        check_sources(evalset, store_names, str(manifest), ws.root)  # before any embedding
        embedder = ws.embedder
        originals = embed_paths(embedder, evalset.orig_path, evalset.orig_hash, FeatureCache(None, embedder.identity),
                                progress=False)
        # scored against the store's resyntheses, what attribute compares with (in combined and dataset modes
        # the whole pool shapes every score); the manifest's own only when the store has none of its descriptions
        pooled = against_store(evalset, originals, ws.store, strict)
        if pooled is not None:
            evalset, features = pooled
            references = "store"
        else:  # the manifest's own pool: its originals without resyntheses there are skipped (or refused)
            evalset = from_manifest(Path(manifest), strict)
            stored_spelling(evalset, store_names)
            features = embed_evalset(evalset, {"store": embedder}, None, progress=False)["store"]
            references = "manifest"
    else:
        evalset, fitted_on = from_store(ws.store, strict), f"store {ws.root}"
        features = evalset.vectors[ws.store.embedder_identity]
        references = "store"
    variant = Variant("store", "cosine", options.aggregation, options.references)
    calibration, precision = fit_calibration(evalset, features, variant, false_reject, fitted_on,
                                             options.mode, options.neighbours)
    calibration.notes["store_sources"] = {s.name: s.fingerprint for s in ws.store.sources()}  # to notice changes
    calibration.notes["references_from"] = references  # whose resyntheses the originals were scored against
    calibration.notes["used"] = json_safe({**evalset.usage(), "text": evalset.usage_text(),
                                           "store_sources_not_fitted": sorted(store_names - set(evalset.sources))})
    if precision is not None:  # dim x dim: a file beside store.json, named by its content
        calibration.open_set["precision_file"] = save_array_atomic(ws.root, precision)
    if manifest is not None:  # its camera images (role "real"), if any, fit the "real" verdict
        fit_real(ws, Path(manifest), features, calibration, false_reject)
    ws.store.update_config(calibration=calibration.to_dict())
    return calibration


def fit_real(ws: "Workspace", manifest: Path, features: tuple[np.ndarray, np.ndarray], calibration: Calibration,
             false_reject: float) -> None:
    """The "real" rule from the manifest's real rows, against its generated images (engine.calibration):
    their vectors go to a content-named file in the store, the threshold and measured shares to
    `calibration.real`. Nothing when the manifest has no real rows."""
    from engine.calibration import REAL_K, fit_real_threshold, real_values
    from engine.manifest import real_rows
    from index.keys import sha256_file

    rows = real_rows(manifest)
    if not rows:
        return
    if len(rows) < 2:
        raise UserError(f"{manifest}: one real image cannot be measured leave-one-out: give at least 2")
    cache = FeatureCache(None, ws.embedder.identity)
    real = embed_paths(ws.embedder, [str(r.image) for r in rows], [sha256_file(r.image) for r in rows], cache,
                       label="embedding (real)", progress=False)
    generated = np.concatenate(features)
    fitted = fit_real_threshold(real_values(features[0], real, generated), real_values(real, real, generated),
                                false_reject)
    calibration.real = json_safe({**fitted, "k": REAL_K, "references": len(rows),
                                  "references_file": save_array_atomic(ws.root, real)})


def stored_spelling(evalset: EvalSet, store_names: set[str]) -> None:
    """A manifest's source names are read in NFC (engine.manifest); a store may hold one in another Unicode form
    (a macOS folder name, ingested before): the set's name becomes the store's, as ingest maps it."""
    import unicodedata

    forms = {unicodedata.normalize("NFC", name): name for name in sorted(store_names)}
    evalset.sources = [forms.get(name, name) for name in evalset.sources]


def check_sources(evalset: EvalSet, store_names: set[str], where: str, store_root) -> None:
    """One UserError line naming the labelled set's sources that the store does not have."""
    foreign = sorted(set(evalset.sources) - store_names)
    if foreign:
        raise UserError(f"{where}: source(s) {', '.join(foreign)} are not in store {store_root} (it has "
                        f"{', '.join(sorted(store_names)) or 'no sources'}): calibrate on a manifest of the "
                        f"store's own sources, or add them with `resynth source add`")


def embed_evalset(evalset: EvalSet, embedders: dict[str, Embedder], cache_dir: Path | None,
                  progress: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(originals, resyntheses) vectors per layer label; each image embedded once per layer, cached."""
    out = {}
    for label, embedder in embedders.items():
        if embedder.identity in evalset.vectors:
            out[label] = evalset.vectors[embedder.identity]
            continue
        cache = FeatureCache(cache_dir, embedder.identity)
        paths, hashes = evalset.orig_path + evalset.res_path, evalset.orig_hash + evalset.res_hash
        vectors = embed_paths(embedder, paths, hashes, cache, label=f"embedding ({label})", progress=progress)
        out[label] = (vectors[:evalset.n_originals], vectors[evalset.n_originals:])
    return out


def open_set_context(evalset: EvalSet, originals: np.ndarray, resyntheses: np.ndarray, references,
                     per_source: int) -> FeatureContext:
    """The feature-based open-set scores' inputs: each original's similarity to its own candidate
    references (the engine's K per source), and to the nearest of every source's references."""
    ids: dict[str, int] = {}
    orig_ids = np.array([ids.setdefault(h, len(ids)) for h in evalset.orig_hash], np.int64)
    res_ids = np.array([ids.setdefault(h, len(ids)) for h in evalset.res_hash], np.int64)
    return feature_context(originals, resyntheses, evalset.res_source, padded_references(references, per_source),
                           orig_ids, res_ids, len(evalset.sources))


def engine_scores(evalset: EvalSet, features: tuple[np.ndarray, np.ndarray], variant: Variant,
                  mode: str = "resynthesis", neighbours: int = 32) -> np.ndarray:
    """The score matrix the engine's rule gives in `mode` (resynthesis, dataset or combined)."""
    originals, resyntheses = features
    if mode == "resynthesis":
        return score_matrix(originals, resyntheses, evalset.references(), variant, orig_source=evalset.orig_source)
    return neighbour_score_matrix(originals, resyntheses, evalset.res_source, evalset.orig_hash, evalset.res_hash,
                                  len(evalset.sources), neighbours, variant.aggregation,
                                  evalset.references() if mode == "combined" else None, variant.per_source)


def without_sources(evalset: EvalSet, features: tuple[np.ndarray, np.ndarray],
                    keep: list[int]) -> tuple[EvalSet, tuple[np.ndarray, np.ndarray]]:
    """The labelled set with only the sources `keep` enrolled (in that order): the others' resyntheses gone,
    so that they fill no nearest-neighbour slot; every original stays, the left-out source's too."""
    from dataclasses import replace

    rows = np.flatnonzero(np.isin(evalset.res_source, keep))
    column = {c: k for k, c in enumerate(keep)}
    position = np.full(len(evalset.res_hash), -1)
    position[rows] = np.arange(len(rows))
    subset = replace(evalset, sources=[evalset.sources[c] for c in keep],
                     orig_source=np.array([column.get(int(c), -1) for c in evalset.orig_source]),
                     res_source=np.array([column[int(c)] for c in evalset.res_source[rows]], np.int64),
                     res_desc=evalset.res_desc[rows], res_seed=evalset.res_seed[rows],
                     res_original=evalset.res_original[rows], res_hash=[evalset.res_hash[j] for j in rows],
                     res_path=[evalset.res_path[j] for j in rows], vectors={})
    return subset, (features[0], features[1][rows])


def fit_calibration(evalset: EvalSet, features: tuple[np.ndarray, np.ndarray], variant: Variant,
                    frr: float = FALSE_REJECT, fitted_on: str = "", mode: str = "resynthesis",
                    neighbours: int = 32) -> tuple[Calibration, np.ndarray | None]:
    """Temperature, the open-set decision and per-source thresholds from every labelled original, scored in
    the mode the engine will attribute with, with the measured figures (cross-fitted ECE,
    leave-one-source-out AUROC) in `notes`. Returns the calibration and, when the open-set score is
    "mahalanobis", its precision matrix (dim x dim: the store keeps it in a file beside its config)."""
    labels, names = evalset.orig_source, evalset.sources
    scores = engine_scores(evalset, features, variant, mode, neighbours)
    # per-source thresholds on the best score: the fallback where the feature-based score has no value
    thresholds = fit_open_set_thresholds(scores, labels, names, CALIBRATE_FALLBACK_SCORE, frr)
    temperature = fit_temperature(scores, labels)
    measured = calibration_report(scores, labels, evalset.orig_desc)
    # dataset mode compares no resyntheses of the query's description, which "mahalanobis" takes its means
    # over (engine.compare.open_set_value): it never applies there, so the fallback is fitted and reported
    headline = CALIBRATE_FALLBACK_SCORE if mode == "dataset" else DEFAULT_OPEN_SET_SCORE
    context = (open_set_context(evalset, *features, evalset.references(), variant.per_source)
               if OPEN_SET_SCORES[headline][0] else None)
    rescore = (None if mode == "resynthesis" else
               lambda keep: engine_scores(*without_sources(evalset, features, keep), variant, mode, neighbours))
    open_set = leave_one_source_out(scores, labels, evalset.orig_desc, names, frr, context=context,
                                    headline=headline, rescore=rescore) if len(names) >= 2 else None
    precision, open_set_fit = None, {}
    if headline == "mahalanobis":
        assert context is not None  # "mahalanobis" needs the features: OPEN_SET_SCORES says so
        precision, threshold = fit_mahalanobis(context, scores, labels, frr)
        if threshold is not None:
            open_set_fit = {"score": DEFAULT_OPEN_SET_SCORE, "threshold": threshold}
    notes = {"fitted_on": fitted_on, "originals": evalset.n_originals, "sources": names,
             "open_set_score": open_set_fit.get("score", CALIBRATE_FALLBACK_SCORE), "mode": mode,
             "neighbours": neighbours, "original_refs": 0,
             "aggregation": variant.aggregation, "per_source": variant.per_source, "distance": variant.distance,
             "false_reject_target": frr,
             "accuracy": float((scores.argmax(1) == labels).mean()),
             "ece_default": measured["ece_default"], "ece_calibrated": measured["ece_calibrated"],
             "open_set_auroc": open_set["auroc"] if open_set else None,
             "without_threshold": sorted(set(names) - set(thresholds))}
    return Calibration(temperature=temperature, thresholds=thresholds, fitted=True, notes=json_safe(notes),
                       open_set=open_set_fit), (precision if open_set_fit else None)
