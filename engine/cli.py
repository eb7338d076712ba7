"""`resynth` command line: a thin layer over engine.workspace, engine.ingest and engine.attribute."""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from engine.errors import (INTERRUPTED, INTERRUPTED_TEXT, UserError, ctrl_c_pressed, forget_ctrl_c, kind_of,
                           message_of, on_ctrl_c, wants_json)
from engine.errors import report as _report
from engine.flags import (Parser, add_clip_arguments, add_global_options, add_source_arguments, check_device,
                          clip_kwargs, common_parent, json_object, source_kind_and_params)
from engine.options import add_arguments
from engine.paths import check_output_file, expand_optional, expand_path, not_a_file, path_argument, shown

EPILOG = ("Store: --store DIR, else $RESYNTH_STORE, else ./resynth-store. Models are read from local paths only. "
          "New here? `resynth demo` runs the whole method offline on tiny models and prints what to try next.")


def main(argv: list[str] | None = None) -> int:
    # Weights only ever come from local paths: an accidental hub download must fail at once, not hang.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Pillow's warnings of damaged metadata (an AVIF's corrupt EXIF is parsed while opening): the reader says in
    # one line what is wrong with a file, and a warning block on stderr broke that line
    warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
    argv = sys.argv[1:] if argv is None else list(argv)
    Parser.json_errors = wants_json(argv)
    forget_ctrl_c()
    # Python's own Ctrl-C handling, remembered (errors.on_ctrl_c); left alone where SIGINT is ignored (nohup) or
    # handled by the caller, and where main() runs outside the main thread (signal handlers cannot be set there)
    ours = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, on_ctrl_c)
    try:  # Ctrl-C while the parser imports the source kinds (a third of a second) is one line too
        return _main(argv)
    except KeyboardInterrupt:
        _report(INTERRUPTED_TEXT, "interrupted", INTERRUPTED, Parser.json_errors)
        return INTERRUPTED
    except BrokenPipeError:  # `resynth ... | head`: the reader left; end quietly
        _silence_stdout()
        return 0
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # the usage of the command the flag was given to, not the top level's
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extras)}")
    if not hasattr(args, "run"):
        if args.json:  # a script asked for JSON: the usage mistake as the one object it parses
            getattr(args, "_parser", parser).error("give a command")
        getattr(args, "_parser", parser).print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="resynth: %(levelname)s: %(name)s: %(message)s")
    if args.quiet:
        quiet_libraries()
    if args.store == "":  # `--store "$UNSET"`: the default folder (init would create a store there) is not meant
        getattr(args, "_parser", parser).error("--store is empty (an unset variable?): give a store folder")
    # $RESYNTH_STORE="~/stores/x" means what a shell would make of it, for every command; set but empty, it
    # is unset, as a shell's ${RESYNTH_STORE:-...} reads it
    from_env = None if args.store else os.environ.get("RESYNTH_STORE") or None  # as typed, for a hint
    args.store = args.store or expand_optional(from_env) or None
    guessed = args.store is None  # neither --store nor $RESYNTH_STORE: ./resynth-store, said if it is no store
    try:
        args.device = check_device(args.device)
        return args.run(args) or 0
    except (KeyboardInterrupt, BrokenPipeError):
        raise
    except Exception as exc:
        if ctrl_c_pressed():  # a Ctrl-C a library turned into an error of its own (a model being loaded)
            raise KeyboardInterrupt from exc
        kind = kind_of(exc)
        if kind is None:
            raise  # a bug: the traceback is what a report needs
        if args.debug:
            traceback.print_exception(exc)
        code = getattr(exc, "code", None) or kind.code
        said = store_hint(exc, args.store, guessed, from_env) or message_of(exc) + source_hint(exc, code, args.store)
        _report(said, code, kind.exit_code, args.json)
        return kind.exit_code


