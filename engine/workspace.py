"""The library's one way in: a Workspace holds a store and the models it is bound to.

    import engine
    with engine.open("my-store") as ws:
        report = ws.attribute("suspicious.png", prompt="portrait of an old man")

Models load lazily (a `stats` or `source list` never imports torch). The Workspace is a facade: the
request path is engine.request (its steps in engine.describe, engine.resynthesis and engine.compare),
sources are engine.sources kinds, calibration is engine.fitting. The steps stay public here (`plan`,
`describe`, `resynthesize`, `candidates`, `embed`, `score`) so callers can run one at a time.
"""
from __future__ import annotations

import functools
import numbers
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from engine import arguments, compare, request, resynthesis, sources
from engine.attribute import Attribution, Candidates, Plan, Query, Report
from engine.calibration import Calibration
from engine.errors import ArgumentTypeError, NotFoundError, UserError
from engine.images import ImageInput
from engine.models import Models
from engine.options import Options
from engine.paths import expand_path, not_a_file
from engine.sources import DEFAULT_KIND, check_name  # noqa: F401  (check_name: imported from here before)
from index.errors import StoreInputError, UnknownName
from index.keys import known_names, same_name
from index.layout import CONFIG_NAME, DB_NAME, INDEX_NAME, LOCK_NAME
from index.store import Store

if TYPE_CHECKING:  # heavy modules (torch) load only when a model is needed
    from engine.api_source import Budget
    from engine.describe import Describer
    from engine.embed import Embedder
    from engine.ingest import IngestReport

DEFAULT_STORE = "resynth-store"
SOURCES_TTL = 1.0  # seconds a workspace trusts its list of sources (a cached lookup then costs no query for it)


def store_path(explicit: str | os.PathLike | None) -> Path:
    """--store, else $RESYNTH_STORE, else ./resynth-store (`~` and `$VAR` expanded), made absolute once: a
    relative $RESYNTH_STORE would otherwise name another folder for anything that runs elsewhere (a Ray
    worker, a later chdir). An empty path is refused: it is an unset variable's, not the current folder."""
    if isinstance(explicit, (str, bytes)) and not explicit:
        raise UserError("the store path is empty: give a store folder, or None for $RESYNTH_STORE or "
                        f"./{DEFAULT_STORE}", code="bad_path")
    return Path(os.path.abspath(expand_path(explicit or os.environ.get("RESYNTH_STORE") or DEFAULT_STORE, "store")))


class StoreOpenError(UserError, StoreInputError):
    """A store `engine.open` cannot open as asked (no store at the path, a file there): an input mistake that
    `except engine.UserError` catches like every other (the store's own StoreInputError escaped it), still a
    StoreInputError for older code."""

    code = "bad_request"  # what the CLI and HTTP said of it before: the same exit code and kind


class WorkspaceClosed(UserError, ValueError):
    """A Workspace used after `close` (or after its `with` block): a ValueError, as Python's closed files raise.
    Every call still worked, reopening database connections nobody closed again, and what it added to the
    index was published only if the caller happened to close once more."""

    code = "workspace_closed"
    status = 503  # over HTTP, a request still running when the service stops: try again (another worker)


def _while_open(method):
    """The public call `method`, refused in one line once the workspace is closed."""

    @functools.wraps(method)
    def checked(self: "Workspace", *args, **kwargs):
        if self.closed:
            root = self.store.root
            raise WorkspaceClosed(f"the workspace of {root} is closed (by close() or the end of its `with` block): "
                                  f"open the store again, e.g. `with engine.open({str(root)!r}) as ws:`")
        return method(self, *args, **kwargs)

    return checked


class UnknownSourceError(NotFoundError, UnknownName):
    """`remove_source` of a name the store lacks: a NotFoundError (a UserError), still the store's UnknownName."""

    code = "unknown_source"


