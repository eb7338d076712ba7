"""A store directory: SQLite metadata (the source of truth) + a FAISS index kept in agreement with it.

Write order: image file, then one database transaction (image + vector rows), then the in-memory
FAISS index, saved atomically at the end of each batch. A crash can therefore only leave the FAISS
file *behind* the database (or ahead of it after a delete); `open` compares id sets and repairs
the index from the stored vectors, so the two never disagree when anyone reads them.

Several processes may use one store: SQLite serialises their writes, each keeps its own in-memory
index, and a search that meets a vector another process committed loads it from the database.
Within a process, a lock keeps FAISS searches apart from index mutation (FAISS is not safe there).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, delete, event, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from index import vectors as vx
from index.errors import StoreDamaged, StoreInputError, UnknownName
from index.keys import normalise_description, sha256_text
from index.schema import Base, Description, Image, Source, Vector

CONFIG_NAME = "store.json"
DB_NAME = "metadata.sqlite"
INDEX_NAME = "vectors.faiss"
FORMAT = 1


@dataclass
class NewImage:
    """One image to record, with its CLIP vector."""

    key: str
    role: str
    source_id: int
    description_id: int
    file_hash: str
    path: str
    vector: np.ndarray
    seed: int | None = None
    params_hash: str | None = None
    original_id: int | None = None


@dataclass
class StoredReference:
    """A stored vector a query can be compared with: a resynthesis, or a labelled original."""

    vector_id: int
    source: str
    seed: int | None
    file_hash: str
    key: str


@dataclass
class OpenReport:
    """What `open` found: how far the FAISS file was from the database and what was done about it."""

    rebuilt: bool = False
    added: int = 0
    removed: int = 0
    notes: list[str] = field(default_factory=list)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers run during a write
    cursor.execute("PRAGMA synchronous=FULL")  # a committed (acknowledged) write survives a crash
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    vx.fsync_dir(path.parent)


class Store:
    """Open with `Store.create` (new) or `Store.open` (existing); use as a context manager."""

    def __init__(self, root: Path, config: dict, writable: bool):
        self.root = root
        self.config = config
        self.writable = writable
        self.embedder_identity: str = config["embedder"]["identity"]
        self.dim: int = int(config["dim"])
        self._index_lock = threading.RLock()
        self.engine = create_engine(f"sqlite:///{root / DB_NAME}")
        event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self.session_factory = sessionmaker(self.engine, expire_on_commit=False)
        self._dirty = False
        self.index, self.open_report = self._load_verified_index()
        self._file_state = _file_state(self.index_path)

    # ----- lifecycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, embedder: dict, dim: int, captioner: str | None = None) -> "Store":
        root = Path(root)
        config_path = root / CONFIG_NAME
        if config_path.exists():
            existing = json.loads(config_path.read_text())
            if existing["embedder"]["identity"] != embedder["identity"]:
                raise StoreInputError(f"store {root} is already bound to embedder {existing['embedder']['identity']}; "
                                f"use another --store for {embedder['identity']}")
            store = cls.open(root)
            if captioner and captioner != store.config.get("captioner"):
                store.update_config(captioner=captioner)
            return store
        root.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT, "embedder": embedder, "dim": dim, "captioner": captioner}
        write_json_atomic(config_path, config)
        return cls(root, config, writable=True)

    @classmethod
    def open(cls, root: Path, writable: bool = True) -> "Store":
        root = Path(root)
        config_path = root / CONFIG_NAME
        if not config_path.exists():
            raise StoreInputError(f"no store at {root} (create one with `resynth init`)")
        try:
            config = json.loads(config_path.read_text())
            config["embedder"]["identity"], config["dim"]
        except (ValueError, KeyError, TypeError):
            raise StoreDamaged(f"store config {config_path} is malformed") from None
        if config.get("format") != FORMAT:
            raise StoreInputError(f"store {root} has format {config.get('format')}, this resynth reads {FORMAT}")
        return cls(root, config, writable)

    def update_config(self, **changes) -> None:
        self.config.update(changes)
        write_json_atomic(self.root / CONFIG_NAME, self.config)

    def close(self) -> None:
        if self.writable and self._dirty:
            self.save_index()
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def session(self) -> Session:
        return self.session_factory()

    # ----- the FAISS index -------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def _db_vector_ids(self) -> np.ndarray:
        with self.session() as s:
            ids = s.scalars(select(Vector.id).where(Vector.embedder == self.embedder_identity)).all()
        return np.array(sorted(ids), dtype=np.int64)

    def _stored_vectors(self, ids: np.ndarray | None = None, batch: int = 10000):
        """Yield (ids, matrix) batches from the database, for rebuilding without re-embedding."""
        base = select(Vector.id, Vector.data).where(Vector.embedder == self.embedder_identity).order_by(Vector.id)
        if ids is None:
            queries = [base]
        else:
            wanted = [int(i) for i in ids]
            queries = [base.where(Vector.id.in_(wanted[k:k + 500])) for k in range(0, len(wanted), 500)]
        with self.session() as s:
            chunk_ids, chunk = [], []
            for query in queries:
                for vid, data in s.execute(query).yield_per(batch):
                    chunk_ids.append(vid)
                    chunk.append(np.frombuffer(data, dtype=np.float32))
                    if len(chunk) == batch:
                        yield np.array(chunk_ids, np.int64), np.stack(chunk)
                        chunk_ids, chunk = [], []
            if chunk:
                yield np.array(chunk_ids, np.int64), np.stack(chunk)

    def _load_verified_index(self):
        report = OpenReport()
        db_ids = self._db_vector_ids()
        index = vx.read_index(self.index_path)
        if index is None or index.d != self.dim:
            if index is not None or len(db_ids):
                report.notes.append("index file missing or unreadable: rebuilt from stored vectors")
            index = self._rebuild_from_db()
            report.rebuilt = True
            report.added = int(index.ntotal)
        else:
            have = vx.index_ids(index)
            extra = np.setdiff1d(have, db_ids)
            missing = np.setdiff1d(db_ids, have)
            if len(extra):
                index.remove_ids(extra)
                report.removed = len(extra)
            for ids, matrix in (self._stored_vectors(missing) if len(missing) else ()):
                index.add_with_ids(matrix, ids)
                report.added += len(ids)
            if report.added or report.removed:
                report.notes.append(f"index repaired from database: +{report.added} -{report.removed} vectors")
        if (report.rebuilt and len(db_ids)) or report.added or report.removed:
            if self.writable:
                vx.write_atomic(index, self.index_path)
        return index, report

    def _rebuild_from_db(self):
        index = vx.new_index(self.dim)
        for ids, matrix in self._stored_vectors():
            index.add_with_ids(matrix, ids)
        return index

    def save_index(self) -> None:
        with self._index_lock:
            vx.write_atomic(self.index, self.index_path)
            self._file_state = _file_state(self.index_path)
            self._dirty = False

    def rebuild(self) -> int:
        """Recreate the FAISS index from stored vectors and swap it in atomically; returns its size."""
        fresh = self._rebuild_from_db()
        with self._index_lock:
            vx.write_atomic(fresh, self.index_path)
            self.index = fresh
            self._file_state = _file_state(self.index_path)
            self._dirty = False
        return int(fresh.ntotal)

    def refresh(self) -> bool:
        """Pick up what another process changed: store.json (e.g. `resynth calibrate`) and a replaced
        index file (e.g. `resynth rebuild`), which is verified and swapped in; True if the index changed."""
        try:
            config = json.loads((self.root / CONFIG_NAME).read_text())
            if config["embedder"]["identity"] == self.embedder_identity:
                self.config = config
        except (OSError, ValueError, KeyError, TypeError):
            pass  # keep the config this process has
        state = _file_state(self.index_path)
        if state is None or state == self._file_state:
            return False
        index, report = self._load_verified_index()
        with self._index_lock:
            self.index, self.open_report = index, report
            self._file_state = state
        return True

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors by id, from the in-memory index; ids another process committed load from SQLite."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        with self._index_lock:
            try:
                return self.index.reconstruct_batch(ids)
            except RuntimeError:  # some id is not in this process's index yet
                absent = np.setdiff1d(ids, vx.index_ids(self.index))
        for batch_ids, matrix in self._stored_vectors(absent):
            with self._index_lock:
                self.index.add_with_ids(matrix, batch_ids)
                self._dirty = True
        with self._index_lock:
            return self.index.reconstruct_batch(ids)

    def search(self, queries: np.ndarray, candidate_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inner products of each query with exactly the candidates, best first: (similarities, ids).

        The candidates are few (sources x K), so they are scored directly: exact, and independent of
        the store's size, where an ID-filtered FAISS scan grows with it (scripts/bench_lookup.py).
        """
        candidate_ids = np.asarray(candidate_ids, dtype=np.int64)
        sims = np.asarray(queries, np.float32) @ self.vectors(candidate_ids).T
        order = np.argsort(-sims, axis=1, kind="stable")
        return np.take_along_axis(sims, order, axis=1), candidate_ids[order]

    # ----- sources ---------------------------------------------------------------------------
    def add_source(self, name: str, kind: str, fingerprint: str, path: str | None = None,
                   params: dict | None = None) -> Source:
        with self.session() as s:
            if s.scalar(select(Source).where(Source.name == name)) is not None:
                raise StoreInputError(f"source {name!r} already exists (remove it first to change it)")
            source = Source(name=name, kind=kind, path=path, params_json=json.dumps(params or {}, sort_keys=True),
                            fingerprint=fingerprint)
            s.add(source)
            s.commit()
            return source

    def sources(self) -> list[Source]:
        with self.session() as s:
            return list(s.scalars(select(Source).order_by(Source.name)))

    def source(self, name: str) -> Source:
        with self.session() as s:
            found = s.scalar(select(Source).where(Source.name == name))
        if found is None:
            known = ", ".join(x.name for x in self.sources()) or "none registered"
            raise UnknownName(f"unknown source {name!r} (known: {known})")
        return found

    def remove_source(self, name: str) -> int:
        """Delete a source with its images and vectors; returns how many vectors were dropped."""
        source = self.source(name)
        with self.session() as s:
            image_ids = select(Image.id).where(Image.source_id == source.id)
            vector_ids = np.array(s.scalars(select(Vector.id).where(Vector.image_id.in_(image_ids))).all(), np.int64)
            # resyntheses of other sources that pointed at these originals lose the link, not their rows
            s.execute(update(Image).where(Image.original_id.in_(image_ids)).values(original_id=None))
            s.execute(delete(Vector).where(Vector.image_id.in_(image_ids)))
            s.execute(delete(Image).where(Image.source_id == source.id))
            s.execute(delete(Source).where(Source.id == source.id))
            s.commit()
        if len(vector_ids):
            with self._index_lock:
                self.index.remove_ids(vector_ids)
            self.save_index()
        shutil.rmtree(self.root / "images" / source.fingerprint[:16], ignore_errors=True)
        return len(vector_ids)

    # ----- descriptions and images -----------------------------------------------------------
    def description_id(self, text: str) -> int:
        """Id of a normalised description, created on first use."""
        normal = normalise_description(text)
        digest = sha256_text(normal)
        with self.session() as s:
            found = s.scalar(select(Description.id).where(Description.hash == digest))
            if found is not None:
                return found
            row = Description(text=normal, hash=digest)
            s.add(row)
            s.commit()
            return row.id

    def find_description_id(self, text: str) -> int | None:
        """Id of a stored description, without creating it (lookups stay read-only)."""
        with self.session() as s:
            return s.scalar(select(Description.id).where(
                Description.hash == sha256_text(normalise_description(text))))

    def description_for_file(self, file_hash: str) -> str | None:
        """A stored description of an image with these bytes (an ingested original), if any."""
        with self.session() as s:
            return s.scalar(select(Description.text).join(Image, Image.description_id == Description.id)
                            .where(Image.file_hash == file_hash).order_by(Image.role).limit(1))

    def existing_keys(self, keys: list[str]) -> dict[str, int]:
        """Map of key -> vector id for the keys already stored (the cache lookup)."""
        found: dict[str, int] = {}
        with self.session() as s:
            for start in range(0, len(keys), 500):
                rows = s.execute(select(Image.key, Vector.id).join(Vector, Vector.image_id == Image.id)
                                 .where(Image.key.in_(keys[start:start + 500]),
                                        Vector.embedder == self.embedder_identity))
                found.update({key: vid for key, vid in rows})
        return found

    def resyntheses(self, description_id: int, source_ids: list[int] | None = None) -> list[StoredReference]:
        """Every stored resynthesis vector of one description (optionally of some sources only)."""
        query = (select(Vector.id, Source.name, Image.seed, Image.file_hash, Image.key)
                 .join(Image, Vector.image_id == Image.id).join(Source, Image.source_id == Source.id)
                 .where(Image.role == "resynthesis", Image.description_id == description_id,
                        Vector.embedder == self.embedder_identity)
                 .order_by(Source.name, Image.seed, Image.id))
        if source_ids is not None:
            query = query.where(Image.source_id.in_(source_ids))
        with self.session() as s:
            return [StoredReference(*row) for row in s.execute(query)]

    def originals(self, source_ids: list[int], per_source: int) -> list[StoredReference]:
        """Up to `per_source` stored labelled originals of each source (oldest first), any description."""
        query = (select(Vector.id, Source.name, Image.seed, Image.file_hash, Image.key)
                 .join(Image, Vector.image_id == Image.id).join(Source, Image.source_id == Source.id)
                 .where(Image.role == "original", Image.source_id.in_(source_ids),
                        Vector.embedder == self.embedder_identity)
                 .order_by(Source.name, Image.id))
        kept: dict[str, int] = {}
        out = []
        with self.session() as s:
            for row in s.execute(query):
                if kept.get(row[1], 0) < per_source:
                    kept[row[1]] = kept.get(row[1], 0) + 1
                    out.append(StoredReference(*row))
        return out

    def add_images(self, rows: list[NewImage]) -> list[int]:
        """Record images and vectors in one transaction, then add them to the in-memory index.

        Returns the new image ids.
        """
        if not rows:
            return []
        matrix = np.stack([np.asarray(r.vector, np.float32) for r in rows])
        if matrix.shape[1] != self.dim:
            raise StoreInputError(f"vector size {matrix.shape[1]} does not match the store's {self.dim}")
        with self.session() as s:
            vectors, image_ids = [], []
            for row, vec in zip(rows, matrix):
                image = Image(key=row.key, role=row.role, source_id=row.source_id, description_id=row.description_id,
                              seed=row.seed, params_hash=row.params_hash, file_hash=row.file_hash, path=row.path,
                              original_id=row.original_id)
                s.add(image)
                s.flush()
                image_ids.append(image.id)
                vector = Vector(image_id=image.id, embedder=self.embedder_identity, data=vec.tobytes())
                s.add(vector)
                vectors.append(vector)
            s.flush()
            ids = np.array([v.id for v in vectors], np.int64)
            s.commit()
        with self._index_lock:
            self.index.add_with_ids(matrix, ids)
            self._dirty = True
        return image_ids

    def original_id_for_file(self, file_hash: str) -> int | None:
        with self.session() as s:
            return s.scalar(select(Image.id).where(Image.file_hash == file_hash, Image.role == "original").limit(1))

    def image_id_for_key(self, key: str) -> int | None:
        with self.session() as s:
            return s.scalar(select(Image.id).where(Image.key == key))

    def resolve_path(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.root / path

    # ----- numbers ---------------------------------------------------------------------------
    def stats(self) -> dict:
        with self.session() as s:
            per_source = s.execute(select(Source.name, Source.kind, Image.role, func.count(Image.id))
                                   .join(Image, Image.source_id == Source.id, isouter=True)
                                   .group_by(Source.name, Source.kind, Image.role)).all()
            descriptions = s.scalar(select(func.count(Description.id)))
            vectors = s.scalar(select(func.count(Vector.id)))
        sources: dict[str, dict] = {}
        for name, kind, role, count in per_source:
            entry = sources.setdefault(name, {"kind": kind, "originals": 0, "resyntheses": 0})
            if role == "original":
                entry["originals"] = count
            elif role == "resynthesis":
                entry["resyntheses"] = count
        return {"store": str(self.root), "embedder": self.embedder_identity, "dim": self.dim,
                "sources": sources, "descriptions": descriptions, "vectors": vectors,
                "index_vectors": int(self.index.ntotal)}


def _file_state(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns
