"""The `resynth` console script. Importing the command line's modules takes a third of a second; Ctrl-C
in that time is one line and exit 130 too, as everywhere after it (engine.cli.main). So this module
imports nothing of its own beyond the standard library."""
from __future__ import annotations

import json
import sys

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C
INTERRUPTED_TEXT = "interrupted (everything committed so far is kept)"


def report(message: str, code: str, exit_code: int, as_json: bool) -> None:
    """The one line of a failure on stderr: text, or with --json one object a script parses."""
    if as_json:
        print(json.dumps({"error": message, "kind": code, "exit_code": exit_code}), file=sys.stderr)
    else:
        print(f"resynth: error: {message}" if exit_code != INTERRUPTED else f"resynth: {message}", file=sys.stderr)


def wants_json(argv: list[str]) -> bool:
    """--json before any `--`: failures are then reported as one JSON object."""
    return "--json" in argv[: argv.index("--") if "--" in argv else len(argv)]


def main() -> int:
    try:
        from engine.cli import main as run
    except KeyboardInterrupt:
        report(INTERRUPTED_TEXT, "interrupted", INTERRUPTED, wants_json(sys.argv[1:]))
        return INTERRUPTED
    return run()