@dataclass
class Stats:
    """Counters and per-stage seconds, accumulated over a Workspace's life."""

    cached: int = 0
    generated: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class Workspace:
    """A store with its embedder, generators and captioner. Use `engine.open` / `engine.init`."""

    def __init__(self, store: Store, device: str | None = None, captioner: str | os.PathLike | None = None,
                 progress: bool = False, max_loaded: int = 2, embedder: "Embedder | None" = None):
        self.store = store
        self.device = device
        self.progress = progress
        self.max_loaded = max(1, max_loaded)  # pipelines kept in memory at once (real ones take GBs)
        self.models = Models(self, str(expand_path(captioner)) if captioner else None, embedder)
        self._plans: dict[tuple, Plan] = {}
        self._sources: tuple[float, list] | None = None
        self._lock = threading.RLock()  # guards the plan and sources caches and the counters
        self.stats_counters = Stats()
        self._local = threading.local()  # per-call stage seconds of `attribute`
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # generation claims
        self.precision = compare.PrecisionFile(store)
        self.closed = False

    # ----- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Publish what this workspace added to the index and let the store go; a second close does nothing."""
        if self.closed:
            return
        try:
            self.store.close()
        finally:
            self.closed = True

    @_while_open
    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def root(self) -> Path:
        return self.store.root

    # ----- models, loaded on first use (engine.models) ---------------------------------------------
    @property
    def embedder(self) -> "Embedder":
        """The store's embedder; refuses weights that changed since the store was bound to them."""
        return self.models.embedder()

    @property
    def captioner(self) -> "Describer | None":
        return self.models.captioner()

    def generator(self, name: str):
        """The lazy generator of a source that generates (a pipeline loads only when it must generate)."""
        return self.models.generator(name)

    @property
    def generator_calls(self) -> dict[str, int]:
        """Images generated per source by this workspace (tests and the service's stats count them)."""
        return {name: g.calls for name, g in self.models.generators.items()}

    def loaded_pipelines(self) -> list[str]:
        """The sources whose pipeline is in memory now (at most `max_loaded` of them)."""
        return [name for name, g in self.models.generators.items() if getattr(g, "loaded", False)]

    def make_room_for(self, generator) -> None:
        self.models.make_room_for(generator)

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

    def sources_changed(self) -> None:
        """Forget the cached list of sources (the next use re-reads it)."""
        with self._lock:
            self._sources = None

    _sources_changed = sources_changed  # the name earlier code used

    def plan(self, options: Options | None = None) -> Plan:
        """Resolve options against the store's current sources (cached per option set and source set)."""
        options = arguments.options(options) or Options()
        found_sources = self.sources()
        signature = tuple((s.id, s.name, s.fingerprint) for s in found_sources)
        with self._lock:
            found = self._plans.get((options, signature))
        if found is not None:
            return found
        if not found_sources:
            raise UserError("the store has no sources: add some with `resynth source add` or `resynth ingest`")
        known = {s.name: s for s in found_sources}
        for name in options.sources or ():
            if name not in known:  # typed in another Unicode form than stored is the same name
                twins = [s for s in found_sources if same_name(s.name, name)]
                if len(twins) != 1:
                    raise NotFoundError(f"unknown source {name!r} (known: {known_names(known)})", code="unknown_source")
                known[name] = twins[0]
        names = options.sources or sorted(s.name for s in found_sources)
        chosen = tuple(dict.fromkeys(known[n] for n in names))  # a name given in two forms is one source
        made = Plan(options, chosen, {s.id: sources.kind_of(s).params_hash(s) for s in chosen},
                    self.store.embedder_identity)
        with self._lock:
            if len(self._plans) > 256:
                self._plans.clear()
            self._plans[(options, signature)] = made
        return made

    # ----- the steps (engine.request runs them in order) ----------------------------------------
    @arguments.keywords
    @_while_open
    def describe(self, queries: Sequence[Query]) -> list[tuple[str, str]]:
        """(description, where it came from) per query: its prompt, a stored description, or a caption."""
        if isinstance(queries, (str, bytes)) or not isinstance(queries, Iterable):
            queries = [queries]
        queries = list(queries)
        for i, query in enumerate(queries):
            if not isinstance(query, Query):
                raise ArgumentTypeError(f"queries[{i}] must be an engine.attribute.Query (Query.read(image, prompt)), "
                                        f"not {type(query).__name__}")
        return request.describe(self, queries)

    @_while_open
    def needs_caption(self, queries: Sequence[Query]) -> bool:
        """Whether `describe` would run the captioner (a model call) for these queries."""
        return any(not q.prompt and self.store.description_for_file(q.file_hash) is None for q in queries)

    @_while_open
    def missing(self, text: str, plan: Plan) -> tuple[int, dict[str, list[tuple[str, int]]]]:
        """(how many of the plan's resyntheses are stored, the missing (key, seed) pairs per source)."""
        return resynthesis.missing(self, text, plan)

    @_while_open
    def resynthesize(self, texts: Iterable[str], plan: Plan,
                     budget: "Budget | None" = None) -> dict[str, tuple[int, int, dict[str, str]]]:
        """Generate and store every missing (description, source, seed).

        Returns (cached, generated, failed sources -> reason) per description. A source that cannot
        load or generate, or whose images would exceed `budget` (API sources), is reported, not
        raised: the other sources are still scored. `budget` also records what was bought and what
        the cache saved.
        """
        return resynthesis.resynthesize(self, texts, plan, budget)

    @_while_open
    def resynthesize_adaptive(self, queries: Sequence[Query], described: Sequence[tuple[str, str]],
                              vectors: np.ndarray, plan: Plan,
                              budget: "Budget | None" = None) -> dict[str, tuple[int, int, dict[str, str]]]:
        """Adaptive generation (see engine.resynthesis.resynthesize_adaptive); same return as `resynthesize`."""
        return resynthesis.resynthesize_adaptive(self, queries, described, vectors, plan, budget)

    @_while_open
    def candidates(self, text: str, plan: Plan) -> Candidates:
        """The stored references of `text` under `plan` (resyntheses, and labelled originals if asked)."""
        return compare.candidates(self, text, plan)

    @arguments.keywords
    @_while_open
    def embed(self, images: Sequence) -> np.ndarray:
        images = arguments.pil_images(images)  # a path or an array failed inside torchvision
        started = time.perf_counter()
        vectors = self.embedder.embed(images)
        self._time("embed", started)
        return vectors

    @_while_open
    def score(self, query: Query, text: str, origin: str, vector: np.ndarray, plan: Plan,
              candidates: Candidates, counts: tuple[int, int, dict[str, str]] = (0, 0, {})) -> Attribution:
        """Rank the sources for one embedded query against its candidates (the ranking alone: no real
        verdict, no redraw of the file's recipe; `attribute` gives the whole answer)."""
        return compare.score(self, query, text, origin, vector, plan, candidates, counts, evidence_checks=False)

    @_while_open
    def neighbours(self, vector: np.ndarray, plan: Plan, file_hash: str) -> dict[str, list]:
        return compare.neighbours(self, vector, plan, file_hash)

    @_while_open
    def calibration_stale(self) -> str | None:
        """Why the stored calibration no longer applies (sources added or removed since), or None."""
        return compare.calibration_stale(self)

    @property
    def calibration(self) -> Calibration:
        """Read from the store's config each time, so a `resynth calibrate` picked up by refresh() applies."""
        _while_open(lambda ws: None)(self)
        return Calibration.from_dict(self.store.config.get("calibration"))

    @arguments.keywords
    @_while_open
    def attribute(self, images: ImageInput | Sequence[ImageInput] | Sequence[Query],
                  prompt: str | Sequence[str | None] | None = None, options: Options | None = None,
                  labels: Sequence[str] | None = None) -> Report:
        """Attribute one image or several (paths, bytes, PIL images or Queries).

        `prompt`: one description for all images, one per image, or None (stored metadata, then the
        captioner). Queries sharing a description share its resyntheses.
        """
        items = arguments.image_items(images)
        return request.attribute(self, items, arguments.prompts(prompt, len(items)), arguments.options(options),
                                 arguments.labels(labels, len(items)))

    @contextmanager
    def stage_seconds(self) -> Iterator[dict[str, float]]:
        """Seconds per stage of the steps this thread runs inside the block."""
        seconds = self._local.seconds = defaultdict(float)
        try:
            yield seconds
        finally:
            self._local.seconds = None

    def _time(self, stage: str, started: float) -> None:
        elapsed = time.perf_counter() - started
        with self._lock:
            self.stats_counters.seconds[stage] += elapsed
        per_call = getattr(self._local, "seconds", None)
        if per_call is not None:
            per_call[stage] += elapsed

    def tally(self, counts: Iterable[tuple[int, int, dict]]) -> None:
        with self._lock:
            for cached, generated, _ in counts:
                self.stats_counters.cached += cached
                self.stats_counters.generated += generated

    # ----- sources -----------------------------------------------------------------------------
    @_while_open
    def add_source(self, name: str, pipeline_dir: str | os.PathLike | None = None, *,
                   kind: str = DEFAULT_KIND, **params) -> dict:
        """Register a source of any kind (engine.sources) with that kind's parameters; for the default
        kind, a diffusers pipeline folder (`pipeline_dir`), checked without loading its weights. Paths
        may start with `~` or hold `$VAR`s."""
        if pipeline_dir is not None:
            params["path"] = pipeline_dir
        arguments.text(name, "a source name")
        if not isinstance(name, str):
            raise ArgumentTypeError(f"a source name must be a str, not {type(name).__name__}")
        if not isinstance(kind, str):
            raise ArgumentTypeError(f"kind must be a str naming a source kind, not {type(kind).__name__}")
        params = arguments.source_params(sources.get(kind), params)
        try:
            return sources.enrol(self.store, name, kind, **params)
        finally:
            self.sources_changed()

    def add_api_source(self, name: str, url: str, model: str, *, protocol: str = "openai", **params) -> dict:
        """Register a model behind an images API (engine.sources.api): `protocol` names the service's
        (engine.providers: openai, the default, bfl, replicate, stability, imagen, gemini,
        google, fal, ideogram, firefly)."""
        return self.add_source(name, kind="api", url=url, model=model, protocol=protocol, **params)

    def add_replay_source(self, name: str) -> None:
        """A source whose resyntheses come from a dataset (nothing to generate with)."""
        self.add_source(name, kind="replay")

    @arguments.keywords
    @_while_open
    def list_sources(self) -> list[dict]:
        import json

        # GET /v1/sources answers these rows without `path`: one row for the CLI, Python and HTTP
        return [{"name": s.name, "kind": s.kind, "path": s.path, "fingerprint": s.fingerprint,
                 "params": json.loads(s.params_json)} for s in self.store.sources()]

    @arguments.keywords
    @_while_open
    def remove_source(self, name: str) -> int:
        """Delete a source with its resyntheses; returns how many stored vectors were dropped."""
        if not isinstance(name, str):
            raise ArgumentTypeError(f"a source name must be a str, not {type(name).__name__}")
        arguments.text(name, "a source name")
        try:  # the loaded generator goes under its stored spelling (typed in another Unicode form, too)
            self.models.forget(self.store.source(name).name)
        except UnknownName:  # said by remove_source, after a read-only store's refusal
            pass
        try:
            return self.store.remove_source(name)
        except UnknownName as exc:
            raise UnknownSourceError(str(exc)) from None
        finally:
            self.sources_changed()

    # ----- datasets, index, numbers ------------------------------------------------------------
    @arguments.keywords
    @_while_open
    def ingest(self, manifest: str | os.PathLike, allow_outside: bool = False) -> "IngestReport":
        """Import a manifest, validated whole before anything is written; rows must resolve inside the
        manifest's folder unless `allow_outside`."""
        from engine.ingest import ingest

        return ingest(self, arguments.required_path(manifest, "manifest"), progress=self.progress,
                      allow_outside=arguments.flag(allow_outside, "allow_outside"))

    @arguments.keywords
    @_while_open
    def verify(self, repair: bool = False, files: bool = True) -> dict:
        """Database, index and image files checked against each other; with `repair`, fixed where possible."""
        return self.store.verify(repair=arguments.flag(repair, "repair"), files=arguments.flag(files, "files"))

    @arguments.keywords
    @_while_open
    def rebuild(self, ray: str | None = None) -> int:
        """Recreate the index files from stored vectors (offline); with `ray`, the search index's shards
        are filled on that Ray cluster ("local" starts one) and merged on disk here."""
        if not arguments.text(ray, "ray"):
            return self.store.rebuild()
        from engine import jobs

        with jobs.ray_cluster(ray) as cluster:
            return self.store.rebuild(shard_map=jobs.ray_shard_map(cluster))

    @arguments.keywords
    @_while_open
    def resynthesize_dataset(self, descriptions: Sequence[str] | str | os.PathLike, options: Options | None = None,
                             ray: str | None = None) -> dict:
        """Precompute every resynthesis of a description list (or a file of them): in this process, or on
        the Ray cluster at `ray` ("local" starts one). Resumable; see engine.jobs."""
        from engine import jobs

        options = arguments.options(options)
        arguments.text(ray, "ray")
        if isinstance(descriptions, (str, bytes, os.PathLike)):
            descriptions = jobs.read_descriptions(arguments.required_path(descriptions, "descriptions file"))
        else:
            descriptions = arguments.texts(descriptions, "descriptions")
        return jobs.resynthesize_dataset(self, descriptions, options, ray_address=ray, progress=self.progress)

    @arguments.keywords
    @_while_open
    def reembed(self, clip_checkpoint: str | os.PathLike, clip_model: str | None = None,
                clip_config: str | os.PathLike | None = None, clip_layer: str | int | None = "middle",
                ray: str | None = None) -> dict:
        """Re-embed every stored image for a new encoder or layer and switch to it atomically (no image is
        regenerated; the old vectors stay live until the new set is complete). See engine.jobs."""
        from engine import jobs

        spec = embedder_spec(clip_checkpoint, clip_model, clip_config, clip_layer)
        return jobs.reembed(self, spec, ray_address=ray, progress=self.progress)

    def abandon_reembeds(self) -> dict:
        """Give up every `reembed` not switched to: its vectors, kept for a rerun to resume from, are deleted
        (those of a reembed running now stay). {"dropped": {embedder: vectors}, "running": [embedder]}."""
        from engine.resynthesis import dead_here

        dropped, running = self.store.discard_unswitched(dead_here)  # a killed reembed's lease lasts 15 minutes
        return {"dropped": dropped, "running": running}

    def use_embedder(self, embedder: "Embedder") -> None:
        """Adopt the embedder the store was just switched to (plans made in the old space are dropped)."""
        self.models.use_embedder(embedder)
        with self._lock:
            self._plans.clear()
        self.sources_changed()

    @arguments.keywords
    @_while_open
    def stats(self) -> dict:
        """The store's numbers; sources that cost money also say what their stored images cost (each bought once)."""
        from engine.api_tasks import RESUME_FOR_S
        from index.errors import StoreDenied
        from index.pending import pending_tasks

        data = self.store.stats()
        try:  # bought, not stored yet, young enough that the next run resumes them (older ones are bought again)
            waiting: dict[str, int] | None = pending_tasks(self.store).by_source(within=RESUME_FOR_S)
        except StoreDenied:  # a role granted the tables before pending_tasks was added: the numbers still answer
            waiting = None
        for source in self.store.sources():
            kind = sources.kind_of(source)
            if kind.costs_money and source.name in data["sources"]:
                entry = data["sources"][source.name]
                price = kind.price(source)
                entry["api"] = {"price_usd": price, "images_bought": entry["resyntheses"],
                                "spent_usd": round(entry["resyntheses"] * price, 6),
                                "tasks_pending": None if waiting is None else waiting.get(source.name, 0)}
        return data

    @arguments.keywords
    @_while_open
    def calibrate(self, manifest: str | os.PathLike | None = None, options: Options | None = None,
                  false_reject: float = 0.05, strict: bool = False) -> Calibration:
        """Fit a temperature and per-source thresholds on labelled originals (the store's own, or a
        manifest's embedded with the store's embedder) and save them in the store (engine.fitting).
        `strict`: refuse originals that cannot be scored instead of skipping them with a count."""
        from engine.fitting import calibrate

        if isinstance(false_reject, bool) or not isinstance(false_reject, numbers.Real):
            raise ArgumentTypeError(f"false_reject must be a number between 0 and 1, not {type(false_reject).__name__}")
        manifest = arguments.required_path(manifest, "manifest") if manifest is not None else None
        return calibrate(self, manifest, arguments.options(options), float(false_reject),
                         strict=arguments.flag(strict, "strict"))

    @_while_open
    def image_file(self, image_id: int) -> Path | None:
        """A stored image's file by its catalog id (evidence thumbnails, case reports); None if unknown."""
        if isinstance(image_id, bool) or not isinstance(image_id, numbers.Integral):  # "3" (from JSON) read as unknown
            raise ArgumentTypeError(f"image_id must be an int (an evidence entry's image_id), not "
                                    f"{type(image_id).__name__}")
        return compare.reference_file(self.store, image_id)

    @arguments.keywords
    @_while_open
    def refresh(self) -> bool:
        """Pick up what another process changed (config, a rebuilt index, sources)."""
        self.sources_changed()
        return self.store.refresh()


