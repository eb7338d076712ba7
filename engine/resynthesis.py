"""Step 2 of a request: resynthesize what is missing, once across processes, and store it.

Functions of a Workspace (its store, generators and embedder). `engine.request` drives them for a
request, `engine.jobs` for a whole description list.
"""
from __future__ import annotations

import io
import logging
import socket
import threading
import time
from collections import Counter, defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from engine import api_tasks, sources
from engine.api_source import PartialResult
from engine.attribute import Candidates, Plan, Query
from engine.errors import SourceError, came_from_ctrl_c, ctrl_c_pressed
from index.errors import StoreError, StoreInputError
from index.faults import crash_point
from index.keys import normalise_description, sha256_text
from index.store import NewImage

if TYPE_CHECKING:
    from engine.api_source import Budget
    from engine.workspace import Workspace

log = logging.getLogger("resynth.workspace")
CLAIM_LEASE_SECONDS = 900.0  # a generation claim outlives any one batch; a dead claimant's expires
RENEW_FOR = 4  # leases a batch's renewals may add (an hour): a generation hung longer releases its keys to others
GENERATION_CHUNK = 48  # images generated, embedded and committed together (memory stays bounded)
# a paid source's images are committed in smaller batches: what a kill can lose is bought but not committed
PAID_CHUNK = 16  # a whole chunk in flight at the highest concurrency most services allow
Counts = tuple[int, int, dict[str, str]]  # (cached, generated, failed source -> reason)


def missing(ws: "Workspace", text: str, plan: Plan) -> tuple[int, dict[str, list[tuple[str, int]]]]:
    """(how many of the plan's resyntheses are stored, the missing (key, seed) pairs per source)."""
    started = time.perf_counter()
    wanted = plan.wanted(sha256_text(normalise_description(text)))
    have = ws.store.existing_keys(list(wanted))
    todo: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for key, (source, seed) in wanted.items():
        if key not in have:
            todo[source.name].append((key, seed))
    ws._time("lookup", started)
    return len(have), dict(todo)


def resynthesize(ws: "Workspace", texts: Iterable[str], plan: Plan,
                 budget: "Budget | None" = None) -> dict[str, Counts]:
    """Generate and store every missing (description, source, seed); see Workspace.resynthesize."""
    from tqdm import tqdm

    from engine.errors import BudgetExceeded, OverBudget

    out: dict[str, list] = {}
    by_source: dict[str, list[tuple[str, str, int]]] = defaultdict(list)  # source -> (text, key, seed)
    for text in dict.fromkeys(texts):
        cached, todo = missing(ws, text, plan)
        out[text] = [cached, 0, {}]
        for source, items in todo.items():
            by_source[source] += [(text, key, seed) for key, seed in items]
        note_cached(plan, todo, budget)
    if by_source:  # a store that cannot take the images refuses before a progress bar promises them
        where = {s.name: s.fingerprint for s in plan.sources}
        ws.store.check_images_writable([image_path(where[name], key).as_posix()
                                        for name, jobs in by_source.items() for _, key, _ in jobs])
    # Source by source (each pipeline loads once), in batches across descriptions (GPU throughput).
    bar = tqdm(total=sum(len(jobs) for jobs in by_source.values()), desc="generating", unit="image",
               disable=not ws.progress or not by_source, leave=False)
    paid = set(prices(plan))
    for source, jobs in sorted(by_source.items()):
        bar.set_postfix_str(source, refresh=False)
        size = PAID_CHUNK if source in paid else GENERATION_CHUNK
        for start in range(0, len(jobs), size):
            chunk = jobs[start:start + size]
            try:
                made = generate_once(ws, plan, source, chunk, budget)
            except (SourceError, BudgetExceeded) as exc:
                if ctrl_c_pressed() or came_from_ctrl_c(exc):  # a Ctrl-C a library reported as its own error
                    raise KeyboardInterrupt from exc
                log.info("%s", exc)
                made = getattr(exc, "made", {})
                for text, count in made.items():
                    out[text][1] += count
                per_job = getattr(exc, "per_job", False)  # only some prompts refused: the source goes on
                wanted = Counter(text for text, _, _ in (chunk if per_job else jobs[start:]))
                reason = OverBudget(exc) if isinstance(exc, BudgetExceeded) else str(exc)
                for text, count in wanted.items():
                    if made.get(text, 0) < count:  # a text whose images were all made has not failed
                        out[text][2][source] = reason
                bar.update(len(chunk))
                if per_job:
                    continue
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
    ws.tally(result.values())
    return result


