"""The dataset-search index: which one for a store's size and memory (a pure function, as autofaiss
chooses), its build in shards (trained once, filled shard by shard, merged on disk) and its checked read.

The live exact index it is built from is index.vectors."""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np

from index.vectors import Index

# faiss's stubs describe the SWIG base classes only (no IDMap id_map, no sel=/nprobe= keywords, no
# PyCallbackIOWriter, Optional invlists): calls into faiss go untyped here rather than cast at each one
faiss: Any = _faiss

FLAT_MAX = 10_000  # up to this many vectors the exact scan of the store's flat index is the search index
MEMORY_BUDGET = 4 << 30  # bytes the search index may hold beside the flat copy (Flat codes, else PQ)
MIN_PER_LIST = 39  # FAISS's floor of training points per centroid
TRAIN_PER_LIST = 64  # training sample: this many stored vectors per list (fixed seed)
PQ_CHOICES = (128, 96, 64, 48, 32, 24, 16, 12, 8, 4)  # sub-quantizers (8 bits each), largest that fits
NPROBE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
RECALL_K = 32
RECALL_TARGET = 0.95
RECALL_MARGIN = 0.02  # nprobe is chosen for target + margin on the sample: new queries scored 0.004 lower at 1M
RERANK = 4  # PQ search: this many times the wanted depth from the codes, re-scored exactly
BUILD_THREADS = 2  # fixed: the same store gives the same search index on any machine
BUILD_SEED = 1234
LISTS_MARGIN = 1 << 20  # room kept free past the on-disk lists' own bytes (file system blocks, metadata)


def ivf_bytes(n_vectors: int, dim: int, nlist: int, code_bytes: int) -> int:
    """What an IVF index holds: codes and ids per vector, plus the coarse centroids."""
    return n_vectors * (code_bytes + 8) + nlist * dim * 4


def nlist_for(n_vectors: int) -> int:
    """Inverted lists for n vectors: ~ sqrt(n) (1,000 at 1M), at least MIN_PER_LIST training points each.
    The k-means training grows with nlist squared (TRAIN_PER_LIST points per list): sqrt(n) keeps a 1M
    rebuild's training near a minute on 2 cores, and on realistic vectors a query's neighbours sit in a
    few lists of that size (docs/measurements.md, "Dataset search on realistic vectors")."""
    return max(4, min(int(np.sqrt(n_vectors)), n_vectors // MIN_PER_LIST))


def choose_index(n_vectors: int, dim: int, memory_budget_bytes: int = MEMORY_BUDGET,
                 flat_max: int = FLAT_MAX) -> str:
    """The search index's FAISS factory spec for this many vectors (pure), from the realistic-vector table
    in docs/measurements.md ("Dataset search on realistic vectors"):

    * "Flat" up to `flat_max` vectors: the exact scan of the store's own flat index (no second copy);
      FLAT_MAX is where that scan reaches about 10 ms per query at 1024-d on 2 cores;
    * "IVF{nlist},Flat" beyond, nlist ~ sqrt(n) (nlist_for), when the float32 codes fit
      `memory_budget_bytes`: on realistic vectors it reaches recall@32 >= 0.95 scanning about 1% of
      the vectors at 1M, where HNSW (M=32) plateaued at 0.925;
    * "IVF{nlist},PQ{m}" (under L2: metric_for) otherwise, m the largest sub-quantizer count dividing
      dim that fits the budget (the smallest if none does; more bytes per code is what PQ's recall
      needs), its answers re-scored exactly from the flat copy (RERANK x k candidates).
    """
    if n_vectors <= max(flat_max, MIN_PER_LIST * 4):
        return "Flat"
    nlist = nlist_for(n_vectors)
    if ivf_bytes(n_vectors, dim, nlist, dim * 4) <= memory_budget_bytes:
        return f"IVF{nlist},Flat"
    choices = [m for m in PQ_CHOICES if m <= dim and dim % m == 0] or [1]
    for m in choices:
        if ivf_bytes(n_vectors, dim, nlist, m) + 256 * dim * 4 <= memory_budget_bytes:
            return f"IVF{nlist},PQ{m}"
    return f"IVF{nlist},PQ{choices[-1]}"


def ivf_layout(index: Index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, list numbers, offsets) of every vector an IVF index holds, sorted by id (read from its
    inverted lists, no codes copied)."""
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    id_parts: list[np.ndarray] = []
    number_parts: list[np.ndarray] = []
    offset_parts: list[np.ndarray] = []
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size:
            id_parts.append(faiss.rev_swig_ptr(lists.get_ids(number), size).copy())
            number_parts.append(np.full(size, number, np.int64))
            offset_parts.append(np.arange(size, dtype=np.int64))
    if not id_parts:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    ids = np.concatenate(id_parts).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    return ids[order], np.concatenate(number_parts)[order], np.concatenate(offset_parts)[order]


def ivf_codes(index: Index, numbers: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The stored codes at (list, offset) positions, one row each (for IVF,Flat: the vectors' bytes)."""
    lists = faiss.extract_index_ivf(index).invlists
    size = lists.code_size
    out = np.empty((len(numbers), size), np.uint8)
    for row, (number, offset) in enumerate(zip(numbers.tolist(), offsets.tolist())):
        codes = faiss.rev_swig_ptr(lists.get_codes(number), lists.list_size(number) * size)
        out[row] = codes[offset * size:(offset + 1) * size]
    return out


def flat_codes(index: Index) -> bool:
    """Whether an IVF index stores the float32 vectors themselves (IVF,Flat) rather than PQ codes."""
    return isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFFlat)


def ids_digest(ids: np.ndarray) -> str:
    return hashlib.blake2b(np.sort(np.asarray(ids, np.int64)).tobytes(), digest_size=16).hexdigest()


@contextmanager
def omp_threads(count: int):
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _exact_rows(ids: np.ndarray):
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]

    def rows(wanted: np.ndarray) -> np.ndarray:
        return order[np.searchsorted(sorted_ids, wanted)]
    return rows