def store_hint(exc: BaseException, store: str | None, guessed: bool, from_env: str | None = None) -> str | None:
    """What to type instead, for `no store at DIR` (None: the message as it is): a forgotten --store (the
    default folder was looked in), the demo's folder given for its store (`--store resynth-demo`, whose store
    is resynth-demo/store), a misspelt store folder beside a store (`resynth-demo/stor`), or a relative
    $RESYNTH_STORE read from another folder (the README's `export RESYNTH_STORE=resynth-demo/store`, then a `cd`):
    all answered "create one with `resynth init`", which was the wrong way out."""
    from index.errors import StoreInputError

    if not isinstance(exc, StoreInputError) or not str(exc).startswith("no store at "):
        return None
    from engine.workspace import store_path

    root, here = store_path(store), Path.cwd()
    if not_a_file(root) not in ("a folder", "not found"):  # a file named as the store: the message says so
        return None

    def near(path: Path) -> str:
        relative = os.path.relpath(path, here)
        return shown(path if relative.startswith("..") else relative)

    inside = sorted(found.parent for found in root.glob("*/store.json")) if root.is_dir() else []
    if inside:  # the folder holds a store one level down: the demo's folder, a case folder
        return f"no store at {shown(root)}, but one in it: give --store {' or --store '.join(map(near, inside[:3]))}"
    if not guessed:
        beside = [found.parent.name for found in root.parent.glob("*/store.json")] if root.parent.is_dir() else []
        meant = difflib.get_close_matches(root.name, beside, n=1, cutoff=0.75)
        if meant:
            return (f"no store at {shown(root)}; did you mean --store {near(root.parent / meant[0])}? (or create "
                    "one with `resynth init`)")
        if from_env and not Path(from_env).expanduser().is_absolute():
            return (f"no store at {shown(root)}: $RESYNTH_STORE is the relative path {from_env}, read from the "
                    f"current folder {shown(here)}; give it as a full path (export RESYNTH_STORE=\"$PWD/{from_env}\" "
                    "in the folder it was meant from), or create a store with `resynth init`")
        return None
    stores = sorted({found.parent for found in (*here.glob("*/store.json"), *here.glob("*/store/store.json"))})
    seen = f" (stores here: {', '.join(map(near, stores[:3]))})" if stores else ""
    return (f"no store at {shown(root)}, the default folder: no --store was given and $RESYNTH_STORE is unset; "
            f"give --store DIR{seen}, or create a store with `resynth init`"
            + ("" if stores else " (or `resynth demo` for one to try)"))


