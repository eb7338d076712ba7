"""The FAISS side of the store: an ID map over an exact inner-product index, saved atomically and
checked when read. The dataset-search index built from it is index.ivf."""
from __future__ import annotations

import hashlib
import os
import struct
import weakref
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np

from index import segments
from index.layout import atomic_write, fsync_dir  # noqa: F401 - fsync_dir: vx.fsync_dir for callers

# faiss's stubs describe the SWIG base classes only (no IDMap id_map, no sel=/nprobe= keywords, no
# PyCallbackIOWriter, Optional invlists): calls into faiss go untyped here rather than cast at each one
faiss: Any = _faiss
Index = Any  # a FAISS index (or a MappedIndex, which answers the same calls)
# each mapped FAISS index's file as it was when mapped (faiss refuses new attributes on its objects)
_MAPPED_FILES: "weakref.WeakKeyDictionary[Any, MappedFile]" = weakref.WeakKeyDictionary()


def new_index(dim: int) -> Index:
    """Exact search (cosine on L2-normalised vectors), keyed by the database's vector ids."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def index_ids(index: Index) -> np.ndarray:
    if isinstance(index, MappedIndex):
        return index.ids()
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def index_digest(index: Index) -> tuple[tuple[int, int, int], int]:
    """(id_digest of the index's ids, its highest id): O(what changed since the files) for a MappedIndex,
    whose files' digests are computed once, so a save at 1M does not re-hash a million ids."""
    if isinstance(index, MappedIndex):
        return index.digest()
    ids = index_ids(index)
    return id_digest(ids), int(ids.max()) if len(ids) else 0


def _ascending(ids: np.ndarray) -> bool:
    return len(ids) < 2 or bool((ids[1:] > ids[:-1]).all())


def _member(ids: np.ndarray, among: np.ndarray, ascending: bool) -> np.ndarray:
    """Which of `ids` are in `among`: a binary search when `among` is ascending (as the store writes
    ids), O(k log n) where np.isin sorts both (tens of ms for a few ids against 1M)."""
    if not ascending or not len(among):
        return np.isin(ids, among)
    pos = np.minimum(np.searchsorted(among, ids), len(among) - 1)
    return among[pos] == ids


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


MappedFile = tuple[str, int, int, int]  # path, device, inode and size of a file when it was mapped


def mapped_file(path: Path) -> MappedFile:
    now = os.stat(path)
    return str(path), now.st_dev, now.st_ino, now.st_size


def still_whole(held: MappedFile | None) -> bool:
    """Whether a mapped file was not cut short in place since `mapped_file` (reading a page past its new end
    is SIGBUS). Replaced or removed is whole: the mapping keeps the inode it had."""
    if held is None:
        return True
    path, device, inode, size = held
    try:
        now = os.stat(path)
    except OSError:
        return True
    return (now.st_dev, now.st_ino) != (device, inode) or now.st_size >= size


def flat_view(index: Index) -> tuple[np.ndarray, np.ndarray]:
    """(ids, matrix) of the store's IDMap2(FlatIP) without copying the vectors (a read-only view)."""
    inner = faiss.downcast_index(index.index)
    matrix = faiss.rev_swig_ptr(inner.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
    return index_ids(index), matrix


class MappedIndex:
    """The saved exact index, memory-mapped from its files rather than read: a process touches the pages
    of the vectors it scores (shared with every process mapping the same files, and reclaimable), never a
    private copy of every vector, not even when it writes. The files are the base and the segments its
    manifest names (index.segments); ids removed from them are kept in `removed` and filtered out of
    every search (FAISS aborts on a mutation of a mapped index). Vectors added since live in a small
    in-memory `delta`. A save publishes the delta and `removed` as a segment, or streams every kept row
    into a new base (`write_atomic`); the store then maps the result in place of this object. Files are
    only ever replaced or added, never rewritten in place, so every mapped inode stays valid."""

    mapped = True

    def __init__(self, base: Index, path: Path, segments: list[Index] | None = None,
                 removed: np.ndarray | None = None, manifest: dict | None = None):
        self.base, self.path = base, path
        self.segments = list(segments or [])
        self.manifest = manifest  # the manifest these files are (None: the base alone)
        self.delta = new_index(base.d)
        self.removed = np.zeros(0, np.int64) if removed is None else np.asarray(removed, np.int64)
        self.saved_removed = len(self.removed)  # `removed` as published (it only grows until a rewrite)
        self.base_ids = faiss.vector_to_array(base.id_map).astype(np.int64)
        self.segment_ids = [faiss.vector_to_array(s.id_map).astype(np.int64) for s in self.segments]
        self.sorted = [_ascending(ids) for ids in [self.base_ids] + self.segment_ids]  # per file
        self.digests: list[tuple[tuple[int, int, int], int] | None] = [None] * (1 + len(self.segments))
        self.problem: str | None = None  # why the manifest's segments were left out, if they were
        self.identity: dict | None = None  # the base file's identity when it was read (segments.base_identity)

    @property
    def d(self) -> int:
        return int(self.base.d)

    @property
    def mapped_rows(self) -> int:
        return int(self.base.ntotal) + sum(int(s.ntotal) for s in self.segments)

    @property
    def ntotal(self) -> int:
        return self.mapped_rows - len(self.removed) + int(self.delta.ntotal)

    def intact(self) -> bool:
        """Whether every mapped file still holds the bytes it held when mapped. resynth only replaces these
        files, but one cut short in place (by hand, by a tool) would kill the process with SIGBUS at the
        next read of a page past its new end; the store checks this before reading and reloads instead."""
        return all(still_whole(_MAPPED_FILES.get(part)) for part in [self.base, *self.segments])

    def signature(self) -> tuple:
        """The mapped files as they are now (inode, size, mtime): changes when one is written in place."""
        out = []
        for part in [self.base, *self.segments]:
            held = _MAPPED_FILES.get(part)
            try:
                now = os.stat(held[0]) if held else None
            except OSError:
                now = None
            out.append(None if now is None else (now.st_ino, now.st_size, now.st_mtime_ns))
        return tuple(out)

    def _parts(self) -> list[tuple[Index, np.ndarray]]:
        return [(self.base, self.base_ids)] + list(zip(self.segments, self.segment_ids))

    def _kept(self, k: int) -> np.ndarray | None:
        """Which rows of file `k` are not removed (None: all of them)."""
        ids = self._parts()[k][1]
        if not len(self.removed):
            return None
        if not self.sorted[k]:
            return ~np.isin(ids, self.removed)
        here = self.removed[_member(self.removed, ids, True)]
        if not len(here):
            return None
        keep = np.ones(len(ids), bool)
        keep[np.searchsorted(ids, here)] = False
        return keep

    def _has(self, k: int, ids: np.ndarray) -> np.ndarray:
        return _member(ids, self._parts()[k][1], self.sorted[k])

    def ids(self) -> np.ndarray:
        parts = []
        for k, (_, ids) in enumerate(self._parts()):
            keep = self._kept(k)
            parts.append(ids if keep is None else ids[keep])
        return np.concatenate(parts + [faiss.vector_to_array(self.delta.id_map).astype(np.int64)])

    def digest(self) -> tuple[tuple[int, int, int], int]:
        """`index_digest`: the files' digests (cached) less the removed ids' plus the delta's."""
        total, top = [0, 0, 0], 0
        for k, (_, ids) in enumerate(self._parts()):
            if self.digests[k] is None:
                self.digests[k] = id_digest(ids), int(ids.max()) if len(ids) else 0
            part, part_top = self.digests[k]  # type: ignore[misc]
            total, top = [a + b for a, b in zip(total, part)], max(top, part_top)
        gone = id_digest(self.removed)
        delta = faiss.vector_to_array(self.delta.id_map).astype(np.int64)
        more = id_digest(delta)
        total = [a - b + c for a, b, c in zip(total, gone, more)]
        top = max(top, int(delta.max()) if len(delta) else 0)
        return (total[0], total[1] % DIGEST_MOD, total[2] % DIGEST_MOD), top

    def _in_delta(self, ids: np.ndarray) -> np.ndarray:
        if not self.delta.ntotal:
            return np.zeros(len(ids), bool)
        return np.isin(ids, faiss.vector_to_array(self.delta.id_map))

    def reconstruct_batch(self, ids) -> np.ndarray:
        """Vectors by id (RuntimeError for an id the index does not hold, as FAISS)."""
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.d), np.float32)
        left = ~self._in_delta(ids)
        if len(self.removed) and np.isin(ids[left], self.removed).any():
            raise RuntimeError("id not in the index (removed)")
        if not left.all():
            out[~left] = self.delta.reconstruct_batch(ids[~left])
        for k, segment in enumerate(self.segments, 1):
            here = left & self._has(k, ids)
            if here.any():
                out[here] = segment.reconstruct_batch(ids[here])
                left &= ~here
        if left.any():
            out[left] = self.base.reconstruct_batch(ids[left])
        return out

    def search(self, x, k: int, params=None):
        """The k best over the files (less removed ids) and the delta, each under `params`' selector."""
        selector = params.sel if params is not None else None
        keep = []
        if len(self.removed):
            keep = [faiss.IDSelectorBatch(self.removed)]
            keep.append(faiss.IDSelectorNot(keep[0]))
            keep.append(faiss.IDSelectorAnd(selector, keep[1]) if selector is not None else keep[1])
            mapped_params = faiss.SearchParameters(sel=keep[-1])
        else:
            mapped_params = params
        results = [part.search(x, k, params=mapped_params) for part in [self.base] + self.segments]
        if self.delta.ntotal:
            results.append(self.delta.search(x, k, params=params))
        if len(results) == 1:
            return results[0]
        scores, found = np.hstack([r[0] for r in results]), np.hstack([r[1] for r in results])
        order = np.argsort(-np.where(found >= 0, scores, -np.inf), axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(found, order, 1)

    def add_with_ids(self, x, ids) -> None:
        self.delta.add_with_ids(x, ids)

    def remove_ids(self, ids) -> int:
        ids = np.asarray(ids, np.int64)
        count = int(self.delta.remove_ids(ids)) if self.delta.ntotal else 0
        mapped = np.zeros(len(ids), bool)
        for k in range(len(self._parts())):
            mapped |= self._has(k, ids)
        gone = np.setdiff1d(ids[mapped], self.removed)
        if len(gone):
            self.removed = np.union1d(self.removed, gone)
        return count + len(gone)

    def unsaved(self) -> bool:
        return bool(self.delta.ntotal) or len(self.removed) != self.saved_removed

    def stream_to(self, handle, first: int = 0) -> None:
        """Write the index this object stands for in FAISS's IndexIDMap2(IndexFlatIP) format, chunk by
        chunk from the mapped files (the bytes faiss.write_index would give; a test holds them equal).
        From the `first` file on: 1 leaves the base out (one segment merging the segments and the delta),
        1 + len(segments) writes the delta alone (a new segment)."""
        parts = self._parts()[first:]
        keeps = [self._kept(k) for k in range(first, first + len(parts))]
        n = sum(len(ids) if keep is None else int(keep.sum()) for (_, ids), keep in zip(parts, keeps))
        n, d = n + int(self.delta.ntotal), self.d
        header = struct.pack("<iqqq?i", d, n, 1 << 20, 1 << 20, True, faiss.METRIC_INNER_PRODUCT)
        handle.write(b"IxM2" + header + b"IxFI" + header + struct.pack("<Q", n * d))
        for (part, part_ids), keep in zip(parts, keeps):
            _, matrix = flat_view(part)
            for start in range(0, len(part_ids), 65536):
                rows = matrix[start:start + 65536]
                handle.write((rows if keep is None else rows[keep[start:start + 65536]]).tobytes())
        if self.delta.ntotal:
            handle.write(flat_view(self.delta)[1].tobytes())
        handle.write(struct.pack("<Q", n))
        for (_, part_ids), keep in zip(parts, keeps):
            handle.write((part_ids if keep is None else part_ids[keep]).tobytes())
        handle.write(faiss.vector_to_array(self.delta.id_map).astype(np.int64).tobytes())

    def saved(self, manifest: dict, segment: Index | None, merged: bool) -> "MappedIndex":
        """This index once `manifest` published its unsaved rows as `segment` (mapped from its file;
        `merged`: in place of every segment): the same mapped base, no delta, nothing unsaved."""
        kept = [] if merged else list(zip(self.segments, self.segment_ids))
        if segment is not None:
            kept.append((segment, faiss.vector_to_array(segment.id_map).astype(np.int64)))
        removed = self.removed[self._has(0, self.removed)] if merged else self.removed
        fresh = MappedIndex.__new__(MappedIndex)
        fresh.base, fresh.path, fresh.manifest, fresh.base_ids = self.base, self.path, manifest, self.base_ids
        fresh.segments, fresh.segment_ids = [p for p, _ in kept], [i for _, i in kept]
        carried = [(self.sorted[k], self.digests[k]) for k in range(1 if merged else len(self.sorted))]
        carried += [(_ascending(ids), None) for ids in fresh.segment_ids[len(carried) - 1:]]
        fresh.sorted, fresh.digests = [a for a, _ in carried], [d for _, d in carried]
        fresh.delta, fresh.removed, fresh.saved_removed = new_index(self.d), removed, len(removed)
        fresh.problem, fresh.identity = None, self.identity
        return fresh

    def in_memory(self) -> Index:
        """A private IndexIDMap2 of what this stands for (a copy of every vector: for verify and tests)."""
        index = new_index(self.d)
        parts = self._parts() + [(self.delta, faiss.vector_to_array(self.delta.id_map))]
        for k, (part, part_ids) in enumerate(parts):
            if not part.ntotal:
                continue
            _, matrix = flat_view(part)
            kept = self._kept(k) if k < len(parts) - 1 else None
            keep: Any = slice(None) if kept is None else kept
            index.add_with_ids(np.ascontiguousarray(matrix[keep]), np.asarray(part_ids, np.int64)[keep])
        return index


def write_atomic(index: Index, path: Path, point: str = "index:before-replace") -> None:
    """Write beside the target, fsync, rename (layout.atomic_write): a reader sees the old file or the
    new one, never half. A live index's segments are then stale (index.segments: they name another base)."""
    def write(handle) -> None:
        if isinstance(index, MappedIndex):  # streamed from the mapped files: no copy of every vector
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


def read_part(path: Path, dim: int | None, mapped: bool) -> tuple[Index | None, str | None]:
    """One well-formed IDMap2(FlatIP) file: (index, None) or (None, why)."""
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
    if mapped:
        _MAPPED_FILES[index] = held = mapped_file(path)  # for MappedIndex.intact
        if index.ntotal * index.d * 4 + 8 * index.ntotal > held[3]:
            return None, "shorter than its vectors"  # never map past the end of the file
    return index, None


def _read_segments(path: Path, base: Index, manifest: dict) -> tuple[list[Index], np.ndarray]:
    """The mapped segments and removed ids a manifest names (FileNotFoundError when a rewrite removed
    one meanwhile; ValueError when one is not what the manifest says)."""
    found = []
    for entry in manifest["segments"]:
        part = segments.part_path(path, entry)
        if part.stat().st_size != entry["size"]:
            raise ValueError(f"segment {part.name} is {part.stat().st_size} bytes, the manifest says {entry['size']}")
        segment, why = read_part(part, int(base.d), True)
        if segment is None or segment.ntotal != entry["n"]:
            raise ValueError(f"segment {part.name} {why or 'holds another number of vectors'}")
        found.append(segment)
    removed = segments.read_removed(path, manifest["removed"])
    return found, removed


def read_checked(path: Path, dim: int | None, mapped: bool = False) -> tuple[Index | None, str | None]:
    """(index, None) for a well-formed store index; (None, why) otherwise; (None, None) if absent.
    `mapped`: a MappedIndex over the files instead of a copy in memory. The index is the base file
    and the segments its manifest names (index.segments), less the removed ids.

    Well-formed: IndexIDMap2s over inner-product flat indexes of `dim`, one id per vector, no duplicate
    ids. Content (the vectors themselves) is checked by the store against its checksums. Segments the
    manifest names but that are missing or malformed are left out (`problem` says why): the store
    reads what the base lacks from the database.
    """
    for _attempt in range(5):  # a save or a rewrite by another process may replace files meanwhile
        identity = segments.base_identity(path)
        if identity is None:
            return None, None
        base, why = read_part(path, dim, True)
        if base is None:
            return None, why
        manifest, problem = segments.read_manifest(path, identity)
        parts: list[Index] = []
        removed = None
        if manifest is not None:
            try:
                parts, removed = _read_segments(path, base, manifest)
            except FileNotFoundError:
                if segments.base_identity(path) != identity or segments.key(
                        segments.read_manifest(path, identity)[0]) != segments.key(manifest):
                    continue
                manifest, problem = None, "a file its manifest names is missing"
            except (OSError, ValueError, KeyError, TypeError) as exc:
                manifest, problem = None, str(exc)
        if segments.base_identity(path) != identity:
            continue
        index = MappedIndex(base, path, parts, removed, manifest)
        if manifest is not None and ((len(index.removed) and len(np.setdiff1d(index.removed, np.concatenate(
                [index.base_ids] + index.segment_ids)))) or not _distinct(index.ids())):
            index = MappedIndex(base, path)
            problem = "its segments repeat ids or remove absent ones"
        index.problem, index.identity = problem, identity
        return (index if mapped else index.in_memory()), None
    return None, "replaced again and again while being read"


def search_among(index: Index, queries: np.ndarray, candidate_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inner products of each query with exactly the candidate ids (FAISS IDSelector, not post-filtering)."""
    k = len(candidate_ids)
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(candidate_ids.astype(np.int64)))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)


# ----- the search index: exact up to a size, IVF beyond it (chosen the autofaiss way) ---------------
