"""Helpers the tests share, importable as `tests.helpers` from any working directory (tests/ is a package)."""
from __future__ import annotations


def run_cli(*argv) -> int:
    """Run a resynth command in this process, as a user would type it; returns its exit code."""
    from engine.cli import main

    return main([str(a) for a in argv])


def db_args(db) -> list:
    """`resynth init` arguments for the backend `db` (the `db` fixture: nothing for SQLite)."""
    return ["--db", db] if db else []