def quiet_libraries() -> None:
    """--quiet: no progress bar from the model libraries either (diffusers, transformers and
    huggingface_hub show their own while loading weights). huggingface_hub and transformers read
    the environment variable when imported; diffusers has only a switch, thrown as soon as its
    logging module is imported (importing it now would load torch for `stats` too)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66: any other bar a library opens
    for name, switch in (("diffusers.utils.logging", "disable_progress_bar"),
                         ("transformers.utils.logging", "disable_progress_bar"),
                         ("huggingface_hub.utils", "disable_progress_bars")):
        after_import(name, lambda module, switch=switch: getattr(module, switch)())


def after_import(name: str, call) -> None:
    """Run `call(module)` once module `name` is imported (now, if it already is)."""
    import importlib.abc
    import importlib.util

    if name in sys.modules:
        call(sys.modules[name])
        return

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            if spec is None or spec.loader is None:
                return spec
            original = spec.loader.exec_module

            def exec_module(module):
                original(module)
                try:
                    call(module)
                except Exception:  # noqa: BLE001 - a changed library API must not break the command
                    logging.getLogger("resynth").debug("could not silence %s", name, exc_info=True)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Hook())


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def build_parser() -> argparse.ArgumentParser:
    common = common_parent()  # the global options, also accepted after the command
    parser = Parser(
        prog="resynth", epilog=EPILOG,
        description="Attribute AI-generated images to the text-to-image generator that made them, by "
                    "resynthesis: describe the image, regenerate it with every candidate generator, and "
                    "compare in CLIP space. No training.")
    add_global_options(parser, top=True)
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create a store bound to one CLIP image encoder",
                       description="Create a store bound to one open_clip image encoder, given as an architecture "
                                   "name (e.g. ViT-B-32) or a model config JSON, plus a local checkpoint file. "
                                   "Run again on an existing store with the same encoder flags, it changes "
                                   "nothing but the captioner (and its instruction) when --captioner is given; a "
                                   "store moves to another encoder with `resynth reembed`.")
    add_clip_arguments(p)
    p.add_argument("--captioner", metavar="DIR", type=path_argument,
                   help="captioner folder used when a query comes without a prompt: an image-to-text model (BLIP, "
                        "GIT, VisionEncoderDecoder) or any image-text-to-text (vision-language) model such as "
                        "LLaVA, Qwen-VL, Idefics, SmolVLM")
    p.add_argument("--caption-instruction", metavar="TEXT",
                   help="what a vision-language captioner is asked about each image (kept in the store; "
                        "$RESYNTH_CAPTION_INSTRUCTION overrides it for one run; default: a one-sentence "
                        "text-to-image prompt of the subject, setting, style and lighting)")
    p.add_argument("--db", metavar="URL", help="keep metadata and vectors in PostgreSQL (postgresql+psycopg://USER@HOST"
                                              ":PORT/DBNAME; password from $PGPASSWORD) instead of metadata.sqlite")
    p.add_argument("--images", metavar="URL", help="keep generated image files in object storage (s3://BUCKET/PREFIX, "
                                                  "gs://...; endpoint and keys from $AWS_ENDPOINT_URL, "
                                                  "$AWS_ACCESS_KEY_ID ...) instead of the store folder")
    p.set_defaults(run=cmd_init)

    p = sub.add_parser("source", parents=[common], help="add, list or remove candidate generators")
    source_sub = p.add_subparsers(metavar="ACTION")
    q = source_sub.add_parser(
        "add", parents=[common], help="register a candidate generator (a diffusers pipeline folder, a model behind "
                                      "an images API, or another registered kind)",
        description=_source_add_description(), epilog=_source_add_examples(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(q)
    q.set_defaults(run=cmd_source_add)
    q = source_sub.add_parser("list", parents=[common], help="list sources with their recipes",
                              description="List every source: its kind, its recipe (the settings its images are "
                                          "generated with, which must match how the images you attribute were "
                                          "made) and where its model is. --json gives every stored parameter.")
    q.set_defaults(run=cmd_source_list)
    q = source_sub.add_parser("remove", parents=[common], help="remove a source with its resyntheses",
                              description="Remove a source with every image and vector stored for it (its "
                                          "resyntheses and labelled originals). A calibration fitted with it "
                                          "becomes stale: rerun `resynth calibrate`.")
    q.add_argument("name", help="the source's name, as `resynth source list` shows it")
    q.set_defaults(run=cmd_source_remove)

    p = sub.add_parser("ingest", parents=[common], help="import a dataset manifest (CSV or JSONL)",
                       description="Import originals and resyntheses. Columns: image (path relative to the "
                                   "manifest), source, description, role (original|resynthesis), optional seed "
                                   "and original (the original image a resynthesis was made from). Unknown "
                                   "sources become replay sources. Re-running skips rows already stored.")
    p.add_argument("manifest", type=path_argument, help="the manifest file (.csv or .jsonl), not its folder")
    p.add_argument("--allow-outside", action="store_true",
                   help="accept image paths that resolve outside the manifest's folder (refused by default)")
    p.set_defaults(run=cmd_ingest)

    p = sub.add_parser("attribute", parents=[common], help="attribute images to sources",
                       description="Rank every source for each image. Resyntheses already in the store are "
                                   "reused; missing ones are generated and cached. The answer names the closest "
                                   "enrolled source, whatever made the image (a camera photograph, a generator "
                                   "nobody enrolled); it says `known` or `unknown source` only once `resynth "
                                   "calibrate` has fitted thresholds (before, the verdict is `uncalibrated`), and "
                                   "`real` only once it was fitted with real photographs (docs/model-card.md).")
    p.add_argument("images", nargs="*", metavar="IMAGE", type=path_argument,
                   help="image files (PNG, JPEG, WebP ...); a folder: use `resynth triage`")
    p.add_argument("--prompt", help="the description of the image(s), the more exact the better (the prompt it was "
                                    "made with, if known); default: a prompt embedded in the file, then the "
                                    "description stored for an identical image, then the store's captioner")
    p.add_argument("--queries", metavar="FILE.jsonl", type=path_argument,
                   help="rows of {\"image\": PATH, \"prompt\": TEXT}, one per line (a relative PATH is read from "
                        "the file's folder)")
    add_arguments(p)
    p.add_argument("--captioner", metavar="DIR", type=path_argument,
                   help="captioner folder for this run (overrides the store's)")
    p.add_argument("--report", metavar="FILE.html", type=path_argument,
                   help="also write a self-contained HTML case report (queries, evidence images, store, versions)")
    p.set_defaults(run=cmd_attribute)

    p = sub.add_parser("rebuild", parents=[common], help="recreate the FAISS index from stored vectors",
                       description="Recreate vectors.faiss and the dataset-search index from the database and "
                                   "swap them in atomically. Beyond 10k vectors the search index is IVF-Flat (IVF-PQ "
                                   "beyond the memory budget): trained once, filled in shards of 250k vectors, "
                                   "merged on disk, nprobe tuned for recall@32 >= 0.95 (+0.02 margin).")
    p.add_argument("--ray", metavar="ADDRESS", help="fill the search index's shards on this Ray cluster "
                                                     "(`local` starts one here)")
    p.set_defaults(run=cmd_rebuild)
    p = sub.add_parser("stats", parents=[common], help="what the store holds",
                       description="What the store holds: its vectors, descriptions and embedder, and per source "
                                   "its kind, labelled originals and resyntheses (and what an API source has "
                                   "bought). Loads no model.")
    p.set_defaults(run=cmd_stats)
    p = sub.add_parser("verify", parents=[common], help="check database, index and image files against each other",
                       description="Check every stored vector against its checksum, the index file against the "
                                   "database, every image file against its hash, and look for orphan and leftover "
                                   "temporary files. Exit 0 when all is well, 4 when a problem remains. With "
                                   "--repair: rebuild the index from the database, remove orphans and temporary "
                                   "files (the database itself is the source of truth and is never rewritten).")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed from the database")
    p.add_argument("--no-files", action="store_true", help="skip hashing every image file (faster)")
    p.set_defaults(run=cmd_verify)
    p = sub.add_parser("demo", parents=[common], help="run the whole method offline on a tiny model zoo",
                       description="Build tiny random diffusers pipelines and a tiny CLIP, register them, make a "
                                   "dataset, ingest it and attribute held-out images, then print the recipes it "
                                   "used, where its models are, the commands that reuse them and what to run "
                                   "next. Offline, on CPU: about 25 seconds on 2 quiet cores, longer on busy ones "
                                   "(docs/measurements.md); it ends with the time of each step. Its "
                                   "random-weight models show that the machinery works, not how accurate resynth "
                                   "is on real generators. Its store is DIR/store (--store and $RESYNTH_STORE "
                                   "are not used).")
    p.add_argument("--workdir", "--out", default="resynth-demo", type=path_argument, metavar="DIR",
                   help="where models, dataset and store go (default ./resynth-demo)")
    p.set_defaults(run=cmd_demo)
    for register in _extension_commands():
        register(sub, common)
    return parser


def _extension_commands():
    """Command groups that live beside their code (evaluation, service): each adds its subparsers."""
    from engine.evaluation.commands import register as evaluation
    from engine.jobs import register as jobs
    from engine.published import register as published
    from engine.service.commands import register as service
    from engine.triage import register as triage

    return [evaluation, published, jobs, service, triage]


def _emit(args, data, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def _open(args, writable: bool = True, **kwargs):
    import engine

    return engine.open(args.store, writable=writable, progress=not args.quiet, device=args.device, **kwargs)


def cmd_init(args) -> None:
    import engine

    with engine.init(args.store, **clip_kwargs(args), captioner=args.captioner, db=args.db, images=args.images,
                     device=args.device, progress=not args.quiet,
                     caption_instruction=args.caption_instruction) as ws:
        store = ws.store
        captioner = store.config.get("captioner")  # an init run again with --captioner sets it: say so
        _emit(args, store.config, f"store {store.root} bound to {store.embedder_identity} ({store.dim}-d); captioner: "
                                  + (str(captioner.get("path", captioner)) if isinstance(captioner, dict)
                                     else str(captioner or "none")))


def _source_add_description() -> str:
    """What `source add` registers, one paragraph per registered kind (engine.sources)."""
    import textwrap

    from engine import sources

    lines = [textwrap.fill(
        "Register a candidate source. Its kind is --kind KIND, else the kind its arguments fit (a folder "
        f"alone: {sources.DEFAULT_KIND}; --api URL: api). A pipeline source regenerates every description "
        "with its recipe (--steps, --guidance, --size, --scheduler, --negative-prompt): give the settings the "
        "images you will attribute were made with, since the defaults are only guesses and a mismatch makes "
        "wrong answers look confident. Kinds:", 100)]
    for kind in sources.kinds():
        lines.append(textwrap.fill(f"{kind.name}: {kind.describe()}", 100, initial_indent="  ",
                                   subsequent_indent="    "))
    return "\n".join(lines)


def _source_add_examples() -> str:
    from engine import sources

    examples = [line for kind in sources.kinds() for line in kind.examples]
    return "examples:\n" + "\n".join(f"  {line}" for line in examples) if examples else ""


def cmd_source_add(args) -> None:
    kind, params = source_kind_and_params(args, parsers={"rate": _rate})  # checked before the store opens
    with _open(args) as ws:
        info = ws.add_source(args.name, kind=kind, **params)
    text = f"added source {info['name']} ({info['path'] or info['kind']})\n  recipe: {info['recipe']}"
    for warning in info.get("warnings", []):  # the answer's own (engine.sources.enrol): --json carries them too
        print(f"resynth: warning: {warning}", file=sys.stderr)
    _emit(args, info, text)


_json_object = json_object  # the name this module had for it


def _rate(text: str | None) -> float | None:
    """--rate: requests per minute, as N, N/min or N/s."""
    if text is None:
        return None
    number, _, unit = text.strip().lower().partition("/")
    try:
        value = float(number)
    except ValueError:
        raise UserError(f"--rate must look like 60 or 60/min or 2/s, not {text!r}") from None
    if unit in ("", "min", "m", "minute"):
        return value
    if unit in ("s", "sec", "second"):
        return value * 60
    raise UserError(f"--rate must look like 60 or 60/min or 2/s, not {text!r}")


def cmd_source_list(args) -> None:
    with _open(args, writable=False) as ws:
        rows = ws.list_sources()
    from engine.recipes import table

    _emit(args, rows, table(rows))


def cmd_source_remove(args) -> None:
    with _open(args) as ws:
        dropped = ws.remove_source(args.name)
    _emit(args, {"removed": args.name, "vectors": dropped}, f"removed {args.name} and {dropped} stored vectors")


def cmd_ingest(args) -> None:
    from dataclasses import asdict

    folder = Path(args.manifest)
    if not_a_file(folder) == "a folder":
        found = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".csv", ".jsonl") and p.is_file())
        hint = f" ({', '.join(found[:3])} there)" if found else ""
        raise UserError(f"{folder} is a folder: give the manifest file in it (.csv or .jsonl){hint}")
    with _open(args) as ws:
        known = [source["name"] for source in ws.list_sources()]
        report = ws.ingest(args.manifest, allow_outside=args.allow_outside)
        report.warnings.extend(originals_only(ws.stats(), report.new_sources or [], known, args.store))
    for warning in report.warnings:
        print(f"resynth: warning: {warning}", file=sys.stderr)
    from engine.errors import plural

    _emit(args, asdict(report), f"ingested {plural(report.added, 'image')} ({report.skipped} skipped: stored before, "
                                f"or a duplicate row of this manifest) from {plural(report.rows, 'row')}; new replay "
                                f"sources: {', '.join(report.new_sources) or 'none'}")


def source_hint(exc: BaseException, code: str, store: str | None) -> str:
    """`; did you mean 'café'?` after `unknown source 'cafe' (known: ...)`: a mistyped or unaccented name in
    --sources or `source remove`, the nearest stored name, as a mistyped command or flag gets."""
    import ast
    import difflib
    import re

    found = re.match(r"unknown source ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")", str(exc))
    if code != "unknown_source" or not found:
        return ""
    try:
        import engine

        name = ast.literal_eval(found.group(1))
        with engine.open(store, writable=False) as ws:
            names = [source["name"] for source in ws.list_sources()]
    except Exception:  # noqa: BLE001 - a hint, never a second error
        return ""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def originals_only(stats: dict, new: list[str], known: list[str], store: str | None = None) -> list[str]:
    """A warning per new replay source that got no resynthesis: no answer scores it by default, and one row's
    mistyped source name (`tiny-sd-dim` for `tiny-sd-ddim`) made it, which nothing else said. The command it
    gives names the store ingested into (without it, it removed from the default store) and quotes the name."""
    import difflib
    import shlex

    said = []
    for name in new:
        if (stats.get("sources", {}).get(name) or {}).get("resyntheses", 1):
            continue
        close = difflib.get_close_matches(name, [other for other in (*known, *new) if other != name], n=1, cutoff=0.8)
        command = shlex.join(["resynth", "source", "remove", name, *(["--store", str(store)] if store else [])])
        typo = (f"; if it is a typo of {close[0]!r}: `{command}`, correct the manifest and ingest it again"
                if close else "")
        said.append(f"new replay source {name!r} holds originals but no resyntheses: answers leave it unscored (a "
                    f"replay source is compared through its resyntheses; its originals only with --original-refs)"
                    f"{typo}")
    return said


def _query_specs(args) -> list[tuple[Path, str | None]]:
    """(image path, prompt) pairs, all checked (header only, no pixel decoded) before any model loads."""
    from engine.describe import clean_prompt
    from engine.images import check_header

    from engine.arguments import text

    prompt = clean_prompt(text(args.prompt, "--prompt"))  # bytes a Latin-1 terminal typed: one line, not later
    specs = [(Path(p), prompt) for p in args.images]
    lines: dict[int, tuple[Path, int, str]] = {}  # spec index -> (queries file, line, image as written)
    if args.queries:
        path = Path(args.queries)
        why = not_a_file(path)
        if why == "a folder":
            raise UserError(f"--queries {shown(path)} is a folder: give a JSONL file with one {{\"image\": PATH, "
                            "\"prompt\": TEXT} per line", code="is_a_directory")
        if why is not None:
            raise UserError(f"queries file not found: {shown(path)}" if why == "not found" else
                            f"--queries {shown(path)} is {why}, not a JSONL file", code="not_found"
                            if why == "not found" else "not_a_file")
        for number, line in _text_lines(path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = row["image"]
                own = row.get("prompt", row.get("description"))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UserError(f"{path}:{number}: expected {{\"image\": PATH, \"prompt\": TEXT}}") from None
            if not isinstance(image, str) or not image.strip() or "\0" in image or \
                    not (own is None or isinstance(own, str)):
                raise UserError(f"{shown(path)}:{number}: \"image\" must be a path and \"prompt\" a text")
            try:  # an empty prompt names its line, as HTTP names "prompt 3" of several
                own = clean_prompt(own) if own is not None else prompt
            except UserError as exc:
                raise UserError(f"{shown(path)}:{number}: {exc}", code=exc.code) from None
            lines[len(specs)] = (path, number, image)
            specs.append((path.parent / expand_path(image), own))
    if not specs:
        raise UserError("nothing to attribute: give IMAGE paths or --queries FILE.jsonl")
    for index, (image, _) in enumerate(specs):
        try:
            check_header(image)
        except UserError as exc:
            if index not in lines:
                raise
            path, number, written = lines[index]
            relative = "" if expand_path(written).is_absolute() else \
                " (a relative \"image\" path is read from the queries file's folder)"
            raise UserError(f"{shown(path)}:{number}: {exc}{relative}", code=exc.code) from None
    return specs


def _not_over_inputs(report: Path, images: list[Path], store: str | None) -> None:
    """`--report` must not name a query image (`--report q.png` renamed the HTML over the evidence) nor a
    file of the store (`--report store/metadata.sqlite` over the database)."""
    from engine.workspace import store_path

    try:
        target = report.resolve()
        images = [image.resolve() for image in images]
    except (OSError, RuntimeError):  # a link loop on the way: the write names it
        return
    if target in images:
        raise UserError(f"--report {shown(report)} is one of the images to attribute: give a new .html path")
    root = store_path(store).resolve()
    if target == root or target.is_relative_to(root):
        raise UserError(f"--report {shown(report)} is inside the store {shown(root)}: give a path outside it")


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file (a BOM tolerated); one line naming the file and line
    where it is not UTF-8."""
    from engine.manifest import MAX_LINE, MAX_ROWS

    raws: list[bytes] = []
    try:
        with open(path, "rb") as handle:  # line by line, each bounded: a 2 GB file of one line is not read whole
            while raw := handle.readline(MAX_LINE + 1):
                if len(raws) >= MAX_ROWS:
                    raise UserError(f"{shown(path)}: more than {MAX_ROWS} lines: split it", code="too_many_rows")
                if len(raw) > MAX_LINE:
                    raise UserError(f"{shown(path)}:{len(raws) + 1}: a line longer than {MAX_LINE} bytes",
                                    code="line_too_long")
                raws.append(raw.rstrip(b"\r\n"))
    except OSError as exc:
        raise UserError(f"cannot read {shown(path)}: {exc.strerror or type(exc).__name__}") from None
    if raws and raws[0].startswith(b"\xef\xbb\xbf"):
        raws[0] = raws[0][3:]
    lines = []
    for number, raw in enumerate(raws, start=1):
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                            f"{exc.start + 1}): save the file as UTF-8", code="not_utf8") from None
    return lines


