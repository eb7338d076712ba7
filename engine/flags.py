"""Command-line flags shared by several commands, declared once (as engine.options.Options is for the
per-request options): the global options, the CLIP/embedder flags, and the parser class that places
errors where a user looks for them.

- Global options (`--store`, `--json`, `--quiet`, `--debug`, `--device`) are accepted before or after
  the command: `resynth --store DIR stats` and `resynth stats --store DIR` are the same.
- The CLIP flags (`--clip-model`, `--clip-config`, `--clip-checkpoint`, `--clip-layer`) are the same
  words with the same meaning for `init`, `reembed`, `evaluate` and the scripts: `add_clip_arguments`
  adds them and `clip_kwargs` reads them back as the keyword arguments of `engine.init`.
- `Parser`: a bad flag prints the usage of the (sub)command it was given to, not the top level's;
  with `--json` anywhere on the line, the error is one JSON object on stderr.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, NoReturn

from engine.paths import path_argument

# (flag, argparse keywords); `default` is the top-level parser's, the subcommands' copy never sets one.
GLOBAL_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--store", dict(metavar="DIR", type=path_argument, default=None,
                     help="store directory (default: $RESYNTH_STORE or ./resynth-store)")),
    ("--json", dict(action="store_true", default=False,
                    help="print machine-readable JSON on stdout (errors: one JSON object on stderr)")),
    ("--quiet", dict(action="store_true", default=False,
                     help="no progress bars (the model libraries' own included)")),
    ("--debug", dict(action="store_true", default=False, help="on an error, also print its chained causes")),
    ("--device", dict(metavar="DEVICE", default=None,
                      help="where models run: cpu, cuda, cuda:N or mps (default: cuda when available)")),
)
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
LAYER_HELP = ("features: the class token of the middle transformer block (default; published work and our "
              "measurements found it stronger), the final embedding, or block N (1-based)")


def add_global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The global options on `parser`. On a subcommand (`top=False`) an option left out sets nothing,
    so one given before the command (on the top-level parser) is kept."""
    group = parser.add_argument_group("global options (before or after the command)")
    for flag, keywords in GLOBAL_OPTIONS:
        keywords = dict(keywords)
        if not top:
            keywords["default"] = argparse.SUPPRESS
        group.add_argument(flag, **keywords)


def common_parent() -> argparse.ArgumentParser:
    """The parent parser every subcommand takes (`parents=[common]`)."""
    common = argparse.ArgumentParser(add_help=False)
    add_global_options(common, top=False)
    return common


def check_device(device: str | None) -> str | None:
    from engine.errors import UserError

    if device is not None and not DEVICE.match(device.strip()):
        raise UserError(f"--device must be cpu, cuda, cuda:N or mps, not {device!r}")
    return device.strip() if device else None


def add_clip_arguments(parser: argparse.ArgumentParser, *, required: bool = True,
                       default_from_store: bool = False) -> None:
    """--clip-model/--clip-config/--clip-checkpoint/--clip-layer, as `resynth init` takes them.

    `required`: the checkpoint must be given (init, reembed); `default_from_store`: leaving all out
    means the store's own embedder (evaluate)."""
    group = parser.add_argument_group(
        "CLIP image encoder", "an open_clip architecture name or config JSON, and a local checkpoint file")
    store_note = " (default: the store's embedder)" if default_from_store else ""
    group.add_argument("--clip-model", metavar="ARCH",
                       help="open_clip architecture name, e.g. ViT-L-14-336" + store_note)
    group.add_argument("--clip-config", metavar="JSON", type=path_argument,
                       help="open_clip model config JSON, for an architecture open_clip does not list "
                            "(its file name, without .json, becomes the architecture name)")
    group.add_argument("--clip-checkpoint", metavar="FILE", type=path_argument, required=required,
                       help="checkpoint file, e.g. open_clip_pytorch_model.bin")
    group.add_argument("--clip-layer", default="middle", metavar="{middle,final,N}", help=LAYER_HELP)


def clip_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The CLIP flags as the keyword arguments of `engine.init` / `Workspace.reembed`."""
    return {"clip_checkpoint": args.clip_checkpoint, "clip_model": args.clip_model,
            "clip_config": args.clip_config, "clip_layer": args.clip_layer}


class Parser(argparse.ArgumentParser):
    """argparse, with errors shown where they belong.

    `json_errors` is set by the CLI when `--json` is on the command line; the usage printed for a bad
    flag is that of the innermost subcommand, recorded on the namespace as `_parser`.
    """

    json_errors = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if not hasattr(namespace, "_parser"):  # the innermost subcommand returns first
            namespace._parser = self
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        if Parser.json_errors:
            print(json.dumps({"error": f"{message} (see `{self.prog} --help`)", "kind": "usage"}), file=sys.stderr)
            sys.exit(2)
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")
