"""The dataset-search index: built offline by `rebuild`, checked at open, served beside the live index.

vectors.faiss stays the verified copy. `rebuild` also builds a search index chosen by
vectors.choose_index from the vector count and a memory budget: "Flat" (the exact scan of vectors.faiss,
no second file) up to FLAT_MAX vectors, IVF beyond it (search.faiss, with search.json: type, count,
nprobe chosen for recall@32 >= 0.95, timings). At open it is checked cheaply (size, count and id digest
against its infos, ids against the database, a sample of vectors that must find themselves); a stale or
unreadable one is ignored, never served. Vectors added since the build are searched exactly and merged
in; ids deleted since are skipped by an IDSelector.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from index import ivf
from index import vectors as vx
from index.layout import Layout, file_digest, file_state, fsync_dir, publish, write_json_atomic
from index.live import FULL_CHECK, SAMPLE, LiveIndex
from index.failures import full, os_failure
from index.faults import crash_point
from index.schema import _now as _utcnow

log = logging.getLogger(__name__)


FIRST_READ = 8  # hits read beyond k on the first read of their rows: enough when few are filtered out


@dataclass
class StoredReference:
    """A stored vector a query can be compared with: a resynthesis, or a labelled original."""

    vector_id: int
    source: str
    seed: int | None
    file_hash: str
    key: str
    image_id: int = 0  # the catalog's image row (its file, its thumbnail); 0 when not read
    checksum: str = ""  # of the vector's bytes, as the database keeps it ("": not read)


@dataclass
class BuiltSearch:
    """A verified IVF search index: its FAISS index, the ids it holds (sorted), where each one is (inverted
    list and offset, aligned with ids) and its infos."""

    index: Any  # a FAISS IndexIVF (faiss's stubs know too little of it to type it)
    ids: np.ndarray
    infos: dict
    numbers: np.ndarray | None = None
    offsets: np.ndarray | None = None
    lists: vx.MappedFile | None = None  # the inverted lists' file (memory-mapped) as it was when read

    @property
    def nprobe(self) -> int:
        return int(self.infos["nprobe"])

    @property
    def rescored(self) -> bool:
        return bool(self.infos.get("rerank"))


def _summary(state: str, found: BuiltSearch | None, why: str | None, infos: dict | None = None) -> dict:
    infos = found.infos if found is not None else (infos or {})
    out = {"state": state, "problem": why, "type": infos.get("type"), "count": infos.get("count"),
           "nprobe": infos.get("nprobe"), "recall": infos.get("recall"), "k": infos.get("k"),
           "built_at": infos.get("built_at")}
    return {k: v for k, v in out.items() if v is not None}


def _require_space(root, needed: int, doing: str) -> None:
    """FAISS grows its on-disk lists through a memory mapping: on a full disk that is a SIGBUS, not an
    error, so the space is checked first (shards plus lists, at most about twice the vectors)."""
    stat = os.statvfs(root)
    if stat.f_bavail * stat.f_frsize < needed:
        raise full(root / "search.faiss", f"{doing} needs about {needed / 2**20:.0f} MiB")


def _sample(ids: np.ndarray, size: int) -> np.ndarray:
    return np.sort(np.random.default_rng().choice(ids, size, replace=False))


class SearchIndex:
    """The search index this process serves (`built`, None for exact search) and its state on disk."""

    def __init__(self, live: LiveIndex, layout: Layout):
        self.live, self.layout = live, layout
        self.built: BuiltSearch | None = None
        self.state: dict = {"state": "absent"}
        self.delta: dict | None = None  # what the live index has that the search index lacks, and vice versa
        self.files = None
        live.on_added, live.on_reset = self.index_added, self.forget_delta

    def forget_delta(self) -> None:
        self.delta = None

    def file_states(self):
        return file_state(self.layout.search_path), file_state(self.layout.search_infos_path)

    # ----- build --------------------------------------------------------------------------------
    def settings(self, flat_max, memory_budget_bytes, threads) -> tuple[int, int, int]:
        cfg = self.layout.config.get("search") or {}
        return (int(flat_max if flat_max is not None else cfg.get("flat_max", ivf.FLAT_MAX)),
                int(memory_budget_bytes if memory_budget_bytes is not None
                    else cfg.get("memory_budget_bytes", ivf.MEMORY_BUDGET)),
                int(threads if threads is not None else cfg.get("threads", ivf.BUILD_THREADS)))

    def build(self, fresh, flat_max, memory_budget_bytes, threads,
              shard_map: ivf.ShardMap | None = None) -> tuple[BuiltSearch | None, dict]:
        """Build the search index over `fresh` (a private flat index) in shards merged on disk, and publish
        it: its inverted lists under a content name (search-<digest>.ivfdata), then search.faiss, then
        its infos, each atomically (a crash between leaves files whose infos disagree: ignored, never
        served); lists files no longer named are removed last."""
        root, dim = self.layout.root, self.layout.dim
        flat_max, budget, threads = self.settings(flat_max, memory_budget_bytes, threads)
        spec = ivf.choose_index(int(fresh.ntotal), dim, budget, flat_max)
        ids, matrix = vx.flat_view(fresh)
        if spec != "Flat":
            _require_space(root, 2 * matrix.nbytes + 8 * len(ids), "building the search index")
        shard_size = int((self.layout.config.get("search") or {}).get("shard_size", ivf.SHARD_SIZE))
        building = root / f".search.ivfdata.{os.getpid()}.tmp"
        try:
            try:
                index, infos = ivf.build_search_index(ids, matrix, spec, threads=threads, data_path=building,
                                                     shard_size=shard_size, shard_map=shard_map)
            except OSError as exc:  # its shard files: a full disk, a lost permission
                problem = os_failure(exc, building, "building the search index")
                if problem is None:
                    raise
                raise problem from exc
            infos.update({"embedder": self.layout.embedder_identity, "flat_max": flat_max,
                          "memory_budget_bytes": budget, "built_at": _utcnow().isoformat()})
            if index is None:
                self.layout.search_path.unlink(missing_ok=True)
                fsync_dir(root)
                write_json_atomic(self.layout.search_infos_path, infos, "search:before-replace")
                self.drop_data(keep=None)
                return None, {"state": "flat", "type": "Flat", "count": infos["count"], "infos": infos}
            data = root / f"search-{file_digest(building)}.ivfdata"
            faiss: Any = vx.faiss  # its stubs know neither the on-disk lists nor their filename
            faiss_lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
            faiss_lists.filename = data.name  # what search.faiss records: read beside it, wherever the store is
            publish(building, data)
            crash_point("search:lists-published")
        finally:
            building.unlink(missing_ok=True)
        vx.write_atomic(index, self.layout.search_path, "search:before-replace")
        infos.update({"bytes": self.layout.search_path.stat().st_size, "ivfdata": data.name,
                      "ivfdata_bytes": data.stat().st_size})
        write_json_atomic(self.layout.search_infos_path, infos, "search:infos-before-replace")
        self.drop_data(keep=data.name)
        ids, numbers, offsets = ivf.ivf_layout(index)
        found = BuiltSearch(index, ids, infos, numbers, offsets, self._lists_file(infos))
        return found, _summary("ok", found, None)

    def drop_data(self, keep: str | None) -> None:
        """Remove inverted-list files of earlier builds (a process still mapping one keeps its pages)."""
        for path in self.layout.root.glob("search-*.ivfdata"):
            if path.name != keep:
                path.unlink(missing_ok=True)

    def adopt(self, built: tuple[BuiltSearch | None, dict]) -> None:
        """(Under the live lock.) Serve what `build` returned."""
        self.built, self.state = built
        self.delta = None
        self.files = self.file_states()

    def drop(self) -> None:
        """(Under the live lock.) Serve no search index (its embedder is gone); see `remove_files`."""
        self.built, self.state, self.delta = None, {"state": "absent"}, None

    def remove_files(self) -> None:
        for stale in (self.layout.search_path, self.layout.search_infos_path):
            stale.unlink(missing_ok=True)
        self.drop_data(keep=None)
        self.files = self.file_states()

    # ----- open ---------------------------------------------------------------------------------
    def read(self, full: bool = False) -> tuple[BuiltSearch | None, dict]:
        """The search index on disk, checked (see vectors.read_search_checked), then against the database:
        every id it holds is stored or recorded as deleted, and its vectors agree with the flat copy (a
        sample at open, all of them with `full`: `content_problems`)."""
        infos, why = None, None
        if self.layout.search_infos_path.exists():
            try:
                infos = json.loads(self.layout.search_infos_path.read_text())
                if not isinstance(infos, dict):
                    infos, why = None, "infos unreadable"
            except (OSError, ValueError):
                why = "infos unreadable"
        if infos and infos.get("embedder") not in (None, self.layout.embedder_identity):
            why, infos = f"built for embedder {infos.get('embedder')}", None
        index, layout, problem = ivf.read_search_checked(self.layout.search_path, infos, self.layout.dim)
        if index is None:
            problem = problem or (why if self.layout.search_path.exists() else None)
            if problem:
                return None, _summary("ignored", None, problem, infos)
            if infos and infos.get("type") == "Flat":
                return None, _summary("flat", None, None, infos)
            if infos and infos.get("type"):  # infos of an IVF index whose file is gone
                return None, _summary("ignored", None, "search.faiss is missing", infos)
            return None, {"state": "absent"}
        assert layout is not None and infos is not None  # read_search_checked answers both with an index
        found = BuiltSearch(index, layout[0], infos, layout[1], layout[2], self._lists_file(infos))
        live = self.live
        with live.db.session() as s:  # the id digest first (built from what is stored, perhaps behind it)
            if not full and live.stored.behind_by(s, found.ids) is not None:
                extra = np.zeros(0, np.int64)
            else:
                extra = np.setdiff1d(found.ids, live.stored.db_vector_ids(s))
            if len(extra):
                _, floor = live.stored.tomb_state(s)
                lost = np.setdiff1d(extra, live.stored.deleted(s, extra, floor))
                if len(lost):
                    return None, _summary("ignored", None, f"holds {len(lost)} ids the database never stored", infos)
        bad, checked = self.content_problems(found, full=full)
        if bad:
            return None, _summary(
                "ignored", None, f"{len(bad)} of {checked} checked vectors differ from vectors.faiss", infos)
        state = _summary("ok", found, None)
        state["checked"] = checked
        return found, state

    def content_problems(self, found: BuiltSearch, full: bool = False) -> tuple[list[int], int]:
        """Ids whose search-index vector disagrees with the verified flat copy: (bad ids, how many checked).

        IVF,Flat codes are the vectors' bytes: compared exactly, all of them up to FULL_CHECK (or with
        `full`), else a sample of SAMPLE. PQ codes are lossy: each sampled vector, searched for, must find
        itself in the first list probed (at most a quarter may miss, PQ ties)."""
        with self.live.lock:
            live = np.intersect1d(found.ids, vx.index_ids(self.live.index))
            if not full and len(live) > FULL_CHECK:
                live = _sample(live, SAMPLE)
            if not ivf.flat_codes(found.index) and len(live) > FULL_CHECK:
                live = _sample(live, FULL_CHECK)
            reference = (self.live.index.reconstruct_batch(live) if len(live)
                         else np.zeros((0, self.layout.dim), np.float32))
        if not len(live):
            return [], 0
        if ivf.flat_codes(found.index):
            assert found.numbers is not None and found.offsets is not None  # read with its layout
            at = np.searchsorted(found.ids, live)
            codes = ivf.ivf_codes(found.index, found.numbers[at], found.offsets[at])
            differ = np.any(codes != reference.view(np.uint8).reshape(len(live), -1), axis=1)
            return live[differ].tolist(), len(live)
        _, hits = ivf.search_ivf(found.index, reference, min(10, len(found.ids)), 1)
        bad = [int(v) for v, hit in zip(live, hits) if v not in hit]
        return (bad if len(bad) > len(live) // 4 else []), len(live)

    def _lists_file(self, infos: dict) -> vx.MappedFile | None:
        try:
            return vx.mapped_file(self.layout.search_path.with_name(str(infos["ivfdata"])))
        except (OSError, KeyError):
            return None

    def reload_if_cut(self) -> None:
        """Before a search: the live index's files, and the inverted lists this index maps, cut short in place
        (vectors.still_whole) are reloaded rather than read (SIGBUS); cut lists fail their check, exact search."""
        self.live.reload_if_cut()
        built = self.built
        if built is not None and not vx.still_whole(built.lists):
            log.warning("%s was cut short under this process: searching exactly until `resynth rebuild`",
                        self.layout.search_path.name)
            self.load()

    def load(self) -> None:
        self.files = self.file_states()
        found, state = self.read()
        with self.live.lock:
            self.built, self.state, self.delta = found, state, None

    def reload_if_replaced(self) -> bool:
        if self.file_states() == self.files:
            return False
        self.load()
        return True

    # ----- serving ------------------------------------------------------------------------------
    def _delta(self) -> dict:
        """(Under the live lock.) What the live index holds that the search index lacks (added since the
        build: ids with their vectors, searched exactly) and what the search index holds that the live
        index does not (deleted since: skipped by an IDSelector)."""
        built = self.built
        assert built is not None  # asked only while a search index is served
        if self.delta is None:
            index = self.live.index
            live = vx.index_ids(index)
            missing = np.setdiff1d(live, built.ids)
            gone = np.setdiff1d(built.ids, live)
            matrix = index.reconstruct_batch(missing) if len(missing) else np.zeros((0, self.layout.dim), np.float32)
            self.delta = {"missing": missing, "matrix": matrix, "gone": gone,
                          "params": ivf.IVFParams(built.nprobe, gone)}
        return self.delta

    def index_added(self, ids: np.ndarray, matrix: np.ndarray) -> None:
        """(Under the live lock.) New ids reached the live index: the search delta gains those it lacks."""
        if self.built is None or self.delta is None:
            return
        known = self.built.ids
        at = np.searchsorted(known, ids).clip(0, max(0, len(known) - 1))
        new = known[at] != ids if len(known) else np.ones(len(ids), bool)
        if np.any(~new):
            self.delta = None  # an id the search index holds came back: recompute
        elif np.any(new):
            self.delta["missing"] = np.concatenate([self.delta["missing"], ids[new]])
            self.delta["matrix"] = np.concatenate([self.delta["matrix"], matrix[new]])

    def report(self) -> dict:
        """The search index's state for `verify`/`stats`: what is on disk and what this process serves."""
        self.reload_if_cut()  # its delta reads the live index's mapped rows
        entry = dict(self.state)
        entry["path"] = str(self.layout.search_path)
        with self.live.lock:
            entry["serving"] = "ivf" if self.built is not None else "exact"
            if self.built is not None:
                delta = self._delta()
                entry.update({"added_since_build": len(delta["missing"]), "deleted_since_build": len(delta["gone"]),
                              "meets_target": bool(self.built.infos.get("meets_target", True))})
        return entry

    def nearest(self, query: np.ndarray, k: int, references: Callable[[list[int]], dict[int, StoredReference]],
                exclude_file: str | None = None, *, exact: bool = False) -> list[tuple[StoredReference, float]]:
        """The k stored vectors closest to `query` that `references` keeps (it maps the ids it keeps to
        their rows), never an image with the bytes `exclude_file`: best first.

        With a verified search index (and not `exact`): its IVF answer (ids deleted since the build
        skipped) merged with an exact scan of the vectors added since; an exact FAISS scan otherwise,
        and also whenever the IVF probes run out before enough references survive the filters."""
        query = np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1))
        lock = self.live.lock
        with lock:
            total = int(self.live.index.ntotal)
            search = None if exact else self.built
        wanted = max(1, k)
        while True:
            depth = min(total, wanted * 4 + 16)
            if depth == 0:
                return []
            self.reload_if_cut()
            with lock:
                if search is not None and search is not self.built:
                    search = None  # swapped meanwhile (refresh, rebuild): answer exactly
                if search is None:
                    sims, ids = self.live.index.search(query, depth)
                    sims, ids = sims[0], ids[0]
                else:
                    sims, ids = self._merged(search, query, depth)
                    sims, ids = sims[0], ids[0]
            found = [(int(i), float(v)) for i, v in zip(ids, sims) if i >= 0]
            kept = _kept(found, k, references, exclude_file)
            if len(kept) >= k:
                return kept
            if search is not None and len(found) < depth:
                search = None  # the IVF probes ran out: look again exactly
                continue
            if depth >= total:
                return kept[:k]
            wanted *= 4  # filtered out too many: look deeper

    def nearest_many(self, queries: np.ndarray, k: int,
                     references: Callable[[list[int]], dict[int, StoredReference]],
                     exclude_files: list[str | None], *, exact: bool = False
                     ) -> list[list[tuple[StoredReference, float]]]:
        """`nearest` for several queries at once: one search call (IVF or exact) for all of them and one
        `references` call for every id found, so queries arriving together share FAISS's batched scan
        and one SQL round trip. A query whose first look does not settle its answer (too many hits
        filtered out, or the IVF probes ran out) is answered by `nearest` on its own; every answer is
        the one `nearest` gives."""
        queries = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(len(exclude_files), self.layout.dim))
        lock = self.live.lock
        with lock:
            total = int(self.live.index.ntotal)
            search = None if exact else self.built
        depth = min(total, max(1, k) * 4 + 16)
        if depth == 0 or not len(queries):
            return [[] for _ in exclude_files]
        self.reload_if_cut()
        with lock:
            if search is not None and search is not self.built:
                search = None
            if search is None:
                sims, ids = self.live.index.search(queries, depth)
            else:
                sims, ids = self._merged(search, queries, depth)
        found = [[(int(i), float(v)) for i, v in zip(row_ids, row_sims) if i >= 0]
                 for row_ids, row_sims in zip(ids, sims)]
        # the rows of every query's first hits in one read (the common case needs no more), then the rest
        rows = references(sorted({i for hits in found for i, _ in hits[:k + FIRST_READ]}))
        rest = sorted({i for hits, exclude in zip(found, exclude_files)
                       if len(_kept(hits[:k + FIRST_READ], k, lambda _: rows, exclude)) < k
                       for i, _ in hits[k + FIRST_READ:]})
        rows = {**rows, **references(rest)} if rest else rows
        out = []
        for query, hits, exclude in zip(queries, found, exclude_files):
            kept = _kept(hits, k, lambda _: rows, exclude)
            settled = len(kept) >= k or (depth >= total and (search is None or len(hits) >= depth))
            out.append(kept if settled else self.nearest(query, k, references, exclude, exact=exact))
        return out

    def _merged(self, search: BuiltSearch, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(Under the live lock.) Per query, the IVF search index's top `depth`, deleted ids skipped, merged
        with the exact top of the vectors added since its build (exact scores for both when its codes are
        PQ): (queries, depth) arrays."""
        delta = self._delta()
        rescore = self.live.index.reconstruct_batch if search.rescored else None
        sims, ids = ivf.search_ivf(search.index, queries, depth, delta["params"], rescore=rescore)
        if not len(delta["missing"]):
            return sims, ids
        extra = queries @ delta["matrix"].T  # (queries, added since the build)
        if extra.shape[1] > depth:
            top = np.argpartition(-extra, depth, axis=1)[:, :depth]
        else:
            top = np.broadcast_to(np.arange(extra.shape[1]), extra.shape)
        extra_sims = np.take_along_axis(extra, top, axis=1)
        best = np.argsort(-extra_sims, axis=1, kind="stable")  # as `nearest` always merged: each side best first
        top, extra_sims = np.take_along_axis(top, best, axis=1), np.take_along_axis(extra_sims, best, axis=1)
        sims = np.concatenate([sims, extra_sims], axis=1)
        ids = np.concatenate([ids, delta["missing"][top]], axis=1)
        order = np.argsort(-np.where(ids >= 0, sims, -np.inf), axis=1, kind="stable")[:, :depth]
        return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _kept(hits: list[tuple[int, float]], k: int, read: Callable[[list[int]], dict[int, StoredReference]],
          exclude: str | None) -> list[tuple[StoredReference, float]]:
    """The first k hits that `read` gives rows for (it applies the store's filters: roles, sources) and
    that are not of the excluded file. Rows are read for the first k + FIRST_READ hits, and for the rest
    only when too few of those survive: a dataset search reads about k rows, not its whole depth."""
    kept: list[tuple[StoredReference, float]] = []
    start, end = 0, k + FIRST_READ
    while start < len(hits) and len(kept) < k:
        chunk = hits[start:end]
        rows = read([i for i, _ in chunk])
        kept += [(rows[i], v) for i, v in chunk if i in rows and rows[i].file_hash != exclude]
        start, end = end, len(hits)
    return kept[:k]