def cmd_attribute(args) -> None:
    from engine.options import from_args

    options = from_args(args)
    if args.report:  # before the work, not after it
        check_output_file(args.report, "--report")
    specs = _query_specs(args)
    if args.report:
        _not_over_inputs(Path(args.report), [path for path, _ in specs], args.store)
    with _open(args, captioner=args.captioner) as ws:
        ws.plan(options)  # an unknown source fails before any model loads
        report = ws.attribute([path for path, _ in specs], [prompt for _, prompt in specs], options)
        unwritten = None
        if args.report:
            from engine import casereport

            images = [path for path, _ in specs]
            try:
                casereport.write_attribution(args.report, ws, report, images, options,
                                             command=casereport.attribute_command(args, images))
            except OSError as exc:  # a full or read-only disk under the report: the answer is still shown
                unwritten = exc
    from engine.textanswer import text_answer

    written = args.report and unwritten is None
    text = text_answer(report) + (f"\ncase report: {args.report}" if written else "")  # as triage names its own
    _emit(args, report.to_dict(), text)
    if unwritten is not None:
        raise unwritten


def cmd_rebuild(args) -> None:
    from engine.jobs import require_ray

    require_ray(args.ray)
    with _open(args) as ws:
        count = ws.rebuild(ray=args.ray)
        search = ws.store.search_report()
    _emit(args, {"vectors": count, "search": search},
          f"rebuilt the index from {count} stored vectors; search index: {search.get('type') or 'exact'}")