class IVFParams:
    """Search parameters of an IVF search index: nprobe, and ids to skip (an IDSelector, not a post-filter).
    Keeps the selectors alive as long as the parameters (FAISS holds raw pointers to them)."""

    def __init__(self, nprobe: int, exclude: np.ndarray | None = None):
        self.inner = self.sel = None
        if exclude is not None and len(exclude):
            self.inner = faiss.IDSelectorBatch(np.ascontiguousarray(exclude, dtype=np.int64))
            self.sel = faiss.IDSelectorNot(self.inner)
        self.params = faiss.SearchParametersIVF(nprobe=int(nprobe), sel=self.sel)


def search_ivf(index: Index, queries: np.ndarray, k: int, params: IVFParams | int,
               rescore=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of an IVF search index under `params` (or an nprobe). With `rescore(ids) -> vectors` (PQ
    codes), RERANK*k hits are re-scored exactly and the best k kept."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not isinstance(params, IVFParams):
        params = IVFParams(params)
    params = params.params
    depth = k * RERANK if rescore is not None else k
    sims, ids = index.search(queries, depth, params=params)
    if index.metric_type == faiss.METRIC_L2:  # PQ codes (metric_for): squared distance of unit vectors
        sims = np.where(ids >= 0, 1.0 - sims / 2.0, -np.inf).astype(np.float32)
    if rescore is None:
        return sims, ids
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(queries), 64):  # re-scored in blocks: (queries x depth x dim) stays small
        block, found = queries[start:start + 64], ids[start:start + 64]
        valid = found >= 0
        vectors = np.zeros(found.shape + (queries.shape[1],), np.float32)
        vectors[valid] = rescore(found[valid])
        exact = np.where(valid, np.einsum("qkd,qd->qk", vectors, block), -np.inf)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        out_s[start:start + 64] = np.take_along_axis(exact, order, axis=1)
        out_i[start:start + 64] = np.where(np.isfinite(out_s[start:start + 64]),
                                           np.take_along_axis(found, order, axis=1), -1)
    return out_s, out_i


