"""Subcommands of this package, added to the `resynth` parser by engine.cli."""
from __future__ import annotations


def register(sub, common) -> None:
    """Add this package's subparsers to `sub`; `common` is the parent parser with --store/--json/--quiet."""