def open_workspace(store_dir: str | os.PathLike | None = None, *, device: str | None = None,
                   captioner: str | os.PathLike | None = None, progress: bool = False,
                   writable: bool = True, repair: bool = False) -> Workspace:
    root = store_path(store_dir)
    writable, repair = arguments.flag(writable, "writable"), arguments.flag(repair, "repair")
    progress = arguments.flag(progress, "progress")
    device, captioner = arguments.device(device), arguments.optional_path(captioner, "--captioner")
    why = not_a_file(root)  # a file, a FIFO, a dangling link: said as such ("no store at" read as a missing one)
    if why is None or (why not in ("a folder", "not found") and not why.startswith("unreadable")):
        raise StoreOpenError(f"no store at {root}: it is {why or 'a file'}, not a store folder (create a store with "
                             "`resynth init` in a new folder)")
    try:
        store = Store.open(root, writable=writable, repair=repair)
    except StoreInputError as exc:
        if type(exc) is not StoreInputError:  # read-only and the like keep their own kind (and exit code)
            raise
        raise StoreOpenError(str(exc)) from None
    return Workspace(store, device=device, captioner=captioner, progress=progress)


def embedder_spec(clip_checkpoint: str | os.PathLike, clip_model: str | None = None,
                  clip_config: str | os.PathLike | None = None, clip_layer: str | int | None = "middle"):
    """The EmbedderSpec of `init`'s and `reembed`'s --clip-* options (paths made absolute)."""
    from engine.embed import EmbedderSpec, parse_layer

    arguments.text(clip_model, "clip_model")
    if isinstance(clip_layer, bool) or not isinstance(clip_layer, (str, numbers.Integral, type(None))):
        raise ArgumentTypeError(f"clip_layer must be \"middle\", \"final\", a block number or None (final), not "
                                f"{type(clip_layer).__name__}")  # True was block 1
    if bool(clip_model) == bool(clip_config):
        raise UserError("give exactly one of --clip-model ARCH or --clip-config JSON")
    checkpoint = arguments.required_path(clip_checkpoint, "clip_checkpoint (--clip-checkpoint)")
    given = arguments.required_path(clip_config, "clip_config (--clip-config)") if clip_config else None
    config = str(given.resolve()) if given else None
    return EmbedderSpec(arch=clip_model or Path(str(given)).stem,
                        checkpoint=str(checkpoint.resolve()), config=config,
                        layer=parse_layer(clip_layer))


def init_workspace(store_dir: str | os.PathLike | None = None, *, clip_checkpoint: str | os.PathLike,
                   clip_model: str | None = None, clip_config: str | os.PathLike | None = None,
                   clip_layer: str | int | None = "middle", captioner: str | os.PathLike | None = None,
                   device: str | None = None, progress: bool = False, db: str | None = None,
                   images: str | None = None, caption_instruction: str | None = None) -> Workspace:
    """Create a store bound to one open_clip image encoder (loaded once, to validate it and learn its identity)."""
    from engine.describe import make_captioner
    from engine.embed import Embedder

    for value, what in ((db, "db"), (images, "images"), (caption_instruction, "caption_instruction")):
        arguments.text(value, what)
    progress = arguments.flag(progress, "progress")
    device, root = arguments.device(device), store_path(store_dir)
    check_new_store(root)
    if images:
        from index.objects import parse_images_url

        parse_images_url(images)  # a wrong URL or a missing backend is one line before any model loads
    spec = embedder_spec(clip_checkpoint, clip_model, clip_config, clip_layer)
    captioner = arguments.optional_path(captioner, "--captioner")
    if caption_instruction is not None and not caption_instruction.strip():
        raise UserError("--caption-instruction must not be empty")
    if caption_instruction is not None and not captioner:
        raise UserError("--caption-instruction needs --captioner DIR (a vision-language model folder)")
    from engine.models import LOADING

    with LOADING:  # another thread of this process may be loading a model (engine.models.LOADING says why)
        if captioner:
            make_captioner(captioner, instruction=caption_instruction)  # checked now, not at the first query
        embedder = Embedder(spec, device=device)
    store = Store.create(root, embedder.describe(), embedder.dim,
                         captioner=str(Path(captioner).resolve()) if captioner else None, db_url=db,
                         images=images)
    if caption_instruction:
        store.update_config(caption_instruction=" ".join(caption_instruction.split()))
    return Workspace(store, device=device, progress=progress, embedder=embedder)


