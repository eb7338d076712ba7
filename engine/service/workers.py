"""`resynth serve --workers N`: N server processes answering on one listening socket.

A server process runs Python on one core at a time, so where the GPU outruns a core a cached lookup is
bound by the CPU work of each request (upload parsing, decoding, lookups, scoring): about 5 ms on this
project's CPU (scripts/bench_serve.py, "server CPU ms"). Workers multiply that. This supervisor binds the
socket once; each worker inherits it and the kernel spreads connections among those accepting. A worker
is a whole server (its own CLIP copy and micro-batcher, its own generation worker and counters, which
/v1/stats labels); the store they share is built for several processes.

The supervisor starts the workers, prints the serving line once all are ready, forwards SIGTERM and
SIGINT as one SIGTERM each (a graceful stop: every worker finishes its requests and saves; a second
signal kills them), restarts a worker that dies after it was ready, and stops them all with a one-line
error when one fails before.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError, kind_of, message_of

WORKER_ENV = "RESYNTH_SERVE_WORKER"  # in a worker: "INDEX/COUNT:SOCKET_FD:READY_FD:SUPERVISOR_PID"
CODE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding this engine package
MAX_RESTARTS = 5  # per worker within RESTART_WINDOW seconds; more means it cannot stay up
RESTART_WINDOW = 60.0
SLOW_START_ENV, SLOW_START_SECONDS = "RESYNTH_WORKER_SLOW_START_S", 180.0  # not serving by then: a warning
PIPE_MESSAGE = 4000  # a worker's start error, in one atomic pipe write (PIPE_BUF is 4096 on Linux)
STOP_SECONDS = 40.0  # a worker's graceful stop (uvicorn allows 30 s for open requests) before it is killed


@dataclass
class Worker:
    """What a worker process knows of itself (from WORKER_ENV)."""

    label: str  # "2/4"
    sock: socket.socket
    ready_fd: int

    def ready(self) -> None:
        """Tell the supervisor this worker is serving (once)."""
        self._say(b"r")

    def failed(self, exc: BaseException) -> None:
        """Before serving: hand a user's error (a damaged store, a missing model) to the supervisor, which
        prints it once for all workers, and exit with its code (SystemExit) without printing it here.
        A bug (no kind) is left to raise: its traceback is what a report needs."""
        kind = kind_of(exc)
        if self.ready_fd < 0 or kind is None:
            return
        said = {"message": message_of(exc), "kind": getattr(exc, "code", None) or kind.code,
                "exit_code": kind.exit_code}
        self._say(b"e" + json.dumps(said).encode()[:PIPE_MESSAGE])
        raise SystemExit(kind.exit_code)

    def _say(self, data: bytes) -> None:
        if self.ready_fd >= 0:
            try:
                os.write(self.ready_fd, data)  # one write under PIPE_BUF: read whole by the supervisor
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = -1


def this_worker() -> Worker | None:
    """The worker this process is, or None for a plain server (or the supervisor)."""
    value = os.environ.pop(WORKER_ENV, None)  # not inherited by anything this worker starts
    if not value:
        return None
    label, sock_fd, ready_fd, supervisor = value.split(":")
    _die_with_parent(int(supervisor))
    return Worker(label, socket.socket(fileno=int(sock_fd)), int(ready_fd))


def _die_with_parent(supervisor: int) -> None:
    """Linux: SIGTERM this worker when the supervisor dies (even by SIGKILL), so none serves orphaned."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor:  # it was gone before the call (reparented to init or a subreaper)
        os.kill(os.getpid(), signal.SIGTERM)


def _seconds(name: str, default: float) -> float:
    """A duration from the environment; a value that is not a number of seconds is a one-line error."""
    raw = os.environ.get(name)
    try:
        value = default if raw is None else float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UserError(f"{name}={raw!r} is not a number of seconds")
    return value


