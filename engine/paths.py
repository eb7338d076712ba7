"""Paths as a user writes them: `~`, `~user` and `$VAR` / `${VAR}` expanded wherever a path enters.

A shell expands `~` only when it is unquoted and at the start of a word (`--clip-checkpoint=~/x` and
`"~/x"` reach resynth as they are), and Python never does: so every entry point (CLI arguments, the
Python API, the service's configuration, paths stored in a store's config) goes through `expand_path`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union, overload

PathLike = Union[str, os.PathLike]


def expand(text: str) -> str:
    """`~`/`~user` and environment variables expanded; an undefined variable stays as written (as in
    a shell's `set -u`-free behaviour, so the resulting "not found" message shows the `$NAME`)."""
    return os.path.expanduser(os.path.expandvars(text))


@overload
def expand_path(path: PathLike) -> Path: ...
@overload
def expand_path(path: None) -> None: ...
def expand_path(path: PathLike | None) -> Path | None:
    """`path` as a Path with `~` and `$VAR` expanded (not resolved: relative stays relative); None stays None."""
    if path is None:
        return None
    if isinstance(path, Path):
        text = str(path)
        return path if "~" not in text and "$" not in text else Path(expand(text))
    return Path(expand(os.fspath(path)))


def expand_optional(path: PathLike | None) -> str | None:
    """`expand_path` as a string (for APIs that keep paths as text); None and "" stay as they are."""
    if path is None or path == "":
        return path  # type: ignore[return-value]
    return str(expand_path(path))


def path_argument(text: str) -> str:
    """argparse `type=` for path options: the expanded text (quoted `~/x` and `--flag=~/x` included)."""
    return expand(text)
