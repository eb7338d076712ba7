"""Subcommands of this package, added to the `resynth` parser by engine.cli: `evaluate` and `calibrate`."""
from __future__ import annotations

import json
from pathlib import Path

from engine.aggregate import AGGREGATIONS, DEFAULT_AGGREGATION, DEFAULT_PER_SOURCE
from engine.errors import UserError



def register(sub, common) -> None:
    """Add this package's subparsers to `sub`; `common` is the parent parser with --store/--json/--quiet."""
    p = sub.add_parser(
        "evaluate", parents=[common], help="measure the method on a labelled manifest (tables and plots)",
        description="Attribute every original of a labelled manifest (the `resynth ingest` format) leave-one-out "
                    "against the manifest's resyntheses, with every method variant, the few-shot baselines, "
                    "unknown-source rejection, calibration and (with --perturb) robustness. Writes report.json, "
                    "report.md and PNG plots to --out. Generates nothing; features are cached in --out.")
    p.add_argument("manifest")
    p.add_argument("--out", default="resynth-eval", help="output folder (default ./resynth-eval)")
    _clip_arguments(p)
    p.add_argument("--layers", default="base,final,mid",
                   help="feature layers to compare: final, mid (middle block), block numbers, base (the "
                        "embedder's own); comma-separated (default base,final,mid)")
    p.add_argument("--perturb", nargs="?", const="all", metavar="LIST",
                   help="post-process the queries: all (default when given), or e.g. jpeg,resize=0.5,blur "
                        "(kinds: jpeg, webp, resize, crop, blur)")
    p.add_argument("--draws", type=int, default=5, help="random draws per k for the few-shot baselines (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot draws (default 0)")
    p.add_argument("--save-calibration", action="store_true",
                   help="also fit the engine default's calibration and write it to --store")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser(
        "calibrate", parents=[common], help="fit probabilities and unknown-source thresholds for a store",
        description="Fit a softmax temperature and per-source acceptance thresholds on labelled originals (the "
                    "store's own, or MANIFEST's, embedded with the store's embedder) and save them in the store: "
                    "`resynth attribute` then reports calibrated probabilities and `unknown: true` for a query "
                    "below its best source's threshold.")
    p.add_argument("manifest", nargs="?", help="labelled manifest (default: the originals stored in the store)")
    p.add_argument("--per-source", type=int, default=DEFAULT_PER_SOURCE, metavar="K",
                   help=f"resyntheses per source, as `resynth attribute` will use (default {DEFAULT_PER_SOURCE})")
    p.add_argument("--aggregation", default=DEFAULT_AGGREGATION, choices=AGGREGATIONS,
                   help=f"aggregation, as `resynth attribute` will use (default {DEFAULT_AGGREGATION})")
    p.add_argument("--false-reject", type=float, default=0.05, metavar="RATE",
                   help="share of genuine queries a threshold may reject (default 0.05)")
    p.set_defaults(run=cmd_calibrate)


def _clip_arguments(p) -> None:
    p.add_argument("--clip-model", metavar="ARCH", help="open_clip architecture (default: the store's embedder)")
    p.add_argument("--clip-config", metavar="JSON", help="open_clip model config for a custom architecture")
    p.add_argument("--clip-checkpoint", metavar="FILE", help="CLIP checkpoint file")
    p.add_argument("--clip-layer", default="middle", metavar="{middle,final,N}",
                   help="features of the explicit embedder: middle block (default), final embedding or block N")


def _store(args, required: bool):
    from engine.workspace import store_path
    from index.store import Store

    path = store_path(args.store)
    if not required and not args.store and not (path / "store.json").exists():
        return None
    return Store.open(path)


def _embedder(args, store):
    from engine.embed import Embedder
    from engine.evaluation.features import spec_from_args
    from engine.workspace import load_embedder

    spec = spec_from_args(args.clip_model, args.clip_config, args.clip_checkpoint, args.clip_layer)
    if spec is not None:
        return Embedder(spec)
    if store is None:
        raise UserError("no embedder: pass --store DIR (its embedder) or --clip-model/--clip-config with "
                        "--clip-checkpoint")
    return load_embedder(store)


def _emit(args, data, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def cmd_evaluate(args) -> None:
    from engine.evaluation.dataset import from_manifest
    from engine.evaluation.openset import FALSE_REJECT
    from engine.evaluation.protocol import ENGINE_DEFAULT
    from engine.evaluation.report import summary
    from engine.evaluation.runner import evaluate

    evalset = from_manifest(Path(args.manifest))
    explicit = bool(args.clip_model or args.clip_config or args.clip_checkpoint)
    store = _store(args, required=args.save_calibration or not explicit)
    try:
        base = _embedder(args, store)
        report = evaluate(evalset, base, Path(args.out), args.layers.split(","), args.perturb, args.draws,
                          args.seed, progress=not args.quiet)
        text = summary(report) + f"\nreport: {Path(args.out) / 'report.md'} (+ report.json, plots)"
        if args.save_calibration:
            text += "\n" + _save_calibration(store, base, evalset, args.manifest, ENGINE_DEFAULT.aggregation,
                                              ENGINE_DEFAULT.per_source, FALSE_REJECT,
                                              Path(args.out) / "features")
    finally:
        if store is not None:
            store.close()
    _emit(args, report, text)


def _save_calibration(store, embedder, evalset, fitted_on: str, aggregation: str, per_source: int,
                      frr: float, cache_dir: Path | None = None) -> str:
    from engine.evaluation.runner import embed_evalset, fit_calibration
    from engine.evaluation.scoring import Variant

    if embedder.identity != store.embedder_identity:
        raise UserError(f"cannot calibrate store {store.root} (bound to {store.embedder_identity}) with features "
                        f"of {embedder.identity}")
    if per_source < 1:
        raise UserError("--per-source must be at least 1")
    if not 0 < frr < 1:
        raise UserError("--false-reject must be between 0 and 1")
    features = embed_evalset(evalset, {"store": embedder}, cache_dir, progress=False)
    calibration = fit_calibration(evalset, features["store"], Variant("store", "cosine", aggregation, per_source),
                                  frr, fitted_on)
    store.update_config(calibration=calibration.to_dict())
    notes = calibration.notes
    return (f"calibration saved to {store.root}: temperature {calibration.temperature:.3g}, thresholds for "
            f"{len(calibration.thresholds)} sources; ECE {notes['ece_default']:.3f} -> {notes['ece_calibrated']:.3f}"
            + (f", unknown-source AUROC {notes['open_set_auroc']:.3f}" if notes.get("open_set_auroc") else ""))


def cmd_calibrate(args) -> None:
    from engine.calibration import Calibration
    from engine.evaluation.dataset import from_manifest, from_store

    with _store(args, required=True) as store:
        if args.manifest:
            from engine.workspace import load_embedder

            evalset, embedder, fitted_on = from_manifest(Path(args.manifest)), load_embedder(store), args.manifest
        else:
            evalset, fitted_on = from_store(store), f"store {store.root}"
            embedder = _StoredOnly(store.embedder_identity)
        text = _save_calibration(store, embedder, evalset, fitted_on, args.aggregation, args.per_source,
                                 args.false_reject)
        data = Calibration.from_dict(store.config["calibration"]).to_dict()
    _emit(args, data, text)


class _StoredOnly:
    """Stands in for an embedder when every vector comes from the store (nothing to embed)."""

    def __init__(self, identity: str):
        self.identity = identity
