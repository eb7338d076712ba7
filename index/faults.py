"""Named crash points for the fault-injection tests.

`RESYNTH_CRASH_AT=<name>` makes the process kill itself (SIGKILL: no cleanup, no flush, as a power cut
or the OOM killer would) when it reaches that point, so tests can stop a real process at each write
step deterministically. Unset, a crash point costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "RESYNTH_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
