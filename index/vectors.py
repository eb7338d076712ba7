"""The FAISS side of the store: an ID map over an exact inner-product index, saved atomically."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import faiss
import numpy as np

from index.faults import crash_point


def new_index(dim: int) -> faiss.Index:
    """Exact search (cosine on L2-normalised vectors), keyed by the database's vector ids."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def index_ids(index: faiss.Index) -> np.ndarray:
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def checksum(data: bytes) -> str:
    """Checksum of one stored vector's float32 bytes (what the database keeps beside it)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def checksums(matrix: np.ndarray) -> list[str]:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return [checksum(row.tobytes()) for row in matrix]


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(index: faiss.Index, path: Path) -> None:
    """Write beside the target, fsync, rename: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        crash_point("index:before-replace")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_index(path: Path) -> faiss.Index | None:
    """The saved index, or None if it is missing or unreadable (the caller rebuilds from the database)."""
    return read_checked(path, None)[0]


def read_checked(path: Path, dim: int | None) -> tuple[faiss.Index | None, str | None]:
    """(index, None) for a well-formed store index; (None, why) otherwise; (None, None) if absent.

    Well-formed: an IndexIDMap2 over an inner-product flat index of `dim`, one id per vector, no
    duplicate ids. Content (the vectors themselves) is checked by the store against its checksums.
    """
    if not path.exists():
        return None, None
    try:
        index = faiss.read_index(str(path))
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
    if len(ids) != index.ntotal or len(np.unique(ids)) != len(ids):
        return None, "inconsistent id map"
    return index, None


def search_among(index: faiss.Index, queries: np.ndarray, candidate_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inner products of each query with exactly the candidate ids (FAISS IDSelector, not post-filtering)."""
    k = len(candidate_ids)
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(candidate_ids.astype(np.int64)))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
