"""The attribution service: the one request path (engine.request) with its steps placed so cached
lookups stay fast.

The service decides only where each step runs (`Placement`): the query images go to the
micro-batcher (shared CLIP forward passes) as soon as they are described, while each description's
stored resyntheses are looked up; a caption or a missing resynthesis is a single-flight job on the one
generation worker. A request whose resyntheses are all stored never touches the generation queue.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, ContextManager, Hashable

from engine.attribute import Query, Report
from engine.options import Options
from engine.request import Request, Waiter
from engine.resynthesis import prices
from engine.service.batching import MicroBatcher
from engine.service.config import Limits
from engine.service.generation import GenerationQueue
from engine.workspace import Workspace, open_workspace
from index.errors import StoreError

log = logging.getLogger("resynth.service")


class Placement:
    """engine.request's runner for the service: batched embedding, model calls on the generation worker."""

    shared = True  # one single-flight job per description (and per caption), joined by concurrent requests

    def __init__(self, batcher: MicroBatcher, generation: GenerationQueue):
        self.batcher, self.generation = batcher, generation

    def announce(self) -> ContextManager:
        return self.batcher.expect()

    def embed(self, ws: Workspace, images: list) -> Waiter:
        return self.batcher.submit(images).result

    def heavy(self, key: Hashable, job: Callable[[], Any]) -> Waiter:
        joined = self.generation.in_flight(key)
        future = self.generation.submit(key, job)  # QueueFull propagates: the caller answers 503
        return lambda: (future.result(), joined)


class Service:
    """Owns a Workspace and the two worker threads; safe to call from many requests at once."""

    def __init__(self, workspace: Workspace, limits: Limits = Limits()):
        self.ws = workspace
        self.store = workspace.store
        self.limits = limits
        workspace.max_loaded = limits.max_loaded
        self.batcher = MicroBatcher(workspace.embed, limits.batch_window, limits.max_batch)
        self.generation = GenerationQueue(limits.queue_size, after_job=self._mark_unsaved)
        self.placement = Placement(self.batcher, self.generation)
        # a request's path runs on one of these threads (it waits there for its embedding and jobs)
        self.requests = ThreadPoolExecutor(max(4, limits.max_requests), thread_name_prefix="resynth-request")
        self._lock = threading.Lock()  # guards counters and the unsaved flag
        self._unsaved = False
        self._last_save = time.monotonic()
        self._save_cost = 0.0  # seconds the last save took (a save rewrites the whole index file)
        self.started = time.time()
        self.counters: Counter[str] = Counter()
        self.closed = False
        self.worker: str | None = None  # "2/4" under `resynth serve --workers 4`: these counters are that worker's
        # the readiness probe of the database: one at a time, on its own thread (see probe_store)
        self._probes = ThreadPoolExecutor(1, thread_name_prefix="resynth-ready")
        self._probe: Future | None = None

    @classmethod
    def open(cls, root: Path, limits: Limits = Limits(), captioner: str | None = None,
             device: str | None = None) -> "Service":
        """Open a store with the models it is bound to (errors if anything does not match)."""
        ws = open_workspace(root, device=device, captioner=captioner)
        try:
            _ = ws.embedder  # loaded now: ready means ready
            _ = ws.captioner
            return cls(ws, limits)
        except BaseException:
            ws.close()
            raise

    # ----- attribution ---------------------------------------------------------------------------
    async def attribute(self, queries: list[Query], options: Options) -> dict:
        """Same JSON as `resynth attribute --json`, plus per-stage seconds of this request."""
        started = time.perf_counter()
        if options.per_source > self.limits.max_per_source:
            from engine.errors import OptionError

            raise OptionError(f"per_source (--per-source) must be at most {self.limits.max_per_source} on this "
                              "server (its --max-per-source)")  # named as Options names its bounds
        from engine.api_source import Budget

        limits = [x for x in (options.max_cost, self.limits.max_cost) if x is not None]
        budget = Budget(min(limits) if limits else None)
        request = Request(self.ws, options, budget, self.placement)
        loop = asyncio.get_running_loop()
        results, counts = await loop.run_in_executor(self.requests, request.run, queries)
        marks = request.marks
        seconds = {"describe": marks["described"] - started,
                   "resyntheses_and_embed": marks["resynthesized"] - marks["described"]}
        cached = sum(c for c, _, _ in counts.values())
        generated = sum(g for _, g, _ in counts.values())
        with self._lock:
            self.counters.update(requests=1, queries=len(queries), cached=cached, generated=generated)
        seconds["total"] = time.perf_counter() - started
        assert request.plan is not None  # run() resolved it
        return Report(results, cached, generated, seconds,
                      budget.to_dict() if prices(request.plan) else None).to_dict()

    # ----- upkeep --------------------------------------------------------------------------------
    def maintain(self) -> None:
        """Periodic, off the event loop: swap in a rebuilt index, save new vectors."""
        if self.ws.refresh():
            with self._lock:
                self.counters["index_swaps"] += 1
            log.info("index file replaced by another process: swapped in")
        with self._lock:  # at most 10% of the time saving: new vectors are in the database already, and
            # other processes catch an index file that lags up by reading only the newer ids
            interval = max(self.limits.save_seconds, 10 * self._save_cost)
            due = self._unsaved and time.monotonic() - self._last_save >= interval
            if due:
                self._unsaved = False
                self._last_save = time.monotonic()
        if due:
            started = time.monotonic()
            self.store.save_index()
            self._save_cost = time.monotonic() - started

    def _mark_unsaved(self) -> None:
        with self._lock:
            self._unsaved = True

    def count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def stats(self) -> dict:
        store = self.ws.stats()
        store.pop("store", None)  # the server's filesystem layout is not the client's business
        (store.get("search") or {}).pop("path", None)  # nor is where its search index lies (hardening)
        with self._lock:
            counters = dict(self.counters)
        service = {"uptime_seconds": round(time.time() - self.started, 1),
                   **({"worker": self.worker} if self.worker else {}), **counters}
        return {"store": store, "service": service,
                "generation_queue": self.generation.stats(), "embed_batches": self.batcher.stats(),
                "generator_images": self.ws.generator_calls}

    def ready(self) -> bool:
        return not self.closed and self.batcher.alive() and self.generation.alive()

    def store_reachable(self) -> bool:
        """Whether the store's database answers a trivial query: a server whose database is down answers
        every lookup 503, so readiness says so and a balancer sends its requests to another server."""
        try:
            return self.store.reachable()
        except StoreError:  # the store's own translation of a driver error: not reachable either
            return False

    def probe_store(self) -> Future:
        """The probe in flight, or a new one. A database that hangs (a network black hole, a paused VM) holds
        a probe for as long as the driver waits: later probes join it instead of taking more threads."""
        with self._lock:
            if self._probe is None or self._probe.done():
                self._probe = self._probes.submit(self.store_reachable)
            return self._probe

    def close(self) -> None:
        """Finish the running job, stop the workers, save the index."""
        if self.closed:
            return
        self.closed = True
        self.generation.close()
        self.batcher.close()
        self.requests.shutdown(wait=False)
        self._probes.shutdown(wait=False)
        self.ws.close()
