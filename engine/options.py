"""Per-request attribution options, declared once: default, bounds and help of each.

The CLI flags (`add_arguments`), the HTTP form fields (`Options.from_strings`) and the evaluation
all derive from this one dataclass, so a new option reaches every entry point together.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from collections.abc import Iterable, Mapping
from typing import Any

from engine.aggregate import AGGREGATIONS, DEFAULT_AGGREGATION, DEFAULT_PER_SOURCE, DEFAULT_REFERENCES
from engine.errors import OptionError

MAX_SEED = 2**31 - 1
MODES = ("resynthesis", "dataset", "combined")
# combined: best mean and best worst case over 9 (dataset x features) cells, never significantly worse
# than resynthesis alone (README, "Method variants and the defaults"; scripts/bench_modes.py)
DEFAULT_MODE = "combined"
DEFAULT_NEIGHBOURS = 32
DEFAULT_ADAPTIVE = True  # half the generations at equal or better accuracy (README, "Generation budget")
DECISIVE_MARGIN = 0.02  # adaptive: a source more than this below the best is out of contention
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _option(default: Any, help: str, kind: type = int, low: float | None = None, high: float | None = None,
            choices: tuple[str, ...] | None = None, metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "kind": kind, "low": low, "high": high,
                                            "choices": choices, "metavar": metavar})


@dataclass(frozen=True)
class Options:
    """How one request is attributed. Hashable, so plans can be cached per distinct option set."""

    per_source: int = _option(
        DEFAULT_PER_SOURCE, "resyntheses per source, K: each one not yet stored costs a generation",
        low=1, high=64, metavar="K")
    aggregation: str = _option(
        DEFAULT_AGGREGATION, "how a source's similarities become its score: max (best match), mean, knn "
        "(mean of the top 3), softmax", kind=str, choices=AGGREGATIONS)
    references: int = _option(
        DEFAULT_REFERENCES, "most stored resyntheses of the description compared per source (every stored "
        "one of the same recipe counts, whatever its seed: K caps generation, this caps evidence)",
        low=1, high=100_000, metavar="N")
    mode: str = _option(
        DEFAULT_MODE, "resynthesis: compare with the description's resyntheses (generating what is missing); "
        "dataset: no generation, rank sources by the query's nearest neighbours among every stored "
        "resynthesis, whatever its description; combined: both sets of references together",
        kind=str, choices=MODES)
    adaptive: bool = _option(
        DEFAULT_ADAPTIVE, "generate one seed per source first, then more seeds only for the sources still in "
        "contention (within the decisive margin of the best), up to K", kind=bool)
    neighbours: int = _option(
        DEFAULT_NEIGHBOURS, "nearest stored references searched in dataset and combined modes", low=1, high=10_000,
        metavar="N")
    seed: int = _option(0, "first generation seed; seeds seed .. seed+K-1 are used", low=0, high=MAX_SEED)
    sources: tuple[str, ...] | None = _option(
        None, "comma-separated subset of sources to consider (default: all)", kind=tuple, metavar="A,B")
    original_refs: int = _option(
        0, "also compare with up to N stored labelled originals per source (few-shot references; "
        "0: resynthesis only, the paper's setting)", low=0, high=100_000, metavar="N")
    max_cost: float | None = _option(
        None, "most USD this request may spend on API sources' images (default: no limit); a source whose "
        "next images would exceed it is not scored, with the reason", kind=float, low=0, high=1e9, metavar="USD")

    def __post_init__(self) -> None:
        for f in fields(self):
            meta, value = f.metadata, getattr(self, f.name)
            name = f"{f.name} (--{f.name.replace('_', '-')})"
            if meta["kind"] is bool:
                if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
                    value = bool(value)  # a numpy yes/no (a pandas cell, a mask's element) is a yes/no
                    object.__setattr__(self, f.name, value)
                if not isinstance(value, bool):
                    raise OptionError(f"{name} must be true or false, not {value!r:.40}")
            elif meta["kind"] is int:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise OptionError(f"{name} must be an integer, not {value!r:.40}")
                value = int(value)  # a numpy integer is an integer; stored as Python's, for hashing and JSON
                object.__setattr__(self, f.name, value)
                if not meta["low"] <= value <= meta["high"]:
                    raise OptionError(f"{name} must be between {meta['low']} and {meta['high']}, not {value}")
            elif meta["kind"] is float and value is not None:
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
                    raise OptionError(f"{name} must be a number, not {value!r:.40}")
                if not meta["low"] <= value <= meta["high"]:
                    raise OptionError(f"{name} must be between {meta['low']} and {meta['high']:g}, not {value}")
                # a float whatever it was given as (bounded first: float(10**400) overflows): `max_cost=1` from
                # Python said 1 in the answer's budget where `--max-cost 1` and the HTTP field said 1.0
                object.__setattr__(self, f.name, float(value) + 0.0)  # + 0.0: -0.0 is 0.0
            elif meta["choices"] and value not in meta["choices"]:
                raise OptionError(f"{name} must be one of {', '.join(meta['choices'])}, not {value!r:.40}")
        if self.sources is not None:
            given: Any = self.sources.split(",") if isinstance(self.sources, str) else self.sources
            names = list(given) if isinstance(given, Iterable) and not isinstance(given, (bytes, Mapping)) else [None]
            if not all(isinstance(n, str) for n in names):
                raise OptionError(f"sources (--sources) must be source names: a str \"A,B\" or a list of str, not "
                                  f"{self.sources!r:.60}")
            if not all(str(n).encode("utf-8", "replace") == str(n).encode("utf-8", "surrogatepass") for n in names):
                raise OptionError("sources (--sources) holds bytes that are not UTF-8: set the terminal to UTF-8")
            cleaned = tuple(sorted({str(n).strip() for n in names if str(n).strip()}))
            if not cleaned and isinstance(self.sources, str):  # `--sources "$UNSET"` meant a subset, not all
                raise OptionError("sources (--sources) names no source: give A,B or leave it out for all")
            object.__setattr__(self, "sources", cleaned or None)

    @classmethod
    def from_strings(cls, given: Mapping[str, str]) -> "Options":
        """From text fields (an HTTP form): empty fields keep their default; unknown names are ignored."""
        if not isinstance(given, Mapping):
            raise OptionError(f"options must be given as a mapping of names to texts, not {type(given).__name__}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = given.get(f.name)
            if raw is None or not str(raw).strip():
                continue
            values[f.name] = parse_text(f.name, str(raw))
        return cls(**values)

    @classmethod
    def check_fields(cls, names: Iterable[str], others: tuple[str, ...] = ("image", "prompt")) -> None:
        """Refuse a form field that is neither an option nor one of `others`, as the CLI refuses an unknown
        flag: an HTTP client that sent `max-cost` (the flag's spelling) ran with no cost limit at all."""
        options = [f.name for f in fields(cls)]
        for name in names:
            if name in options or name in others:
                continue
            spelt = str(name).strip().lstrip("-").replace("-", "_")
            hint = ""
            if spelt in options:
                hint = f" (the field is {spelt})"
            elif spelt.startswith("no_") and spelt[3:] in options:
                hint = f" (send {spelt[3:]}=false)"
            elif close := difflib.get_close_matches(spelt, [*options, *others], n=1):
                hint = f" (did you mean {close[0]}?)"
            raise OptionError(f"unknown field {str(name)[:40]!r}{hint}; the fields are {', '.join(others)} and "
                              f"the options {', '.join(options)}")

    def with_changes(self, **changes: Any) -> "Options":
        for name in changes:
            if name not in _FIELDS:
                raise unknown_option(name)
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


class UnknownOptionError(OptionError, TypeError):
    """An option name Options does not have (`Options(per_sourc=3)`): a bad_option like the HTTP form's unknown
    field, and a TypeError as Python raises for an unknown keyword, with the nearest name as the CLI gives it."""


def unknown_option(name: Any) -> UnknownOptionError:
    spelt = str(name).strip().lstrip("-").replace("-", "_")
    close = [spelt] if spelt in _FIELDS else difflib.get_close_matches(spelt, list(_FIELDS), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return UnknownOptionError(f"unknown option {str(name)[:40]!r}{hint} (the options: {', '.join(_FIELDS)})")


def _refusing_unknown_names(init: Any) -> Any:
    """The dataclass's own __init__, after a check of its keyword names: Python's TypeError for
    `Options(per_sourc=3)` named no option, where the CLI suggests the nearest flag (engine.flags)."""

    @functools.wraps(init)
    def __init__(self: Options, *args: Any, **kwargs: Any) -> None:
        for name in kwargs:
            if name not in _FIELDS:
                raise unknown_option(name)
        if len(args) > len(_FIELDS):
            raise UnknownOptionError(f"Options takes at most {len(_FIELDS)} values; give them by name, e.g. "
                                     "Options(per_source=3)")
        init(self, *args, **kwargs)

    return __init__


def parse_text(name: str, raw: str) -> Any:
    """One option's value from its text, as a CLI flag or an HTTP form field gives it: both layers read it
    here, so a bad value is the same OptionError (and message) from either, and from Options itself."""
    meta = _FIELDS[name].metadata
    raw = raw.strip()
    flag = f"{name} (--{name.replace('_', '-')})"
    if meta["kind"] is bool:
        if raw.lower() not in TRUE + FALSE:
            raise OptionError(f"{flag} must be true or false, not {raw[:40]!r}")
        return raw.lower() in TRUE
    if meta["kind"] in (int, float):
        try:
            return meta["kind"](raw)
        except ValueError:
            kind = "an integer" if meta["kind"] is int else "a number"
            raise OptionError(f"{flag} must be {kind}, not {raw[:40]!r}") from None
    return raw


def given_twice(name: str, count: int) -> OptionError:
    """An option given more than once: only the last would count, so a list of sources was silently cut to
    one. The CLI (`--sources a --sources b`) and an HTTP form (two `sources` fields) refuse it alike."""
    return OptionError(f"option {name!r} given {count} times: give each option once (sources as one "
                       "comma-separated list)")


REPEATED = "_options_given_twice"  # the namespace's record of the flags given more than once (from_args refuses)


def _count(namespace: argparse.Namespace, dest: str) -> None:
    seen = getattr(namespace, REPEATED, None) or {}
    seen[dest] = seen.get(dest, 0) + 1
    setattr(namespace, REPEATED, seen)


class _Store(argparse.Action):
    """argparse's store, counting how often the flag was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        _count(namespace, self.dest)
        setattr(namespace, self.dest, values)


class _Switch(argparse.BooleanOptionalAction):
    """--flag / --no-flag, counting how often either was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        _count(namespace, self.dest)
        super().__call__(parser, namespace, values, option_string)


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One CLI flag per option (or per option named in `only`), with its default and help. Values are
    read as text and checked by `from_args` (parse_text, then Options), not by argparse: `--mode foo` is
    the same one-line bad_option error as the HTTP field `mode=foo`, not a usage message."""
    for f in fields(Options):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        shown = ("on" if f.default else "off") if meta["kind"] is bool else f.default
        default = f" (default {shown})" if f.default is not None else ""
        if meta["kind"] is bool:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                                action=_Switch, help=meta["help"] + default)
            continue
        metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else meta["metavar"]
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar=metavar,
                            action=_Store, help=meta["help"] + default)


def from_args(args: argparse.Namespace) -> Options:
    twice = {name: count for name, count in (getattr(args, REPEATED, None) or {}).items() if count > 1}
    if twice:
        raise given_twice(*next(iter(twice.items())))
    given = {f.name: getattr(args, f.name, None) for f in fields(Options)}
    return Options(**{name: parse_text(name, value) if isinstance(value, str) else value
                      for name, value in given.items() if value is not None})


def schema() -> dict:
    """JSON-schema properties of the options, for the HTTP API's documentation."""
    out = {}
    for f in fields(Options):
        meta = f.metadata
        prop: dict[str, Any] = {"description": meta["help"]}
        if meta["kind"] is bool:
            prop.update(type="boolean", default=f.default)
        elif meta["kind"] is int:
            prop.update(type="integer", default=f.default, minimum=meta["low"], maximum=meta["high"])
        elif meta["kind"] is float:
            prop.update(type="number", default=f.default, minimum=meta["low"], maximum=meta["high"])
        else:
            prop.update(type="string")
            if f.default is not None:
                prop["default"] = f.default
            if meta["choices"]:
                prop["enum"] = list(meta["choices"])
        out[f.name] = prop
    return out


_FIELDS = {f.name: f for f in fields(Options)}
Options.__init__ = _refusing_unknown_names(Options.__init__)  # type: ignore[method-assign]
