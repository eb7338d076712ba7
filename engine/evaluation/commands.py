"""Subcommands of this package, added to the `resynth` parser by engine.cli: `evaluate` and `calibrate`."""
from __future__ import annotations

import json
from pathlib import Path

from engine.errors import UserError
from engine.flags import add_clip_arguments
from engine.labelled import few_originals_text
from engine.options import add_arguments
from engine.errors import plural

STRICT_HELP = ("refuse the whole manifest when an original cannot be scored (its description has no "
               "resyntheses); by default such originals are skipped and counted in the output")


def register(sub, common) -> None:
    """Add this package's subparsers to `sub`; `common` is the parent parser with --store/--json/--quiet."""
    p = sub.add_parser(
        "evaluate", parents=[common], help="measure the method on a labelled manifest (tables and plots)",
        description="Attribute every original of a labelled manifest (the `resynth ingest` format) leave-one-out "
                    "against the manifest's resyntheses, with every method variant, the few-shot baselines, "
                    "unknown-source rejection, calibration and (with --perturb) robustness. Writes report.json, "
                    "report.md and PNG plots to --out. Generates nothing; features are cached in --out.")
    p.add_argument("manifest", help="labelled manifest, CSV or JSONL in the `resynth ingest` format (originals and "
                                    "resyntheses; rows of role `real` measure the real verdict)")
    p.add_argument("--out", default="resynth-eval", help="output folder (default ./resynth-eval)")
    add_clip_arguments(p, required=False, default_from_store=True)
    p.add_argument("--layers", default="base,final,mid",
                   help="feature layers to compare: final, mid (middle block), block numbers, base (the "
                        "embedder's own); comma-separated (default base,final,mid)")
    p.add_argument("--perturb", nargs="?", const="all", metavar="LIST",
                   help="post-process the queries: all (default when given), or e.g. jpeg,resize=0.5,blur "
                        "(kinds: jpeg, webp, resize, crop, blur, social, median, rotate, grey, noise; "
                        "docs/evaluation.md)")
    p.add_argument("--draws", type=int, default=5, help="random draws per k for the few-shot baselines (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot draws (default 0)")
    p.add_argument("--save-calibration", action="store_true",
                   help="also fit the engine default's calibration and write it to --store")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser(
        "calibrate", parents=[common], help="fit probabilities and unknown-source thresholds for a store",
        description="Fit a softmax temperature and an unknown-source threshold on labelled originals (the "
                    "store's own, or MANIFEST's, embedded with the store's embedder) and save them in the store: "
                    "`resynth attribute` then reports calibrated probabilities and the verdict `known` or "
                    "`unknown source` (and `real`, with camera images of role `real` in MANIFEST). Fit it with the "
                    "options you attribute with (--mode, --aggregation). A manifest's sources must all be in the "
                    "store; give originals of every source.")
    p.add_argument("manifest", nargs="?", help="labelled manifest (default: the originals stored in the store)")
    add_arguments(p)  # the attribution options `resynth attribute` will use
    p.add_argument("--false-reject", type=float, default=0.05, metavar="RATE",
                   help="share of genuine queries a threshold may reject (default 0.05)")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP.replace("manifest", "manifest (or store)"))
    p.set_defaults(run=cmd_calibrate)


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
    from engine.labelled import from_manifest
    from engine.evaluation.features import spec_from_args
    from engine.evaluation.report import summary
    from engine.evaluation.runner import evaluate

    if Path(args.out).exists() and not Path(args.out).is_dir():  # it said "expected a folder, got a file: OUT/features"
        raise UserError(f"--out {args.out} is a file: give a folder (it is created if missing)", code="not_a_directory")
    evalset = from_manifest(Path(args.manifest), args.strict)  # a bad manifest fails before any model loads
    labelled = [name for name, n in evalset.originals_per_source().items() if n]
    if len(labelled) < 2:  # nothing to tell apart: the few-shot baselines and leave-one-source-out cannot run
        raise UserError(f"{args.manifest}: evaluate needs scorable originals of at least 2 sources, it has "
                        f"{len(labelled)} ({', '.join(labelled) or 'none'}): add the other candidate generators' "
                        f"originals and resyntheses")
    from engine.manifest import real_rows

    real = [str(r.image) for r in real_rows(Path(args.manifest))]
    if args.clip_layer is not None and not (args.clip_model or args.clip_config):
        raise UserError("--clip-layer applies to --clip-model or --clip-config with --clip-checkpoint; the store's "
                        "embedder keeps its own layer: compare its layers with --layers (e.g. --layers base,final,4)")
    spec = spec_from_args(args.clip_model, args.clip_config, args.clip_checkpoint,
                          "middle" if args.clip_layer is None else args.clip_layer)
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
                          args.seed, progress=not args.quiet, real=real)
        text = summary(report) + f"\nreport: {Path(args.out) / 'report.md'} (+ report.json, plots)"
        if args.save_calibration:
            if base.identity != ws.store.embedder_identity:
                raise UserError(f"cannot calibrate store {ws.root} (bound to {ws.store.embedder_identity}) with "
                                f"features of {base.identity}")
            from engine.fitting import calibrate

            text += "\n" + _calibration_line(ws, calibrate(ws, args.manifest, strict=args.strict))
    finally:
        if ws is not None:
            ws.close()
    _emit(args, report, text)


