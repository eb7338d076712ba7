"""Library API behind `resynth evaluate` and `resynth calibrate`: features in, report or calibration out."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.calibration import Calibration
from engine.embed import Embedder
from engine.errors import UserError
from engine.evaluation import perturb as px
from engine.evaluation import plots
from engine.evaluation import report as rp
from engine.evaluation.dataset import EvalSet
from engine.evaluation.features import FeatureCache, embed_paths, layer_embedders
from engine.evaluation.openset import (DEFAULT_OPEN_SET_SCORE, FALSE_REJECT, calibration_report,
                                       fit_open_set_thresholds, fit_temperature, leave_one_source_out)
from engine.evaluation.protocol import run_protocol
from engine.evaluation.scoring import Variant, neighbour_score_matrix, score_matrix


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


def embed_perturbed(evalset: EvalSet, embedder: Embedder, perturbations: list[tuple[str, float]],
                    cache_dir: Path | None, progress: bool = True) -> dict[str, np.ndarray]:
    """The originals' vectors after each post-processing (queries only; references stay clean)."""
    out = {}
    for kind, strength in perturbations:
        name = px.label(kind, strength)
        cache = FeatureCache(cache_dir, embedder.identity, name)
        out[name] = embed_paths(embedder, evalset.orig_path, evalset.orig_hash, cache, px.transform(kind, strength),
                                label=f"embedding ({name})", progress=progress)
    return out


def evaluate(evalset: EvalSet, base: Embedder, out: Path, layers: list[str], perturb: str | None = None,
             draws: int = 5, seed: int = 0, progress: bool = True) -> dict:
    """Embed, run the protocol, write report.json, report.md and the plots into `out`."""
    if draws < 1:
        raise UserError("--draws must be at least 1")
    perturbations = px.parse_perturbations(perturb)  # a bad spec fails before any embedding
    out = Path(out)
    cache_dir = out / "features"
    embedders = layer_embedders(base, layers)
    primary = "final" if base.spec.layer is None else f"block{base.spec.layer}"
    embedders = {primary: base, **{k: v for k, v in embedders.items() if k != primary}}
    features = embed_evalset(evalset, embedders, cache_dir, progress)
    perturbed = embed_perturbed(evalset, base, perturbations, cache_dir, progress)
    report = run_protocol(evalset, features, primary, perturbed or None, draws=draws, seed=seed, progress=progress)
    report["embedder"] = {label: e.identity for label, e in embedders.items()}
    report["notes"] = ["figures come from the data evaluated; on the tiny random model zoo they show the "
                       "machinery works, not how real generators separate"]
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plots.write_all(report, out)
    rp.write(report, out)
    return rp.json_safe(report)


def engine_scores(evalset: EvalSet, features: tuple[np.ndarray, np.ndarray], variant: Variant,
                  mode: str = "resynthesis", neighbours: int = 32) -> np.ndarray:
    """The score matrix the engine's rule gives in `mode` (resynthesis, dataset or combined)."""
    originals, resyntheses = features
    if mode == "resynthesis":
        return score_matrix(originals, resyntheses, evalset.references(), variant, orig_source=evalset.orig_source)
    return neighbour_score_matrix(originals, resyntheses, evalset.res_source, evalset.orig_hash, evalset.res_hash,
                                  len(evalset.sources), neighbours, variant.aggregation,
                                  evalset.references() if mode == "combined" else None, variant.per_source)


def fit_calibration(evalset: EvalSet, features: tuple[np.ndarray, np.ndarray], variant: Variant,
                    frr: float = FALSE_REJECT, fitted_on: str = "", mode: str = "resynthesis",
                    neighbours: int = 32) -> tuple[Calibration, np.ndarray | None]:
    """Temperature, the open-set decision and per-source thresholds from every labelled original, scored in
    the mode the engine will attribute with, with the measured figures (cross-fitted ECE,
    leave-one-source-out AUROC) in `notes`. Returns the calibration and, when the open-set score is
    "mahalanobis", its precision matrix (dim x dim: the store keeps it in a file beside its config)."""
    from engine.evaluation.openset import OPEN_SET_SCORES, fit_mahalanobis
    from engine.evaluation.protocol import open_set_context

    labels, names = evalset.orig_source, evalset.sources
    scores = engine_scores(evalset, features, variant, mode, neighbours)
    # per-source thresholds on the best score: the fallback where the feature-based score has no value
    thresholds = fit_open_set_thresholds(scores, labels, names, "best-score", frr)
    temperature = fit_temperature(scores, labels)
    measured = calibration_report(scores, labels, evalset.orig_desc)
    context = (open_set_context(evalset, *features, evalset.references(), variant.per_source)
               if OPEN_SET_SCORES[DEFAULT_OPEN_SET_SCORE][0] else None)
    open_set = leave_one_source_out(scores, labels, evalset.orig_desc, names, frr, context=context,
                                    headline=DEFAULT_OPEN_SET_SCORE) if len(names) >= 2 else None
    precision, open_set_fit = None, {}
    if DEFAULT_OPEN_SET_SCORE == "mahalanobis":
        precision, threshold = fit_mahalanobis(context, scores, labels, frr)
        if threshold is not None:
            open_set_fit = {"score": "mahalanobis", "threshold": threshold}
    notes = {"fitted_on": fitted_on, "originals": evalset.n_originals, "sources": names,
             "open_set_score": open_set_fit.get("score", "best-score"), "mode": mode, "neighbours": neighbours,
             "aggregation": variant.aggregation, "per_source": variant.per_source, "distance": variant.distance,
             "false_reject_target": frr,
             "accuracy": float((scores.argmax(1) == labels).mean()),
             "ece_default": measured["ece_default"], "ece_calibrated": measured["ece_calibrated"],
             "open_set_auroc": open_set["auroc"] if open_set else None,
             "without_threshold": sorted(set(names) - set(thresholds))}
    return Calibration(temperature=temperature, thresholds=thresholds, fitted=True, notes=rp.json_safe(notes),
                       open_set=open_set_fit), (precision if open_set_fit else None)
