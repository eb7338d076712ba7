"""Library API behind `resynth evaluate` and `resynth calibrate`: features in, report or calibration out."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.embed import Embedder
from engine.errors import UserError
from engine.evaluation import perturb as px
from engine.evaluation import plots
from engine.evaluation import report as rp
from engine.evaluation.features import layer_embedders
from engine.fitting import embed_evalset, engine_scores, fit_calibration  # noqa: F401  (the method's calibration)
from engine.labelled import EvalSet, FeatureCache, embed_paths
from engine.evaluation.protocol import run_protocol


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
             draws: int = 5, seed: int = 0, progress: bool = True, real: list[str] | None = None) -> dict:
    """Embed, run the protocol, write report.json, report.md and the plots into `out`. `real`: paths of
    camera images (a manifest's rows of role "real"): their false-positive rate is reported."""
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
    if real:
        report["real_images"] = real_section(features[primary], base, real, cache_dir, seed, progress)
    report["embedder"] = {label: e.identity for label, e in embedders.items()}
    report["notes"] = ["figures come from the data evaluated; on the tiny random model zoo they show the "
                       "machinery works, not how real generators separate"]
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plots.write_all(report, out)
    rp.write(report, out)
    return rp.json_safe(report)


def real_section(features: tuple[np.ndarray, np.ndarray], base: Embedder, real: list[str], cache_dir: Path,
                 seed: int, progress: bool) -> dict:
    """The real-image figures (engine.evaluation.realimages) on the primary layer."""
    from engine.evaluation.realimages import real_image_figures
    from engine.openset import FALSE_REJECT
    from index.keys import sha256_file

    cache = FeatureCache(cache_dir, base.identity)
    vectors = embed_paths(base, real, [sha256_file(Path(p)) for p in real], cache, label="embedding (real)",
                          progress=progress)
    return real_image_figures(*features, vectors, FALSE_REJECT, seed)


def evaluate_workspace(ws, manifest, out="resynth-eval", layers=("base", "final", "mid"), perturb: str | None = None,
                       draws: int = 5, seed: int = 0) -> dict:
    """The evaluation protocol on a labelled manifest with a workspace's embedder (what
    `Workspace.evaluate` was): report.json etc. in `out`."""
    from engine.labelled import from_manifest
    from engine.manifest import real_rows

    return evaluate(from_manifest(Path(manifest)), ws.embedder, Path(out), list(layers), perturb, draws, seed,
                    progress=ws.progress, real=[str(r.image) for r in real_rows(Path(manifest))])