def _calibration_line(ws, calibration) -> str:
    notes = calibration.notes

    def figure(value) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) else "not measured"
    used = notes.get("used") or {}
    thresholds = f"thresholds for {plural(len(calibration.thresholds), 'source')}"
    if calibration.open_set.get("threshold") is not None:  # the default: one threshold shared by every source
        rule = (f"unknown-source threshold {calibration.open_set.get('score')} {calibration.open_set['threshold']:.2f}"
                f" (one for every source; fallback score {thresholds})")
    else:
        rule = f"score {thresholds}"
    line = (f"calibration saved to {ws.root}: temperature {calibration.temperature:.3g}, {rule}; ECE "
            f"{figure(notes.get('ece_default'))} -> {figure(notes.get('ece_calibrated'))}; unknown-source AUROC "
            f"{figure(notes.get('open_set_auroc'))}")
    if used.get("text"):
        against = {"store": " against the store's resyntheses", "manifest": " against its own resyntheses (the store "
                   "has none of its descriptions)"}.get(notes.get("references_from"), "") \
            if not str(notes.get("fitted_on", "")).startswith("store ") else ""
        line += f"\nfitted on {notes.get('fitted_on')}{against}: {used['text']}"
    if len(notes.get("sources") or ()) == 1:  # nothing to compare with, nothing to leave out
        line += ("\nwarning: one source: its p is 1 whatever the image (the temperature and ECE mean nothing) and "
                 "no other source could be left out to measure unknown-source rejection; the threshold rests on "
                 "its own originals only. Enrol and calibrate the other candidate generators too")
    if few_originals_text(used):
        line += "\n" + few_originals_text(used)
    if used.get("store_sources_not_fitted"):
        line += (f"\nno labelled originals for store source(s) {', '.join(used['store_sources_not_fitted'])}: "
                 f"no threshold of their own")
    real = calibration.real
    if real:  # the manifest's camera images fit the "real" verdict
        m = real.get("measured") or {}
        def share(value) -> str:
            return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "not measured"
        line += (f"\nreal verdict: {real.get('references')} real references, threshold "
                 f"{figure(real.get('threshold'))}; on the fitting images {share(m.get('real_called_real'))} of "
                 f"real images called real (each leave-one-out), {share(m.get('generated_called_real'))} of "
                 f"generated originals")
    return line


def cmd_calibrate(args) -> None:
    from engine.fitting import calibrate
    from engine.options import from_args

    options = from_args(args)
    with _workspace(args, required=True) as ws:
        calibration = calibrate(ws, args.manifest, options, args.false_reject, strict=args.strict)
        _emit(args, calibration.to_dict(), _calibration_line(ws, calibration))
