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
import textwrap
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


def common_parent() -> "Parser":
    """The parent parser every subcommand takes (`parents=[common]`)."""
    common = Parser(add_help=False)
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
    # evaluate: None tells "not given" apart, since with the store's embedder a layer would be ignored
    group.add_argument("--clip-layer", default=None if default_from_store else "middle", metavar="{middle,final,N}",
                       help=LAYER_HELP)


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
        message += self._did_you_mean(message)
        if Parser.json_errors:
            print(json.dumps({"error": f"{message} (see `{self.prog} --help`)", "kind": "usage", "exit_code": 2}),
                  file=sys.stderr)
            sys.exit(2)
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _did_you_mean(self, message: str) -> str:
        """`; did you mean 'attribute'?` for a mistyped command or flag (`atribute`, `--stepz`), the nearest
        of this parser's own words, or nothing when none is near."""
        import difflib

        typed = re.search(r"invalid choice: '([^']*)'", message)
        if "you meant" in message:  # argparse's own suggestion (Python 3.14's suggest_on_error)
            return ""
        if typed:
            words = [c for a in self._actions if a.choices for c in a.choices if isinstance(c, str)]
            close = difflib.get_close_matches(typed.group(1), words, n=1)
            return f"; did you mean '{close[0]}'?" if close else ""
        if message.startswith("unrecognized arguments:"):
            flags = [flag[2:] for flag in self._option_string_actions if flag.startswith("--")]
            for word in message.split()[2:]:
                if word.startswith("--"):  # compared without the dashes every flag shares
                    close = difflib.get_close_matches(word[2:].split("=", 1)[0], flags, n=1)
                    if close:
                        return f"; did you mean --{close[0]}?"
        return ""


# ----- `source add`: flags built from the source-kind registry (engine.sources) ----------------------
RESERVED_FLAGS = {"--kind", "--help", "-h"} | {flag for flag, _ in GLOBAL_OPTIONS}
POSITIONAL_DEST = "kind_positional"


def _dest(flag: str) -> str:
    return "kind_flag_" + flag.lstrip("-").replace("-", "_")


def _metavar(param) -> str:
    return param.metavar or param.name.upper()


def _declared(kinds) -> tuple[dict[str, list], list]:
    """flag -> [(kind, Param)] in registry order, and the [(kind, Param)] positional ones."""
    flags: dict[str, list] = {}
    positional: list = []
    for kind in kinds:
        for param in kind.params:
            if param.positional:
                positional.append((kind, param))
                continue
            if param.cli_flag in RESERVED_FLAGS:
                raise ValueError(f"source kind {kind.name!r}: {param.cli_flag} is taken by resynth itself")
            flags.setdefault(param.cli_flag, []).append((kind, param))
    return flags, positional


def _joined_help(declarations) -> str:
    """One help, or "kind, kind: help; kind: help" when kinds mean different things by one flag."""
    by_help: dict[str, list[str]] = {}
    for kind, param in declarations:
        by_help.setdefault(param.help, []).append(kind.name)
    if len(by_help) == 1:
        (text, names), = by_help.items()
        return text if len(declarations) == 1 else f"{text} ({', '.join(names)})"
    return "; ".join(f"{', '.join(names)}: {text}" for text, names in by_help.items())


def _unique(values) -> list:
    return list(dict.fromkeys(values))


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """`source add NAME [PATH] --kind K ...`: one flag per declared Param of every registered kind
    (a flag several kinds declare is one flag, read as the chosen kind's type), grouped by kind."""
    from engine import sources

    kinds = sources.kinds()
    flags, positional = _declared(kinds)
    parser.add_argument("name", help="the source's name (its label in every answer)")
    if positional:
        parser.add_argument(POSITIONAL_DEST, nargs="?", default=None,
                            metavar="|".join(_unique(_metavar(p) for _, p in positional)),
                            help=_joined_help(positional))
    # no argparse choices (here and below): a value outside them is the one-line error Python and HTTP give
    parser.add_argument("--kind", metavar="{" + ",".join(k.name for k in kinds) + "}",
                        help=f"the source's kind (default: the kind its arguments name; a folder alone: "
                             f"{sources.DEFAULT_KIND})")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for kind in kinds:
        own = [f for f, decl in flags.items() if decl[0][0] is kind]
        shared = [f for f, decl in flags.items() if decl[0][0] is not kind and any(k is kind for k, _ in decl)]
        if not own and not shared and not kind.params:
            continue
        text = kind.describe().rstrip(".")
        if shared:
            text += ("; a" if text else "A") + f"lso takes {', '.join(shared)}"
        groups[kind.name] = parser.add_argument_group(f"{kind.name} sources", textwrap.fill(text, 100))
    for flag, declarations in flags.items():
        group = groups[declarations[0][0].name]
        keywords: dict[str, Any] = dict(dest=_dest(flag), default=argparse.SUPPRESS, help=_joined_help(declarations))
        if all(p.type is bool for _, p in declarations):
            keywords["action"] = "store_true"
        else:
            if all(p.repeatable for _, p in declarations):
                keywords["action"] = "append"
            keywords["metavar"] = "|".join(_unique(_metavar(p) for _, p in declarations))
            choices = _unique(tuple(p.allowed() or ()) for _, p in declarations)
            if len(choices) == 1 and choices[0]:  # shown as argparse shows choices; checked by _convert
                keywords["metavar"] = "{" + ",".join(choices[0]) + "}"
        group.add_argument(flag, **keywords)


