"""The FAISS side of the store: an ID map over an exact inner-product index, saved atomically and
checked when read. The dataset-search index built from it is index.ivf."""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np

from index.layout import atomic_write, fsync_dir  # noqa: F401 - fsync_dir: vx.fsync_dir for callers

# faiss's stubs describe the SWIG base classes only (no IDMap id_map, no sel=/nprobe= keywords, no
# PyCallbackIOWriter, Optional invlists): calls into faiss go untyped here rather than cast at each one
faiss: Any = _faiss
Index = Any  # a FAISS index (or a MappedIndex, which answers the same calls)


def new_index(dim: int) -> Index:
    """Exact search (cosine on L2-normalised vectors), keyed by the database's vector ids."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def index_ids(index: Index) -> np.ndarray:
    if isinstance(index, MappedIndex):
        return index.ids()
    return faiss.vector_to_array(index.id_map).astype(np.int64)


DIGEST_MOD = 1 << 62  # id_sum and id_mix are kept modulo this (no 64-bit overflow in SQL or numpy)
MIX_MUL, MIX_ADD, MIX_MOD = 1103515245, 12345, 1 << 32  # mix(id) = ((id mod 2^32) * MUL + ADD) mod 2^32


def id_digest(ids: np.ndarray) -> tuple[int, int, int]:
    """(count, sum of ids, sum of mix(id)) modulo DIGEST_MOD: what the database's `vector_sets`
    triggers maintain for its stored ids, computed here for an index file's ids. Order-independent,
    so a set is compared in O(1) on the database side and one pass over the file's id map here."""
    ids = np.asarray(ids, np.int64)
    mixed = ((ids % MIX_MOD) * MIX_MUL + MIX_ADD) % MIX_MOD
    # unsigned sums wrap modulo 2^64, of which DIGEST_MOD is a divisor: exact for any count
    return (int(len(ids)), int(ids.astype(np.uint64).sum(dtype=np.uint64)) % DIGEST_MOD,
            int(mixed.astype(np.uint64).sum(dtype=np.uint64)) % DIGEST_MOD)


