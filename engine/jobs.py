"""Offline jobs over a whole dataset: precompute resyntheses (`resynth resynthesize`) and re-embed a store
for a new CLIP model or layer (`resynth reembed`).

Both run in this process by default, or on a Ray cluster (`--ray ADDRESS`, or `--ray local` to start one
here). On Ray, each source gets its own actor (one per GPU when the cluster has GPUs), which loads its
pipeline once and generates in batches; every result is written through the store (claims make a key
generated once even when two jobs overlap), so a job that stops is resumed by running it again: stored
keys are skipped. The in-process and Ray paths store the same keys and vectors (tested).
"""
from __future__ import annotations

import csv
import json
import os
import logging
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from engine.errors import UserError, first_line, plural
from engine.options import Options

log = logging.getLogger("resynth.jobs")

DESCRIPTIONS_PER_TASK = 16  # one Ray task: a few batches of one source (small enough for a smooth progress bar)
IMAGES_PER_EMBED_TASK = 256


# ----- input -------------------------------------------------------------------------------------
def read_descriptions(path: str | os.PathLike) -> list[str]:
    """Descriptions from a text file (one per line, `#` comments) or a manifest (CSV with a
    `description` column, or JSONL rows with `description` or `prompt`); duplicates kept once."""
    from engine.describe import clean_prompt

    path = Path(path)
    if not path.is_file():
        raise UserError(f"descriptions file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {first_line(exc)}") from None
    found: list[tuple[int, str]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if "description" not in (reader.fieldnames or []):
            raise UserError(f"{path}: a manifest needs a 'description' column")
        found = [(number, row.get("description") or "") for number, row in enumerate(reader, start=2)]
    elif path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    found.append((number, str(row.get("description", row.get("prompt")) or "")))
                except (ValueError, AttributeError):
                    raise UserError(f"{path}:{number}: expected a JSON object with a description") from None
    else:
        found = [(n, line) for n, line in enumerate(text.splitlines(), start=1)
                 if line.strip() and not line.lstrip().startswith("#")]
    out: dict[str, None] = {}
    for number, raw in found:
        try:
            out[clean_prompt(raw) or ""] = None  # clean_prompt refuses an empty description
        except UserError:
            raise UserError(f"{path}:{number}: empty description") from None
    if not out:
        raise UserError(f"{path} holds no description")
    return list(out)


# ----- Ray ---------------------------------------------------------------------------------------
def require_ray(address: str | None) -> None:
    """Refuse `--ray` without Ray installed before any work starts (not after a first progress bar)."""
    import importlib.util

    if address and importlib.util.find_spec("ray") is None:
        raise UserError("--ray needs Ray: pip install 'resynth[ray]'")


@contextmanager
def ray_cluster(address: str | None) -> Iterator[Any]:
    """The `ray` module connected to `address` ("local": a cluster in this process), or None without
    one. A cluster the caller already initialised is used as it is and left running."""
    if not address:
        yield None
        return
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'resynth[ray]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
        except Exception as exc:  # ConnectionError, ValueError ... for an unreachable address
            raise UserError(f"cannot connect to the Ray cluster at {address}: {first_line(exc)}") from None
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _placement(ray, actors: int) -> tuple[dict, str]:
    """Actor resources and device: a whole GPU each on a cluster with GPUs (a pipeline sizes its batches
    by the free memory of its device: two on one GPU would run out of it); with fewer GPUs than sources,
    an actor waits for a GPU that a finished source's actor gives back. A share of the CPUs otherwise."""
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if gpus >= 1:
        return {"num_gpus": 1.0, "num_cpus": min(1.0, cpus / max(1, min(actors, int(gpus))))}, "cuda"
    return {"num_cpus": min(1.0, cpus / actors)}, "cpu"


class _SourceWorker:
    """A Ray actor generating for one source: its pipeline loads once, on the first task."""

    def __init__(self, store_dir: str, options: Options, device: str):
        import engine

        self.ws = engine.open(store_dir, device=device)
        self.plan = self.ws.plan(options)

    def run(self, texts: list[str]) -> tuple[int, int, dict[str, str]]:
        cached = generated = 0
        failed: dict[str, str] = {}
        for c, g, f in self.ws.resynthesize(texts, self.plan).values():
            cached, generated = cached + c, generated + g
            failed.update(f)
        self.ws.store.save_index()
        return cached, generated, failed


class _EmbedWorker:
    """A Ray actor embedding image files with the new encoder (loaded once)."""

    def __init__(self, spec, device: str):
        from engine.embed import Embedder

        self.embedder = Embedder(spec, device=device)

    def run(self, jobs: list[tuple[int, str, str]]) -> tuple[list[int], np.ndarray, list[tuple[str, str]]]:
        return _embed_files(self.embedder, jobs)


def ray_shard_map(ray):
    """A search-index shard filler (index.ivf.ShardMap) running each shard as a Ray task: the trained
    index and the shard's vectors travel through the object store, the filled shard comes back to be
    merged on disk here. Results are yielded in shard order as they finish (bounded in flight)."""
    from index import ivf

    fill = ray.remote(num_cpus=1)(ivf.fill_shard)

    def run(trained: bytes, shards, threads: int):
        blob = ray.put(trained)
        pending = [fill.remote(blob, ids, matrix, 1) for ids, matrix in shards[:2]]
        for k in range(len(shards)):
            if k + 2 < len(shards):
                pending.append(fill.remote(blob, *shards[k + 2], 1))
            yield ray.get(pending[k])
            pending[k] = None  # its result is on disk now: let the object store drop it

    return run


# ----- resynthesize ------------------------------------------------------------------------------
def resynthesize_dataset(ws, descriptions: Sequence[str], options: Options | None = None,
                         ray_address: str | None = None, progress: bool = True) -> dict:
    """Generate and store every missing resynthesis of `descriptions` by every generating source of
    `options` (per_source seeds from options.seed): the request path's resynthesis step
    (engine.resynthesis) over a description list. On Ray, sources that need a GPU run in actors; the
    others (API sources) are called from this process (they share one --max-cost budget)."""
    from tqdm import tqdm

    from engine import sources
    from engine.api_source import Budget
    from engine.resynthesis import prices

    options = (options or Options()).with_changes(mode="resynthesis", adaptive=False)
    plan = ws.plan(options)
    names = [s.name for s in plan.pipelines]
    remote = [s.name for s in plan.pipelines if ray_address and sources.kind_of(s).needs_gpu]
    local = [name for name in names if name not in remote]
    texts = list(dict.fromkeys(descriptions))
    started = time.perf_counter()
    budget = Budget(options.max_cost)
    totals = {"cached": 0, "generated": 0}
    failed: dict[str, str] = {}
    wanted = len(texts) * len(names) * options.per_source
    bar = tqdm(total=wanted, desc="resynthesizing", unit="image", disable=not progress or not wanted)

    def add(cached: int, generated: int, failures: dict[str, str]) -> None:
        totals["cached"] += cached
        totals["generated"] += generated
        failed.update(failures)

    chunks = [texts[i:i + DESCRIPTIONS_PER_TASK] for i in range(0, len(texts), DESCRIPTIONS_PER_TASK)]
    with ray_cluster(ray_address if remote else None) as ray:
        pending, actors = {}, {}
        if ray is not None:
            resources, device = _placement(ray, len(remote))
            worker = ray.remote(_SourceWorker)
            actors = {name: worker.options(**resources).remote(str(ws.root), options.with_changes(sources=(name,)),
                                                               device) for name in remote}
            pending = {actors[name].run.remote(chunk): (name, len(chunk)) for name in remote for chunk in chunks}
        if local:
            here = ws.plan(options.with_changes(sources=tuple(local)))
            for chunk in chunks:
                for cached, generated, failures in ws.resynthesize(chunk, here, budget).values():
                    add(cached, generated, failures)
                bar.update(len(chunk) * len(local) * options.per_source)
        tasks_left = Counter(name for name, _ in pending.values())
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                name, size = pending.pop(done[0])
                try:
                    add(*ray.get(done[0]))
                except Exception as exc:  # an actor that could not even open the store or load
                    failed[name] = first_line(getattr(exc, "cause", None) or exc)
                bar.update(size * options.per_source)
                tasks_left[name] -= 1
                if not tasks_left[name]:  # its GPU goes to a source still waiting for one
                    ray.kill(actors.pop(name))
        finally:
            for actor in actors.values():
                ray.kill(actor)
        if remote:
            ws.store.refresh()
    bar.close()
    report = {"descriptions": len(texts), "sources": names, "per_source": options.per_source, "wanted": wanted,
              **totals, "failed": failed, "backend": "ray" if remote else "in-process",
              "seconds": round(time.perf_counter() - started, 3)}
    if prices(plan):
        report["cost"] = budget.to_dict()
    return report


# ----- reembed -----------------------------------------------------------------------------------
RUNNING_LEASE_S = 900.0  # a running reembed's lease, renewed every batch; one killed is abandonable after it
def _embed_files(embedder, jobs: list[tuple[int, str, str]]) -> tuple[list[int], np.ndarray, list[tuple[str, str]]]:
    from engine.images import read_image
    from index.objects import read_location, sha256_bytes

    ids, images, unreadable = [], [], []
    for image_id, path, file_hash in jobs:
        try:  # a file, or an object of a store with its images in object storage
            data = read_location(path)
            if sha256_bytes(data) != file_hash:  # a cut or replaced file decodes too, as another image
                unreadable.append((str(path), "differs from its recorded sha256 (altered or cut)"))
                continue
            images.append(read_image(data, str(path))[0])
            ids.append(image_id)
        except (UserError, OSError) as exc:
            unreadable.append((str(path), first_line(exc)))
    matrix = embedder.embed(images) if images else np.zeros((0, embedder.dim), np.float32)
    return ids, matrix, unreadable


def reembed(ws, spec, ray_address: str | None = None, progress: bool = True, batch: int = 64) -> dict:
    """Embed every stored image with the encoder `spec`, beside the live vectors, then switch the store
    to it atomically (index and search index rebuilt, calibration dropped: it was fitted in the old
    space). Resumable: images that already have a new vector are skipped. No image is regenerated."""
    from engine.embed import Embedder

    started = time.perf_counter()
    from engine.models import LOADING

    with LOADING:  # another thread of this process may be loading a model (engine.models.LOADING says why)
        embedder = Embedder(spec, device=ws.device)  # validates the weights before any work
    store = ws.store
    if embedder.identity == store.embedder_identity:
        from index.reembed import finish_superseded

        # a switch stopped after its commit (Ctrl-C, SIGKILL): its rerun finishes the clean-up, or the old
        # vectors and index file stayed for good
        finished = finish_superseded(store)
        if finished is None:
            raise UserError(f"store {store.root} already uses {embedder.identity}: nothing to re-embed")
        ws.rebuild()
        return {"embedder": embedder.identity, "previous": finished["embedder"], "dim": embedder.dim,
                "embedded": 0, "vectors": len(store.vector_ids()), "backend": "in-process",
                "seconds": round(time.perf_counter() - started, 3)}
    from index.errors import StoreError
    from index.reembed import RUNNING, reuse_superseded

    reuse_superseded(store.db, embedder.identity)  # a reembed back: the clean-up elsewhere leaves its vectors now
    running = [RUNNING + embedder.identity]
    try:
        return _reembed(ws, store, embedder, spec, running, ray_address, progress, batch, started)
    finally:
        try:
            store.release(running, ws.owner)
        except StoreError:  # the lease expires; meanwhile `reembed --abandon` keeps these vectors
            pass


def _reembed(ws, store, embedder, spec, running: list[str], ray_address: str | None, progress: bool, batch: int,
             started: float) -> dict:
    from tqdm import tqdm

    def add(ids: list[int], matrix: np.ndarray) -> int:
        store.claim(running, ws.owner, RUNNING_LEASE_S)  # renewed: `reembed --abandon` leaves a running one's
        return store.add_vectors(embedder.identity, ids, matrix)

    store.claim(running, ws.owner, RUNNING_LEASE_S)
    todo = store.images_without_vector(embedder.identity)
    unreadable: list[tuple[str, str]] = []
    embedded = 0
    bar = tqdm(total=len(todo), desc="re-embedding", unit="image", disable=not progress or not todo)
    with ray_cluster(ray_address) as ray:
        if ray is None:
            for k in range(0, len(todo), batch):
                ids, matrix, bad = _embed_files(embedder, todo[k:k + batch])
                embedded += add(ids, matrix)
                unreadable += bad
                bar.update(len(todo[k:k + batch]))
        elif todo:
            count = max(1, int(ray.cluster_resources().get("GPU", 0))) or 1
            resources, device = _placement(ray, count)
            worker = ray.remote(_EmbedWorker)
            actors = [worker.options(**resources).remote(spec, device) for _ in range(count)]
            parts = [todo[k:k + IMAGES_PER_EMBED_TASK] for k in range(0, len(todo), IMAGES_PER_EMBED_TASK)]
            pending = {actors[i % count].run.remote(part): len(part) for i, part in enumerate(parts)}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                size = pending.pop(done[0])
                ids, matrix, bad = ray.get(done[0])
                embedded += add(ids, matrix)
                unreadable += bad
                bar.update(size)
            for actor in actors:
                ray.kill(actor)
    bar.close()
    if unreadable:
        path, reason = unreadable[0]
        raise UserError(f"{len(unreadable)} stored image(s) could not be read ({path}: {reason}); the store "
                        f"still uses {store.embedder_identity} and keeps the {embedded} new vectors for the next "
                        "run: restore the files or repair with `resynth verify`, then run reembed again")
    old = store.embedder_identity
    store.claim(running, ws.owner, RUNNING_LEASE_S)  # the switch may take long: its vectors are kept meanwhile
    vectors = store.switch_embedder(embedder.describe(), embedder.dim)
    ws.use_embedder(embedder)
    ws.rebuild()  # the dataset-search index, in the new space
    return {"embedder": embedder.identity, "previous": old, "dim": embedder.dim, "embedded": embedded,
            "vectors": vectors, "backend": "ray" if ray_address else "in-process",
            "seconds": round(time.perf_counter() - started, 3)}


def cost_line(cost: dict) -> str:
    limit = f" of --max-cost {cost['max_cost_usd']:.4f}" if cost.get("max_cost_usd") is not None else ""
    return (f"API images: {cost['images_bought']} bought for {cost['spent_usd']:.4f} USD{limit}; "
            f"the cache saved {cost['saved_by_cache_usd']:.4f} USD")


# ----- command line ------------------------------------------------------------------------------
def register(sub, common) -> None:
    """`resynth resynthesize` and `resynth reembed` (the offline jobs)."""
    from engine.flags import add_clip_arguments
    from engine.options import add_arguments

    ray_help = ("run on the Ray cluster at ADDRESS (ray://host:10001, or 'local' to start one here); "
                "default: in this process")
    p = sub.add_parser("resynthesize", parents=[common], help="precompute the resyntheses of a description list",
                       description="Generate and store, for every description of DESCRIPTIONS (a text file with "
                                   "one per line, or a CSV/JSONL manifest with a description column), the "
                                   "resyntheses of every pipeline source: the dataset queries then reuse. Stored "
                                   "keys are skipped, so an interrupted run is resumed by running it again.")
    p.add_argument("descriptions", metavar="DESCRIPTIONS",
                   help="text file with one description per line, or a CSV/JSONL manifest with a description column")
    add_arguments(p, only=("sources", "per_source", "seed", "max_cost"))
    p.add_argument("--ray", metavar="ADDRESS", help=ray_help)
    p.set_defaults(run=cmd_resynthesize)

    p = sub.add_parser("reembed", parents=[common], help="switch the store to another CLIP model or layer",
                       description="Embed every stored image with another open_clip encoder or block, beside the "
                                   "live vectors, then switch the store to it in one step (index and search index "
                                   "rebuilt, calibration dropped: refit it). No image is regenerated; until the "
                                   "switch the store answers with its old vectors, and an interrupted run resumes. "
                                   "Restart running servers afterwards. --abandon gives up a reembed instead.")
    add_clip_arguments(p, required=False)
    p.add_argument("--ray", metavar="ADDRESS", help=ray_help)
    p.add_argument("--abandon", action="store_true",
                   help="give up every reembed not switched to (stopped, or no longer wanted): delete the vectors "
                        "kept for its rerun (`resynth verify` counts them); a reembed running now keeps its own")
    p.set_defaults(run=cmd_reembed)


def cmd_resynthesize(args) -> None:
    import engine
    from engine.options import from_args

    options = from_args(args)
    require_ray(args.ray)
    descriptions = read_descriptions(args.descriptions)  # checked before any model loads
    with engine.open(args.store, progress=not args.quiet, device=args.device) as ws:
        report = ws.resynthesize_dataset(descriptions, options, ray=args.ray)
    failed = "".join(f"\n  {name} failed: {reason}" for name, reason in report["failed"].items())
    if "cost" in report:
        failed += "\n" + cost_line(report["cost"])
    text = (f"{plural(report['descriptions'], 'description')} x {plural(len(report['sources']), 'source')} x "
            f"{plural(report['per_source'], 'seed')}: {report['generated']} generated, {report['cached']} already "
            f"stored ({report['backend']}, {report['seconds']:.1f} s){failed}")
    print(json.dumps(report, indent=2) if args.json else text)


def cmd_reembed(args) -> None:
    import engine

    from engine.flags import clip_kwargs
    if args.abandon:
        if args.clip_checkpoint or args.clip_model or args.clip_config or args.ray:
            args._parser.error("--abandon takes no --clip-* or --ray option")
        cmd_abandon(args)
        return
    if not args.clip_checkpoint:
        args._parser.error("the following arguments are required: --clip-checkpoint (or --abandon)")
    require_ray(args.ray)
    with engine.open(args.store, progress=not args.quiet, device=args.device) as ws:
        report = ws.reembed(**clip_kwargs(args), ray=args.ray)
    text = (f"store now uses {report['embedder']} ({report['dim']}-d, was {report['previous']}): "
            f"{plural(report['embedded'], 'image')} embedded, {plural(report['vectors'], 'vector')} live "
            f"({report['backend']}, {report['seconds']:.1f} s)")
    print(json.dumps(report, indent=2) if args.json else text)


def cmd_abandon(args) -> None:
    import engine

    with engine.open(args.store, progress=not args.quiet, device=args.device) as ws:
        report = ws.abandon_reembeds()
    dropped = ", ".join(f"{plural(n, 'vector')} of {name}" for name, n in report["dropped"].items())
    text = f"deleted {dropped}" if dropped else "no reembed to give up"
    if report["running"]:
        text += "; kept those of the reembed running now: " + ", ".join(report["running"])
    print(json.dumps(report, indent=2) if args.json else text)
