"""Micro-batching: concurrent requests' query images share one CLIP forward pass.

A CLIP forward on a batch of 16 costs far less than 16 forwards of one, so one thread embeds
everything that is waiting in a single call. It holds a batch open for up to `window` seconds, but
only while other requests have announced (`expect`) that their images are on the way: a lone
request is embedded at once and pays no waiting, a busy server fills its batches.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
from PIL import Image

Embed = Callable[[list[Image.Image]], np.ndarray]


class MicroBatcher:
    """`submit(images)` returns a Future of their vectors; one worker thread batches submissions."""

    def __init__(self, embed: Embed, window: float = 0.004, max_images: int = 32):
        self._embed = embed
        self.window = window
        self.max_images = max_images
        self._cond = threading.Condition()
        self._waiting: list[tuple[list[Image.Image], Future]] = []
        self._expected = 0
        self._closed = False
        self.batches = 0
        self.images = 0
        self._thread = threading.Thread(target=self._run, name="resynth-embed-batcher", daemon=True)
        self._thread.start()

    @contextmanager
    def expect(self) -> Iterator[None]:
        """Announce a submission to come, so a batch being formed waits (up to `window`) for it."""
        with self._cond:
            self._expected += 1
        try:
            yield
        finally:
            with self._cond:
                self._expected -= 1
                self._cond.notify_all()

    def submit(self, images: list[Image.Image]) -> Future:
        future: Future = Future()
        if not images:
            future.set_result(np.zeros((0, 0), np.float32))
            return future
        with self._cond:
            if self._closed:
                raise RuntimeError("the embedding batcher is closed")
            self._waiting.append((images, future))
            self._cond.notify_all()
        return future

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def stats(self) -> dict:
        with self._cond:
            return {"batches": self.batches, "images": self.images,
                    "mean_batch": round(self.images / self.batches, 2) if self.batches else 0.0}

    def _take(self) -> list[tuple[list[Image.Image], Future]] | None:
        """Block for work, hold the batch open while more is announced, return it (None: closed)."""
        with self._cond:
            self._cond.wait_for(lambda: self._waiting or self._closed)
            if not self._waiting:
                return None
            deadline = time.monotonic() + self.window
            while self._expected > 0 and self._count() < self.max_images:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list = []
            count = 0
            while self._waiting and (not batch or count + len(self._waiting[0][0]) <= self.max_images):
                item = self._waiting.pop(0)
                batch.append(item)
                count += len(item[0])
            return batch

    def _count(self) -> int:
        return sum(len(images) for images, _ in self._waiting)

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            batch = [(images, fut) for images, fut in batch if fut.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                vectors = self._embed([im for images, _ in batch for im in images])
            except BaseException as exc:  # every waiter learns of the failure; the thread lives on
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            start = 0
            for images, fut in batch:
                fut.set_result(vectors[start:start + len(images)])
                start += len(images)
            with self._cond:
                self.batches += 1
                self.images += start