SHARD_SIZE = 250_000  # vectors per shard of the search-index build (each shard is filled on its own)
ShardMap = Callable[[bytes, list[tuple[np.ndarray, np.ndarray]], int], Iterator[bytes]]


@contextmanager
def quiet_stdout():
    """FAISS's on-disk inverted lists printf to stdout (C stdio) on every merge and read: keep that out
    of what the process prints (JSON output included). Serialised: it redirects the process's fd 1."""
    with _QUIET:
        libc = ctypes.CDLL(None)
        sys.stdout.flush()
        libc.fflush(None)
        saved, sink = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(sink, 1)
        try:
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            os.close(sink)


_QUIET = threading.Lock()


def metric_for(spec: str) -> int:
    """Inner product for flat codes; L2 for PQ codes. The store's vectors are unit length, so both rank
    alike, but FAISS's IVF-PQ by residual under inner product lost most of the neighbours on realistic
    vectors (recall@32 0.18, re-ranked 0.45 at 100k, nprobe 16) where under L2 it kept them (0.58,
    re-ranked 0.94): docs/measurements.md, "Dataset search on realistic vectors"."""
    return faiss.METRIC_L2 if "PQ" in spec else faiss.METRIC_INNER_PRODUCT


def train_search_index(matrix: np.ndarray, spec: str, seed: int = BUILD_SEED, threads: int = BUILD_THREADS,
                       rng: np.random.Generator | None = None) -> tuple[Index, int]:
    """The empty IVF index `spec`, trained once on a fixed-seed sample of `matrix`; (index, sample size)."""
    rng = rng or np.random.default_rng(seed)
    n, dim = matrix.shape
    with omp_threads(threads):
        index = faiss.index_factory(dim, spec, metric_for(spec))
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        concrete = faiss.downcast_index(ivf)
        if isinstance(concrete, faiss.IndexIVFPQ):
            concrete.do_polysemous_training = False  # the factory's default; only Hamming filtering uses it
            concrete.pq.cp.seed = seed
        train_n = min(n, max(ivf.nlist * TRAIN_PER_LIST, 256 * MIN_PER_LIST))
        sample = np.sort(rng.choice(n, train_n, replace=False))
        index.train(np.ascontiguousarray(matrix[sample]))
    return index, int(train_n)


def fill_shard(trained: bytes, ids: np.ndarray, matrix: np.ndarray, threads: int = BUILD_THREADS) -> bytes:
    """One shard: the trained (serialised) index with these vectors added, serialised. Runs anywhere
    (in process, or as a Ray task: everything it needs travels with it)."""
    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
    with omp_threads(threads):
        for start in range(0, len(ids), 65536):
            index.add_with_ids(np.ascontiguousarray(matrix[start:start + 65536], dtype=np.float32),
                               np.ascontiguousarray(ids[start:start + 65536], dtype=np.int64))
    return faiss.serialize_index(index).tobytes()


def _fill_here(trained: bytes, shards: list[tuple[np.ndarray, np.ndarray]], threads: int) -> Iterator[bytes]:
    for ids, matrix in shards:
        yield fill_shard(trained, ids, matrix, threads)


def _check_room(data_path: Path, needed: int) -> None:
    """FAISS sizes its on-disk lists with truncate (a hole) and fills them through a memory mapping: on a disk
    without room for them that is a SIGBUS, the process killed, not an error. The lists' bytes (an id and a
    code a vector) are known once the shards are written, so the room is checked just before; a margin for
    the file system's blocks. A disk filled by another program during the merge still kills it."""
    stat = os.statvfs(data_path.parent)
    if stat.f_bavail * stat.f_frsize < needed + LISTS_MARGIN:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(data_path))