def resynthesize_adaptive(ws: "Workspace", queries: Sequence[Query], described: Sequence[tuple[str, str]],
                          vectors: np.ndarray, plan: Plan, budget: "Budget | None" = None) -> dict[str, Counts]:
    """Adaptive generation: one seed per source first; then, round by round, the next seed only for
    the sources still in contention (scoring within DECISIVE_MARGIN of the best for some query of
    that description), up to K. Same return as `resynthesize`."""
    from engine.options import DECISIVE_MARGIN

    options = plan.options
    by_text: dict[str, list] = defaultdict(list)
    for query, (text, _), vector in zip(queries, described, vectors):
        by_text[text].append((query, vector))
    totals: dict[str, list[Any]] = {text: [0, 0, {}] for text in by_text}  # [cached, generated, failed]
    contenders = {text: tuple(s.name for s in plan.pipelines) for text in by_text}
    for step in range(options.per_source):
        groups: dict[tuple, list[str]] = defaultdict(list)
        for text, names in contenders.items():
            if names:
                groups[names].append(text)
        for names, texts in groups.items():
            one = ws.plan(options.with_changes(sources=names, seed=options.seed + step, per_source=1,
                                               adaptive=False, mode="resynthesis"))
            for text, (cached, generated, failed) in resynthesize(ws, texts, one, budget).items():
                totals[text][0] += cached
                totals[text][1] += generated
                totals[text][2].update(failed)
        if step == options.per_source - 1:
            break
        # Decided on this request's seeds so far only (not on whatever else is stored), so the same
        # query and description always take the same path: a repeat finds everything cached.
        decide = ws.plan(options.with_changes(mode="resynthesis", adaptive=False))
        allowed = set(range(options.seed, options.seed + step + 1))
        generates = {s.name: sources.kind_of(s).generates for s in decide.sources}
        for text, pairs in by_text.items():
            if not contenders[text]:
                continue
            stored = ws.candidates(text, decide)
            found = Candidates({name: [r for r in rows if not generates[name] or r.seed in allowed]
                                for name, rows in stored.resyntheses.items()})
            close: set[str] = set()
            for query, vector in pairs:
                scores = ws.score(query, text, "prompt", vector, decide, found).scores
                near = [s.source for s in scores if scores[0].score - s.score <= DECISIVE_MARGIN]
                if len(near) > 1:
                    close.update(near)
            contenders[text] = tuple(n for n in contenders[text] if n in close and n not in totals[text][2])
    return {text: (cached, generated, failed) for text, (cached, generated, failed) in totals.items()}


def generate_once(ws: "Workspace", plan: Plan, name: str, jobs: list[tuple[str, str, int]],
                  budget: "Budget | None" = None) -> dict[str, int]:
    """Cross-process single flight: claim the keys (a lease row in the database), generate what this
    process holds, and wait for what another process is making, then reuse it. A dead claimant's
    lease expires and its keys are taken over. Returns how many images this process made per text."""
    store = ws.store
    owner = f"{ws.owner}:{threading.get_ident()}"  # threads of one process single-flight as processes do
    by_key = {key: (text, seed) for text, key, seed in jobs}
    pending = list(by_key)
    made: dict[str, int] = defaultdict(int)
    while pending:
        mine = store.claim(pending, owner, CLAIM_LEASE_SECONDS)
        try:
            stored = store.existing_keys(mine)  # made by someone else just before our claim
            todo = [(by_key[key][0], key, by_key[key][1]) for key in mine if key not in stored]
            if todo:
                try:
                    with renewing(store, mine, owner, CLAIM_LEASE_SECONDS):
                        generate_and_store(ws, plan, name, todo, budget)
                except PartialResult as partial:  # the images made before the failure count
                    for text, _, _ in partial.stored:
                        made[text] += 1
                    partial.made = dict(made)
                    raise
                for text, _, _ in todo:
                    made[text] += 1
        finally:
            store.release(mine, owner)
        theirs = [key for key in pending if key not in set(mine)]
        if theirs:
            theirs = wait_for_others(store, theirs)
        pending = theirs  # released, expired or dead without a result: take them over
    return made


