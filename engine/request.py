"""One attribution request: plan, describe, resynthesize what is missing, candidates, embed, score, verdict.

`Request` is the only implementation of this path: `Workspace.attribute` (the library and the CLI)
and the service both run it. Where each step runs is its runner's choice, never a copy of the path:

* `Inline` (the library): every step in the calling thread; one generation job for every
  description of the request, so a pipeline generates for all of them in shared batches.
* the service's runner (engine.service.core): query images through the micro-batcher; captioning and
  generation as single-flight jobs on the generation worker, one per description, so concurrent
  requests for one description share it and a description whose resyntheses are stored never waits.

The offline jobs (engine.jobs) run its resynthesis step (engine.resynthesis) over description lists.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Hashable, Protocol, Sequence, cast

import numpy as np
from PIL import Image

from engine import arguments, compare
from engine.attribute import Attribution, Candidates, Plan, Query, Report
from engine.errors import UserError
from engine.images import ImageInput
from engine.options import Options
from engine.resynthesis import Counts, note_cached, prices
from index.keys import normalise_description

if TYPE_CHECKING:
    from engine.api_source import Budget
    from engine.workspace import Workspace

QUERY_CHUNK = 64  # images decoded and attributed together: memory stays flat on long query lists
Waiter = Callable[[], Any]


class Runner(Protocol):
    """Where a request's steps run: `Inline`, or the service's `Placement` (engine.service.core)."""

    shared: bool  # True: steps are single-flight jobs shared with concurrent requests, one per description

    def announce(self) -> ContextManager: ...

    def embed(self, ws: "Workspace", images: list) -> Waiter: ...

    def heavy(self, key: Hashable, job: Callable[[], Any]) -> Waiter: ...


class Inline:
    """Every step in the calling thread, when it is needed."""

    shared = False  # True: steps are single-flight jobs shared with concurrent requests, one per description

    def announce(self) -> ContextManager:
        """Held while a request describes its queries, before its images go to `embed`."""
        return nullcontext()

    def embed(self, ws: "Workspace", images: list) -> Waiter:
        return lambda: ws.embed(images)  # when the scores need them: after generation, as it always was

    def heavy(self, key: Hashable, job: Callable[[], Any]) -> Waiter:
        """Run a model call (captioning, generation); the waiter gives (result, joined another's job)."""
        result = job()
        return lambda: (result, False)


class Embedded(Inline):
    """Inline, with the query vectors computed ahead (`attribute` embeds a chunk while the one before it
    is scored)."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def embed(self, ws: "Workspace", images: list) -> Waiter:
        return lambda: self.vectors


class Request:
    """The path for one batch of queries under one option set (or one resolved plan)."""

    def __init__(self, ws: "Workspace", options: Options | None = None, budget: "Budget | None" = None,
                 runner: Runner | None = None, plan: Plan | None = None):
        self.ws, self.options, self.budget = ws, options, budget
        self.runner: Runner = runner or Inline()
        self.plan = plan
        self.marks: dict[str, float] = {}  # perf_counter when describing, and resynthesizing, ended

    def run(self, queries: Sequence[Query]) -> tuple[list[Attribution], dict[str, Counts]]:
        """Results in query order, and (cached, generated, failed) per description."""
        ws, runner = self.ws, self.runner
        with runner.announce():  # a batch forming meanwhile waits for these images
            if self.plan is None:
                self.plan = ws.plan(self.options)
            described = self.describe(queries)
            embedded = runner.embed(ws, [q.image for q in queries])
        self.marks["described"] = time.perf_counter()
        plan = self.plan
        if plan.options.adaptive and plan.options.mode != "dataset":  # the query vectors decide what is generated
            vectors = embedded()
            counts, error = self.resynthesize(queries, described, vectors)
        else:
            counts, error = self.resynthesize(queries, described, None)
            vectors = embedded()
        if error is not None:
            raise error
        found = {text: ws.candidates(text, plan) if plan.options.mode != "dataset" else Candidates({})
                 for text in counts}
        self.marks["resynthesized"] = time.perf_counter()
        near: list = [None] * len(queries)
        if compare.mode_of(plan) != "resynthesis" and len(queries) > 1:  # one dataset search for the batch
            near = compare.neighbours_many(ws, vectors, plan, [q.file_hash for q in queries])
        results = [compare.score(ws, q, text, origin, vector, plan, found[text], counts[text], near=n)
                   for q, (text, origin), vector, n in zip(queries, described, vectors, near)]
        return results, counts

    def _plan(self) -> Plan:
        """The resolved plan (`run` resolves it first)."""
        assert self.plan is not None, "Request.run resolves the plan first"
        return self.plan

    def describe(self, queries: Sequence[Query]) -> list[tuple[str, str]]:
        if self._plan().options.mode == "dataset":  # no description, no generation
            return [(q.prompt or "", "prompt" if q.prompt else "none") for q in queries]
        ws = self.ws
        undescribed = [q for q in queries if not (q.prompt or q.embedded_prompt)]
        if (self.runner.shared and undescribed and ws.captioner is not None
                and ws.needs_caption(undescribed)):  # a caption is a model call: it takes the heavy lane
            key = ("caption", tuple(q.file_hash for q in queries), tuple(bool(q.prompt) for q in queries))
            return self.runner.heavy(key, lambda: ws.describe(queries))()[0]
        return ws.describe(queries)

    def resynthesize(self, queries: Sequence[Query], described: Sequence[tuple[str, str]],
                     vectors: np.ndarray | None) -> tuple[dict[str, Counts], BaseException | None]:
        """Counts per description, and the first failure (raised once the query vectors are in, so an
        embedding failure is reported first)."""
        ws, plan, budget = self.ws, self._plan(), self.budget
        texts = list(dict.fromkeys(text for text, _ in described))
        adaptive = plan.options.adaptive
        if plan.options.mode == "dataset":
            return {text: (0, 0, {}) for text in texts}, None
        if not self.runner.shared:  # one job for every description
            if adaptive:
                assert vectors is not None  # adaptive generation is decided on the query vectors (run)
                return ws.resynthesize_adaptive(queries, described, vectors, plan, budget), None
            return ws.resynthesize(texts, plan, budget), None
        outcomes: dict[str, Any] = {}
        for text in texts:  # a description whose resyntheses are all stored never enters the queue
            cached, todo = ws.missing(text, plan)
            if not todo:
                note_cached(plan, todo, budget)
                outcomes[text] = (cached, 0, {})
                continue
            key, job = self._job(text, queries, described, vectors)
            try:
                outcomes[text] = self.runner.heavy(key, job)
            except BaseException as exc:  # a full queue: the request answers 503
                outcomes[text] = exc
        counts: dict[str, Counts] = {}
        error = None
        for text, outcome in outcomes.items():
            try:
                if isinstance(outcome, BaseException):
                    raise outcome
                if callable(outcome):
                    outcome, joined = outcome()
                    if joined and not adaptive:  # another request made these images: for this one, cached
                        outcome = (outcome[0] + outcome[1], 0, outcome[2])
                counts[text] = outcome
            except BaseException as exc:
                error = error or exc
        return counts, error

    def _job(self, text: str, queries: Sequence[Query], described: Sequence[tuple[str, str]],
             vectors: np.ndarray | None) -> tuple[Hashable, Callable[[], Counts]]:
        """The single-flight key and the job of one description: one job per (description, generating
        sources, seeds, spend limit), and for adaptive generation per set of queries too."""
        ws, plan, budget = self.ws, self._plan(), self.budget
        common = (normalise_description(text), tuple(s.name for s in plan.pipelines), tuple(plan.seeds))
        limit = budget.limit_usd if budget is not None else None  # a spend limit is per request
        if not plan.options.adaptive:
            return ("resynthesize", *common, limit), lambda: ws.resynthesize([text], plan, budget)[text]
        assert vectors is not None  # adaptive generation is decided on the query vectors (run)
        mine = [i for i, (t, _) in enumerate(described) if t == text]
        key = ("adaptive", *common, tuple(queries[i].file_hash for i in mine), limit)
        return key, lambda: ws.resynthesize_adaptive([queries[i] for i in mine], [described[i] for i in mine],
                                                     vectors[mine], plan, budget)[text]


def describe(ws: "Workspace", queries: Sequence[Query]) -> list[tuple[str, str]]:
    """Step 1: (description, where it came from) per query, first found of: the caller's prompt, the
    prompt the file's own generation metadata names ("metadata"), a description stored for an image with
    the same bytes ("store"), a caption."""
    started = time.perf_counter()
    out: list[tuple[str, str] | None] = []
    need_caption = []
    for i, q in enumerate(queries):
        if q.prompt:
            out.append((q.prompt, "prompt"))
        elif (embedded := q.embedded_prompt) is not None:
            out.append((embedded, "metadata"))
        elif (stored := ws.store.description_for_file(q.file_hash)) is not None:
            out.append((stored, "store"))
        else:
            out.append(None)
            need_caption.append(i)
    if need_caption:
        captioner = ws.captioner
        if captioner is None:
            first = queries[need_caption[0]].label
            raise UserError(f"no description for {first}: pass --prompt, or configure a captioner "
                            "(`resynth init --captioner DIR` or `--captioner DIR`)", code="no_description")
        captions = captioner.caption([queries[i].image for i in need_caption])
        for i, text in zip(need_caption, captions):
            out[i] = (text, "caption")
    ws._time("describe", started)
    return out  # type: ignore[return-value]


def attribute(ws: "Workspace", images: ImageInput | Sequence[ImageInput] | Sequence[Query],
              prompt: str | Sequence[str | None] | None = None, options: Options | None = None,
              labels: Sequence[str] | None = None) -> Report:
    """Workspace.attribute: the queries in chunks of QUERY_CHUNK, each chunk one Request."""
    from tqdm import tqdm

    # a list or tuple is many queries; anything else is one image
    items: list[ImageInput | Query] = (list(images) if isinstance(images, (list, tuple))
                                       else [cast(ImageInput, images)])
    if not items:
        raise UserError("nothing to attribute: give at least one image")
    prompts: list[str | None] = (list(prompt) if isinstance(prompt, (list, tuple))
                                 else [cast("str | None", prompt)] * len(items))
    if len(prompts) != len(items):
        raise UserError(f"{len(prompts)} prompt{'s' * (len(prompts) != 1)} for {len(items)} "
                        f"image{'s' * (len(items) != 1)}: give one, or one per image")
    from engine.api_source import Budget

    plan = ws.plan(options)
    budget = Budget(plan.options.max_cost)
    results: list[Attribution] = []
    cached = generated = 0
    chunks = [range(start, min(start + QUERY_CHUNK, len(items))) for start in range(0, len(items), QUERY_CHUNK)]

    stop = threading.Event()  # the call ended (a failure, an interrupt): the chunk read ahead stops too

    def read(chunk: range) -> list[Query]:
        queries = []
        for i in chunk:
            if stop.is_set():
                raise CancelledError
            item = items[i]
            if isinstance(item, Image.Image):
                arguments.loaded(item, f"images[{i}]")
            queries.append(item if isinstance(item, Query)
                           else Query.read(item, prompts[i], labels[i] if labels else None))
        return queries

    def ahead(chunk: range) -> tuple[list[Query], np.ndarray, dict[str, float]]:
        """The next chunk read and embedded on a worker thread while this one is scored: decoding, metadata
        and the CLIP forward overlap the store lookups and scoring (a GPU's forward, and a second core)."""
        with ws.stage_seconds() as spent:
            queries = read(chunk)
            if stop.is_set():
                raise CancelledError
            return queries, ws.embed([q.image for q in queries]), dict(spent)

    worker = ThreadPoolExecutor(1, thread_name_prefix="resynth-ahead")
    try:
        with ws.stage_seconds() as seconds:
            coming = worker.submit(ahead, chunks[0]) if len(chunks) > 1 else None
            for n, chunk in enumerate(tqdm(chunks, desc="attributing", unit="chunk",
                                           disable=not ws.progress or len(chunks) < 2)):
                runner: Runner = Inline()
                if coming is None:  # one chunk: read here, embedded when the scores need it (after any generation)
                    queries = read(chunk)
                else:
                    queries, vectors, spent = coming.result()
                    for stage, value in spent.items():
                        seconds[stage] += value
                    runner = Embedded(vectors)
                    coming = worker.submit(ahead, chunks[n + 1]) if n + 1 < len(chunks) else None
                found, counts = Request(ws, budget=budget, plan=plan, runner=runner).run(queries)
                results += found
                cached += sum(c for c, _, _ in counts.values())
                generated += sum(g for _, g, _ in counts.values())
    finally:  # a failure or an interrupt returns at once: the chunk being read ahead stops at its next image
        stop.set()
        worker.shutdown(wait=False, cancel_futures=True)
    return Report(results, cached, generated, dict(seconds), budget.to_dict() if prices(plan) else None)
