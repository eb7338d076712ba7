"""The library's one way in: a Workspace holds a store and the models it is bound to.

    import engine
    with engine.open("my-store") as ws:
        report = ws.attribute("suspicious.png", prompt="portrait of an old man")

Models load lazily (a `stats` or `source list` never imports torch). The four steps are public
(`plan`, `describe`, `resynthesize`, `candidates`, `embed`, `score`) so the service can arrange them
around its micro-batcher and generation queue; `attribute` runs them in order. There is no other
implementation of describe -> candidates -> score.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from engine.attribute import Attribution, Candidates, Plan, Query, Report, rank, verdict
from engine.calibration import Calibration, content_name, save_array_atomic
from engine.api_source import PartialResult
from engine.errors import NotFoundError, SourceError, UserError
from engine.images import ImageInput
from engine.options import Options
from index.errors import StoreInputError
from index.faults import crash_point
from index.keys import normalise_description, sha256_text
from index.store import NewImage, Store

if TYPE_CHECKING:  # heavy modules (torch) load only when a model is needed
    from engine.api_source import ApiGenerator, Budget
    from engine.describe import Captioner
    from engine.embed import Embedder, EmbedderSpec
    from engine.generate import DiffusersGenerator
    from engine.ingest import IngestReport

log = logging.getLogger("resynth.workspace")
DEFAULT_STORE = "resynth-store"
QUERY_CHUNK = 64  # images decoded and attributed together: memory stays flat on long query lists
SOURCES_TTL = 1.0  # seconds a workspace trusts its list of sources (a cached lookup then costs no query for it)
CLAIM_LEASE_SECONDS = 900.0
GENERATION_CHUNK = 48  # images generated, embedded and committed together (memory stays bounded)  # a generation claim outlives any one batch; a dead claimant's expires


def store_path(explicit: str | os.PathLike | None) -> Path:
    """--store, else $RESYNTH_STORE, else ./resynth-store."""
    return Path(explicit or os.environ.get("RESYNTH_STORE") or DEFAULT_STORE)


@dataclass
class Stats:
    """Counters and per-stage seconds, accumulated over a Workspace's life."""

    cached: int = 0
    generated: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class Workspace:
    """A store with its embedder, generators and captioner. Use `engine.open` / `engine.init`."""

    def __init__(self, store: Store, device: str | None = None, captioner: str | os.PathLike | None = None,
                 progress: bool = False, max_loaded: int = 2):
        self.store = store
        self.device = device
        self.progress = progress
        self.max_loaded = max(1, max_loaded)  # pipelines kept in memory at once (real ones take GBs)
        self._captioner_folder = str(captioner) if captioner else None
        self._embedder: Embedder | None = None
        self._captioner: Captioner | None = None
        self._generators: dict[str, DiffusersGenerator] = {}
        self._open_set_precision: tuple[str | None, np.ndarray | None] = (None, None)  # (file, matrix)
        self._resident: list[DiffusersGenerator] = []
        self._plans: dict[tuple, Plan] = {}
        self._sources: tuple[float, list] | None = None
        self._lock = threading.RLock()  # guards lazy loading, the plan cache and the pipeline LRU
        self.stats_counters = Stats()
        self._local = threading.local()  # per-call stage seconds of `attribute`
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # generation claims

    # ----- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def root(self) -> Path:
        return self.store.root

    # ----- models, loaded on first use ---------------------------------------------------------
    @property
    def embedder(self) -> "Embedder":
        """The store's embedder; refuses weights that changed since the store was bound to them."""
        with self._lock:
            if self._embedder is None:
                from engine.embed import Embedder, EmbedderSpec

                config = self.store.config["embedder"]
                embedder = Embedder(EmbedderSpec.from_dict(config), device=self.device,
                                    known_hash=config.get("checkpoint_hash"))
                if embedder.identity != self.store.embedder_identity:
                    raise UserError(f"store {self.root} is bound to embedder {self.store.embedder_identity}, but "
                                    f"{config['checkpoint']} is now {embedder.identity}")
                self._embedder = embedder
            return self._embedder

    @property
    def captioner(self) -> "Captioner | None":
        with self._lock:
            folder = self._captioner_folder or self.store.config.get("captioner")
            if folder and (self._captioner is None or str(self._captioner.folder) != str(folder)):
                from engine.describe import Captioner

                self._captioner = Captioner(Path(folder), device=self.device)
            return self._captioner if folder else None

    def generator(self, name: str) -> "DiffusersGenerator | ApiGenerator":
        """The lazy generator of a pipeline or API source (a pipeline loads only when it must generate)."""
        from engine.generate import DiffusersGenerator, GenerationParams

        with self._lock:
            source = next((s for s in self.sources() if s.name == name), None)
            if source is None:  # removed by another process since this request was planned
                self._sources_changed()
                raise SourceError(name, "was removed from the store during this request")
            if source.kind not in ("diffusers", "api"):
                raise UserError(f"source {name!r} has no pipeline to generate with")
            kept = self._generators.get(name)
            if kept is None or kept.fingerprint != source.fingerprint:
                if source.kind == "api":
                    from engine.api_source import ApiGenerator, ApiParams

                    kept = ApiGenerator(name, ApiParams.from_json(source.params_json), source.fingerprint)
                else:
                    kept = DiffusersGenerator(name, Path(source.path), GenerationParams.from_json(source.params_json),
                                              self.device, fingerprint=source.fingerprint)
                self._generators[name] = kept
            return kept

    @property
    def generator_calls(self) -> dict[str, int]:
        """Images generated per source by this workspace (tests and the service's stats count them)."""
        return {name: g.calls for name, g in self._generators.items()}

    def _make_room_for(self, generator: "DiffusersGenerator") -> None:
        """Unload the least recently used pipelines so that at most `max_loaded` are resident."""
        with self._lock:
            self._resident = [g for g in self._resident if g is not generator] + [generator]
            for stale in self._resident[:-self.max_loaded]:
                stale.unload()
            self._resident = self._resident[-self.max_loaded:]

    # ----- step 0: what a request means against this store -------------------------------------
    def sources(self) -> list:
        """The store's sources, re-read at most every SOURCES_TTL seconds (changes made through this
        workspace apply at once; another process's within that delay)."""
        with self._lock:
            if self._sources is not None and time.monotonic() - self._sources[0] < SOURCES_TTL:
                return self._sources[1]
        found = self.store.sources()
        with self._lock:
            self._sources = (time.monotonic(), found)
        return found

    def _sources_changed(self) -> None:
        with self._lock:
            self._sources = None

    def plan(self, options: Options | None = None) -> Plan:
        """Resolve options against the store's current sources (cached per option set and source set)."""
        from engine.generate import source_params_hash

        options = options or Options()
        sources = self.sources()
        signature = tuple((s.id, s.name, s.fingerprint) for s in sources)
        with self._lock:
            found = self._plans.get((options, signature))
        if found is not None:
            return found
        if not sources:
            raise UserError("the store has no sources: add some with `resynth source add` or `resynth ingest`")
        known = {s.name: s for s in sources}
        for name in options.sources or ():
            if name not in known:
                raise NotFoundError(f"unknown source {name!r} (known: {', '.join(sorted(known))})",
                                    code="unknown_source")
        chosen = tuple(known[n] for n in (options.sources or sorted(known)))
        made = Plan(options, chosen, {s.id: source_params_hash(s) for s in chosen}, self.store.embedder_identity)
        with self._lock:
            if len(self._plans) > 256:
                self._plans.clear()
            self._plans[(options, signature)] = made
        return made

    # ----- step 1: describe --------------------------------------------------------------------
    def describe(self, queries: Sequence[Query]) -> list[tuple[str, str]]:
        """(description, where it came from) per query: its prompt, a stored description, or a caption."""
        started = time.perf_counter()
        out: list[tuple[str, str] | None] = []
        need_caption = []
        for i, q in enumerate(queries):
            if q.prompt:
                out.append((q.prompt, "prompt"))
            elif (stored := self.store.description_for_file(q.file_hash)) is not None:
                out.append((stored, "store"))
            else:
                out.append(None)
                need_caption.append(i)
        if need_caption:
            captioner = self.captioner
            if captioner is None:
                first = queries[need_caption[0]].label
                raise UserError(f"no description for {first}: pass --prompt, or configure a captioner "
                                "(`resynth init --captioner DIR` or `--captioner DIR`)", code="no_description")
            captions = captioner.caption([queries[i].image for i in need_caption])
            for i, text in zip(need_caption, captions):
                out[i] = (text, "caption")
        self._time("describe", started)
        return out  # type: ignore[return-value]

    def needs_caption(self, queries: Sequence[Query]) -> bool:
        """Whether `describe` would run the captioner (a model call) for these queries."""
        return any(not q.prompt and self.store.description_for_file(q.file_hash) is None for q in queries)

    # ----- step 2: resynthesize what is missing ------------------------------------------------
    def missing(self, text: str, plan: Plan) -> tuple[int, dict[str, list[tuple[str, int]]]]:
        """(how many of the plan's resyntheses are stored, the missing (key, seed) pairs per source)."""
        started = time.perf_counter()
        wanted = plan.wanted(sha256_text(normalise_description(text)))
        have = self.store.existing_keys(list(wanted))
        todo: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for key, (source, seed) in wanted.items():
            if key not in have:
                todo[source.name].append((key, seed))
        self._time("lookup", started)
        return len(have), dict(todo)

    def resynthesize(self, texts: Iterable[str], plan: Plan,
                     budget: "Budget | None" = None) -> dict[str, tuple[int, int, dict[str, str]]]:
        """Generate and store every missing (description, source, seed).

        Returns (cached, generated, failed sources -> reason) per description. A source that cannot
        load or generate, or whose images would exceed `budget` (API sources), is reported, not
        raised: the other sources are still scored. `budget` also records what was bought and what
        the cache saved.
        """
        from tqdm import tqdm

        from engine.errors import BudgetExceeded

        out: dict[str, list] = {}
        by_source: dict[str, list[tuple[str, str, int]]] = defaultdict(list)  # source -> (text, key, seed)
        for text in dict.fromkeys(texts):
            cached, todo = self.missing(text, plan)
            out[text] = [cached, 0, {}]
            for source, items in todo.items():
                by_source[source] += [(text, key, seed) for key, seed in items]
            note_cached(plan, todo, budget)
        # Source by source (each pipeline loads once), in batches across descriptions (GPU throughput).
        bar = tqdm(total=sum(len(jobs) for jobs in by_source.values()), desc="generating", unit="image",
                   disable=not self.progress or not by_source, leave=False)
        for source, jobs in sorted(by_source.items()):
            bar.set_postfix_str(source, refresh=False)
            for start in range(0, len(jobs), GENERATION_CHUNK):
                chunk = jobs[start:start + GENERATION_CHUNK]
                try:
                    made = self._generate_once(plan, source, chunk, budget)
                except (SourceError, BudgetExceeded) as exc:
                    log.info("%s", exc)
                    for text, count in getattr(exc, "made", {}).items():
                        out[text][1] += count
                    for text in {text for text, _, _ in jobs}:
                        out[text][2][source] = str(exc)
                    break
                for text, _, _ in chunk:
                    if made.get(text, 0) > 0:
                        made[text] -= 1
                        out[text][1] += 1
                    else:
                        out[text][0] += 1  # made meanwhile by another process: reused
                bar.update(len(chunk))
        bar.close()
        result = {text: (c, g, f) for text, (c, g, f) in out.items()}
        with self._lock:
            for cached, generated, _ in result.values():
                self.stats_counters.cached += cached
                self.stats_counters.generated += generated
        return result

    def resynthesize_adaptive(self, queries: Sequence[Query], described: Sequence[tuple[str, str]],
                              vectors: np.ndarray, plan: Plan,
                              budget: "Budget | None" = None) -> dict[str, tuple[int, int, dict[str, str]]]:
        """Adaptive generation: one seed per source first; then, round by round, the next seed only for
        the sources still in contention (scoring within DECISIVE_MARGIN of the best for some query of
        that description), up to K. Same return as `resynthesize`."""
        from engine.options import DECISIVE_MARGIN

        options = plan.options
        by_text: dict[str, list] = defaultdict(list)
        for query, (text, _), vector in zip(queries, described, vectors):
            by_text[text].append((query, vector))
        totals = {text: [0, 0, {}] for text in by_text}
        contenders = {text: tuple(s.name for s in plan.pipelines) for text in by_text}
        for step in range(options.per_source):
            groups: dict[tuple, list[str]] = defaultdict(list)
            for text, names in contenders.items():
                if names:
                    groups[names].append(text)
            for names, texts in groups.items():
                one = self.plan(options.with_changes(sources=names, seed=options.seed + step, per_source=1,
                                                     adaptive=False, mode="resynthesis"))
                for text, (cached, generated, failed) in self.resynthesize(texts, one, budget).items():
                    totals[text][0] += cached
                    totals[text][1] += generated
                    totals[text][2].update(failed)
            if step == options.per_source - 1:
                break
            # Decided on this request's seeds so far only (not on whatever else is stored), so the same
            # query and description always take the same path: a repeat finds everything cached.
            decide = self.plan(options.with_changes(mode="resynthesis", adaptive=False))
            allowed = set(range(options.seed, options.seed + step + 1))
            for text, pairs in by_text.items():
                if not contenders[text]:
                    continue
                stored = self.candidates(text, decide)
                kinds = {s.name: s.kind for s in decide.sources}
                found = Candidates({name: [r for r in rows if kinds[name] == "replay" or r.seed in allowed]
                                    for name, rows in stored.resyntheses.items()})
                close: set[str] = set()
                for query, vector in pairs:
                    scores = self.score(query, text, "prompt", vector, decide, found).scores
                    near = [s.source for s in scores if scores[0].score - s.score <= DECISIVE_MARGIN]
                    if len(near) > 1:
                        close.update(near)
                contenders[text] = tuple(n for n in contenders[text] if n in close and n not in totals[text][2])
        return {text: (cached, generated, failed) for text, (cached, generated, failed) in totals.items()}

    def _generate_once(self, plan: Plan, name: str, jobs: list[tuple[str, str, int]],
                       budget: "Budget | None" = None) -> dict[str, int]:
        """Cross-process single flight: claim the keys (a lease row in the database), generate what this
        process holds, and wait for what another process is making, then reuse it. A dead claimant's
        lease expires and its keys are taken over. Returns how many images this process made per text."""
        by_key = {key: (text, seed) for text, key, seed in jobs}
        pending = list(by_key)
        made: dict[str, int] = defaultdict(int)
        while pending:
            mine = self.store.claim(pending, self._owner, CLAIM_LEASE_SECONDS)
            try:
                stored = self.store.existing_keys(mine)  # made by someone else just before our claim
                todo = [(by_key[key][0], key, by_key[key][1]) for key in mine if key not in stored]
                if todo:
                    try:
                        self._generate_and_store(plan, name, todo, budget)
                    except PartialResult as partial:  # the images made before the failure count
                        for text, _, _ in partial.stored:
                            made[text] += 1
                        partial.made = dict(made)
                        raise
                    for text, _, _ in todo:
                        made[text] += 1
            finally:
                self.store.release(mine, self._owner)
            theirs = [key for key in pending if key not in set(mine)]
            if theirs:
                theirs = self._wait_for_others(theirs)
            pending = theirs  # released, expired or dead without a result: take them over
        return made

    def _wait_for_others(self, keys: list[str], poll: float = 0.2) -> list[str]:
        """Wait while other processes make `keys`; returns those still missing with no live claimant.

        A claimant on this host whose process is gone (killed mid-generation) is released at once
        rather than after its lease: its work is taken over now.
        """
        deadline = time.monotonic() + CLAIM_LEASE_SECONDS
        while True:
            found = self.store.existing_keys(keys)
            rest = [key for key in keys if key not in found]
            claims = self.store.live_claims(rest) if rest else {}
            for owner in set(claims.values()):
                if _dead_here(owner):
                    self.store.release([k for k, o in claims.items() if o == owner], owner)
                    claims = {k: o for k, o in claims.items() if o != owner}
            if not rest or not claims or time.monotonic() > deadline:
                return rest
            time.sleep(poll)

    def _generate_and_store(self, plan: Plan, name: str, jobs: list[tuple[str, str, int]],
                            budget: "Budget | None" = None) -> int:
        """Generate (text, key, seed) jobs of one source in batches, embed, and commit them together.
        When an API source answers only some jobs, those are stored before its error is raised: an
        image paid for is never thrown away."""
        generator = self.generator(name)
        if source_kind(plan, name) != "api":  # an API holds no GPU memory: no pipeline is unloaded for it
            self._make_room_for(generator)
        started = time.perf_counter()
        try:
            images = generator.generate_many([(text, seed) for text, _, seed in jobs], budget=budget)
        except PartialResult as partial:
            kept = [(job, image) for job, image in zip(jobs, partial.images) if image is not None]
            self._generate_and_store_images(plan, name, [j for j, _ in kept], [i for _, i in kept])
            partial.stored = [job for job, _ in kept]
            raise
        self._time("generate", started)
        return self._generate_and_store_images(plan, name, jobs, images)

    def _generate_and_store_images(self, plan: Plan, name: str, jobs: list[tuple[str, str, int]],
                                   images: list) -> int:
        from engine.images import save_png_atomic

        source = next(s for s in plan.sources if s.name == name)
        vectors = self.embed(images)
        description_ids = {text: self.store.description_id(text) for text in dict.fromkeys(t for t, _, _ in jobs)}
        params_hash = plan.params_hash[source.id]
        rows = []
        for (text, key, seed), image, vector in zip(jobs, images, vectors):
            relative = Path("images") / source.fingerprint[:16] / key[:2] / f"{key}.png"
            file_hash = save_png_atomic(image, self.store.root / relative)
            rows.append(NewImage(key=key, role="resynthesis", source_id=source.id, description_id=description_ids[text],
                                 file_hash=file_hash, path=relative.as_posix(), vector=vector, seed=seed,
                                 params_hash=params_hash))
        crash_point("generate:before-commit")  # images on disk, rows not yet committed
        try:
            self.store.add_images(rows)
        except StoreInputError as exc:
            self._sources_changed()
            if all(s.name != name for s in self.sources()):
                raise SourceError(name, "was removed from the store during this request") from exc
            raise
        return len(rows)

    # ----- steps 3 and 4: embed, compare, rank -------------------------------------------------
    def candidates(self, text: str, plan: Plan) -> Candidates:
        """The stored references of `text` under `plan` (resyntheses, and labelled originals if asked)."""
        started = time.perf_counter()
        digest = sha256_text(normalise_description(text))
        description_id = self.store.find_description_id(text)
        ids = [s.id for s in plan.sources]
        rows = self.store.resyntheses(description_id, ids) if description_id else []
        found = Candidates(dict(plan.select(rows, digest)))
        if plan.options.original_refs:
            for row in self.store.originals(ids, plan.options.original_refs + 1):  # +1: the query may be one
                found.originals.setdefault(row.source, []).append(row)
        self._time("lookup", started)
        return found

    def embed(self, images: Sequence) -> np.ndarray:
        started = time.perf_counter()
        vectors = self.embedder.embed(list(images))
        self._time("embed", started)
        return vectors

    def score(self, query: Query, text: str, origin: str, vector: np.ndarray, plan: Plan,
              candidates: Candidates, counts: tuple[int, int, dict[str, str]] = (0, 0, {})) -> Attribution:
        """Rank the sources for one embedded query against its candidates."""
        started = time.perf_counter()
        per_source = plan.references(candidates, query.file_hash) if plan.options.mode != "dataset" else {}
        description_refs = dict(per_source)
        if plan.options.mode in ("dataset", "combined"):
            for name, rows in self.neighbours(vector, plan, query.file_hash).items():
                seen = {r.vector_id for r in per_source.get(name, ())}
                per_source[name] = per_source.get(name, []) + [r for r in rows if r.vector_id not in seen]
        ids = np.array([r.vector_id for rows in per_source.values() for r in rows], np.int64)
        sims, found = self.store.search(np.asarray(vector, np.float32)[None, :], ids)
        similarity = dict(zip(found[0].tolist(), sims[0].tolist()))
        per_source = {name: [r for r in rows if r.vector_id in similarity]  # removed meanwhile: not evidence
                      for name, rows in per_source.items()}
        values = {name: np.array([similarity[r.vector_id] for r in rows]) for name, rows in per_source.items()}
        calibration, stale = self.calibration, self.calibration_stale()
        scores, unknown = rank(values, {n: len(r) for n, r in per_source.items()}, plan.options.aggregation,
                               calibration)
        open_set = (self._open_set_value(vector, {n: r for n, r in per_source.items() if r}, calibration,
                                         description_refs)
                    if calibration.fitted and calibration.open_set and not stale and scores
                    and not plan.options.original_refs else None)  # fitted on resyntheses alone
        answer, evidence = verdict(scores, calibration, stale, open_set)
        self._time("search", started)
        cached, generated, failed = counts
        if not scores and failed:  # nothing could be scored because sources failed: not an answer
            raise SourceError(", ".join(sorted(failed)), "; ".join(sorted(set(failed.values()))))
        return Attribution(
            query=query.label, description=text, description_from=origin,
            predicted=scores[0].source if scores else None,
            margin=(scores[0].score - scores[1].score) if len(scores) > 1 else None,
            scores=scores, missing=sorted({s.name for s in plan.sources} - {x.source for x in scores}),
            unknown=answer == "unknown", calibrated=calibration.fitted and not stale, cached=cached,
            generated=generated, failed={k: v for k, v in failed.items() if k not in {x.source for x in scores}},
            verdict=answer, evidence=evidence)

    def calibration_stale(self) -> str | None:
        """Why the stored calibration no longer applies (sources added or removed since), or None."""
        calibration = self.calibration
        fitted_on = calibration.notes.get("store_sources") if calibration.fitted else None
        if fitted_on is None:
            return None
        now = {s.name: s.fingerprint for s in self.sources()}
        # a list of names (older calibrations), or name -> fingerprint: a source re-added under the same
        # name with another model is a change too
        same = set(now) == set(fitted_on) if isinstance(fitted_on, list) else now == fitted_on
        if not same:
            return "calibration is stale (sources changed since `resynth calibrate`): run it again"
        return None

    def neighbours(self, vector: np.ndarray, plan: Plan, file_hash: str) -> dict[str, list]:
        """Per source, its references among the query's nearest stored vectors (any description): the
        zero-generation answer of the dataset search."""
        roles = ("resynthesis", "original") if plan.options.original_refs else ("resynthesis",)
        found = self.store.nearest(vector, plan.options.neighbours, [s.id for s in plan.sources], roles, file_hash)
        out: dict[str, list] = {}
        for ref, _ in found:
            out.setdefault(ref.source, []).append(ref)
        return out

    @property
    def calibration(self) -> Calibration:
        """Read from the store's config each time, so a `resynth calibrate` picked up by refresh() applies."""
        return Calibration.from_dict(self.store.config.get("calibration"))

    # ----- the whole method --------------------------------------------------------------------
    def attribute(self, images: ImageInput | Sequence[ImageInput] | Sequence[Query],
                  prompt: str | Sequence[str | None] | None = None, options: Options | None = None,
                  labels: Sequence[str] | None = None) -> Report:
        """Attribute one image or several (paths, bytes, PIL images or Queries).

        `prompt`: one description for all images, one per image, or None (stored metadata, then the
        captioner). Queries sharing a description share its resyntheses.
        """
        from tqdm import tqdm

        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise UserError("nothing to attribute: give at least one image")
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(items)
        if len(prompts) != len(items):
            raise UserError(f"{len(prompts)} prompts for {len(items)} images: give one, or one per image")
        from engine.api_source import Budget

        plan = self.plan(options)
        budget = Budget(plan.options.max_cost)
        seconds = self._local.seconds = defaultdict(float)
        results: list[Attribution] = []
        cached = generated = 0
        chunks = range(0, len(items), QUERY_CHUNK)
        for start in tqdm(chunks, desc="attributing", unit="chunk", disable=not self.progress or len(chunks) < 2):
            queries = [item if isinstance(item, Query) else
                       Query.read(item, p, labels[start + i] if labels else None)
                       for i, (item, p) in enumerate(zip(items[start:start + QUERY_CHUNK],
                                                         prompts[start:start + QUERY_CHUNK]))]
            if plan.options.mode == "dataset":  # no description, no generation
                described = [(q.prompt or "", "prompt" if q.prompt else "none") for q in queries]
                counts = {text: (0, 0, {}) for text, _ in described}
            elif plan.options.adaptive:  # the queries' vectors decide which sources get more seeds
                described = self.describe(queries)
                vectors = self.embed([q.image for q in queries])
                counts = self.resynthesize_adaptive(queries, described, vectors, plan, budget)
            else:
                described = self.describe(queries)
                counts = self.resynthesize([text for text, _ in described], plan, budget)
            if not plan.options.adaptive or plan.options.mode == "dataset":
                vectors = self.embed([q.image for q in queries])
            candidates = {text: self.candidates(text, plan) if plan.options.mode != "dataset" else Candidates({})
                          for text in counts}
            results += [self.score(q, text, origin, vector, plan, candidates[text], counts[text])
                        for q, (text, origin), vector in zip(queries, described, vectors)]
            cached += sum(c for c, _, _ in counts.values())
            generated += sum(g for _, g, _ in counts.values())
        self._local.seconds = None
        return Report(results, cached, generated, dict(seconds), budget.to_dict() if _api_prices(plan) else None)

    def _time(self, stage: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        with self._lock:
            self.stats_counters.seconds[stage] += elapsed
        per_call = getattr(self._local, "seconds", None)
        if per_call is not None:
            per_call[stage] += elapsed

    # ----- sources -----------------------------------------------------------------------------
    def add_source(self, name: str, pipeline_dir: str | os.PathLike, *, steps: int = 30, guidance: float = 7.0,
                   size: int | None = None, scheduler: str | None = None,
                   negative_prompt: str | None = None) -> dict:
        """Register a diffusers text-to-image pipeline folder, checked without loading its weights."""
        from engine.generate import (GenerationParams, check_pipeline_folder, check_scheduler, fingerprint_folder,
                                     source_fingerprint)

        check_name(name)
        folder = Path(pipeline_dir).resolve()
        check_pipeline_folder(folder)
        check_scheduler(scheduler)
        if steps < 1 or (size is not None and (size < 8 or size % 8)):
            raise UserError("--steps must be >= 1 and --size a multiple of 8")
        params = GenerationParams(steps=steps, guidance=guidance, size=size, scheduler=scheduler,
                                  negative_prompt=negative_prompt)
        fingerprint = source_fingerprint("diffusers", name, fingerprint_folder(folder), params)
        twin = next((s for s in self.store.sources() if s.fingerprint == fingerprint), None)  # fresh, not cached
        if twin is not None:
            raise UserError(f"source {twin.name!r} already uses this pipeline folder with the same parameters "
                            f"(a second name would share its resyntheses)")
        source = self.store.add_source(name, "diffusers", fingerprint, path=str(folder), params=asdict(params))
        self._sources_changed()
        return {"name": source.name, "kind": source.kind, "path": source.path, "fingerprint": fingerprint}

    def add_api_source(self, name: str, url: str, model: str, *, size: str | None = None,
                       api_key_env: str | None = None, price: float = 0.0, rate: float | None = None,
                       concurrency: int = 2, extra: dict | None = None, timeout: float = 120.0) -> dict:
        """Register a model behind an OpenAI-compatible images API. Only the *name* of the environment
        variable holding the key is stored; the key is read at each run and never written anywhere."""
        from engine.api_source import ApiParams, endpoint_url
        from engine.generate import source_fingerprint

        check_name(name)
        params = ApiParams(url=url, model=model, size=size, api_key_env=api_key_env, price=price, rate=rate,
                           concurrency=concurrency, extra=dict(extra or {}), timeout=timeout).validate()
        fingerprint = source_fingerprint("api", name, params.cache_hash(), None)
        twin = next((s for s in self.store.sources() if s.fingerprint == fingerprint), None)
        if twin is not None:
            raise UserError(f"source {twin.name!r} already calls this endpoint and model with the same parameters "
                            f"(a second name would share its resyntheses)")
        source = self.store.add_source(name, "api", fingerprint, path=endpoint_url(url), params=asdict(params))
        self._sources_changed()
        info = {"name": source.name, "kind": source.kind, "path": source.path, "fingerprint": fingerprint}
        if api_key_env and not os.environ.get(api_key_env):
            info["warning"] = f"environment variable {api_key_env} is not set here: set it where resynth runs"
        return info

    def add_replay_source(self, name: str) -> None:
        """A source whose resyntheses come from a dataset (nothing to generate with)."""
        from engine.generate import source_fingerprint

        check_name(name)
        self.store.ensure_source(name, "replay", source_fingerprint("replay", name, None, None))
        self._sources_changed()

    def list_sources(self) -> list[dict]:
        import json

        return [{"name": s.name, "kind": s.kind, "path": s.path, "params": json.loads(s.params_json)}
                for s in self.store.sources()]

    def remove_source(self, name: str) -> int:
        """Delete a source with its resyntheses; returns how many stored vectors were dropped."""
        with self._lock:
            self._generators.pop(name, None)
        try:
            return self.store.remove_source(name)
        finally:
            self._sources_changed()

    # ----- datasets, index, numbers ------------------------------------------------------------
    def ingest(self, manifest: str | os.PathLike, allow_outside: bool = False) -> "IngestReport":
        """Import a manifest, validated whole before anything is written; rows must resolve inside the
        manifest's folder unless `allow_outside`."""
        from engine.ingest import ingest

        return ingest(self, Path(manifest), progress=self.progress, allow_outside=allow_outside)

    def verify(self, repair: bool = False, files: bool = True) -> dict:
        """Database, index and image files checked against each other; with `repair`, fixed where possible."""
        return self.store.verify(repair=repair, files=files)

    def rebuild(self, ray: str | None = None) -> int:
        """Recreate the index files from stored vectors (offline); with `ray`, the search index's shards
        are filled on that Ray cluster ("local" starts one) and merged on disk here."""
        if not ray:
            return self.store.rebuild()
        from engine import jobs

        with jobs.ray_cluster(ray) as cluster:
            return self.store.rebuild(shard_map=jobs.ray_shard_map(cluster))

    def resynthesize_dataset(self, descriptions: Sequence[str] | str | os.PathLike, options: Options | None = None,
                             ray: str | None = None) -> dict:
        """Precompute every resynthesis of a description list (or a file of them): in this process, or on
        the Ray cluster at `ray` ("local" starts one). Resumable; see engine.jobs."""
        from engine import jobs

        if isinstance(descriptions, (str, os.PathLike)):
            descriptions = jobs.read_descriptions(descriptions)
        return jobs.resynthesize_dataset(self, descriptions, options, ray_address=ray, progress=self.progress)

    def reembed(self, clip_checkpoint: str | os.PathLike, clip_model: str | None = None,
                clip_config: str | os.PathLike | None = None, clip_layer: str | int | None = "middle",
                ray: str | None = None) -> dict:
        """Re-embed every stored image for a new encoder or layer and switch to it atomically (no image is
        regenerated; the old vectors stay live until the new set is complete). See engine.jobs."""
        from engine import jobs

        spec = embedder_spec(clip_checkpoint, clip_model, clip_config, clip_layer)
        return jobs.reembed(self, spec, ray_address=ray, progress=self.progress)

    def use_embedder(self, embedder: "Embedder") -> None:
        """Adopt the embedder the store was just switched to (plans made in the old space are dropped)."""
        with self._lock:
            self._embedder = embedder
            self._plans.clear()
        self._sources_changed()

    def stats(self) -> dict:
        """The store's numbers; API sources also say what their stored images cost (each bought once)."""
        import json

        data = self.store.stats()
        for source in self.store.sources():
            if source.kind == "api" and source.name in data["sources"]:
                entry = data["sources"][source.name]
                price = float(json.loads(source.params_json).get("price") or 0.0)
                entry["api"] = {"price_usd": price, "images_bought": entry["resyntheses"],
                                "spent_usd": round(entry["resyntheses"] * price, 6)}
        return data

    def calibrate(self, manifest: str | os.PathLike | None = None, options: Options | None = None,
                  false_reject: float = 0.05) -> Calibration:
        """Fit a temperature and per-source thresholds on labelled originals (the store's own, or a
        manifest's embedded with the store's embedder) and save them in the store."""
        from engine.evaluation.dataset import from_manifest, from_store
        from engine.evaluation.runner import embed_evalset, fit_calibration
        from engine.evaluation.scoring import Variant

        options = options or Options()
        if not 0 < false_reject < 1:
            raise UserError("--false-reject must be between 0 and 1")
        if manifest is not None:
            evalset, fitted_on = from_manifest(Path(manifest)), str(manifest)
            features = embed_evalset(evalset, {"store": self.embedder}, None, progress=False)["store"]
        else:
            evalset, fitted_on = from_store(self.store), f"store {self.root}"
            features = evalset.vectors[self.store.embedder_identity]
        variant = Variant("store", "cosine", options.aggregation, options.references)
        calibration, precision = fit_calibration(evalset, features, variant, false_reject, fitted_on,
                                                 options.mode, options.neighbours)
        calibration.notes["store_sources"] = {s.name: s.fingerprint for s in self.store.sources()}  # to notice changes
        if precision is not None:  # dim x dim: a file beside store.json, named by its content
            calibration.open_set["precision_file"] = save_array_atomic(self.root, precision)
        self.store.update_config(calibration=calibration.to_dict())
        return calibration

    def _precision(self, name: str) -> np.ndarray | None:
        """The open-set precision matrix a calibration names (cached; None if the file is gone or altered)."""
        with self._lock:
            if self._open_set_precision[0] == name:
                return self._open_set_precision[1]
        path = self.root / name
        try:
            matrix = np.load(path, allow_pickle=False)
            ok = path.name == content_name(matrix) and matrix.shape == (self.store.dim, self.store.dim)
        except Exception:  # missing, empty, truncated, not an array: untrusted, the fallback decides
            ok, matrix = False, None
        matrix = matrix if ok else None
        with self._lock:
            self._open_set_precision = (name, matrix)
        return matrix

    def _open_set_value(self, vector: np.ndarray, per_source: dict[str, list], calibration: Calibration,
                        description_refs: dict[str, list]) -> float | None:
        """The calibrated feature-based open-set value of a query ("mahalanobis"), or None without one.
        Means are taken over each source's resyntheses of the query's description, what the calibration
        was fitted on; sources with none (dataset neighbours only, chosen for being close to the query,
        would flatter it) are left out, and with none at all there is no value."""
        from engine.calibration import mahalanobis_open_set

        name = calibration.open_set.get("precision_file") if calibration.open_set.get("score") == "mahalanobis" else None
        precision = self._precision(name) if name else None
        if precision is None:
            return None
        refs = {source: rows for source, rows in description_refs.items() if rows and source in per_source}
        if not refs:
            return None
        ids = np.array([r.vector_id for rows in refs.values() for r in rows], np.int64)
        try:
            matrix = dict(zip(ids.tolist(), self.store.vectors(ids)))
        except StoreInputError:  # removed meanwhile
            present = self.store.present(ids)
            matrix = dict(zip(present.tolist(), self.store.vectors(present)))
        vectors = {source: np.array([matrix[r.vector_id] for r in rows if r.vector_id in matrix])
                   for source, rows in refs.items()}
        value, _ = mahalanobis_open_set(np.asarray(vector, np.float32), vectors, precision)
        return value

    def evaluate(self, manifest: str | os.PathLike, out: str | os.PathLike = "resynth-eval",
                 layers: Sequence[str] = ("base", "final", "mid"), perturb: str | None = None, draws: int = 5,
                 seed: int = 0) -> dict:
        """The evaluation protocol on a labelled manifest with the store's embedder (report.json etc. in `out`)."""
        from engine.evaluation.dataset import from_manifest
        from engine.evaluation.runner import evaluate

        return evaluate(from_manifest(Path(manifest)), self.embedder, Path(out), list(layers), perturb, draws, seed,
                        progress=self.progress)

    def refresh(self) -> bool:
        """Pick up what another process changed (config, a rebuilt index, sources)."""
        self._sources_changed()
        return self.store.refresh()


def _dead_here(owner: str) -> bool:
    """Whether a claim owner ("host:pid:tag") is a process of this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def check_name(name: str) -> None:
    if not name or not name.strip() or len(name) > 200 or any(c in name for c in "/\\\0\n"):
        raise UserError(f"invalid source name {name!r}: use a short name without slashes")


def open_workspace(store_dir: str | os.PathLike | None = None, *, device: str | None = None,
                   captioner: str | os.PathLike | None = None, progress: bool = False,
                   writable: bool = True, repair: bool = False) -> Workspace:
    store = Store.open(store_path(store_dir), writable=writable, repair=repair)
    return Workspace(store, device=device, captioner=captioner, progress=progress)


def source_kind(plan: Plan, name: str) -> str | None:
    return next((s.kind for s in plan.sources if s.name == name), None)


def note_cached(plan: Plan, todo: dict[str, list], budget: "Budget | None") -> None:
    """Record in `budget` what the API images of one description found in the cache would have cost."""
    if budget is not None:
        for source, price in _api_prices(plan).items():
            budget.cached(plan.options.per_source - len(todo.get(source, ())), price)


def _api_prices(plan: Plan) -> dict[str, float]:
    """Price per image of the plan's API sources (for the cost report)."""
    import json

    return {s.name: float(json.loads(s.params_json).get("price") or 0.0) for s in plan.sources if s.kind == "api"}


def embedder_spec(clip_checkpoint: str | os.PathLike, clip_model: str | None = None,
                  clip_config: str | os.PathLike | None = None, clip_layer: str | int | None = "middle"):
    """The EmbedderSpec of `init`'s and `reembed`'s --clip-* options (paths made absolute)."""
    from engine.embed import EmbedderSpec, parse_layer

    if bool(clip_model) == bool(clip_config):
        raise UserError("give exactly one of --clip-model ARCH or --clip-config JSON")
    config = str(Path(clip_config).resolve()) if clip_config else None
    return EmbedderSpec(arch=clip_model or Path(str(clip_config)).stem, checkpoint=str(Path(clip_checkpoint).resolve()),
                        config=config, layer=parse_layer(clip_layer))


def init_workspace(store_dir: str | os.PathLike | None = None, *, clip_checkpoint: str | os.PathLike,
                   clip_model: str | None = None, clip_config: str | os.PathLike | None = None,
                   clip_layer: str | int | None = "middle", captioner: str | os.PathLike | None = None,
                   device: str | None = None, progress: bool = False, db: str | None = None) -> Workspace:
    """Create a store bound to one open_clip image encoder (loaded once, to validate it and learn its identity)."""
    from engine.describe import Captioner
    from engine.embed import Embedder

    spec = embedder_spec(clip_checkpoint, clip_model, clip_config, clip_layer)
    if captioner:
        Captioner(Path(captioner))  # validates the folder now rather than at the first query
    embedder = Embedder(spec, device=device)
    store = Store.create(store_path(store_dir), embedder.describe(), embedder.dim,
                         captioner=str(Path(captioner).resolve()) if captioner else None, db_url=db)
    ws = Workspace(store, device=device, progress=progress)
    ws._embedder = embedder
    return ws
