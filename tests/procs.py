"""Real `resynth` processes for the fault and race tests, without each paying the model libraries' import.

A `resynth` process spends about 5 s importing torch, open_clip and diffusers before its first step, and the
fault tests start dozens of them. Here they are forked from one server process that imported those once
(multiprocessing's forkserver): each is still a process of its own, with its own memory, files, locks and
database connections, killed by its own SIGKILL at a crash point, racing the others for real. What the
import itself does (a console script, Ctrl-C during it) is tested with ordinary subprocesses elsewhere.
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What every command imports sooner or later; importing them here, once, is the whole point.
PRELOAD = ["torch", "torchvision", "transformers", "open_clip", "diffusers", "engine.cli", "engine.workspace",
           "engine.sources", "tests.procs"]

_lock = threading.Lock()
_context = None


def _forkserver():
    global _context
    with _lock:
        if _context is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read at import by huggingface_hub, so before the server
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            _context = context
    return _context


def _run(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """The child: the command's environment, folder and output files, then `resynth argv`."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        sys.stdout.flush(), sys.stderr.flush()
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    from engine.cli import main

    code = main(argv)
    sys.stdout.flush(), sys.stderr.flush()
    sys.exit(code)


class Running:
    """A started `resynth` process: `pid`, `alive()`, `kill()` (SIGKILL) and `wait()`."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path):
        self.argv = ["resynth", *argv]
        self._folder = tempfile.TemporaryDirectory(prefix="resynth-proc-")
        self._out, self._err = Path(self._folder.name, "out"), Path(self._folder.name, "err")
        self._out.touch(), self._err.touch()
        self.process = _forkserver().Process(target=_run, args=(argv, env, str(cwd), str(self._out), str(self._err)))
        self.process.start()
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout: float = 180) -> subprocess.CompletedProcess:
        """What subprocess.run would return (returncode -9 when killed); a process past `timeout` is killed
        and subprocess.TimeoutExpired raised, as subprocess.run does."""
        self.process.join(timeout)
        try:
            if self.process.exitcode is None:
                self.process.kill()
                self.process.join()
                raise subprocess.TimeoutExpired(self.argv, timeout, self._out.read_text(), self._err.read_text())
            return subprocess.CompletedProcess(self.argv, self.process.exitcode, self._out.read_text(errors="replace"),
                                               self._err.read_text(errors="replace"))
        finally:
            self._folder.cleanup()


def start(*argv, crash_at: str | None = None, env: dict[str, str] | None = None, cwd: Path = REPO) -> Running:
    """`resynth argv` started in a process of its own, optionally killed (SIGKILL) at the named write step
    (RESYNTH_CRASH_AT). Thread-safe: two calls from two threads are two processes racing."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    environment.pop("RESYNTH_CRASH_AT", None)
    if crash_at:
        environment["RESYNTH_CRASH_AT"] = crash_at
    return Running([str(a) for a in argv], environment, cwd)


def resynth(*argv, crash_at: str | None = None, env: dict[str, str] | None = None, cwd: Path = REPO,
            timeout: float = 180) -> subprocess.CompletedProcess:
    """`resynth argv` run to its end in a process of its own (see `start`): what subprocess.run returns."""
    return start(*argv, crash_at=crash_at, env=env, cwd=cwd).wait(timeout)
