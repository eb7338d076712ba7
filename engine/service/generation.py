"""Heavy work (generation, captioning) on one worker thread behind a bounded queue, with single flight.

Cached lookups never enter this queue, so they never wait behind a generation. Requests that need the
same work (same key) share one job: the second caller gets the first caller's Future. When the queue
is full a new job is refused at once (the caller answers 503) rather than piling up unbounded.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Hashable


class QueueFull(Exception):
    """The generation queue holds `limit` waiting jobs already."""


class GenerationQueue:
    def __init__(self, limit: int = 16, after_job: Callable[[], None] | None = None):
        self.limit = limit
        self._after_job = after_job
        self._queue: queue.Queue[tuple[Hashable, Callable[[], Any], Future] | None] = queue.Queue()
        self._inflight: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self._waiting = 0
        self.counters = {"jobs": 0, "joined": 0, "refused": 0, "failed": 0}
        self._thread = threading.Thread(target=self._run, name="resynth-generation", daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, job: Callable[[], Any]) -> Future:
        """Future of `job()`; joins a queued or running job with the same key instead of adding one."""
        with self._lock:
            running = self._inflight.get(key)
            if running is not None:
                self.counters["joined"] += 1
                return running
            if self._waiting >= self.limit:
                self.counters["refused"] += 1
                raise QueueFull(f"generation queue full ({self.limit} job{'s' * (self.limit != 1)} waiting)")
            future: Future = Future()
            self._inflight[key] = future
            self._waiting += 1
            self.counters["jobs"] += 1
        self._queue.put((key, job, future))
        return future

    def in_flight(self, key: Hashable) -> bool:
        """Whether a job with this key is queued or running (a submit now would join it)."""
        with self._lock:
            return key in self._inflight

    def depth(self) -> int:
        with self._lock:
            return self._waiting

    def stats(self) -> dict:
        with self._lock:
            return {**self.counters, "waiting": self._waiting, "running": len(self._inflight) - self._waiting,
                    "limit": self.limit}

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            key, job, future = item
            with self._lock:
                self._waiting -= 1
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:  # reported to every waiter; the worker keeps serving
                    with self._lock:
                        self.counters["failed"] += 1
                    future.set_exception(exc)
            with self._lock:
                self._inflight.pop(key, None)
            if self._after_job is not None:
                try:
                    self._after_job()
                except Exception:  # bookkeeping must never stop the worker
                    pass
