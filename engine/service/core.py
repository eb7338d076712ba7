"""The attribution service: the Workspace's public steps arranged so cached lookups stay fast.

Per request: describe (prompt / stored metadata; captioning goes through the generation queue), then
concurrently (a) embed the query images through the micro-batcher and (b) for each description, look
up its stored resyntheses and, only if some are missing, wait for the single generation worker;
finally score against exactly those candidates. A request whose resyntheses are all stored never
touches the generation queue.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

from engine.attribute import Attribution, Candidates, Plan, Query, Report
from engine.options import Options
from engine.service.batching import MicroBatcher
from engine.service.config import Limits
from engine.service.generation import GenerationQueue
from engine.workspace import Workspace, note_cached, open_workspace
from index.keys import normalise_description

log = logging.getLogger("resynth.service")


class Service:
    """Owns a Workspace and the two worker threads; safe to call from many requests at once."""

    def __init__(self, workspace: Workspace, limits: Limits = Limits()):
        self.ws = workspace
        self.store = workspace.store
        self.limits = limits
        workspace.max_loaded = limits.max_loaded
        self.batcher = MicroBatcher(workspace.embed, limits.batch_window, limits.max_batch)
        self.generation = GenerationQueue(limits.queue_size, after_job=self._mark_unsaved)
        self._lock = threading.Lock()  # guards counters and the unsaved flag
        self._unsaved = False
        self._last_save = time.monotonic()
        self._save_cost = 0.0  # seconds the last save took (a save rewrites the whole index file)
        self.started = time.time()
        self.counters: Counter[str] = Counter()
        self.closed = False

    @classmethod
    def open(cls, root: Path, limits: Limits = Limits(), captioner: str | None = None,
             device: str | None = None) -> "Service":
        """Open a store with the models it is bound to (errors if anything does not match)."""
        ws = open_workspace(root, device=device, captioner=captioner)
        try:
            ws.embedder  # loaded now: ready means ready
            ws.captioner
            return cls(ws, limits)
        except BaseException:
            ws.close()
            raise

    # ----- attribution ---------------------------------------------------------------------------
    async def attribute(self, queries: list[Query], options: Options) -> dict:
        """Same JSON as `resynth attribute --json`, plus per-stage seconds of this request."""
        started = time.perf_counter()
        seconds: dict[str, float] = {}
        if options.per_source > self.limits.max_per_source:
            from engine.errors import OptionError

            raise OptionError(f"per_source must be at most {self.limits.max_per_source} on this server")
        from engine.api_source import Budget

        limits = [x for x in (options.max_cost, self.limits.max_cost) if x is not None]
        budget = Budget(min(limits) if limits else None)
        with self.batcher.expect():  # a batch forming meanwhile waits for these images
            plan = await asyncio.to_thread(self.ws.plan, options)
            if options.mode == "dataset":  # no description, no generation
                described = [(q.prompt or "", "prompt" if q.prompt else "none") for q in queries]
            else:
                described = await self._describe(queries)
            embedded = asyncio.wrap_future(self.batcher.submit([q.image for q in queries]))
        seconds["describe"] = time.perf_counter() - started
        texts = list(dict.fromkeys(text for text, _ in described))
        if options.adaptive and options.mode != "dataset":  # the query vectors decide what is generated
            vectors = await embedded
            outcomes = await asyncio.gather(*(self._adaptive(plan, t, queries, described, vectors, budget)
                                              for t in texts),
                                            return_exceptions=True)
            outcomes = [vectors, *outcomes]
        else:
            outcomes = await asyncio.gather(embedded, *(self._resyntheses(plan, t, budget) for t in texts),
                                            return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        vectors, ready = outcomes[0], dict(zip(texts, outcomes[1:]))
        seconds["resyntheses_and_embed"] = time.perf_counter() - started - seconds["describe"]
        results: list[Attribution] = await asyncio.to_thread(
            lambda: [self.ws.score(q, text, origin, vector, plan, ready[text][1], ready[text][0])
                     for q, (text, origin), vector in zip(queries, described, vectors)])
        cached = sum(ready[t][0][0] for t in texts)
        generated = sum(ready[t][0][1] for t in texts)
        with self._lock:
            self.counters.update(requests=1, queries=len(queries), cached=cached, generated=generated)
        seconds["total"] = time.perf_counter() - started
        priced = any(s.kind == "api" for s in plan.pipelines)
        return Report(results, cached, generated, seconds, budget.to_dict() if priced else None).to_dict()

    async def _describe(self, queries: list[Query]) -> list[tuple[str, str]]:
        """Prompts and stored descriptions inline; a caption (a model call) waits in the generation queue."""
        if all(q.prompt for q in queries):
            return self.ws.describe(queries)  # prompts only: no database, no model, no thread hop
        if self.ws.captioner is not None and await asyncio.to_thread(self.ws.needs_caption, queries):
            key = ("caption", tuple(q.file_hash for q in queries), tuple(bool(q.prompt) for q in queries))
            return await self._queued(key, lambda: self.ws.describe(queries))
        return await asyncio.to_thread(self.ws.describe, queries)

    async def _resyntheses(self, plan: Plan, text: str, budget=None) -> tuple[tuple[int, int, dict], Candidates]:
        """(cached, generated, failed) counts and scoring candidates of one description."""
        if plan.options.mode == "dataset":
            return (0, 0, {}), Candidates({})
        cached, todo = await asyncio.to_thread(self.ws.missing, text, plan)
        counts: tuple[int, int, dict] = (cached, 0, {})
        if not todo:
            note_cached(plan, todo, budget)
        if todo:
            # single flight: one job per (description, pipeline sources, seeds), whoever asks
            key = ("resynthesize", normalise_description(text), tuple(s.name for s in plan.pipelines),
                   tuple(plan.seeds), budget.limit_usd if budget is not None else None)  # a spend limit is per request
            joined = self.generation.in_flight(key)
            counts = await self._queued(key, lambda: self.ws.resynthesize([text], plan, budget)[text])
            if joined:  # another request made these images: for this one they were cached
                counts = (counts[0] + counts[1], 0, counts[2])
        return counts, await asyncio.to_thread(self.ws.candidates, text, plan)

    async def _adaptive(self, plan: Plan, text: str, queries: list[Query], described: list[tuple[str, str]],
                        vectors, budget=None) -> tuple[tuple[int, int, dict], Candidates]:
        """Adaptive generation for one description, on the generation worker when anything is missing."""
        cached, todo = await asyncio.to_thread(self.ws.missing, text, plan)
        counts: tuple[int, int, dict] = (cached, 0, {})
        if not todo:
            note_cached(plan, todo, budget)
        if todo:
            mine = [i for i, (t, _) in enumerate(described) if t == text]
            key = ("adaptive", normalise_description(text), tuple(s.name for s in plan.pipelines), tuple(plan.seeds),
                   tuple(queries[i].file_hash for i in mine), budget.limit_usd if budget is not None else None)
            counts = await self._queued(key, lambda: self.ws.resynthesize_adaptive(
                [queries[i] for i in mine], [described[i] for i in mine], vectors[mine], plan, budget)[text])
        return counts, await asyncio.to_thread(self.ws.candidates, text, plan)

    async def _queued(self, key: Any, job: Callable[[], Any]) -> Any:
        future: Future = self.generation.submit(key, job)  # QueueFull propagates: the caller answers 503
        return await asyncio.shield(asyncio.wrap_future(future))

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
        with self._lock:
            counters = dict(self.counters)
        return {"store": store, "service": {"uptime_seconds": round(time.time() - self.started, 1), **counters},
                "generation_queue": self.generation.stats(), "embed_batches": self.batcher.stats(),
                "generator_images": self.ws.generator_calls}

    def ready(self) -> bool:
        return not self.closed and self.batcher.alive() and self.generation.alive()

    def close(self) -> None:
        """Finish the running job, stop the workers, save the index."""
        if self.closed:
            return
        self.closed = True
        self.generation.close()
        self.batcher.close()
        self.ws.close()
