"""The database's side of the vectors, as the live index (index.live) checks and merges it: the stored
ids and their digest, tombstones, vectors and checksums read in batches, and the content checks that
tell a damaged index file from a database that lost rows."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from index import vectors as vx
from index.db import Database
from index.faults import observe, skipped
from index.layout import Layout
from index.schema import DeletedVector, StoreMeta, Vector, VectorSet

MISNUMBERED_CLOSE = 64  # up to this many lost ids, a damaged vector under a damaged id is still recognised


class StoredVectors:
    """The database side of the vectors: ids, tombstones, stored vectors, checksums and the id digest."""

    def __init__(self, db: Database, layout: Layout):
        self.db, self.layout = db, layout

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def embedder(self) -> str:
        return self.layout.embedder_identity

    def db_vector_ids(self, session: Session | None = None) -> np.ndarray:
        """Every id the database stores for the live embedder, sorted (a full read: O(store))."""
        observe("ids:full-read")
        query = select(Vector.id).where(Vector.embedder == self.embedder)
        if session is not None:
            return np.array(sorted(session.scalars(query).all()), dtype=np.int64)
        with self.db.session() as s:
            return np.array(sorted(s.scalars(query).all()), dtype=np.int64)

    def tomb_state(self, s: Session) -> tuple[int, int]:
        """(highest tombstone seq, tombstones_from floor) in this session's snapshot."""
        if not self.db.has_tombstones:
            return 0, 1 << 62  # an old database, opened read-only: every unknown id counts as deleted
        seq = s.scalar(select(func.max(DeletedVector.seq))) or 0
        floor = s.scalar(select(StoreMeta.value).where(StoreMeta.key == "tombstones_from"))
        return int(seq), int(floor or 0)

    def deleted(self, s: Session, ids: np.ndarray, floor: int) -> np.ndarray:
        """Which of `ids` the database records as deleted (tombstoned, or older than tombstones)."""
        ids = np.asarray(ids, np.int64)
        known = set(ids[ids <= floor].tolist())
        rest = [int(i) for i in ids if i > floor]
        if self.db.has_tombstones:
            for k in range(0, len(rest), 500):
                known.update(s.scalars(select(DeletedVector.vector_id)
                                       .where(DeletedVector.vector_id.in_(rest[k:k + 500]))).all())
        return np.array(sorted(known), np.int64)

    def stored_vectors(self, ids: np.ndarray | None = None, batch: int = 10000, session: Session | None = None,
                       embedder: tuple[str, int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, matrix) batches from the database, for rebuilding without re-embedding (of the
        live embedder, or of `embedder` = (identity, dim))."""
        identity, dim = embedder or (self.embedder, self.dim)
        base = select(Vector.id, Vector.data).where(Vector.embedder == identity).order_by(Vector.id)
        if ids is None:
            queries = [base]
        else:
            wanted = [int(i) for i in ids]
            queries = [base.where(Vector.id.in_(wanted[k:k + 500])) for k in range(0, len(wanted), 500)]
        s = session if session is not None else self.db.session()
        try:
            chunk_ids, chunk = [], []
            for query in queries:
                for vid, data in s.execute(query).yield_per(batch):
                    vec = np.frombuffer(data, dtype=np.float32)
                    if vec.shape != (dim,):
                        raise self.db.damaged(f"holds vector {vid} of size {vec.size}, not {dim}")
                    chunk_ids.append(vid)
                    chunk.append(vec)
                    if len(chunk) == batch:
                        yield np.array(chunk_ids, np.int64), np.stack(chunk)
                        chunk_ids, chunk = [], []
            if chunk:
                yield np.array(chunk_ids, np.int64), np.stack(chunk)
        finally:
            if session is None:
                s.close()

    def _checksums(self, s: Session, ids: np.ndarray) -> dict[int, str]:
        """Reference checksums of stored vectors (from `data` where the row has none)."""
        out: dict[int, str] = {}
        wanted = [int(i) for i in ids]
        for k in range(0, len(wanted), 500):
            part = wanted[k:k + 500]
            if self.db.has_checksums:
                rows = s.execute(select(Vector.id, Vector.checksum).where(Vector.id.in_(part))).all()
                out.update({vid: c for vid, c in rows if c})
            need = [i for i in part if i not in out]
            if need:
                stored = s.execute(select(Vector.id, Vector.data).where(Vector.id.in_(need))).all()
                out.update({vid: vx.checksum(data) for vid, data in stored})
        return out

    def content_problems(self, s: Session, index, ids: np.ndarray, batch: int = 4096) -> list[int]:
        """Ids whose index vector is not finite or differs from its stored checksum."""
        bad = []
        for k in range(0, len(ids), batch):
            part = np.asarray(ids[k:k + batch], np.int64)
            matrix = index.reconstruct_batch(part)
            reference = self._checksums(s, part)
            finite = np.isfinite(matrix).all(axis=1)
            for vid, row, ok in zip(part.tolist(), matrix, finite):
                if not ok or reference.get(vid) != vx.checksum(row.tobytes()):  # (None: no such stored vector)
                    bad.append(vid)
        return bad

    def misnumbered(self, s: Session, index, lost: np.ndarray, missing: np.ndarray) -> bool:
        """Whether the index's vectors under `lost` ids (ones the database neither holds nor deleted) are
        stored vectors the index lacks (`missing`) under damaged ids: then the index file's id map is
        damaged, not the database, and the index is rebuilt rather than the database called incomplete.
        A vector counts as one of them when it matches its checksum, or (a few lost ids: a flipped byte
        in the vector too) when most of its components are bit for bit those of one of them: distinct
        embeddings share none. Only asked when some ids are lost (rare): reads the missing ids' rows."""
        if not len(missing) or len(lost) > len(missing):
            return False
        found = index.reconstruct_batch(np.asarray(lost, np.int64))
        sums = set(self._checksums(s, missing).values())
        left = np.array([vx.checksum(row.tobytes()) not in sums for row in found])
        if not left.any() or len(lost) > MISNUMBERED_CLOSE:
            return not left.any()
        bits = np.ascontiguousarray(found[left]).view(np.uint32)
        close = np.zeros(len(bits), bool)
        for _, matrix in self.stored_vectors(missing, batch=1024, session=s):
            same = (bits[:, None, :] == np.ascontiguousarray(matrix).view(np.uint32)[None]).mean(axis=2)
            close |= (same >= 0.5).any(axis=1)
        return bool(close.all())

    def db_digest(self, s: Session, embedder: str | None = None) -> tuple[int, int, int] | None:
        """The database's id digest of an embedder's vectors (vector_sets), None where it keeps none."""
        if not self.db.has_vector_sets:
            return None
        row = s.execute(select(VectorSet.n, VectorSet.id_sum, VectorSet.id_mix)
                        .where(VectorSet.embedder == (embedder or self.embedder))).first()
        return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)

    def behind_by(self, s: Session, have: np.ndarray | None,
                  known: tuple[tuple[int, int, int], int] | None = None) -> np.ndarray | None:
        """The watermark check: the ids the database holds beyond the index's highest one, when the index
        holds exactly the database's ids up to that point (digests add up), else None. O(1) plus a range
        read of what is newer; None (the full comparison) after deletions the file has not seen.
        `known`: the index's (digest, highest id) in place of its ids `have` (vectors.index_digest)."""
        db = None if skipped("ids:digest") else self.db_digest(s)
        if db is None:
            return None
        if known is None:
            assert have is not None
            known = vx.id_digest(have), int(have.max()) if len(have) else 0
        mine, top = known
        if mine == db:
            return np.zeros(0, np.int64)
        newer = np.array(s.scalars(select(Vector.id).where(Vector.id > top, Vector.embedder == self.embedder)
                                   .order_by(Vector.id)).all(), np.int64)
        extra = vx.id_digest(newer)
        total = (mine[0] + extra[0], (mine[1] + extra[1]) % vx.DIGEST_MOD, (mine[2] + extra[2]) % vx.DIGEST_MOD)
        return newer if len(newer) and total == db else None
