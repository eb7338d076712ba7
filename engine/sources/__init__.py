"""Candidate source kinds: one protocol (`SourceKind`) and one registry.

A source kind is what a stored `Source.kind` names: how a source of that kind is declared (its
parameters, validated into the stored params dict), fingerprinted (the cache key's model part), loaded
(the generator object the engine calls) and what it needs (`generates`, `needs_gpu`, `costs_money`).
The engine asks the registry; it never compares kind strings.

Adding a kind is one module and one registry entry:

    # engine/sources/lora.py
    from engine.sources import Param, Recipe, SourceKind

    class Lora(SourceKind):
        name = "lora"                      # stored in Source.kind: never rename
        params = (Param("path", str, None, "base pipeline folder", positional=True, required=True),
                  Param("lora", str, None, "adapter file", required=True))

        def prepare(self, name, path, lora):            # validate; nothing is loaded here
            return Recipe(path=path, params={"lora": lora}, fingerprint=..., twin="...")

        def params_hash(self, source): ...             # the recipe part of a cache key
        def load(self, source, device): ...            # an object with generate_many(jobs, budget=...)

    # engine/sources/__init__.py, in _builtin():
    from engine.sources.lora import Lora
    register(Lora())

`Workspace.add_source(name, kind="lora", path=..., lora=...)` then enrols it, and `resynth source add`
builds its flags from `params` (engine.cli): one flag per Param (`--name-with-dashes`, or `Param.flag`),
the positional one as the command's second argument; the kind is `--kind K`, else the kind whose
declared flags and required parameters the given ones match (so `source add NAME DIR` is the default
kind and `source add NAME --api URL --model M` the api kind, and a new kind needs no CLI edit).
Paths (`Param.path`, any parameter named `path`, or one whose metavar is DIR or FILE) have `~` and
`$VAR` expanded by `enrol`, whichever way they come in.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from engine.errors import UserError
from engine.paths import expand_optional, expand_path
from index.keys import canonical_json, same_name, sha256_text

DEFAULT_KIND = "diffusers"  # `source add NAME FOLDER` without a kind


@dataclass(frozen=True)
class Param:
    """One declared parameter of a kind: enough for a CLI flag or an HTTP field."""

    name: str
    type: type
    default: Any
    help: str
    positional: bool = False  # the CLI takes it as an argument, not a flag (at most one per kind)
    required: bool = False
    metavar: str | None = None
    flag: str | None = None  # the CLI flag, when not `--name-with-dashes` (the api kind's url is `--api`)
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None  # allowed values (or a call listing them)
    path: bool = False  # a filesystem path: `~` and `$VAR` expanded wherever it enters
    repeatable: bool = False  # the CLI flag may be given several times (the kind receives a list)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def is_path(self) -> bool:
        return self.path or self.name == "path" or self.metavar in ("DIR", "FILE")

    def allowed(self) -> list[str] | None:
        return list(self.choices() if callable(self.choices) else self.choices) if self.choices else None


@dataclass(frozen=True)
class Recipe:
    """A validated declaration, ready to store."""

    path: str | None
    params: dict | None
    fingerprint: str
    twin: str = ""  # why a second name for the same fingerprint is refused
    warning: str | None = None
    older: tuple[str, ...] = ()  # its fingerprint as sources added before recorded it: a twin of those too


class SourceKind:
    """The protocol every kind implements (defaults: a kind that generates locally and is free)."""

    name: str = ""
    params: tuple[Param, ...] = ()
    summary: str = ""  # one line for `source add --help` (default: the class docstring's first line)
    examples: tuple[str, ...] = ()  # `resynth source add ...` lines shown in its help
    generates = True  # False: its references come from a dataset, nothing is ever generated
    needs_gpu = True  # holds device memory while loaded (pipelines are unloaded to make room for it)
    costs_money = False  # each image is bought (cost reports, --max-cost)
    reenrol = False  # adding it again with the same fingerprint is a no-op (ingest creates these)

    def prepare(self, *args: Any, **params: Any) -> Recipe:  # each kind names its own: (name, ...declared params)
        raise NotImplementedError

    def params_hash(self, source) -> str | None:
        """The generation recipe's hash, part of every cache key of this source (None: no recipe)."""
        return None

    def load(self, source, device: str | None):
        raise UserError(f"source {source.name!r} has no pipeline to generate with")

    def current_fingerprint(self, source, linked: bool = True, whole: bool = True) -> str:
        """The fingerprint `prepare` would give the source's files now, from its stored params; a generator
        compares it with the stored one before it loads (kinds with files to re-check define it). `linked` and
        `whole` as engine.generate.fingerprint_folder takes them: older sources recorded other forms."""
        raise NotImplementedError

    def price(self, source) -> float:
        """USD per image (only kinds that cost money)."""
        return float(json.loads(source.params_json).get("price") or 0.0) if self.costs_money else 0.0

    def describe_recipe(self, params: dict, path: str | None) -> str:
        """The stored recipe in words, for `source list` and the demo (engine.recipes)."""
        from engine.recipes import describe

        return describe(params, path)

    def describe(self) -> str:
        """`summary`, else the first line of the class's docstring, else of its module's."""
        import sys

        module = sys.modules.get(type(self).__module__)
        for text in (self.summary, type(self).__doc__, getattr(module, "__doc__", None)):
            if text and text.strip():
                return text.strip().splitlines()[0]
        return ""


