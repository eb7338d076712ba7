"""The live vector index (vectors.faiss, IDMap2 over a flat index): verified against the database at
open, merged with what other processes committed or deleted, published atomically.

Write order elsewhere guarantees the file can only be *behind* the database, or ahead of it by ids the
database records as deleted (tombstones). An id in the file that the database neither holds nor records
as deleted means the database lost data: StoreDamaged, and the file is left as it is. Content is
verified, not only ids: a sample of index vectors is compared with their checksums; any mismatch (or a
file of another index type) is rebuilt from the database, never served.

Within a process, `lock` keeps FAISS searches apart from index mutation (FAISS is not safe there).
Lock order is always the cross-process file lock, then `lock` (never the other way: a save and a
refresh would deadlock).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from index import segments
from index import vectors as vx
from index.db import Database
from index.errors import StoreDamaged, StoreInputError, StoreReadOnly, StoreUnavailable
from index.faults import crash_point
from index.layout import Layout
from index.migrations import recount_vector_sets
from index.schema import DeletedVector, Vector
from index.stored import StoredVectors

log = logging.getLogger(__name__)

VERIFIED_MAX = 1 << 18  # ids remembered as checked (_as_stored); past this many, checked again
SAMPLE = 256  # index vectors checked against their checksums at open (all of them up to FULL_CHECK)
FULL_CHECK = 4096


@dataclass
class OpenReport:
    """What `open` found: how far the FAISS file was from the database and what was done about it."""

    rebuilt: bool = False
    added: int = 0
    removed: int = 0
    checked: int = 0  # index vectors compared with their checksums
    digest: bool = False  # ids compared by the database's id digest, not read one by one
    notes: list[str] = field(default_factory=list)


def impossible_ids(ids: np.ndarray) -> int:
    """How many of an index's ids no database gives out: vector ids count up from 1, and the id digest
    (vectors.id_digest) is taken modulo 2^62, so an id with a flipped sign or top bit would pass it."""
    return int(((ids < 1) | (ids >= vx.DIGEST_MOD)).sum()) if len(ids) else 0


def _whole(index: Any) -> bool:
    """Not a mapped index, or one whose files were not cut short in place (vectors.MappedIndex.intact)."""
    return not getattr(index, "mapped", False) or index.intact()


def _sample(ids: np.ndarray, size: int) -> np.ndarray:
    return np.sort(np.random.default_rng().choice(ids, size, replace=False))


class LiveIndex:
    """The index this process serves, and the database reads that keep it honest."""

    def __init__(self, db: Database, layout: Layout, repair: bool = False):
        self.db, self.layout, self.repair = db, layout, repair
        self.stored = StoredVectors(db, layout)
        self.lock = threading.RLock()
        self._reload_lock = threading.Lock()
        self._index: Any = None  # a FAISS IndexIDMap2, or the mapped file (vectors.MappedIndex): see `index`
        self._generation = 0  # counts the indexes served (`index`'s setter)
        self.report = OpenReport()
        self.dirty = False  # holds vectors its file lacks
        self.rewrite = False  # replaced vectors the files hold damaged (_as_stored): the next save writes a new base
        self._verified: set[int] = set()  # vector ids checked against the database's checksums (_as_stored)
        self._verified_for: tuple = ()  # the index served (and its mapped files' state) those checks were of
        self.tomb_seq = 0  # the highest tombstone this index has applied
        self.file_state: tuple | None = None  # segments.state: of the base file and of its manifest
        # what the dataset-search index wants to hear (set by the store): ids added, and "recompute"
        self.on_added: Callable[[np.ndarray, np.ndarray], None] = lambda ids, matrix: None
        self.on_reset: Callable[[], None] = lambda: None

    @property
    def index(self) -> Any:
        return self._index

    @index.setter
    def index(self, index: Any) -> None:
        """Whatever replaces the served index (a save, a reload, a rebuild) ends what was checked of the last
        one, and a rewrite owed for its repaired vectors."""
        self._index, self._generation, self.rewrite = index, self._generation + 1, False

    @property
    def dim(self) -> int:
        return self.layout.dim

    def load(self) -> None:
        self.index, self.report = self.load_verified()
        self.file_state = segments.state(self.layout.index_path)

    def _digest_drift(self, s: Session, db_ids: np.ndarray) -> str | None:
        """After a full comparison: whether vector_sets disagrees with the ids the database really holds
        (triggers bypassed, a hand-edited row); a writable open recomputes it, so the next open is fast."""
        db = self.stored.db_digest(s)
        if db is None or db == vx.id_digest(db_ids):
            return None
        if self.layout.writable:
            try:
                recount_vector_sets(self.db)
                return "the database's id digest (vector_sets) disagreed with its vectors: recomputed"
            except (StoreUnavailable, StoreReadOnly) as exc:  # a held lock, a full disk: not a reason to refuse
                return (f"the database's id digest (vector_sets) disagrees with its vectors and could not be "
                        f"recomputed now ({exc}): every open reads all ids until one can")
        return ("the database's id digest (vector_sets) disagrees with its vectors: every open reads all ids "
                "until a writable open recomputes it")

    # ----- open: verify, repair ---------------------------------------------------------------
    def load_verified(self):
        """Read vectors.faiss, check it against the database (ids, then content), repair or refuse.

        Ids are compared in O(1) first (`behind_by`: the database's id digest against the file's, the
        file possibly behind by vectors committed since it was written); only when that fails is every
        id read and compared. Content is always checked on a sample (all of it for small stores)."""
        report = OpenReport()
        index, problem = vx.read_checked(self.layout.index_path, self.dim, mapped=True)  # the files first
        if index is not None and index.problem:
            report.notes.append(f"index segments left out ({index.problem}): what they held is read from the "
                                "database")
        have = vx.index_ids(index) if index is not None else None
        impossible = impossible_ids(have) if have is not None else 0
        if impossible:  # the id digest works modulo 2^62: such ids must never reach it
            index, have, problem = None, None, f"holds {impossible} ids no database gives (its id map is damaged)"
        with self.db.session() as s:
            tomb_seq, floor = self.stored.tomb_state(s)
            newer = self.stored.behind_by(s, have, vx.index_digest(index)) if index is not None else None
            if newer is not None:  # ids agree, up to vectors committed after the file was written
                report.digest = True
                present = have if len(have) <= FULL_CHECK else _sample(have, SAMPLE)
                bad = self.stored.content_problems(s, index, present)
                report.checked = len(present)
                if not bad:
                    for ids, matrix in (self.stored.stored_vectors(newer, session=s) if len(newer) else ()):
                        index.add_with_ids(matrix, ids)
                        report.added += len(ids)
                    if report.added:
                        report.notes.append(f"index caught up with the database: +{report.added} vectors")
                    self.tomb_seq = tomb_seq
                    if self.layout.writable and report.added:
                        index = self._save_at_open(index, report)
                    return index, report
                report.digest = False  # the full comparison below finds and handles the bad vectors
            db_ids = self.stored.db_vector_ids(s)
            if index is not None:
                index, problem = self._compare(s, index, have, db_ids, floor, report)
            if index is None:
                if problem:
                    report.notes.append(f"index file {problem}: rebuilt from stored vectors")
                index = vx.new_index(self.dim)
                for ids, matrix in self.stored.stored_vectors(session=s):
                    index.add_with_ids(matrix, ids)
                report.rebuilt = True
                report.added = int(index.ntotal)
            else:
                missing = np.setdiff1d(db_ids, vx.index_ids(index))
                for ids, matrix in (self.stored.stored_vectors(missing, session=s) if len(missing) else ()):
                    index.add_with_ids(matrix, ids)
                    report.added += len(ids)
                if report.added or report.removed:
                    report.notes.append(f"index repaired from database: +{report.added} -{report.removed} vectors")
            drift = self._digest_drift(s, db_ids)
        if drift:
            report.notes.append(drift)
        self.tomb_seq = tomb_seq
        if self.layout.writable and ((report.rebuilt and (problem or len(db_ids))) or report.added or report.removed):
            index = self._save_at_open(index, report)
        return index, report

    def _save_at_open(self, index, report: OpenReport):
        """Publish what an open verified and repaired. A save the machine refuses (a full disk, a held
        lock, denied permission) does not refuse the open: the repaired index is served from memory, the
        files stay as they were (behind the database, which holds everything), and the next save or
        open writes them."""
        try:
            return self.publish(index)
        except (StoreUnavailable, StoreReadOnly) as exc:
            report.notes.append(f"the repaired index was not saved ({exc}): served from memory")
            return index

    def _compare(self, s: Session, index, have: np.ndarray, db_ids: np.ndarray, floor: int, report: OpenReport):
        """The full comparison of the file's ids and a sample of its content with the database: (index
        with deleted ids removed, None) or (None, why it must be rebuilt)."""
        extra = np.setdiff1d(have, db_ids)
        lost = np.setdiff1d(extra, self.stored.deleted(s, extra, floor)) if len(extra) else extra
        if len(lost) and self.stored.misnumbered(s, index, lost, np.setdiff1d(db_ids, have)):
            return None, f"{len(lost)} vectors under ids the database never gave them (its id map is damaged)"
        if len(lost):
            if not self.repair:
                raise StoreDamaged(
                    f"{self.layout.index_path} holds {len(lost)} vectors that {self.db.short_name} neither stores "
                    f"nor records as deleted (the database lost data): {self.db.restore_hint}, or, if it is whole and "
                    "the index file damaged, run `resynth verify --repair` to rebuild the index from the database")
            report.notes.append(f"{len(lost)} vectors the database lost were dropped (repair)")
        present = np.intersect1d(have, db_ids)
        if len(present) > FULL_CHECK:
            present = _sample(present, SAMPLE)
        bad = self.stored.content_problems(s, index, present)
        report.checked = len(present)
        if bad:
            return None, f"{len(bad)} of {len(present)} checked vectors differ from the database"
        if len(extra):
            index.remove_ids(extra)
            report.removed = len(extra)
        return index, None

    # ----- keeping up with other processes, publishing ---------------------------------------
    def merge_from_db(self, index) -> bool:
        """Bring `index` to the database's latest state: drop ids deleted since, add ids committed elsewhere.
        True if it changed."""
        changed = False
        with self.db.session() as s:
            tomb_seq, floor = self.stored.tomb_state(s)
            if self.db.has_tombstones and tomb_seq > self.tomb_seq:
                gone = np.array(s.scalars(select(DeletedVector.vector_id)
                                          .where(DeletedVector.seq > self.tomb_seq)).all(), np.int64)
                if len(gone) and index.remove_ids(gone):  # ids it does not hold are left alone
                    changed = True
            # O(1) when the digests agree (the files' digests are cached), a range read when only behind
            missing = self.stored.behind_by(s, None, vx.index_digest(index))
            if missing is None:
                missing = np.setdiff1d(self.stored.db_vector_ids(s), vx.index_ids(index))
            for ids, matrix in (self.stored.stored_vectors(missing, session=s) if len(missing) else ()):
                index.add_with_ids(matrix, ids)
                changed = True
        self.tomb_seq = max(self.tomb_seq, tomb_seq)
        return changed

    def publish(self, index=None):
        """Merge and write `index` (default: the live one) under the cross-process lock; returns the index
        to go on with: the files just written, mapped (so no process keeps a private copy of every vector
        past a save). What changed since the files on disk is published as a segment (index.segments);
        a new base is written when there are no files yet, when the segments have grown past a share
        of the base, or when the files on disk cannot be read."""
        if index is None:  # a rewrite streams the mapped rows: never from a file cut short meanwhile
            self.reload_if_cut()
        with self.layout.file_lock():
            with self.lock:
                live = index is None
                if live and not _whole(self.index):  # cut while this save waited for the file lock
                    log.warning("%s was cut short under this process: written again from the database",
                                self.layout.index_path.name)
                    self.index, self.tomb_seq = self.rebuild_from_db()
                    self.rewrite = True
                    self.on_reset()
                index = self.index if live else index
                if self.merge_from_db(index) and live:
                    self.on_reset()
                path = self.layout.index_path
                saved = None if live and self.rewrite else self._append(index, path)
                if saved is None:
                    known = vx.index_digest(index)  # of the base about to be written: the next save reuses it
                    vx.write_atomic(index, path)
                    crash_point(segments.REWRITE_POINTS[1])
                    segments.remove_orphans(path)  # the old manifest names another base now
                    saved, _ = vx.read_checked(path, self.dim, mapped=True)
                    if saved is not None and not saved.segments and len(saved.base_ids):
                        saved.digests[0] = known[0], int(saved.base_ids.max())
                else:
                    segments.remove_orphans(path, saved.manifest)  # what a crash between a save's steps left
                self.file_state = segments.state(path)
                if saved is not None:
                    index = saved
                if live:
                    self.index, self.dirty, self.rewrite = index, False, False
                return index

    def _append(self, index, path) -> Any:
        """(Under the file lock.) Publish what `index` holds beyond the files on disk as one segment and
        return the index mapping them all; None where a whole new base must be written instead."""
        if not isinstance(index, vx.MappedIndex) or index.path != path or index.problem:
            return None
        identity = segments.base_identity(path)
        current, problem = segments.read_manifest(path, identity)
        if problem or identity is None:
            return None
        disk: Any = index
        if identity != index.identity or segments.key(current) != segments.key(index.manifest):
            # another process published since this index was read (a segment, a new base): add this
            # index's difference from those files as a segment over them
            disk, _ = vx.read_checked(path, self.dim, mapped=True)
            if disk is None or disk.problem or disk.identity != identity or segments.key(disk.manifest) != segments.key(
                    current):
                return None
            ours, theirs = vx.index_ids(index), vx.index_ids(disk)
            new, gone = np.setdiff1d(ours, theirs), np.setdiff1d(theirs, ours)
            for k in range(0, len(new), 65536):
                disk.add_with_ids(index.reconstruct_batch(new[k:k + 65536]), new[k:k + 65536])
            if len(gone):
                disk.remove_ids(gone)
        if not disk.unsaved():
            return disk
        if len(disk.removed) and np.isin(vx.index_ids(disk.delta), disk.removed).any():
            return None  # an id removed from the files and added again (a repair): only a new base holds it
        added = int(disk.delta.ntotal)
        rows = sum(int(part.ntotal) for part in disk.segments) + added
        if segments.should_compact(int(disk.base.ntotal), rows, len(disk.removed)):
            return None
        merged = len(disk.segments) + 1 > segments.MAX_SEGMENTS  # one segment of them all (not the base)
        removed = disk.removed[np.isin(disk.removed, disk.base_ids)] if merged else disk.removed
        changed = merged or len(disk.removed) != disk.saved_removed
        first = 1 if merged else 1 + len(disk.segments)
        count = rows - (len(disk.removed) - len(removed)) if merged else added
        manifest = segments.append(path, disk.manifest, lambda handle: disk.stream_to(handle, first), count,
                                   removed if changed else None, merged)
        segment = None
        if count:
            segment, why = vx.read_part(segments.part_path(path, manifest["segments"][-1]), self.dim, True)
            if segment is None:
                raise StoreDamaged(f"the segment just written over {path} reads back {why}")
        return disk.saved(manifest, segment, merged)

    def remove_stale_segments(self) -> list[str]:
        """Segment files no manifest names (a save killed between its steps), removed under the publish
        lock so no save is between its steps (nothing for a read-only process)."""
        if not self.layout.writable:
            return []
        with self.layout.file_lock():
            return segments.remove_orphans(self.layout.index_path)

    def rebuild_from_db(self, embedder: tuple[str, int] | None = None):
        """A fresh flat index of every stored vector (of `embedder`), and the tombstone seq it reflects."""
        index = vx.new_index(embedder[1] if embedder else self.dim)
        with self.db.session() as s:
            tomb_seq, _ = self.stored.tomb_state(s)
            for ids, matrix in self.stored.stored_vectors(session=s, embedder=embedder):
                index.add_with_ids(matrix, ids)
        return index, tomb_seq

    def swap(self, index, tomb_seq: int) -> None:
        """(Under `lock` and the file lock.) Serve `index`, just written to the index file, from now on;
        the segments of the base it replaced go."""
        self.index, self.tomb_seq, self.dirty = index, tomb_seq, False
        vx.index_digest(index)  # computed now, in a rebuild, rather than in the next save
        segments.remove_orphans(self.layout.index_path)
        self.file_state = segments.state(self.layout.index_path)
        self.on_reset()

    def reload_if_replaced(self) -> bool:
        """If another process replaced the index file, verify and serve the new one."""
        state = segments.state(self.layout.index_path)
        if state[0] is None or state == self.file_state:
            return False
        index, report = self.load_verified()
        with self.lock:
            self.index, self.report, self.file_state = index, report, state
            self.on_reset()
        return True

    def reload_if_cut(self) -> bool:
        """Before reading mapped pages: if a mapped file was cut short in place (vectors.MappedIndex.intact),
        serve the verified reload (the cut file is rebuilt from the database) instead of dying of SIGBUS."""
        if _whole(self.index):
            return False
        with self._reload_lock:  # one reload, not one per waiting request
            if _whole(self.index):
                return False
            log.warning("%s was cut short under this process: reloaded from the database",
                        self.layout.index_path.name)
            index, report = self.load_verified()
            with self.lock:
                self.index, self.report = index, report
                self.file_state = segments.state(self.layout.index_path)
                self.on_reset()
            return True

    # ----- changes made by this process -------------------------------------------------------
    def add(self, ids: np.ndarray, matrix: np.ndarray) -> None:
        """Vectors this process committed. A save or refresh between the commit and this call has read them
        from the database already: those are not added twice (a repeated id made the next file unreadable)."""
        ids = np.asarray(ids, np.int64)
        with self.lock:
            new = ~np.isin(ids, vx.index_ids(self.index))
            if not new.all():
                ids, matrix = ids[new], np.asarray(matrix)[new]
            if not len(ids):
                return
            self.index.add_with_ids(matrix, ids)
            self.on_added(ids, matrix)
            self.dirty = True

    def remove(self, ids: np.ndarray) -> None:
        with self.lock:
            self.index.remove_ids(ids)
            self.on_reset()

    # ----- reads ------------------------------------------------------------------------------
    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors by id, from the in-memory index; ids another process committed load from the db."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        self.reload_if_cut()
        with self.lock:
            try:
                return self.index.reconstruct_batch(ids)
            except RuntimeError:  # some id is not in this process's index yet
                absent = np.setdiff1d(ids, vx.index_ids(self.index))
        for batch_ids, matrix in self.stored.stored_vectors(absent):
            with self.lock:
                fresh = np.setdiff1d(batch_ids, vx.index_ids(self.index))
                if len(fresh):
                    keep = np.isin(batch_ids, fresh)
                    self.add(batch_ids[keep], matrix[keep])
        with self.lock:
            try:
                return self.index.reconstruct_batch(ids)
            except RuntimeError:
                gone = np.setdiff1d(ids, vx.index_ids(self.index))
                raise StoreInputError(f"{len(gone)} requested vectors are not in the store "
                                      f"(removed meanwhile?), e.g. id {int(gone[0])}") from None

    def present(self, ids: np.ndarray) -> np.ndarray:
        """The ids among `ids` the store still holds (a source removed meanwhile takes its vectors along)."""
        ids = np.asarray(ids, dtype=np.int64)
        with self.lock:
            here = np.isin(ids, vx.index_ids(self.index))
        if here.all():
            return ids
        with self.db.session() as s:
            stored = set(s.scalars(select(Vector.id).where(Vector.id.in_(ids[~here].tolist()))))
        return ids[here | np.isin(ids, list(stored))]

    def search(self, queries: np.ndarray, candidate_ids: np.ndarray, checksums: dict[int, str] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Inner products of each query with exactly the candidates, best first: (similarities, ids).

        The candidates are few (sources x K), so they are scored directly: exact, and independent of
        the store's size, where an ID-filtered FAISS scan grows with it (scripts/bench_lookup.py).
        `checksums` (vector id -> the database's checksum): each vector is checked first (`_as_stored`).
        """
        candidate_ids = np.asarray(candidate_ids, dtype=np.int64)
        served = self._served()  # before the read: checks are credited only to the index they were made on
        try:
            matrix = self.vectors(candidate_ids)
        except StoreInputError:  # some were removed meanwhile (a source removed by another process)
            candidate_ids = self.present(candidate_ids)
            matrix = self.vectors(candidate_ids)
        if checksums:
            matrix = self._as_stored(candidate_ids, matrix, checksums, served)
        sims = np.asarray(queries, np.float32) @ matrix.T
        order = np.argsort(-sims, axis=1, kind="stable")
        return np.take_along_axis(sims, order, axis=1), candidate_ids[order]

    def _served(self) -> tuple:
        """Which index is served, with its mapped files' state (inode, size, mtime: a write in place shows)."""
        with self.lock:
            index, generation = self.index, self._generation
        return generation, index.signature() if getattr(index, "mapped", False) else ()

    def _as_stored(self, ids: np.ndarray, matrix: np.ndarray, checksums: dict[int, str], served: tuple
                   ) -> np.ndarray:
        """The vectors a score uses, each as the database stores it. An open checks the files on a sample,
        so a vector damaged on disk (or in place under this process) could be served until `verify`: one
        whose bytes miss the database's checksum is read from the database instead, and replaced in the
        live index (a writable process's next save writes a new base). A vector is checked once per index
        served (hashing every scored vector of every request cost about a tenth of a cached request's CPU at
        ViT-L size); a row without a checksum (an older store's, until `verify --repair`) is not checked."""
        with self.lock:
            trusted = self._verified if served == self._verified_for == self._served_now() else set()
        todo = [i for i, vid in enumerate(ids.tolist()) if vid not in trusted and checksums.get(vid)]
        bad = [i for i, mine in zip(todo, vx.checksums(matrix[todo])) if checksums[int(ids[i])] != mine]
        if bad:
            matrix = self._repaired(ids, matrix, bad, checksums)
        with self.lock:
            if served != self._served_now():
                return matrix  # another index is served since the read: nothing is credited
            if served != self._verified_for or len(self._verified) > VERIFIED_MAX:
                self._verified, self._verified_for = set(), served
            self._verified.update(ids.tolist())
        return matrix

    def _served_now(self) -> tuple:
        """(Under `lock`.) `_served` without taking the lock again."""
        index = self.index
        return self._generation, index.signature() if getattr(index, "mapped", False) else ()

    def _repaired(self, ids: np.ndarray, matrix: np.ndarray, bad: list[int], checksums: dict[int, str]) -> np.ndarray:
        """`matrix` with the rows at `bad` read from the database, and those vectors replaced in the index."""
        matrix = matrix.copy()
        fixed: dict[int, np.ndarray] = {}
        for batch_ids, rows in self.stored.stored_vectors(ids[bad]):
            for vid, row in zip(batch_ids.tolist(), rows):
                if vx.checksum(row.tobytes()) != checksums[vid]:
                    raise self.db.damaged(f"holds vector {vid} whose bytes differ from its checksum")
                fixed[vid] = row
        for i in bad:
            if int(ids[i]) in fixed:  # else removed meanwhile: scored as read, as any removal racing a score
                matrix[i] = fixed[int(ids[i])]
        with self.lock:  # another thread may have replaced some already, a save dropped some removed meanwhile
            index = self.index
            held = np.array(sorted(fixed), np.int64)
            held = held[np.isin(held, vx.index_ids(index))] if len(held) else held
            still = [vid for vid, mine in zip(held.tolist(), vx.checksums(index.reconstruct_batch(held)))
                     if mine != checksums[vid]] if len(held) else []
            if still:
                index.remove_ids(np.array(still, np.int64))
                index.add_with_ids(np.stack([fixed[v] for v in still]), np.array(still, np.int64))
                self.dirty = self.rewrite = True
                self.on_reset()
                log.warning("%s held %d vectors that differ from the database: scored from the database and "
                            "replaced in this process's index (a writable process saves a new file; "
                            "`resynth verify --repair` rewrites it)", self.layout.index_path.name, len(still))
        return matrix
