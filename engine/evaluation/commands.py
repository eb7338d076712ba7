"""Subcommands of this package, added to the `resynth` parser by engine.cli: `evaluate` and `calibrate`."""
from __future__ import annotations

import json
from pathlib import Path

from engine.errors import UserError
from engine.options import add_arguments


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
    add_arguments(p)  # the attribution options `resynth attribute` will use
    p.add_argument("--false-reject", type=float, default=0.05, metavar="RATE",
                   help="share of genuine queries a threshold may reject (default 0.05)")
    p.set_defaults(run=cmd_calibrate)


def _clip_arguments(p) -> None:
    p.add_argument("--clip-model", metavar="ARCH", help="open_clip architecture (default: the store's embedder)")
    p.add_argument("--clip-config", metavar="JSON", help="open_clip model config for a custom architecture")
    p.add_argument("--clip-checkpoint", metavar="FILE", help="CLIP checkpoint file")
    p.add_argument("--clip-layer", default="middle", metavar="{middle,final,N}",
                   help="features of the explicit embedder: middle block (default), final embedding or block N")


def _workspace(args, required: bool):
    """The store's workspace; None when no store is named, none exists, and none is required."""
    import engine
    from engine.workspace import store_path

    if not required and not args.store and not (store_path(None) / "store.json").exists():
        return None
    return engine.open(args.store, progress=not args.quiet)


def _emit(args, data, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def cmd_evaluate(args) -> None:
    from engine.evaluation.dataset import from_manifest
    from engine.evaluation.features import spec_from_args
    from engine.evaluation.report import summary
    from engine.evaluation.runner import evaluate

    evalset = from_manifest(Path(args.manifest))  # a bad manifest fails before any model loads
    spec = spec_from_args(args.clip_model, args.clip_config, args.clip_checkpoint, args.clip_layer)
    ws = _workspace(args, required=args.save_calibration or spec is None)
    try:
        if spec is not None:
            from engine.embed import Embedder

            base = Embedder(spec)
        elif ws is None:
            raise UserError("no embedder: pass --store DIR (its embedder) or --clip-model/--clip-config with "
                            "--clip-checkpoint")
        else:
            base = ws.embedder
        report = evaluate(evalset, base, Path(args.out), args.layers.split(","), args.perturb, args.draws,
                          args.seed, progress=not args.quiet)
        text = summary(report) + f"\nreport: {Path(args.out) / 'report.md'} (+ report.json, plots)"
        if args.save_calibration:
            if base.identity != ws.store.embedder_identity:
                raise UserError(f"cannot calibrate store {ws.root} (bound to {ws.store.embedder_identity}) with "
                                f"features of {base.identity}")
            text += "\n" + _calibration_line(ws, ws.calibrate(args.manifest))
    finally:
        if ws is not None:
            ws.close()
    _emit(args, report, text)


def _calibration_line(ws, calibration) -> str:
    notes = calibration.notes

    def figure(value) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) else "not measured"
    return (f"calibration saved to {ws.root}: temperature {calibration.temperature:.3g}, thresholds for "
            f"{len(calibration.thresholds)} sources; ECE {figure(notes.get('ece_default'))} -> "
            f"{figure(notes.get('ece_calibrated'))}; unknown-source AUROC {figure(notes.get('open_set_auroc'))}")


def cmd_calibrate(args) -> None:
    from engine.options import from_args

    options = from_args(args)
    with _workspace(args, required=True) as ws:
        calibration = ws.calibrate(args.manifest, options, args.false_reject)
        _emit(args, calibration.to_dict(), _calibration_line(ws, calibration))