def merge_on_disk(trained: Index, shard_files: list[Path], data_path: Path) -> Index:
    """`trained` with the shards' inverted lists merged into one on-disk file (FAISS's OnDiskInvertedLists,
    memory-mapped, so no shard and no merged list set is ever held in memory)."""
    ivf = faiss.extract_index_ivf(trained)
    shards = [faiss.read_index(str(path), faiss.IO_FLAG_MMAP) for path in shard_files]
    _check_room(data_path, sum(int(shard.ntotal) for shard in shards) * (8 + ivf.code_size))
    lists = faiss.InvertedListsPtrVector()
    for shard in shards:
        lists.push_back(faiss.extract_index_ivf(shard).invlists)
    with quiet_stdout():
        on_disk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data_path))
        total = on_disk.merge_from_multiple(lists.data(), lists.size(), False, False)
    ivf.replace_invlists(on_disk, True)
    on_disk.this.disown()  # owned by the index now
    ivf.ntotal = trained.ntotal = int(total)
    del shards
    return trained


def _without_self(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's first k ids other than its own (the row's own id dropped wherever it ranks)."""
    out = np.empty((len(found), k), np.int64)
    for row, (hits, me) in enumerate(zip(found, own)):
        out[row] = hits[hits != me][:k]
    return out


def build_search_index(ids: np.ndarray, matrix: np.ndarray, spec: str, *, seed: int = BUILD_SEED,
                       threads: int = BUILD_THREADS, k: int = RECALL_K, target: float = RECALL_TARGET,
                       recall_queries: int = 1000, data_path: Path | None = None, shard_size: int = SHARD_SIZE,
                       shard_map: ShardMap | None = None) -> tuple[Index | None, dict]:
    """Build the search index `spec` over (ids, matrix) offline: fixed seed and thread count, trained once
    on a sample; vectors added in shards of `shard_size` (by `shard_map`, e.g. on Ray; in this process by
    default), each written next to `data_path` and merged there on disk; then nprobe chosen as the
    smallest on NPROBE_LADDER whose recall@k against the exact answer, measured with stored vectors as
    queries (their other neighbours), reaches `target` + RECALL_MARGIN. Returns (index or None for
    "Flat", infos); the index's inverted lists live in `data_path`, which the caller publishes."""
    started = time.perf_counter()
    n, dim = matrix.shape
    infos = {"type": spec, "count": int(n), "dim": int(dim), "k": k, "recall_target": target, "seed": seed,
             "threads": threads, "faiss": faiss.__version__}
    if spec == "Flat":
        infos.update({"nprobe": None, "recall": 1.0, "build_s": time.perf_counter() - started})
        return None, infos
    if data_path is None:
        raise ValueError("an IVF search index needs data_path (where its inverted lists go)")
    rng = np.random.default_rng(seed)
    index, train_n = train_search_index(matrix, spec, seed, threads, rng)
    trained = faiss.serialize_index(index).tobytes()
    bounds = [(a, min(a + shard_size, n)) for a in range(0, n, max(1, shard_size))]
    shards = [(ids[a:b], matrix[a:b]) for a, b in bounds]
    files = [data_path.with_name(f".search-shard{k}.{os.getpid()}.tmp") for k in range(len(shards))]
    try:
        for path, blob in zip(files, (shard_map or _fill_here)(trained, shards, threads)):
            path.write_bytes(blob)
        index = merge_on_disk(index, files, data_path)
    finally:
        for path in files:
            path.unlink(missing_ok=True)
    ivf = faiss.extract_index_ivf(index)
    with omp_threads(threads):
        trained_s = time.perf_counter() - started
        picked = np.sort(rng.choice(n, min(n, recall_queries), replace=False))
        queries = np.ascontiguousarray(matrix[picked])
        kk = min(k, n - 1)
        # a stored vector always finds itself: recall is over its k other neighbours, as for a new query
        _, truth_rows = faiss.knn(queries, np.ascontiguousarray(matrix), kk + 1, metric=faiss.METRIC_INNER_PRODUCT)
        truth = _without_self(ids[truth_rows], ids[picked], kk)
        rows = _exact_rows(ids)
        rescore = (lambda found: matrix[rows(found)]) if "PQ" in spec else None
        ladder = sorted({p for p in NPROBE_LADDER if p < ivf.nlist} | {ivf.nlist})
        tried = {}
        chosen, recall = ladder[-1], 0.0
        for nprobe in ladder:
            _, found = search_ivf(index, queries, kk + 1, nprobe, rescore=rescore)
            found = _without_self(found, ids[picked], kk)
            recall = float(np.mean([len(np.intersect1d(f[f >= 0], t)) / kk for f, t in zip(found, truth)]))
            tried[nprobe] = round(recall, 4)
            if recall >= min(1.0, target + RECALL_MARGIN):
                chosen = nprobe
                break
        ivf.nprobe = chosen
        single = queries[:100]
        clock = time.perf_counter()
        for query in single:
            search_ivf(index, query[None], kk, chosen, rescore=rescore)
        ivf_ms = (time.perf_counter() - clock) / len(single) * 1e3
        clock = time.perf_counter()
        for query in single[:10]:  # the exact scan: ~1 s a query at 1M x 1024-d on 2 cores
            faiss.knn(query[None], matrix, kk, metric=faiss.METRIC_INNER_PRODUCT)
        exact_ms = (time.perf_counter() - clock) / len(single[:10]) * 1e3
    infos["shards"] = len(shards)
    infos.update({"nlist": int(ivf.nlist), "nprobe": int(chosen), "recall": recall, "recall_by_nprobe": tried,
                  "recall_queries": len(queries), "meets_target": recall >= target, "train_vectors": int(train_n),
                  "rerank": RERANK if rescore is not None else None, "train_add_s": trained_s,
                  "ms_per_query": ivf_ms, "exact_ms_per_query": exact_ms, "ids_digest": ids_digest(ids),
                  "build_s": time.perf_counter() - started})
    return index, infos