def source_kind_and_params(args: argparse.Namespace, parsers: dict[str, Any] | None = None):
    """The kind `source add` names (`--kind`, else the one its arguments fit) and its parameters, each
    converted to its Param's type; `parsers` maps a parameter name to the CLI's own parser of its text
    (`--rate 2/s`). One-line UserErrors for arguments no kind, or not this kind, takes."""
    from engine import sources
    from engine.errors import UserError

    kinds = sources.kinds()
    flags, _ = _declared(kinds)
    given = [flag for flag in flags if hasattr(args, _dest(flag))]
    path = getattr(args, POSITIONAL_DEST, None)

    def fit(kind):
        accepted = {p.cli_flag for p in kind.params if not p.positional}
        takes_path = any(p.positional for p in kind.params)
        foreign = [f for f in given if f not in accepted]
        if path is not None and not takes_path:
            foreign.insert(0, f"the argument {path!r}")
        missing = [p for p in kind.params if p.required and
                   (path is None if p.positional else p.cli_flag not in given)]
        required = sum(p.required for p in kind.params) - len(missing)
        matched = len(given) - len(foreign) + (path is not None and takes_path)
        return foreign, missing, (not foreign, not missing, required, matched, kind.name == sources.DEFAULT_KIND)

    if args.kind:
        kind = sources.get(args.kind)
    elif not given and path is None:
        ways = [" ".join(_metavar(p) if p.positional else f"{p.cli_flag} {_metavar(p)}"
                         for p in k.params if p.required) + f" (kind {k.name})"
                for k in kinds if any(p.required for p in k.params)]
        raise UserError(f"give {', or '.join(ways)}, or --kind KIND (see `resynth source add --help`)")
    else:
        scored = sorted(((fit(k)[2], i, k) for i, k in enumerate(kinds) if fit(k)[2][3]), key=lambda t: t[:2],
                        reverse=True)
        best = [k for score, _, k in scored if score == scored[0][0]]
        if len(best) > 1:
            raise UserError(f"these arguments fit the kinds {', '.join(k.name for k in best)}: give --kind")
        kind = best[0]
    foreign, missing, _ = fit(kind)
    if foreign:
        takers = {f: [k.name for k, _ in flags[f]] for f in foreign if f in flags}
        where = "; ".join(f"{f}: {', '.join(names)}" for f, names in takers.items())
        raise UserError(f"{', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to {kind.name} "
                        f"sources" + (f" ({where})" if where else ""))
    if missing:
        raise UserError(f"{kind.name} sources need " + ", ".join(
            _metavar(p) if p.positional else f"{p.cli_flag} {_metavar(p)}" for p in missing))
    params: dict[str, Any] = {}
    for param in kind.params:
        if param.positional:
            if path is not None:
                params[param.name] = path
            continue
        if param.cli_flag in given:
            params[param.name] = _convert(kind, param, getattr(args, _dest(param.cli_flag)), parsers or {})
    return kind.name, params


def _convert(kind, param, value: Any, parsers: dict[str, Any]) -> Any:
    from engine.errors import UserError, with_article

    flag = param.cli_flag
    if param.type is bool or not isinstance(value, str):
        return value
    allowed, of_kind = param.allowed(), f"{flag} of {with_article(kind.name)} source"
    if allowed and value not in allowed:
        raise UserError(f"{of_kind} must be one of {', '.join(allowed)}, not {value!r}")
    if param.name in parsers:
        return parsers[param.name](value)
    if param.type is dict:
        return json_object(value, flag)
    if param.type in (int, float):
        try:
            return param.type(value)
        except ValueError:
            what = "an integer" if param.type is int else "a number"
            raise UserError(f"{of_kind} must be {what} ({param.help}), not {value!r}") from None
    return value


def json_object(text: str, flag: str) -> dict:
    from engine.errors import UserError

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{flag} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object")
    return value