def cmd_verify(args) -> int:
    with _open(args, writable=args.repair, repair=args.repair) as ws:
        report = ws.verify(repair=args.repair, files=not args.no_files)
        if args.repair:  # what is left after the repair decides the exit code
            report["after_repair"] = ws.verify(files=not args.no_files)
    problems, repaired = report.get("problems", []), report.get("repaired", [])
    left = report["after_repair"]["problems"] if args.repair else problems
    lines = [f"store {report['store']}: " + ("ok" if not problems else f"{len(problems)} problem(s)")]
    done = "repaired" if problems else "done"  # --repair rebuilds a sound store too: "repaired" read as damage found
    lines += [f"  problem: {p}" for p in problems] + [f"  {done}: {r}" for r in repaired]
    lines += [f"  note: {n}" for n in report.get("notes", [])]  # not problems: an index a server has yet to save
    if args.repair:
        lines.append("after repair: " + ("ok" if not left else "; ".join(left)))
    _emit(args, report, "\n".join(lines))
    return 0 if not left else 4


def cmd_stats(args) -> None:
    with _open(args, writable=False) as ws:
        data = ws.stats()
    from engine.errors import plural

    lines = [f"store {data['store']}: {plural(data['vectors'], 'vector')} ({data['index_vectors']} in the index), "
             f"{plural(data['descriptions'], 'description')}, embedder {data['embedder']}"]
    lines += [f"  {name:24} {v['kind']:11} {v['originals']:6} originals {v['resyntheses']:6} resyntheses"
              + (_bought(v["api"]) if "api" in v else "") for name, v in data["sources"].items()]
    _emit(args, data, "\n".join(lines))


def _bought(api: dict) -> str:
    from engine.errors import plural

    waiting = api["tasks_pending"]  # None: this role may not read the paid tasks' records
    its = "its" if waiting == 1 else "their"
    pending = f"; {plural(waiting, 'paid task')} without {its} image yet, resumed by the next run" if waiting else ""
    if waiting is None:
        pending = "; paid tasks without their image not readable by this database role"
    return f"  ({api['spent_usd']:.4f} USD bought{pending})"


def cmd_demo(args) -> None:
    from engine.demo import run_demo

    report = run_demo(Path(args.workdir), progress=not args.quiet)
    _emit(args, report, report["table"])


if __name__ == "__main__":
    sys.exit(main())
