"""Named fault points for the fault-injection tests and benchmarks, never a private attribute.

* Crash points: `RESYNTH_CRASH_AT=<name>` makes the process kill itself (SIGKILL: no cleanup, no flush,
  as a power cut or the OOM killer would) when it reaches that point, so tests can stop a real process
  at each write step deterministically. Unset, a crash point costs one dictionary lookup.
  `RESYNTH_INTERRUPT_AT=<name>` sends the process a SIGINT there instead, once (a user's Ctrl-C at that
  step: Python raises KeyboardInterrupt at its next bytecode, and every cleanup on the way runs).
* Skip points: `with skipping(name):` (or `arm(name)` for the rest of the process) makes the store
  leave out one step, e.g. "close:publish" (a process that dies after its commit, before publishing
  the index) or "ids:digest" (compare every id, as before the id digest existed).
* Observation points: `with observing(name) as calls:` counts how often the store reached a point,
  e.g. "ids:full-read" (every vector id read from the database).

Known names: see SKIP_POINTS and OBSERVE_POINTS.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Iterator

ENV = "RESYNTH_CRASH_AT"
INTERRUPT_ENV = "RESYNTH_INTERRUPT_AT"
SKIP_POINTS = ("close:publish", "ids:digest")
OBSERVE_POINTS = ("ids:full-read",)

_armed: dict[str, int] = {}
_observers: dict[str, list[list[str]]] = {}


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(INTERRUPT_ENV) == name:
        del os.environ[INTERRUPT_ENV]  # one Ctrl-C, not one per pass
        signal.raise_signal(signal.SIGINT)


def _known(name: str, names: tuple[str, ...]) -> None:
    if name not in names:
        raise ValueError(f"unknown fault point {name!r} (known: {', '.join(names)})")


def arm(name: str) -> None:
    """Skip the step `name` from now on in this process (until `disarm`)."""
    _known(name, SKIP_POINTS)
    _armed[name] = _armed.get(name, 0) + 1


def disarm(name: str) -> None:
    if _armed.get(name, 0) > 1:
        _armed[name] -= 1
    else:
        _armed.pop(name, None)


@contextmanager
def skipping(name: str) -> Iterator[None]:
    arm(name)
    try:
        yield
    finally:
        disarm(name)


def skipped(name: str) -> bool:
    """Whether the store should leave out the step `name` (a test or a benchmark asked for it)."""
    return name in _armed


@contextmanager
def observing(name: str) -> Iterator[list[str]]:
    """A list that gains one entry each time the store reaches the observation point `name`."""
    _known(name, OBSERVE_POINTS)
    calls: list[str] = []
    _observers.setdefault(name, []).append(calls)
    try:
        yield calls
    finally:
        _observers[name].remove(calls)


def observe(name: str) -> None:
    for calls in _observers.get(name, ()):
        calls.append(name)
