"""Importer for the folder layout of the reference paper's public resynthesis dataset."""
from __future__ import annotations


def register(sub, common) -> None:
    """Add this module's subparsers to `sub`; `common` is the parent parser with --store/--json/--quiet."""
