"""The `resynth` console script. Importing the command line's modules takes a third of a second; Ctrl-C
in that time is one line and exit 130 too, as everywhere after it (engine.cli.main)."""
from __future__ import annotations

import sys

from engine.errors import INTERRUPTED, INTERRUPTED_TEXT, report, wants_json


def main() -> int:
    try:
        from engine.cli import main as run
    except KeyboardInterrupt:
        report(INTERRUPTED_TEXT, "interrupted", INTERRUPTED, wants_json(sys.argv[1:]))
        return INTERRUPTED
    return run()