def checksum(data: bytes) -> str:
    """Checksum of one stored vector's float32 bytes (what the database keeps beside it)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def checksums(matrix: np.ndarray) -> list[str]:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return [checksum(row.tobytes()) for row in matrix]


def flat_view(index: Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids, matrix) of the store's IDMap2(FlatIP) without copying the vectors (a read-only view)."""
    inner = faiss.downcast_index(index.index)
    matrix = faiss.rev_swig_ptr(inner.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
    return index_ids(index), matrix


class MappedIndex:
    """The saved exact index, memory-mapped from its file rather than read: a process touches the pages
    of the vectors it scores (shared with every process mapping the same file, and reclaimable), never a
    private copy of every vector, not even when it writes. Vectors added since the file live in a small
    in-memory `delta`; ids removed from the file are kept in `removed` and filtered out of every search
    (FAISS aborts on a mutation of a mapped index). `write_atomic` streams the file's rows (less the
    removed) and the delta's into the next file, which the store then maps in place of this one. The
    file is only ever replaced, never rewritten in place, so the mapped inode stays valid."""

    mapped = True

    def __init__(self, base: Index, path: Path):
        self.base, self.path = base, path
        self.delta = new_index(base.d)
        self.removed = np.zeros(0, np.int64)
        self.base_ids = faiss.vector_to_array(base.id_map).astype(np.int64)

    @property
    def d(self) -> int:
        return int(self.base.d)

    @property
    def ntotal(self) -> int:
        return int(self.base.ntotal) - len(self.removed) + int(self.delta.ntotal)

    def ids(self) -> np.ndarray:
        kept = self.base_ids[~np.isin(self.base_ids, self.removed)] if len(self.removed) else self.base_ids
        return np.concatenate([kept, faiss.vector_to_array(self.delta.id_map).astype(np.int64)])

    def _in_delta(self, ids: np.ndarray) -> np.ndarray:
        if not self.delta.ntotal:
            return np.zeros(len(ids), bool)
        return np.isin(ids, faiss.vector_to_array(self.delta.id_map))

    def reconstruct_batch(self, ids) -> np.ndarray:
        """Vectors by id (RuntimeError for an id the index does not hold, as FAISS)."""
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.d), np.float32)
        new = self._in_delta(ids)
        old = ids[~new]
        if len(self.removed) and np.isin(old, self.removed).any():
            raise RuntimeError("id not in the index (removed)")
        if new.any():
            out[new] = self.delta.reconstruct_batch(ids[new])
        if len(old):
            out[~new] = self.base.reconstruct_batch(old)
        return out

    def search(self, x, k: int, params=None):
        """The k best over the file (less removed ids) and the delta, each under `params`' selector."""
        selector = params.sel if params is not None else None
        keep = []
        if len(self.removed):
            keep = [faiss.IDSelectorBatch(self.removed)]
            keep.append(faiss.IDSelectorNot(keep[0]))
            keep.append(faiss.IDSelectorAnd(selector, keep[1]) if selector is not None else keep[1])
            base_params = faiss.SearchParameters(sel=keep[-1])
        else:
            base_params = params
        scores, found = self.base.search(x, k, params=base_params)
        if not self.delta.ntotal:
            return scores, found
        more_scores, more_found = self.delta.search(x, k, params=params)
        scores, found = np.hstack([scores, more_scores]), np.hstack([found, more_found])
        order = np.argsort(-np.where(found >= 0, scores, -np.inf), axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(found, order, 1)

    def add_with_ids(self, x, ids) -> None:
        self.delta.add_with_ids(x, ids)

    def remove_ids(self, ids) -> int:
        ids = np.asarray(ids, np.int64)
        count = int(self.delta.remove_ids(ids)) if self.delta.ntotal else 0
        gone = np.setdiff1d(ids[np.isin(ids, self.base_ids)], self.removed)
        self.removed = np.union1d(self.removed, gone)
        return count + len(gone)

    def stream_to(self, handle) -> None:
        """Write the index this object stands for in FAISS's IndexIDMap2(IndexFlatIP) format, chunk by
        chunk from the mapped file (the bytes faiss.write_index would give; a test holds them equal)."""
        n, d = self.ntotal, self.d
        header = struct.pack("<iqqq?i", d, n, 1 << 20, 1 << 20, True, faiss.METRIC_INNER_PRODUCT)
        handle.write(b"IxM2" + header + b"IxFI" + header + struct.pack("<Q", n * d))
        _, matrix = flat_view(self.base)
        keep = ~np.isin(self.base_ids, self.removed) if len(self.removed) else None
        for start in range(0, len(self.base_ids), 65536):
            rows = matrix[start:start + 65536]
            handle.write((rows if keep is None else rows[keep[start:start + 65536]]).tobytes())
        if self.delta.ntotal:
            handle.write(flat_view(self.delta)[1].tobytes())
        handle.write(struct.pack("<Q", n))
        handle.write((self.base_ids if keep is None else self.base_ids[keep]).tobytes())
        handle.write(faiss.vector_to_array(self.delta.id_map).astype(np.int64).tobytes())


def write_atomic(index: Index, path: Path, point: str = "index:before-replace") -> None:
    """Write beside the target, fsync, rename (layout.atomic_write): a reader sees the old file or the
    new one, never half."""
    def write(handle) -> None:
        if isinstance(index, MappedIndex):  # streamed from the mapped file: no copy of every vector
            index.stream_to(handle)
        else:
            writer = faiss.PyCallbackIOWriter(handle.write)
            faiss.write_index(index, writer)
            del writer  # flushes its buffer
    atomic_write(path, write, point)


def _distinct(ids: np.ndarray) -> bool:
    """No id twice: one pass when ascending (how the store writes them), else a sort."""
    if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):
        return True
    ordered = np.sort(ids)
    return bool((ordered[1:] != ordered[:-1]).all())


def read_index(path: Path) -> Index | None:
    """The saved index, or None if it is missing or unreadable (the caller rebuilds from the database)."""
    return read_checked(path, None)[0]


def read_checked(path: Path, dim: int | None, mapped: bool = False) -> tuple[Index | None, str | None]:
    """(index, None) for a well-formed store index; (None, why) otherwise; (None, None) if absent.
    `mapped`: a MappedIndex over the file instead of a copy in memory.

    Well-formed: an IndexIDMap2 over an inner-product flat index of `dim`, one id per vector, no
    duplicate ids. Content (the vectors themselves) is checked by the store against its checksums.
    """
    if not path.exists():
        return None, None
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mapped else 0)
    except (RuntimeError, MemoryError, ValueError):
        return None, "unreadable"
    if not isinstance(index, faiss.IndexIDMap2):
        return None, f"another index type ({type(index).__name__})"
    inner = faiss.downcast_index(index.index)
    if not isinstance(inner, faiss.IndexFlatIP) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None, f"another index type (IDMap2 over {type(inner).__name__})"
    if dim is not None and index.d != dim:
        return None, f"dimension {index.d}, expected {dim}"
    ids = index_ids(index)
    if len(ids) != index.ntotal or not _distinct(ids):
        return None, "inconsistent id map"
    if mapped and index.ntotal * index.d * 4 + 8 * index.ntotal > path.stat().st_size:
        return None, "shorter than its vectors"  # never map past the end of the file
    return (MappedIndex(index, path) if mapped else index), None


def search_among(index: Index, queries: np.ndarray, candidate_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inner products of each query with exactly the candidate ids (FAISS IDSelector, not post-filtering)."""
    k = len(candidate_ids)
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(candidate_ids.astype(np.int64)))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)


# ----- the search index: exact up to a size, IVF beyond it (chosen the autofaiss way) ---------------
