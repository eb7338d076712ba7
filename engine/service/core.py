"""The attribution service: the Attributor's public steps arranged so cached lookups stay fast.

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
from collections import Counter, OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

from engine.attribute import Attribution, Attributor, Query
from engine.describe import Captioner
from engine.embed import Embedder
from engine.generate import DiffusersGenerator, GenerationParams
from engine.service.batching import MicroBatcher
from engine.service.config import Limits, Options
from engine.service.generation import GenerationQueue
from engine.workspace import load_captioner, load_embedder, load_generators
from index.keys import normalise_description
from index.store import Store

log = logging.getLogger("resynth.service")
ATTRIBUTOR_CACHE = 64  # distinct option sets kept ready; each holds only references and a source list


class Service:
    """Owns the store, the models and the two worker threads; safe to call from many requests at once."""

    def __init__(self, store: Store, embedder: Embedder, generators: dict[str, DiffusersGenerator],
                 captioner: Captioner | None = None, limits: Limits = Limits()):
        self.store = store
        self.embedder = embedder
        self.generators = generators
        self.captioner = captioner
        self.limits = limits
        self.batcher = MicroBatcher(embedder.embed, limits.batch_window, limits.max_batch)
        self.generation = GenerationQueue(limits.queue_size, after_job=self._mark_unsaved)
        self._attributors: OrderedDict[Options, Attributor] = OrderedDict()
        self._lock = threading.Lock()  # guards the attributor cache, counters and the unsaved flag
        self._sources_signature = self._signature()
        self._sources_version = 0  # bumped when sources change, so no stale Attributor is cached
        self._unsaved = False
        self._resident: list[DiffusersGenerator] = []  # pipelines possibly loaded, least recently used first
        self._last_save = time.monotonic()
        self.started = time.time()
        self.counters: Counter[str] = Counter()
        self.closed = False

    @classmethod
    def open(cls, root: Path, limits: Limits = Limits(), captioner: str | None = None,
             device: str | None = None) -> "Service":
        """Open a store with the models it is bound to (UserError if anything does not match)."""
        store = Store.open(Path(root), writable=True)
        try:
            return cls(store, load_embedder(store, device), load_generators(store, device),
                       load_captioner(store, captioner), limits)
        except BaseException:
            store.close()
            raise

    # ----- attribution ---------------------------------------------------------------------------
    def _known_attributor(self, options: Options) -> Attributor | None:
        """The Attributor already made for these options, if any: no I/O, so callable on the event loop."""
        with self._lock:
            found = self._attributors.get(options)
            if found is not None:
                self._attributors.move_to_end(options)
            return found

    def attributor(self, options: Options) -> Attributor:
        """One Attributor per option set (UserError for an unknown source); rebuilt when sources change."""
        if (found := self._known_attributor(options)) is not None:
            return found
        with self._lock:
            version = self._sources_version
        made = Attributor(self.store, self.embedder, self.generators, self.captioner,
                          per_source=options.per_source, aggregation=options.aggregation,
                          base_seed=options.seed, sources=list(options.sources) if options.sources else None,
                          progress=False, max_loaded=self.limits.max_loaded)
        with self._lock:
            if version != self._sources_version:
                return made  # the sources changed while it was made: use it once, do not keep it
            self._attributors[options] = made
            while len(self._attributors) > ATTRIBUTOR_CACHE:
                self._attributors.popitem(last=False)
        return made

    async def attribute(self, queries: list[Query], options: Options) -> dict:
        """Same JSON as `resynth attribute --json`, plus per-stage seconds of this request."""
        started = time.perf_counter()
        seconds: dict[str, float] = {}
        with self.batcher.expect():  # a batch forming meanwhile waits for these images
            attributor = self._known_attributor(options) or await asyncio.to_thread(self.attributor, options)
            described = await self._describe(attributor, queries)
            embedded = asyncio.wrap_future(self.batcher.submit([q.image for q in queries]))
        seconds["describe"] = time.perf_counter() - started
        texts = list(dict.fromkeys(text for text, _ in described))
        outcomes = await asyncio.gather(embedded, *(self._resyntheses(attributor, t) for t in texts),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        vectors, ready = outcomes[0], dict(zip(texts, outcomes[1:]))
        seconds["resyntheses_and_embed"] = time.perf_counter() - started - seconds["describe"]
        results: list[Attribution] = await asyncio.to_thread(
            lambda: [attributor.score(q, text, origin, vector, *ready[text])
                     for q, (text, origin), vector in zip(queries, described, vectors)])
        cached = sum(ready[t][0][0] for t in texts)
        generated = sum(ready[t][0][1] for t in texts)
        with self._lock:
            self.counters.update(requests=1, queries=len(queries), cached=cached, generated=generated)
        seconds["total"] = time.perf_counter() - started
        return {"results": [r.to_dict() for r in results], "cache": {"cached": cached, "generated": generated},
                "seconds": {k: round(v, 4) for k, v in seconds.items()}}

    async def _describe(self, attributor: Attributor, queries: list[Query]) -> list[tuple[str, str]]:
        """Prompts and stored descriptions inline; a caption (a model call) waits in the generation queue."""
        def needs_caption() -> bool:
            return any(not q.prompt and self.store.description_for_file(q.file_hash) is None for q in queries)

        if all(q.prompt for q in queries):
            return attributor.describe(queries)  # prompts only: no database, no model, no thread hop
        if self.captioner is not None and await asyncio.to_thread(needs_caption):
            key = ("caption", tuple(q.file_hash for q in queries), tuple(bool(q.prompt) for q in queries))
            return await self._queued(key, lambda: attributor.describe(queries))
        return await asyncio.to_thread(attributor.describe, queries)

    async def _resyntheses(self, attributor: Attributor, text: str) -> tuple[tuple[int, int], dict[str, list]]:
        """(cached, generated) counts and scoring candidates of one description; generates only if needed."""
        candidates = await asyncio.to_thread(attributor.candidates, text)
        pipelines = [s.name for s in attributor.sources if s.kind != "replay"]
        if all(len(candidates.get(name, ())) >= attributor.per_source for name in pipelines):
            return (len(pipelines) * attributor.per_source, 0), candidates
        # single flight: one job per (description, pipeline sources, seeds), whoever asks
        key = ("resynthesize", normalise_description(text), tuple(pipelines), tuple(attributor.seeds))
        counts = await self._queued(key, lambda: self._resynthesize(attributor, text))
        return counts, await asyncio.to_thread(attributor.candidates, text)

    def _resynthesize(self, attributor: Attributor, text: str) -> tuple[int, int]:
        """On the generation worker: make what is missing, then keep at most `max_loaded` pipelines resident.

        Each Attributor bounds only the pipelines it loaded itself; the service keeps one per option set,
        so the bound across all of them is kept here, least recently used first out.
        """
        before = {id(g): g.calls for g in attributor.generators.values()}
        counts = attributor.ensure_resyntheses([text])[text]
        used = [g for g in attributor.generators.values() if g.calls != before.get(id(g))]
        self._resident = [g for g in self._resident if all(g is not u for u in used)] + used
        for stale in self._resident[:-self.limits.max_loaded]:
            stale.unload()
        self._resident = self._resident[-self.limits.max_loaded:]
        return counts

    async def _queued(self, key: Any, job: Callable[[], Any]) -> Any:
        future: Future = self.generation.submit(key, job)  # QueueFull propagates: the caller answers 503
        return await asyncio.shield(asyncio.wrap_future(future))

    # ----- upkeep --------------------------------------------------------------------------------
    def maintain(self) -> None:
        """Periodic, off the event loop: swap in a rebuilt index, follow source changes, save new vectors."""
        if self.store.refresh():
            with self._lock:
                self.counters["index_swaps"] += 1
            log.info("index file replaced by another process: swapped in")
        signature = self._signature()
        if signature != self._sources_signature:
            self._follow_sources()
            self._sources_signature = signature
        with self._lock:
            due = self._unsaved and time.monotonic() - self._last_save >= self.limits.save_seconds
            if due:
                self._unsaved = False
                self._last_save = time.monotonic()
        if due:
            self.store.save_index()

    def _signature(self) -> tuple:
        return tuple((s.name, s.fingerprint) for s in self.store.sources())

    def _follow_sources(self) -> None:
        """A source added or removed by `resynth source ...`: new generators, fresh attributors."""
        current = {s.name: s for s in self.store.sources() if s.kind == "diffusers"}
        before = dict(self._sources_signature)
        fresh = {}
        for name, source in current.items():
            kept = self.generators.get(name)
            if kept is not None and before.get(name) == source.fingerprint:
                fresh[name] = kept  # unchanged: keep its loaded pipeline
            else:
                params = GenerationParams.from_json(source.params_json)
                fresh[name] = DiffusersGenerator(name, Path(source.path), params, self.embedder.device)
        self.generators = fresh  # a new dict, swapped whole: readers never see it half-updated
        with self._lock:
            self._attributors.clear()
            self._sources_version += 1
        log.info("sources changed: now %s", ", ".join(sorted(current)) or "none")

    def _mark_unsaved(self) -> None:
        with self._lock:
            self._unsaved = True

    def count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def stats(self) -> dict:
        store = self.store.stats()
        store.pop("store", None)  # the server's filesystem layout is not the client's business
        with self._lock:
            counters = dict(self.counters)
        return {"store": store, "service": {"uptime_seconds": round(time.time() - self.started, 1), **counters},
                "generation_queue": self.generation.stats(), "embed_batches": self.batcher.stats(),
                "generator_images": {name: g.calls for name, g in self.generators.items()}}

    def ready(self) -> bool:
        return not self.closed and self.batcher.alive() and self.generation.alive()

    def close(self) -> None:
        """Finish the running job, stop the workers, save the index."""
        if self.closed:
            return
        self.closed = True
        self.generation.close()
        self.batcher.close()
        self.store.close()
