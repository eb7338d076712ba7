"""The FAISS side of the store: an ID map over an exact inner-product index, saved atomically."""
from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np


def new_index(dim: int) -> faiss.Index:
    """Exact search (cosine on L2-normalised vectors), keyed by the database's vector ids."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def index_ids(index: faiss.Index) -> np.ndarray:
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def build_index(dim: int, ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    index = new_index(dim)
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
    return index


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(index: faiss.Index, path: Path) -> None:
    """Write beside the target, fsync, rename: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_index(path: Path) -> faiss.Index | None:
    """The saved index, or None if it is missing or unreadable (the caller rebuilds from the database)."""
    if not path.exists():
        return None
    try:
        return faiss.read_index(str(path))
    except RuntimeError:
        return None


def search_among(index: faiss.Index, queries: np.ndarray, candidate_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inner products of each query with exactly the candidate ids (FAISS IDSelector, not post-filtering)."""
    k = len(candidate_ids)
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(candidate_ids.astype(np.int64)))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