@contextmanager
def renewing(store, keys: list[str], owner: str, lease: float) -> Iterator[None]:
    """Renew `owner`'s leases on `keys` every third of a lease while the block runs (for at most RENEW_FOR
    leases: a generation hung on a dead GPU or API must not hold its keys forever). A batch can outlast
    one lease (48 images of a rate-limited API, or of a large model on a slow GPU, take more than 15
    minutes): its keys were then taken over by another process, which bought every image again."""
    stop = threading.Event()
    until = time.monotonic() + RENEW_FOR * lease  # past this the batch is presumed stuck: others may take over

    def renew() -> None:
        while not stop.wait(lease / 3) and time.monotonic() < until:
            try:
                store.claim(keys, owner, lease)
            except StoreError as exc:  # the database is away for now: the next round tries again
                log.info("cannot renew %d claims now: %s", len(keys), exc)
            except Exception:  # noqa: BLE001 - a renewal thread that died would end renewals silently
                log.exception("cannot renew %d claims now", len(keys))

    thread = threading.Thread(target=renew, name="resynth-claim-renewal", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def wait_for_others(store, keys: list[str], poll: float = 0.2, slice_seconds: float = 1.0) -> list[str]:
    """Wait (Store.wait_for_keys) while other processes make `keys`; returns those still missing with
    no live claimant. Between slices of a second, a claimant on this host whose process is gone (killed
    mid-generation) is released rather than waited for until its lease ends: its work is taken over now."""
    deadline = time.monotonic() + CLAIM_LEASE_SECONDS
    while True:
        release_dead(store, keys)
        found = store.wait_for_keys(keys, timeout=max(0.0, min(slice_seconds, deadline - time.monotonic())),
                                    poll=poll)
        rest = [key for key in keys if key not in found]
        if not rest or time.monotonic() >= deadline or not store.live_claims(rest):
            return rest


def release_dead(store, keys: list[str]) -> None:
    claims = store.live_claims(keys)
    for owner in set(claims.values()):
        if dead_here(owner):
            store.release([k for k, o in claims.items() if o == owner], owner)


def dead_here(owner: str) -> bool:
    """Whether a claim owner ("host:pid:tag", Workspace.owner) is a process of this host that no longer runs."""
    from index.layout import pid_alive

    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and int(pid) > 0 and not pid_alive(int(pid))


def generate_and_store(ws: "Workspace", plan: Plan, name: str, jobs: list[tuple[str, str, int]],
                       budget: "Budget | None" = None) -> int:
    """Generate (text, key, seed) jobs of one source in batches, embed, and commit them together.
    When an API source answers only some jobs, those are stored before its error is raised: an
    image paid for is never thrown away."""
    generator = ws.generator(name)
    source = next(s for s in plan.sources if s.name == name)
    kind = sources.kind_of(source)
    # where the images will go, checked before they are made: a folder another user made was found only
    # after the generation (or the purchase) was spent
    ws.store.check_images_writable([image_path(source.fingerprint, key).as_posix() for _, key, _ in jobs])
    if kind.costs_money:
        # the embedder loads before anything is bought: its load takes seconds (a kill -9 then threw a
        # bought batch away: tests/test_faults_round3.py) and can fail (changed weights)
        ws.embedder  # noqa: B018 - loaded on first use
    started = time.perf_counter()
    # a task a paid service accepted is recorded until its image is stored, and resumed by a later run
    task_keys = {key: plan.task_key(source, sha256_text(normalise_description(text)), seed) for text, key, seed in jobs}
    tasks = api_tasks.book_for(generator, ws.store, name, [task_keys[key] for _, key, _ in jobs])
    try:
        # a source holding no device memory unloads no pipeline, and an API client takes concurrent calls
        with ws.models.generating(generator) if kind.needs_gpu else nullcontext():
            images = generator.generate_many([(text, seed) for text, _, seed in jobs], budget=budget,
                                             **({"tasks": tasks} if tasks is not None else {}))
    except PartialResult as partial:
        kept = [(job, image) for job, image in zip(jobs, partial.images) if image is not None]
        store_generated(ws, plan, name, [j for j, _ in kept], [i for _, i in kept])
        partial.stored = [job for job, _ in kept]
        if tasks is not None:
            tasks.stored([task_keys[key] for _, key, _ in partial.stored])
        raise
    ws._time("generate", started)
    made = store_generated(ws, plan, name, jobs, images)
    if tasks is not None:
        tasks.stored([task_keys[key] for _, key, _ in jobs])
    return made


def image_path(fingerprint: str, key: str) -> Path:
    """Where a generated image lives inside the store."""
    return Path("images") / fingerprint[:16] / key[:2] / f"{key}.png"


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def store_generated(ws: "Workspace", plan: Plan, name: str, jobs: list[tuple[str, str, int]], images: list) -> int:
    store = ws.store
    source = next(s for s in plan.sources if s.name == name)
    vectors = ws.embed(images)
    description_ids = {text: store.description_id(text) for text in dict.fromkeys(t for t, _, _ in jobs)}
    params_hash = plan.params_hash[source.id]
    rows = []
    for (text, key, seed), image, vector in zip(jobs, images, vectors):
        relative = image_path(source.fingerprint, key)
        file_hash = store.write_image(relative.as_posix(), png_bytes(image))  # the folder or its object store
        rows.append(NewImage(key=key, role="resynthesis", source_id=source.id, description_id=description_ids[text],
                             file_hash=file_hash, path=relative.as_posix(), vector=vector, seed=seed,
                             params_hash=params_hash))
    crash_point("generate:before-commit")  # images on disk, rows not yet committed
    try:
        store.add_images(rows)
    except StoreInputError as exc:
        ws.sources_changed()
        if all(s.name != name for s in ws.sources()):
            raise SourceError(name, "was removed from the store during this request") from exc
        raise
    return len(rows)


def note_cached(plan: Plan, todo: dict[str, list], budget: "Budget | None") -> None:
    """Record in `budget` what the bought images of one description found in the cache would have cost."""
    if budget is not None:
        for source, price in prices(plan).items():
            budget.cached(plan.options.per_source - len(todo.get(source, ())), price)


def prices(plan: Plan) -> dict[str, float]:
    """Price per image of the plan's sources that cost money (for the cost report)."""
    kinds = {s.name: sources.kind_of(s) for s in plan.sources}
    return {s.name: kinds[s.name].price(s) for s in plan.sources if kinds[s.name].costs_money}