class Supervisor:
    def __init__(self, sock: socket.socket, count: int, argv: list[str], banner: str, json_errors: bool = False):
        self.sock, self.count, self.argv, self.banner = sock, count, argv, banner
        self.json_errors = json_errors
        self.errors: dict[int, dict] = {}  # worker index -> the start error it handed over
        self.procs: dict[int, subprocess.Popen] = {}
        self.pipes: dict[int, int] = {}  # worker index -> read end of its ready pipe
        self.ready: set[int] = set()  # serving now
        self.served: set[int] = set()  # were serving once: a later failure, even at a restart, is restarted
        self.restarts: dict[int, list[float]] = {i: [] for i in range(count)}
        self.started: dict[int, float] = {}  # worker index -> when its current process started (not yet ready)
        self.stopping = self.forced = False
        self.exit_code = 0
        self.slow_start = _seconds(SLOW_START_ENV, SLOW_START_SECONDS)

    def start(self, index: int) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        env = {**os.environ,
               WORKER_ENV: f"{index + 1}/{self.count}:{self.sock.fileno()}:{write_fd}:{os.getpid()}",
               # this process's own engine package, never one in the current folder (python -P)
               "PYTHONPATH": os.pathsep.join([CODE_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
        # the cores shared out: N workers each running PyTorch on every core stall one another
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.count)))
        try:
            self.procs[index] = subprocess.Popen(
                [sys.executable, "-P", "-m", "engine.cli", *self.argv], env=env,
                pass_fds=(self.sock.fileno(), write_fd), start_new_session=True)  # Ctrl-C reaches the supervisor only
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.pipes[index] = read_fd
        self.started[index] = time.monotonic()

    def run(self) -> int:
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.count):
                self.start(index)
            announced = False
            while not self.stopping:
                self._collect_ready(0.5)
                if not announced and len(self.ready) == self.count:
                    print(self.banner, file=sys.stderr, flush=True)
                    announced = True
                self._reap()
                self._warn_slow()
        finally:
            self._stop_all()
            for s, handler in previous.items():
                signal.signal(s, handler)
            for fd in self.pipes.values():
                os.close(fd)
        return self.exit_code

    def _collect_ready(self, timeout: float) -> None:
        if not self.pipes:
            time.sleep(timeout)
            return
        try:
            readable, _, _ = select.select(list(self.pipes.values()), [], [], timeout)
        except InterruptedError:
            return
        for index in [i for i, fd in self.pipes.items() if fd in readable]:
            self._read_pipe(index)

    def _warn_slow(self) -> None:
        """A worker that neither serves nor exits (a model load hung on a lock, a full GPU) is named once,
        so the operator is not left waiting on a silent server."""
        now = time.monotonic()
        for index, since in list(self.started.items()):
            if index in self.pipes and now - since > self.slow_start:
                print(f"resynth: warning: worker {index + 1} of {self.count} is not serving "
                      f"{now - since:.0f} s after its start; still waiting (Ctrl-C stops)", file=sys.stderr, flush=True)
                del self.started[index]

    def _read_pipe(self, index: int) -> None:
        """The ready byte, or the end of a pipe whose worker exited: read once, then closed."""
        try:
            data = os.read(self.pipes[index], PIPE_MESSAGE + 1)
        except BlockingIOError:  # nothing yet
            return
        if data == b"r":
            self.ready.add(index)
            self.served.add(index)
        elif data.startswith(b"e"):
            try:
                self.errors[index] = json.loads(data[1:])
            except ValueError:
                pass
        os.close(self.pipes.pop(index))

    def _reap(self) -> None:
        for index, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None or self.stopping:
                continue
            if index in self.pipes:  # it may have said ready just before it exited
                self._read_pipe(index)
            if index in self.pipes:
                os.close(self.pipes.pop(index))
            del self.procs[index]
            self.ready.discard(index)
            label = f"worker {index + 1} of {self.count}"
            if index not in self.served:  # the server exits with its code (a store that is down exits 4
                # with workers as without), after stopping the others; its error, if it handed one over,
                # is printed here once, not by every worker
                self._say_failed(index, label, code)
                self.exit_code = code if 0 < code < 126 else 1
                self.stopping = True
                return
            now = time.monotonic()
            recent = [t for t in self.restarts[index] if now - t < RESTART_WINDOW] + [now]
            self.restarts[index] = recent
            if len(recent) > MAX_RESTARTS:
                raise UserError(f"{label} exited {len(recent)} times within {RESTART_WINDOW:.0f} s (last code "
                                f"{code}): stopping")
            print(f"resynth: warning: {label} exited with code {code}: restarting it", file=sys.stderr, flush=True)
            self.start(index)

    def _say_failed(self, index: int, label: str, code: int) -> None:
        said = self.errors.get(index)
        stopped = f"{label} exited with code {code} before it was serving: stopping"
        if said is None:  # killed, or a bug whose traceback is above
            print(f"resynth: {stopped}", file=sys.stderr, flush=True)
        elif self.json_errors:
            print(json.dumps({"error": said.get("message"), "kind": said.get("kind"), "exit_code": code,
                              "worker": label}), file=sys.stderr, flush=True)
        else:
            print(f"resynth: error: {said.get('message')} ({stopped})", file=sys.stderr, flush=True)

    def _stop(self, signum, frame) -> None:
        self.forced = self.stopping  # a second signal: stop now, not gracefully
        self.stopping = True

    def _stop_all(self) -> None:
        """One SIGTERM each (a graceful stop), then kill what is still running after STOP_SECONDS, or at
        once on a second SIGTERM or Ctrl-C. The port is closed first: once the workers stop accepting, new
        connections are refused (a balancer tries another server) instead of waiting in the backlog of a
        socket this process kept open, unanswered for up to STOP_SECONDS."""
        self.sock.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        while any(p.poll() is None for p in self.procs.values()) and time.monotonic() < deadline and not self.forced:
            time.sleep(0.1)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def supervise(sock: socket.socket, count: int, banner: str, json_errors: bool = False) -> int:
    """Run `count` workers of the `resynth serve` command this process was started as, on `sock`."""
    argv = sys.argv[1:]
    if next((a for a in argv if not a.startswith("-")), None) != "serve":
        raise UserError("--workers needs `resynth serve` started as a command (it starts that command again)")
    return Supervisor(sock, count, argv, banner, json_errors).run()