_KINDS: dict[str, SourceKind] = {}


def register(kind: SourceKind) -> SourceKind:
    if not kind.name:
        raise ValueError("a source kind needs a name")
    if sum(p.positional for p in kind.params) > 1:
        raise ValueError(f"source kind {kind.name!r}: at most one positional parameter")
    _KINDS[kind.name] = kind
    return kind


def kinds() -> list[SourceKind]:
    _builtin()
    return list(_KINDS.values())


def get(name: str) -> SourceKind:
    _builtin()
    found = _KINDS.get(name)
    if found is None:
        raise UserError(f"unknown source kind {name!r} (known: {', '.join(sorted(_KINDS))})")
    return found


def kind_of(source) -> SourceKind:
    """The kind of a stored source row."""
    return get(source.kind)


def fingerprint(*parts: Any) -> str:
    return sha256_text(canonical_json(list(parts)))


def check_name(name: str) -> None:
    if not name or not name.strip() or len(name) > 200 or any(c in name for c in "/\\\0\n"):
        raise UserError(f"invalid source name {name!r}: use a short name without slashes")


def enrol(store, name: str, kind: str = DEFAULT_KIND, **params) -> dict:
    """Validate and store a source of `kind`: the one path every `source add` and ingest takes."""
    check_name(name)
    found = get(kind)
    for param in found.params:
        value = params.get(param.name)
        if param.is_path and isinstance(value, (str, os.PathLike)):  # a Path stays a Path
            params[param.name] = expand_path(value) if isinstance(value, os.PathLike) else expand_optional(value)
    recipe = found.prepare(name, **params)
    if found.reenrol:
        source = store.ensure_source(name, kind, recipe.fingerprint, path=recipe.path, params=recipe.params)
    else:
        same = {recipe.fingerprint, *recipe.older}
        twin = next((s for s in store.sources() if s.fingerprint in same), None)  # fresh, not cached
        if twin is not None:
            again = same_name(twin.name, name)  # in another Unicode form too (NFD "café", as macOS types it)
            raise UserError(f"source {name!r} already exists (remove it first to change it)" if again else
                            f"source {twin.name!r} {recipe.twin} (a second name would share its resyntheses)")
        source = store.add_source(name, kind, recipe.fingerprint, path=recipe.path, params=recipe.params)
    from engine.recipes import recipe as in_words

    stored = recipe.params or {}
    info = {"name": source.name, "kind": source.kind, "path": source.path, "fingerprint": recipe.fingerprint,
            "params": stored, "recipe": in_words(source.kind, stored, source.path)}  # as `source list` shows it
    warnings = [recipe.warning] if recipe.warning else []
    defaulted = [f"{setting} {stored[setting]:g}" for setting in GUESSED_SETTINGS
                 if isinstance(stored.get(setting), (int, float)) and params.get(setting) is None]
    if defaulted:  # the same words from the CLI, Python and HTTP
        warnings.append(f"{source.name} uses the default {' and '.join(defaulted)}: a recipe must match how the "
                        "images you attribute were made (to change it, remove the source and add it again)")
    if found.name == "api" and params.get("price") is None:  # counted as free by the budget: no limit at all
        warnings.append(f"{source.name} has no --price: --max-cost counts its images as free and cannot limit what it "
                        "buys; if they cost money, remove it and add it again with --price USD per image")
    if warnings:
        info["warnings"] = warnings
    return info


# A pipeline recipe's settings that no pipeline folder records: left out, they are guesses
GUESSED_SETTINGS = ("steps", "guidance")


_loaded = False
_registering = False  # set while this module's lock holder imports the kinds (a get() from those imports returns)
_REGISTRY_LOCK = threading.RLock()


def _builtin() -> None:
    """The kinds shipped with resynth, registered on first use (their modules import no torch). Threads
    that ask at once wait for the first: `_loaded` was set before the kinds were, and every other thread
    read an empty registry ("unknown source kind 'diffusers' (known: )")."""
    global _loaded, _registering
    if _loaded:
        return
    with _REGISTRY_LOCK:
        if _loaded or _registering:
            return
        _registering = True
        try:
            from engine.sources.api import Api
            from engine.sources.lora import Lora
            from engine.sources.pipeline import Pipeline
            from engine.sources.replay import Replay
            from engine.sources.single_file import SingleFile

            for kind in (Pipeline(), Api(), Replay(), SingleFile(), Lora()):
                _KINDS.setdefault(kind.name, kind)
            _loaded = True
        finally:
            _registering = False
