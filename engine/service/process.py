"""`resynth serve` as a child process on a free loopback port: for scripts, benchmarks and tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts the server and returns once /readyz answers 200; `stop()` shuts it down gracefully.

    Its stderr is read all along (a full pipe would stall the server) and kept in `log`.
    """

    def __init__(self, store: Path, *extra: str, timeout: float = 90.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--store", str(store),
                                      "--port", str(self.port), "--quiet", *extra],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise RuntimeError(f"server exited: {self.log[-2000:]}")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("server did not become ready in time")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        """What the server wrote to stderr so far (all of it once `stop()` has returned)."""
        return "".join(self._lines)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None  # started with stderr=PIPE
        for line in iter(self.proc.stderr.readline, b""):
            self._lines.append(line.decode(errors="replace"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