def read_search_checked(path: Path, infos: dict | None, dim: int) -> tuple[Index | None, tuple | None,
                                                                             str | None]:
    """(index, ivf_layout, None) for a search file that agrees with its infos; (None, None, why) otherwise;
    (None, None, None) when there is none. Checks: readable, IVF of `dim` under its metric (metric_for), trained,
    ntotal = infos count, digest of its ids = the infos' digest (a file from another build never passes)."""
    if not path.exists():
        return None, None, None
    if not infos or infos.get("type", "Flat") == "Flat":
        return None, None, "no infos for it (stale)"
    if infos.get("bytes") is not None and path.stat().st_size != infos["bytes"]:
        return None, None, f"{path.stat().st_size} bytes, its infos say {infos['bytes']} (stale or damaged)"
    if not infos.get("ivfdata"):
        return None, None, "built by an older resynth, with its lists inside it (run `resynth rebuild`)"
    data = path.with_name(str(infos["ivfdata"]))
    if not data.is_file():
        return None, None, f"its inverted lists ({data.name}) are missing"
    if infos.get("ivfdata_bytes") is not None and data.stat().st_size != infos["ivfdata_bytes"]:
        return None, None, f"{data.name} has {data.stat().st_size} bytes, its infos say {infos['ivfdata_bytes']}"
    try:
        with quiet_stdout():  # the lists file is found beside search.faiss wherever the store has moved
            index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    except (RuntimeError, MemoryError, ValueError):
        return None, None, "unreadable, or the inverted lists it names are gone (stale)"
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None, None, f"not an IVF index ({type(index).__name__})"
    wanted = faiss.METRIC_INNER_PRODUCT if flat_codes(index) else faiss.METRIC_L2  # see metric_for
    if index.metric_type != wanted or index.d != dim or not index.is_trained:
        return None, None, "another metric or dimension, or untrained"
    if int(index.ntotal) != infos.get("count") or ivf.nlist != infos.get("nlist"):
        return None, None, f"holds {index.ntotal} vectors, its infos say {infos.get('count')} (stale)"
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists) or Path(lists.filename).name != infos["ivfdata"]:
        return None, None, "its inverted lists are not the file its infos name (stale)"
    layout = ivf_layout(index)
    ids = layout[0]
    if len(ids) != index.ntotal or len(np.unique(ids)) != len(ids) or ids_digest(ids) != infos.get("ids_digest"):
        return None, None, "its ids differ from its infos (stale)"
    return index, layout, None