# What a store folder holds before its store.json (written last) marks it complete: a folder with these is
# a store an earlier init left half made, and init completes it.
STORE_FILES = (CONFIG_NAME, DB_NAME, INDEX_NAME, LOCK_NAME)


def check_new_store(root: Path) -> None:
    """Where `init` may create a store: a new or empty folder, a store, or one an interrupted init left.
    `init --store /` (or ~, or a project folder, as root or not) wrote metadata.sqlite and store.json among
    the user's own files; a file, a FIFO or a dangling link ended in a FileExistsError traceback."""
    from itertools import islice

    from engine.paths import not_a_file, shown

    if not os.path.lexists(root):
        return
    why = not_a_file(root)
    if why != "a folder":
        raise UserError(f"cannot create a store at {shown(root)}: it is {why or 'a file'}, not a folder",
                        code="not_a_directory")
    try:
        names = [entry.name for entry in islice(os.scandir(root), 1000)]
    except OSError:
        return  # the store's own open names what the machine refused
    if names and not any(name.startswith(STORE_FILES) for name in names):
        listed = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise UserError(f"cannot create a store in {shown(root)}: the folder holds other files ({listed}) and no "
                        f"store; give a new or empty folder, e.g. {shown(root / DEFAULT_STORE)}",
                        code="folder_not_empty")
