"""A store directory: SQLite metadata (the source of truth) + a FAISS index kept in agreement with it.

The metadata may instead live in PostgreSQL (`Store.create(..., db_url="postgresql+psycopg://user@host/db")`,
recorded in store.json without any password: libpq reads PGPASSWORD, resynth also RESYNTH_DB_PASSWORD).
The guarantees are the same: every write transaction first takes a transaction-scoped advisory lock (the
single writer SQLite's BEGIN IMMEDIATE gives), reads run in REPEATABLE READ snapshots (what a WAL read
transaction gives), unique rows are got-or-created with ON CONFLICT, and one database holds one store.

Trust rules:
* The database is never created implicitly: only `Store.create` makes one. `open` first checks that
  metadata.sqlite is there, non-empty, a SQLite file with the store's tables, and answers a probe;
  otherwise it raises StoreDamaged and touches no file. A read-only open never writes a store file.
* Write order: image file, then one database transaction (image + vector rows with a checksum each),
  then the in-memory FAISS index, saved atomically (temp file, fsync, rename) under a cross-process
  lock after merging whatever other processes committed or deleted. A crash can therefore only leave
  the FAISS file *behind* the database, or ahead of it by ids the database records as deleted
  (tombstones). An id in the file that the database neither holds nor records as deleted means the
  database lost data: StoreDamaged, and the FAISS file is left as it is.
* Content is verified, not only ids: at open a sample of index vectors is compared with their
  checksums; any mismatch (or a file of another index type) is rebuilt from the database, never served.
* Races are normal: unique rows are got-or-created in one statement, and a claim row with a lease
  makes a generation happen once across processes (`claim` / `release` / `wait_for_keys`).

Within a process, a lock keeps FAISS searches apart from index mutation (FAISS is not safe there).

Dataset search (`nearest`): vectors.faiss (IDMap2 over a flat index) stays the verified copy. `rebuild`
also builds, offline, a search index chosen by vectors.choose_index from the vector count and a memory
budget: "Flat" (the exact scan of vectors.faiss, no second file) up to FLAT_MAX vectors, IVF beyond it
(search.faiss, with search.json: type, count, nprobe chosen for recall@32 >= 0.95, timings). At open it
is checked cheaply (size, count and id digest against its infos, ids against the database, a sample of
vectors that must find themselves); a stale or unreadable one is ignored, never served. Vectors added
since the build are searched exactly and merged in; ids deleted since are skipped by an IDSelector.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, delete, event, func, select, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from index import vectors as vx
from index.faults import crash_point
from index.errors import StoreDamaged, StoreError, StoreInputError, UnknownName
from index.keys import image_key, normalise_description, sha256_file, sha256_text
from index.schema import (ADDED_TABLES, CORE_TABLES, Base, Claim, DeletedVector, Description, Image, Source,
                          StoreMeta, Vector, VectorSet)
from index.schema import _now as _utcnow

CONFIG_NAME = "store.json"
DB_NAME = "metadata.sqlite"
INDEX_NAME = "vectors.faiss"
SEARCH_NAME = "search.faiss"  # the search index (IVF) built by rebuild(); absent while exact search suffices
SEARCH_INFOS = "search.json"  # what rebuild() chose and measured for it (type, count, nprobe, recall, timings)
LOCK_NAME = "store.lock"
FORMAT = 1
SAMPLE = 256  # index vectors checked against their checksums at open (all of them up to FULL_CHECK)
FULL_CHECK = 4096
QUICK_CHECK_MAX_BYTES = 64 << 20  # PRAGMA quick_check at open only for databases up to this size
ORPHAN_GRACE_S = 600.0  # an unreferenced image file younger than this may be a commit in flight
RESTORE = "restore metadata.sqlite from a backup"
TEMP_RE = re.compile(r"^\..+\.(\d+)\.tmp$")
_CORRUPT = ("not a database", "malformed", "corrupt", "disk image")
PG_WRITE_LOCK = 0x7265_7379_6E74_6801  # pg_advisory_xact_lock key of a store's single writer ("resynth")
PG_DRIVERS = ("postgresql", "postgresql+psycopg")
PASSWORD_ENV = "RESYNTH_DB_PASSWORD"


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
class _Search:
    """A verified IVF search index: its FAISS index, the ids it holds (sorted), where each one is (inverted
    list and offset, aligned with ids) and its infos."""

    index: object
    ids: np.ndarray
    infos: dict
    numbers: np.ndarray | None = None
    offsets: np.ndarray | None = None

    @property
    def nprobe(self) -> int:
        return int(self.infos["nprobe"])

    @property
    def rescored(self) -> bool:
        return bool(self.infos.get("rerank"))


VECTOR_SET_TRIGGERS = {True: ("vector_sets_insert", "vector_sets_delete", "vector_sets_update"),
                       False: ("resynth_vector_sets",)}


def _vector_set_ddl(sqlite: bool) -> list[str]:
    """Triggers that keep vector_sets (count, id sum, id mix sum: index.vectors.id_digest) in step with
    every change to `vectors`, cascades and other tools' writes included."""
    m, mix = vx.DIGEST_MOD, lambda v: f"((({v}.id % {vx.MIX_MOD}) * {vx.MIX_MUL} + {vx.MIX_ADD}) % {vx.MIX_MOD})"
    def add(v: str) -> str:
        return (f"UPDATE vector_sets SET n = n + 1, id_sum = (id_sum + {v}.id % {m}) % {m}, "
                f"id_mix = (id_mix + {mix(v)}) % {m} WHERE embedder = {v}.embedder;")
    def drop(v: str) -> str:
        return (f"UPDATE vector_sets SET n = n - 1, id_sum = (id_sum + {m} - {v}.id % {m}) % {m}, "
                f"id_mix = (id_mix + {m} - {mix(v)}) % {m} WHERE embedder = {v}.embedder;")
    if sqlite:
        ensure = "INSERT OR IGNORE INTO vector_sets (embedder, n, id_sum, id_mix) VALUES (NEW.embedder, 0, 0, 0);"
        return [f"DROP TRIGGER IF EXISTS {name}" for name in VECTOR_SET_TRIGGERS[True]] + [
            f"CREATE TRIGGER vector_sets_insert AFTER INSERT ON vectors BEGIN {ensure} {add('NEW')} END",
            f"CREATE TRIGGER vector_sets_delete AFTER DELETE ON vectors BEGIN {drop('OLD')} END",
            f"CREATE TRIGGER vector_sets_update AFTER UPDATE OF id, embedder ON vectors "
            f"BEGIN {drop('OLD')} {ensure} {add('NEW')} END"]
    ensure = ("INSERT INTO vector_sets (embedder, n, id_sum, id_mix) VALUES (NEW.embedder, 0, 0, 0) "
              "ON CONFLICT (embedder) DO NOTHING;")
    return ["DROP TRIGGER IF EXISTS resynth_vector_sets ON vectors",
            "CREATE OR REPLACE FUNCTION resynth_vector_sets() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF TG_OP <> 'INSERT' THEN {drop('OLD')} END IF; "
            f"IF TG_OP <> 'DELETE' THEN {ensure} {add('NEW')} END IF; RETURN NULL; END $$",
            "CREATE TRIGGER resynth_vector_sets AFTER INSERT OR DELETE OR UPDATE OF id, embedder ON vectors "
            "FOR EACH ROW EXECUTE FUNCTION resynth_vector_sets()"]


@dataclass
class OpenReport:
    """What `open` found: how far the FAISS file was from the database and what was done about it."""

    rebuilt: bool = False
    added: int = 0
    removed: int = 0
    checked: int = 0  # index vectors compared with their checksums
    digest: bool = False  # ids compared by the database's id digest, not read one by one
    notes: list[str] = field(default_factory=list)


def _sqlite_pragmas(writable: bool):
    def apply(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        if writable:
            cursor.execute("PRAGMA journal_mode=WAL")  # readers run during a write
        cursor.execute("PRAGMA synchronous=FULL")  # a committed (acknowledged) write survives a crash
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()
    return apply


def _corruption(exc: BaseException | None) -> str | None:
    """The one-line reason if a database error means the file is damaged (not busy, not a bug)."""
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.IntegrityError):
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if any(word in text.lower() for word in _CORRUPT):
            return text
    return None


def _damaged(path: Path, what: str) -> StoreDamaged:
    return StoreDamaged(f"{path} {what}: {RESTORE} (vectors.faiss cannot replace it)")


def _make_engine(path: Path, mode: str):
    """An engine on exactly this file: mode rwc (create), rw (must exist) or ro (never writes the file)."""
    uri = path.resolve().as_uri() + f"?mode={mode}"

    def connect():
        return sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=30)

    engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool)
    event.listen(engine, "connect", _sqlite_pragmas(mode != "ro"))

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:  # explicit transactions; writers take the write lock up front (no BUSY upgrade)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

    @event.listens_for(engine, "handle_error")
    def _on_error(context) -> None:
        reason = _corruption(context.original_exception)
        if reason:
            raise _damaged(path, f"is damaged ({reason})") from None

    return engine


def parse_db_url(text: str) -> URL:
    """A PostgreSQL URL as store.json records it: driver psycopg, no password (StoreInputError otherwise).

    Messages never repeat the URL text: it may hold the very password they refuse."""
    try:
        url = make_url(str(text).strip())
    except Exception:
        raise StoreInputError("--db is not a database URL (expected postgresql+psycopg://USER@HOST:PORT/DBNAME)") \
            from None
    if url.drivername not in PG_DRIVERS:
        hint = " (SQLite is the default: leave --db out)" if url.drivername.startswith("sqlite") else ""
        raise StoreInputError(f"--db must be a PostgreSQL URL (postgresql+psycopg://USER@HOST:PORT/DBNAME), "
                              f"not {url.drivername}{hint}")
    if url.password is not None or "password" in url.query:
        raise StoreInputError("--db must not contain a password (it would be written to store.json): "
                              f"set PGPASSWORD or {PASSWORD_ENV} in the environment instead")
    if not url.database:
        raise StoreInputError("--db names no database (expected postgresql+psycopg://USER@HOST:PORT/DBNAME)")
    return url.set(drivername="postgresql+psycopg")


def db_label(url: URL) -> str:
    """How messages name a PostgreSQL store database: host, port and name, never a password."""
    return f"PostgreSQL database {url.database!r} at {url.host or 'localhost'}:{url.port or 5432}"


def _pg_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _pg_error(exc: BaseException | None, label: str) -> StoreError | None:
    """A PostgreSQL error that is not a bug in resynth, as a one-line StoreError (never "file damaged":
    the server owns its files). Connection failures, timeouts, an unknown database or role."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - no driver, no PostgreSQL errors
        return None
    if isinstance(exc, psycopg.OperationalError):
        state = getattr(exc, "sqlstate", None) or ""
        if not state or state.startswith(("08", "57P", "3D", "28")):  # no connection, shut down, no db, no login
            return StoreError(f"cannot reach {label}: {_pg_reason(exc)}")
        return StoreError(f"{label}: {_pg_reason(exc)}")
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return StoreInputError(f"{label} is open read-only")
    return None


def _make_pg_engine(url: URL, mode: str, label: str):
    """An engine on a PostgreSQL database: pooled with pre-ping (several machines, server restarts),
    REPEATABLE READ snapshots for reads, and read-only sessions for a read-only open (`mode` "ro")."""
    password = os.environ.get(PASSWORD_ENV)
    if password:
        url = url.set(password=password)
    # lock_timeout: a writer waits for the write lock as long as SQLite's busy_timeout lets it (30 s)
    options = "-c lock_timeout=30000" + (" -c default_transaction_read_only=on" if mode == "ro" else "")
    connect_args: dict = {"connect_timeout": 10, "application_name": "resynth", "options": options}
    try:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args=connect_args,
                               isolation_level="REPEATABLE READ")
    except ModuleNotFoundError:
        raise StoreInputError("PostgreSQL metadata needs the psycopg driver: pip install 'resynth[postgres]'") \
            from None

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:  # a writer holds the store's write lock until its commit (one writer at a time)
        if conn.get_execution_options().get("immediate"):
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_WRITE_LOCK})")

    @event.listens_for(engine, "handle_error")
    def _on_error(context) -> None:
        if getattr(context, "is_pre_ping", False):
            return  # the pool reconnects on its own
        problem = _pg_error(context.original_exception, label)
        if problem is not None:
            raise problem from None

    return engine


def _dialect_insert(session: Session):
    """The dialect's INSERT with ON CONFLICT support (SQLite now, PostgreSQL later)."""
    name = session.get_bind().dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise StoreError(f"database dialect {name} has no get-or-create support here")
    return insert


def insert_ignore(session: Session, model, values: dict, conflict: list[str]):
    """INSERT ... ON CONFLICT DO NOTHING; `made(result)` says whether a row was made."""
    insert = _dialect_insert(session)
    return session.execute(insert(model.__table__).values(**values).on_conflict_do_nothing(index_elements=conflict))


def made(result) -> bool:
    """Whether an `insert_ignore` made its row. SQLite reports it in rowcount; PostgreSQL fetches the new
    key with RETURNING (rowcount -1 then), which comes back empty when the conflict skipped the row."""
    if result.rowcount >= 0:
        return result.rowcount == 1
    key = result.inserted_primary_key
    return key is not None and key[0] is not None


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, value: dict, point: str = "config:before-replace") -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    crash_point(point)
    os.replace(tmp, path)
    vx.fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop_own_sidecars(paths: list[Path]) -> None:
    """After a refused open: remove the empty -wal/-shm files SQLite made for this open (they did not
    exist before it), so that a refused open leaves the store's folder as it found it."""
    wal = next((p for p in paths if p.name.endswith("-wal")), None)
    if wal is not None and wal.exists() and wal.stat().st_size:
        return  # holds data someone wrote: not ours to remove
    for path in paths:
        path.unlink(missing_ok=True)


def _check_database_file(path: Path) -> None:
    """Before SQLite sees the file (its connect would create an empty one): there, non-empty, SQLite."""
    if not path.is_file():
        raise _damaged(path, "is missing")
    size = path.stat().st_size
    if size == 0:
        raise _damaged(path, "is empty")
    with open(path, "rb") as handle:
        header = handle.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        raise _damaged(path, "is not a SQLite database (damaged header)")


class Store:
    """Open with `Store.create` (new) or `Store.open` (existing); use as a context manager."""

    def __init__(self, root: Path, config: dict, writable: bool, *, create: bool = False, repair: bool = False):
        self.root = root
        self.config = config
        self.writable = writable
        self.repair = repair
        self.embedder_identity: str = config["embedder"]["identity"]
        self.dim: int = int(config["dim"])
        self._index_lock = threading.RLock()
        self._dirty = False
        self._tomb_seq = 0
        self._search: _Search | None = None  # the IVF search index when one is present and verified
        self._delta: dict | None = None  # what the live index has that the search index lacks, and vice versa
        self.search_state: dict = {"state": "absent"}
        db_path = root / DB_NAME
        mode = "rwc" if create else ("rw" if writable else "ro")
        absent: list[Path] = []
        self.db_url: URL | None = None
        if config.get("db"):
            try:
                self.db_url = parse_db_url(config["db"])
            except StoreInputError:
                raise StoreDamaged(f"store config {root / CONFIG_NAME} has an unusable database URL: "
                                   "restore it from a backup") from None
            self.db_label = db_label(self.db_url)
            self.restore_hint = f"restore {self.db_label} from a backup"
            self.engine = _make_pg_engine(self.db_url, mode, self.db_label)
            # writers see each statement's latest committed state once they hold the write lock
            self._write_engine = self.engine.execution_options(immediate=True, isolation_level="READ COMMITTED")
        else:
            self.db_label, self.restore_hint = str(db_path), RESTORE
            if not create:
                _check_database_file(db_path)
            sidecars = [db_path.with_name(db_path.name + suffix) for suffix in ("-wal", "-shm")]
            absent = [p for p in sidecars if not p.exists()]
            self.engine = _make_engine(db_path, mode)
            self._write_engine = self.engine.execution_options(immediate=True)
        self.is_sqlite = self.db_url is None
        self.session_factory = sessionmaker(self.engine, expire_on_commit=False)
        self._write_factory = sessionmaker(self._write_engine, expire_on_commit=False)
        try:
            if create:
                self._create_schema()
            self._probe(db_path)
            self._adopt_switched_embedder()
            if writable:
                self._migrate()
                self.remove_stale_temp_files()
            self.index, self.open_report = self._load_verified_index()
            self._load_search()
        except BaseException as exc:
            self.engine.dispose()
            if isinstance(exc, StoreDamaged):
                _drop_own_sidecars(absent)
            raise
        self._file_state = _file_state(self.index_path)

    # ----- lifecycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, embedder: dict, dim: int, captioner: str | None = None,
               db_url: str | None = None) -> "Store":
        """A new store (the only way a database is made), or the existing one at `root`.

        `db_url` (postgresql+psycopg://USER@HOST:PORT/DBNAME, no password) puts the metadata and vectors in
        that PostgreSQL database instead of metadata.sqlite; a database holds one store: joining one bound
        to another embedder is refused."""
        root = Path(root)
        config_path = root / CONFIG_NAME
        url = parse_db_url(db_url) if db_url else None
        if config_path.exists():
            existing = json.loads(config_path.read_text())
            if existing["embedder"]["identity"] != embedder["identity"]:
                raise StoreInputError(f"store {root} is already bound to embedder {existing['embedder']['identity']}; "
                                      f"use another --store for {embedder['identity']}")
            if url is not None and existing.get("db") != url.render_as_string(hide_password=False):
                where = db_label(parse_db_url(existing["db"])) if existing.get("db") else "metadata.sqlite"
                raise StoreInputError(f"store {root} already keeps its metadata in {where}; use another --store")
            store = cls.open(root)
            if captioner and captioner != store.config.get("captioner"):
                store.update_config(captioner=captioner)
            return store
        made = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT, "embedder": embedder, "dim": dim, "captioner": captioner}
        if url is not None:
            config["db"] = url.render_as_string(hide_password=False)  # parse_db_url refused any password
        try:
            store = cls(root, config, writable=True, create=True)
        except BaseException:
            if made and root.is_dir() and not any(root.iterdir()):
                root.rmdir()  # e.g. the server refused: leave no empty store folder behind
            raise
        write_json_atomic(config_path, config)  # last: store.json marks a complete store
        return store

    @classmethod
    def open(cls, root: Path, writable: bool = True, repair: bool = False) -> "Store":
        """Open an existing store. `repair=True` accepts the database as it is when the index holds
        vectors the database lost (the index is rebuilt from it) instead of raising StoreDamaged."""
        root = Path(root)
        config_path = root / CONFIG_NAME
        if not config_path.exists():
            raise StoreInputError(f"no store at {root} (create one with `resynth init`)")
        try:
            config = json.loads(config_path.read_text())
            config["embedder"]["identity"], config["dim"]
        except (ValueError, KeyError, TypeError):
            raise StoreDamaged(f"store config {config_path} is malformed: restore it from a backup") from None
        if config.get("format") != FORMAT:
            raise StoreInputError(f"store {root} has format {config.get('format')}, this resynth reads {FORMAT}")
        return cls(root, config, writable, repair=repair)

    def update_config(self, **changes) -> None:
        self._require_writable()
        self.config.update(changes)
        write_json_atomic(self.root / CONFIG_NAME, self.config)

    def close(self) -> None:
        try:
            if self.writable and self._dirty:
                self.save_index()
        finally:
            self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def session(self) -> Session:
        """A session for reads (and ORM writes that need no get-or-create)."""
        return self.session_factory()

    def _write_session(self) -> Session:
        """A session whose transaction takes SQLite's write lock at BEGIN (no lock-upgrade failures)."""
        self._require_writable()
        return self._write_factory()

    @property
    def _db_name(self) -> str:
        return DB_NAME if self.is_sqlite else self.db_label

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreInputError(f"store {self.root} is open read-only")

    # ----- the database: creation, probe, migration ------------------------------------------
    def _create_schema(self) -> None:
        with self._write_engine.begin() as conn:
            Base.metadata.create_all(conn)
            if conn.scalar(select(StoreMeta.value).where(StoreMeta.key == "tombstones_from")) is None:
                conn.execute(StoreMeta.__table__.insert().values(key="tombstones_from", value="0"))
            if not self.is_sqlite:  # one store per database: a second folder may join it, same embedder only
                bound = conn.scalar(select(StoreMeta.value).where(StoreMeta.key == "embedder"))
                if bound is None:
                    conn.execute(StoreMeta.__table__.insert().values(key="embedder", value=self.embedder_identity))
                    conn.execute(StoreMeta.__table__.insert().values(key="dim", value=str(self.dim)))
                elif bound != self.embedder_identity:
                    raise StoreInputError(f"{self.db_label} already holds a store bound to embedder {bound}; "
                                          "use another database for another embedder")

    def _check_binding(self, conn) -> None:
        """(PostgreSQL) The database's store must be the one store.json describes."""
        rows = dict(conn.execute(select(StoreMeta.key, StoreMeta.value)
                                 .where(StoreMeta.key.in_(["embedder", "dim", "config"]))).all())
        switched = json.loads(rows["config"])["embedder"]["identity"] if rows.get("config") else None
        if switched is not None and switched == rows.get("embedder"):
            return  # a `reembed` switch store.json has not caught up with yet: adopted right after the probe
        if rows.get("embedder") not in (None, self.embedder_identity) or rows.get("dim") not in (None, str(self.dim)):
            raise StoreInputError(f"{self.db_label} holds a store bound to embedder {rows.get('embedder')} "
                                  f"({rows.get('dim')}-d), not this store's {self.embedder_identity}")

    def _damaged(self, what: str) -> StoreDamaged:
        if self.is_sqlite:
            return _damaged(self.root / DB_NAME, what)
        return StoreDamaged(f"{self.db_label} {what}: {self.restore_hint} (vectors.faiss cannot replace it)")

    def _tables(self, conn) -> set[str]:
        if self.is_sqlite:
            return set(conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'").scalars())
        return set(conn.exec_driver_sql("SELECT table_name FROM information_schema.tables "
                                        "WHERE table_schema = current_schema()").scalars())

    def _columns(self, conn, table: str) -> set[str]:
        if self.is_sqlite:
            return {row[1] for row in conn.exec_driver_sql(f"PRAGMA table_info({table})")}
        return set(conn.exec_driver_sql("SELECT column_name FROM information_schema.columns WHERE table_schema = "
                                        f"current_schema() AND table_name = '{table}'").scalars())

    def _probe(self, db_path: Path) -> None:
        """Cheap sanity of the source of truth: the store's tables, readable, and (SQLite) quick_check if
        small. PostgreSQL checks its own pages; there the store's binding (embedder) is checked instead."""
        try:
            with self.engine.connect() as conn:
                tables = self._tables(conn)
                missing = [t for t in CORE_TABLES if t not in tables]
                if missing:
                    raise self._damaged(f"lacks the store's tables ({', '.join(missing)})")
                conn.exec_driver_sql("SELECT max(id) FROM vectors").all()
                conn.exec_driver_sql("SELECT max(id) FROM images").all()
                if self.is_sqlite and db_path.stat().st_size <= QUICK_CHECK_MAX_BYTES:
                    result = conn.exec_driver_sql("PRAGMA quick_check(1)").scalar()
                    if result != "ok":
                        raise _damaged(db_path, f"fails its integrity check ({str(result).splitlines()[0]})")
                columns = self._columns(conn, "vectors")
                triggers = self._vector_set_triggers(conn)
                if not self.is_sqlite and "store_meta" in tables:
                    self._check_binding(conn)
            self._has_checksums = "checksum" in columns
            self._has_tombstones = "deleted_vectors" in tables
            self._has_claims = "claims" in tables
            self._has_vector_sets = "vector_sets" in tables and triggers
        except DBAPIError as exc:
            reason = str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__
            if not self.is_sqlite:
                raise StoreError(f"cannot reach {self.db_label}: {reason}") from None
            if "locked" in reason or "busy" in reason:
                raise StoreError(f"{db_path} is locked by another process; try again") from None
            raise _damaged(db_path, f"cannot be read ({reason})") from None

    def _migrate(self) -> None:
        """Bring a database made by an older resynth up to date (writable opens only): checksum column
        (backfilled), tombstones, claims. Ids allocated before tombstones existed count as deleted."""
        if self._has_checksums and self._has_tombstones and self._has_claims and self._has_vector_sets:
            return
        with self._write_engine.begin() as conn:
            if "checksum" not in self._columns(conn, "vectors"):
                conn.exec_driver_sql("ALTER TABLE vectors ADD COLUMN checksum VARCHAR(32)")
            tables = self._tables(conn)
            Base.metadata.create_all(conn, tables=list(ADDED_TABLES))
            if conn.scalar(select(StoreMeta.value).where(StoreMeta.key == "tombstones_from")) is None:
                floor = 0
                if "sqlite_sequence" in tables:
                    floor = conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name='vectors'").scalar() or 0
                elif not self.is_sqlite:  # the highest id the sequence ever handed out (deleted ones included)
                    floor = conn.exec_driver_sql(
                        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM vectors_id_seq").scalar() or 0
                floor = max(int(floor), int(conn.scalar(select(func.max(Vector.id))) or 0))
                conn.execute(StoreMeta.__table__.insert().values(key="tombstones_from", value=str(floor)))
            if not self.is_sqlite and conn.scalar(select(StoreMeta.value).where(StoreMeta.key == "embedder")) is None:
                conn.execute(StoreMeta.__table__.insert().values(key="embedder", value=self.embedder_identity))
                conn.execute(StoreMeta.__table__.insert().values(key="dim", value=str(self.dim)))
            if not self._vector_set_triggers(conn):  # in the same transaction: no insert slips past the count
                for statement in _vector_set_ddl(self.is_sqlite):
                    self._raw_sql(conn, statement)
                self._recount_vector_sets(conn)
        self._has_checksums = self._has_tombstones = self._has_claims = self._has_vector_sets = True
        self._backfill_checksums()

    def _vector_set_triggers(self, conn) -> bool:
        """Whether the triggers that keep vector_sets are installed (all of them)."""
        if self.is_sqlite:
            names = set(conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='trigger'").scalars())
        else:
            names = set(conn.exec_driver_sql("SELECT tgname FROM pg_trigger WHERE tgrelid = "
                                             "to_regclass('vectors') AND NOT tgisinternal").scalars())
        return set(VECTOR_SET_TRIGGERS[self.is_sqlite]) <= names

    def _recount_vector_sets(self, conn=None) -> None:
        """Recompute vector_sets from the vectors table (one scan, under the write lock)."""
        if conn is None:
            with self._write_engine.begin() as conn:
                return self._recount_vector_sets(conn)
        conn.execute(delete(VectorSet))
        mix = f"(((id % {vx.MIX_MOD}) * {vx.MIX_MUL} + {vx.MIX_ADD}) % {vx.MIX_MOD})"
        self._raw_sql(conn, f"INSERT INTO vector_sets (embedder, n, id_sum, id_mix) SELECT embedder, count(*), "
                            f"sum(id) % {vx.DIGEST_MOD}, sum({mix}) % {vx.DIGEST_MOD} FROM vectors GROUP BY embedder")

    def _raw_sql(self, conn, statement: str) -> None:
        """A literal statement (no parameters): psycopg's paramstyle needs its '%' operators doubled."""
        conn.exec_driver_sql(statement if self.is_sqlite else statement.replace("%", "%%"))

    def _backfill_checksums(self, batch: int = 2000) -> int:
        done = 0
        while True:
            with self._write_session() as s:
                rows = s.execute(select(Vector.id, Vector.data).where(Vector.checksum.is_(None)).limit(batch)).all()
                for vid, data in rows:
                    s.execute(update(Vector).where(Vector.id == vid).values(checksum=vx.checksum(data)))
                s.commit()
            done += len(rows)
            if len(rows) < batch:
                return done

    # ----- housekeeping ----------------------------------------------------------------------
    def _temp_files(self, deep: bool = False) -> list[Path]:
        found = [p for p in self.root.glob(".*.tmp") if TEMP_RE.match(p.name)]
        if deep and (self.root / "images").is_dir():
            found += [p for p in (self.root / "images").rglob(".*.tmp") if TEMP_RE.match(p.name)]
        return found

    def remove_stale_temp_files(self, deep: bool = False) -> list[str]:
        """Remove `.NAME.<pid>.tmp` leftovers whose writer is dead (at the root; under images/ if deep)."""
        removed = []
        for path in self._temp_files(deep):
            pid = int(TEMP_RE.match(path.name).group(1))
            if pid != os.getpid() and not _pid_alive(pid):
                path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(self.root)))
        return removed

    @contextmanager
    def _file_lock(self):
        """Cross-process lock for publishing vectors.faiss (flock on store.lock in the store folder)."""
        self._require_writable()
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # ----- the FAISS index -------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        """The index file store.json names (a re-embedded store names a new one, so the switch is one
        atomic replace of store.json)."""
        return self.root / self.config.get("index_file", INDEX_NAME)

    def _db_vector_ids(self, session: Session | None = None) -> np.ndarray:
        query = select(Vector.id).where(Vector.embedder == self.embedder_identity)
        if session is not None:
            return np.array(sorted(session.scalars(query).all()), dtype=np.int64)
        with self.session() as s:
            return np.array(sorted(s.scalars(query).all()), dtype=np.int64)

    def _tomb_state(self, s: Session) -> tuple[int, int]:
        """(highest tombstone seq, tombstones_from floor) in this session's snapshot."""
        if not self._has_tombstones:
            return 0, 1 << 62  # an old database, opened read-only: every unknown id counts as deleted
        seq = s.scalar(select(func.max(DeletedVector.seq))) or 0
        floor = s.scalar(select(StoreMeta.value).where(StoreMeta.key == "tombstones_from"))
        return int(seq), int(floor or 0)

    def _deleted(self, s: Session, ids: np.ndarray, floor: int) -> np.ndarray:
        """Which of `ids` the database records as deleted (tombstoned, or older than tombstones)."""
        ids = np.asarray(ids, np.int64)
        known = set(ids[ids <= floor].tolist())
        rest = [int(i) for i in ids if i > floor]
        if self._has_tombstones:
            for k in range(0, len(rest), 500):
                known.update(s.scalars(select(DeletedVector.vector_id)
                                       .where(DeletedVector.vector_id.in_(rest[k:k + 500]))).all())
        return np.array(sorted(known), np.int64)

    def _stored_vectors(self, ids: np.ndarray | None = None, batch: int = 10000, session: Session | None = None,
                        embedder: tuple[str, int] | None = None):
        """Yield (ids, matrix) batches from the database, for rebuilding without re-embedding (of the
        live embedder, or of `embedder` = (identity, dim))."""
        identity, dim = embedder or (self.embedder_identity, self.dim)
        base = select(Vector.id, Vector.data).where(Vector.embedder == identity).order_by(Vector.id)
        if ids is None:
            queries = [base]
        else:
            wanted = [int(i) for i in ids]
            queries = [base.where(Vector.id.in_(wanted[k:k + 500])) for k in range(0, len(wanted), 500)]
        s = session if session is not None else self.session()
        try:
            chunk_ids, chunk = [], []
            for query in queries:
                for vid, data in s.execute(query).yield_per(batch):
                    vec = np.frombuffer(data, dtype=np.float32)
                    if vec.shape != (dim,):
                        raise self._damaged(f"holds vector {vid} of size {vec.size}, not {dim}")
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
            if self._has_checksums:
                rows = s.execute(select(Vector.id, Vector.checksum).where(Vector.id.in_(part))).all()
                out.update({vid: c for vid, c in rows if c})
            need = [i for i in part if i not in out]
            if need:
                rows = s.execute(select(Vector.id, Vector.data).where(Vector.id.in_(need))).all()
                out.update({vid: vx.checksum(data) for vid, data in rows})
        return out

    def _content_problems(self, s: Session, index, ids: np.ndarray, batch: int = 4096) -> list[int]:
        """Ids whose index vector is not finite or differs from its stored checksum."""
        bad = []
        for k in range(0, len(ids), batch):
            part = np.asarray(ids[k:k + batch], np.int64)
            matrix = index.reconstruct_batch(part)
            reference = self._checksums(s, part)
            finite = np.isfinite(matrix).all(axis=1)
            for vid, row, ok in zip(part.tolist(), matrix, finite):
                if not ok or reference.get(vid) not in (None, vx.checksum(row.tobytes())):
                    bad.append(vid)
        return bad

    def _load_verified_index(self):
        """Read vectors.faiss, check it against the database (ids, then content), repair or refuse.

        Ids are compared in O(1) first (`_behind_by`: the database's id digest against the file's, the
        file possibly behind by vectors committed since it was written); only when that fails is every
        id read and compared. Content is always checked on a sample (all of it for small stores)."""
        report = OpenReport()
        index, problem = vx.read_checked(self.index_path, self.dim, mapped=True)  # the file first: the db is ahead
        with self.session() as s:
            tomb_seq, floor = self._tomb_state(s)
            have = vx.index_ids(index) if index is not None else None
            newer = self._behind_by(s, have) if index is not None else None
            if newer is not None:  # ids agree, up to vectors committed after the file was written
                report.digest = True
                present = have if len(have) <= FULL_CHECK else np.sort(
                    np.random.default_rng().choice(have, SAMPLE, replace=False))
                bad = self._content_problems(s, index, present)
                report.checked = len(present)
                if not bad:
                    for ids, matrix in (self._stored_vectors(newer, session=s) if len(newer) else ()):
                        index.add_with_ids(matrix, ids)
                        report.added += len(ids)
                    if report.added:
                        report.notes.append(f"index caught up with the database: +{report.added} vectors")
                    self._tomb_seq = tomb_seq
                    if self.writable and report.added:
                        index = self._publish(index)
                    return index, report
                report.digest = False  # the full comparison below finds and handles the bad vectors
            db_ids = self._db_vector_ids(s)
            if index is not None:
                extra = np.setdiff1d(have, db_ids)
                lost = np.setdiff1d(extra, self._deleted(s, extra, floor)) if len(extra) else extra
                if len(lost):
                    if not self.repair:
                        raise StoreDamaged(
                            f"{self.index_path} holds {len(lost)} vectors that {self._db_name} neither stores nor "
                            f"records as deleted (the database lost data): {self.restore_hint}, or run `resynth verify --repair` "
                            "to rebuild the index from the database as it is")
                    report.notes.append(f"{len(lost)} vectors the database lost were dropped (repair)")
                present = np.intersect1d(have, db_ids)
                if len(present) > FULL_CHECK:
                    present = np.sort(np.random.default_rng().choice(present, SAMPLE, replace=False))
                bad = self._content_problems(s, index, present)
                report.checked = len(present)
                if bad:
                    index, problem = None, f"{len(bad)} of {len(present)} checked vectors differ from the database"
                elif len(extra):
                    index.remove_ids(extra)
                    report.removed = len(extra)
            if index is None:
                if problem:
                    report.notes.append(f"index file {problem}: rebuilt from stored vectors")
                index = vx.new_index(self.dim)
                for ids, matrix in self._stored_vectors(session=s):
                    index.add_with_ids(matrix, ids)
                report.rebuilt = True
                report.added = int(index.ntotal)
            else:
                missing = np.setdiff1d(db_ids, vx.index_ids(index))
                for ids, matrix in (self._stored_vectors(missing, session=s) if len(missing) else ()):
                    index.add_with_ids(matrix, ids)
                    report.added += len(ids)
                if report.added or report.removed:
                    report.notes.append(f"index repaired from database: +{report.added} -{report.removed} vectors")
            drift = self._digest_drift(s, db_ids)
        if drift:
            report.notes.append(drift)
        self._tomb_seq = tomb_seq
        if self.writable and ((report.rebuilt and (problem or len(db_ids))) or report.added or report.removed):
            index = self._publish(index)
        return index, report

    def _db_digest(self, s: Session, embedder: str | None = None) -> tuple[int, int, int] | None:
        """The database's id digest of an embedder's vectors (vector_sets), None where it keeps none."""
        if not self._has_vector_sets:
            return None
        row = s.execute(select(VectorSet.n, VectorSet.id_sum, VectorSet.id_mix)
                        .where(VectorSet.embedder == (embedder or self.embedder_identity))).first()
        return tuple(int(v) for v in row) if row else (0, 0, 0)

    def _behind_by(self, s: Session, have: np.ndarray) -> np.ndarray | None:
        """The watermark check: the ids the database holds beyond the index's highest one, when the index
        holds exactly the database's ids up to that point (digests add up), else None. O(1) plus a range
        read of what is newer; None (the full comparison) after deletions the file has not seen."""
        db = self._db_digest(s)
        if db is None:
            return None
        mine = vx.id_digest(have)
        if mine == db:
            return np.zeros(0, np.int64)
        top = int(have.max()) if len(have) else 0
        newer = np.array(s.scalars(select(Vector.id).where(Vector.id > top, Vector.embedder == self.embedder_identity)
                                   .order_by(Vector.id)).all(), np.int64)
        extra = vx.id_digest(newer)
        total = (mine[0] + extra[0], (mine[1] + extra[1]) % vx.DIGEST_MOD, (mine[2] + extra[2]) % vx.DIGEST_MOD)
        return newer if len(newer) and total == db else None

    def _digest_drift(self, s: Session, db_ids: np.ndarray) -> str | None:
        """After a full comparison: whether vector_sets disagrees with the ids the database really holds
        (triggers bypassed, a hand-edited row); a writable open recomputes it, so the next open is fast."""
        db = self._db_digest(s)
        if db is None or db == vx.id_digest(db_ids):
            return None
        if self.writable:
            self._recount_vector_sets()
            return "the database's id digest (vector_sets) disagreed with its vectors: recomputed"
        return ("the database's id digest (vector_sets) disagrees with its vectors: every open reads all ids "
                "until a writable open recomputes it")

    def _merge_from_db(self, index) -> bool:
        """Bring `index` to the database's latest state: drop ids deleted since, add ids committed elsewhere.
        True if it changed."""
        changed = False
        with self.session() as s:
            tomb_seq, floor = self._tomb_state(s)
            if self._has_tombstones and tomb_seq > self._tomb_seq:
                gone = np.array(s.scalars(select(DeletedVector.vector_id)
                                          .where(DeletedVector.seq > self._tomb_seq)).all(), np.int64)
                gone = np.intersect1d(gone, vx.index_ids(index))
                if len(gone):
                    index.remove_ids(gone)
                    changed = True
            have = vx.index_ids(index)
            missing = self._behind_by(s, have)  # O(1) when the digests agree, a range read when only behind
            if missing is None:
                missing = np.setdiff1d(self._db_vector_ids(s), have)
            for ids, matrix in (self._stored_vectors(missing, session=s) if len(missing) else ()):
                index.add_with_ids(matrix, ids)
                changed = True
        self._tomb_seq = max(self._tomb_seq, tomb_seq)
        return changed

    def _publish(self, index=None):
        """Merge and write `index` (default: the live one) under the cross-process lock; returns the index
        to go on with: the file just written, mapped (so no process keeps a private copy of every vector
        past a save). Lock order is always file lock, then index lock (never the other way: a save and a
        refresh would deadlock)."""
        with self._file_lock():
            with self._index_lock:
                live = index is None
                index = self.index if live else index
                if self._merge_from_db(index) and live:
                    self._delta = None
                vx.write_atomic(index, self.index_path)
                self._file_state = _file_state(self.index_path)
                mapped, _ = vx.read_checked(self.index_path, self.dim, mapped=True)
                if mapped is not None:
                    index = mapped
                if live:
                    self.index, self._dirty = index, False
                return index

    def save_index(self) -> None:
        """Publish the in-memory index atomically, merged with what other processes committed/deleted."""
        self._publish()

    def _rebuild_from_db(self, embedder: tuple[str, int] | None = None):
        index = vx.new_index(embedder[1] if embedder else self.dim)
        with self.session() as s:
            tomb_seq, _ = self._tomb_state(s)
            for ids, matrix in self._stored_vectors(session=s, embedder=embedder):
                index.add_with_ids(matrix, ids)
        return index, tomb_seq

    def rebuild(self, search: bool = True, *, flat_max: int | None = None, memory_budget_bytes: int | None = None,
                threads: int | None = None, shard_map: vx.ShardMap | None = None) -> int:
        """Recreate the FAISS index from stored vectors and swap it in atomically; returns its size.

        With `search`, also (re)build the search index offline (see `_build_search`; `shard_map` fills
        its shards elsewhere, e.g. on Ray); the parameters default to store.json's "search" entry, then
        to vectors.FLAT_MAX / MEMORY_BUDGET / BUILD_THREADS / SHARD_SIZE.
        Everything happens under the cross-process lock (other writers' saves wait for it)."""
        self._require_writable()
        with self._file_lock():
            fresh, tomb_seq = self._rebuild_from_db()
            vx.write_atomic(fresh, self.index_path)
            built = self._build_search(fresh, flat_max, memory_budget_bytes, threads, shard_map) if search else None
            mapped, _ = vx.read_checked(self.index_path, self.dim, mapped=True)  # the private copy goes
            with self._index_lock:
                self.index = fresh if mapped is None else mapped
                self._tomb_seq = tomb_seq
                self._file_state = _file_state(self.index_path)
                self._dirty = False
                self._delta = None
                if search:
                    self._search, self.search_state = built
                    self._search_files = self._search_file_state()
        return int(fresh.ntotal)

    # ----- the search index (dataset search) -------------------------------------------------
    @property
    def search_path(self) -> Path:
        return self.root / SEARCH_NAME

    @property
    def search_infos_path(self) -> Path:
        return self.root / SEARCH_INFOS

    def _search_file_state(self):
        return _file_state(self.search_path), _file_state(self.search_infos_path)

    def _search_settings(self, flat_max, memory_budget_bytes, threads) -> tuple[int, int, int]:
        cfg = self.config.get("search") or {}
        return (int(flat_max if flat_max is not None else cfg.get("flat_max", vx.FLAT_MAX)),
                int(memory_budget_bytes if memory_budget_bytes is not None
                    else cfg.get("memory_budget_bytes", vx.MEMORY_BUDGET)),
                int(threads if threads is not None else cfg.get("threads", vx.BUILD_THREADS)))

    def _build_search(self, fresh, flat_max, memory_budget_bytes, threads,
                      shard_map: vx.ShardMap | None = None) -> tuple[_Search | None, dict]:
        """Build the search index over `fresh` (a private flat index) in shards merged on disk, and publish
        it: its inverted lists under a content name (search-<digest>.ivfdata), then search.faiss, then
        its infos, each atomically (a crash between leaves files whose infos disagree: ignored, never
        served); lists files no longer named are removed last."""
        flat_max, budget, threads = self._search_settings(flat_max, memory_budget_bytes, threads)
        spec = vx.choose_index(int(fresh.ntotal), self.dim, budget, flat_max)
        ids, matrix = vx.flat_view(fresh)
        shard_size = int((self.config.get("search") or {}).get("shard_size", vx.SHARD_SIZE))
        building = self.root / f".search.ivfdata.{os.getpid()}.tmp"
        try:
            index, infos = vx.build_search_index(ids, matrix, spec, threads=threads, data_path=building,
                                                 shard_size=shard_size, shard_map=shard_map)
            infos.update({"embedder": self.embedder_identity, "flat_max": flat_max, "memory_budget_bytes": budget,
                          "built_at": _utcnow().isoformat()})
            if index is None:
                self.search_path.unlink(missing_ok=True)
                vx.fsync_dir(self.root)
                write_json_atomic(self.search_infos_path, infos, "search:before-replace")
                self._drop_search_data(keep=None)
                return None, {"state": "flat", "type": "Flat", "count": infos["count"], "infos": infos}
            with open(building, "rb") as handle:
                os.fsync(handle.fileno())
            data = self.root / f"search-{_file_digest(building)}.ivfdata"
            faiss_lists = vx.faiss.downcast_InvertedLists(vx.faiss.extract_index_ivf(index).invlists)
            faiss_lists.filename = data.name  # what search.faiss records: read beside it, wherever the store is
            os.replace(building, data)
            vx.fsync_dir(self.root)
            crash_point("search:lists-published")
        finally:
            building.unlink(missing_ok=True)
        vx.write_atomic(index, self.search_path, "search:before-replace")
        infos.update({"bytes": self.search_path.stat().st_size, "ivfdata": data.name,
                      "ivfdata_bytes": data.stat().st_size})
        write_json_atomic(self.search_infos_path, infos, "search:infos-before-replace")
        self._drop_search_data(keep=data.name)
        found = _Search(index, *self._layout(index, infos))
        return found, self._search_summary("ok", found, None)

    def _drop_search_data(self, keep: str | None) -> None:
        """Remove inverted-list files of earlier builds (a process still mapping one keeps its pages)."""
        for path in self.root.glob("search-*.ivfdata"):
            if path.name != keep:
                path.unlink(missing_ok=True)

    @staticmethod
    def _layout(index, infos):
        ids, numbers, offsets = vx.ivf_layout(index)
        return ids, infos, numbers, offsets

    def _search_summary(self, state: str, found: _Search | None, why: str | None, infos: dict | None = None) -> dict:
        infos = found.infos if found is not None else (infos or {})
        out = {"state": state, "problem": why, "type": infos.get("type"), "count": infos.get("count"),
               "nprobe": infos.get("nprobe"), "recall": infos.get("recall"), "k": infos.get("k"),
               "built_at": infos.get("built_at")}
        return {k: v for k, v in out.items() if v is not None}

    def _read_search(self, full: bool = False) -> tuple[_Search | None, dict]:
        """The search index on disk, checked (see vectors.read_search_checked), then against the database:
        every id it holds is stored or recorded as deleted, and its vectors agree with the flat copy (a
        sample at open, all of them with `full`: `_search_content_problems`)."""
        infos, why = None, None
        if self.search_infos_path.exists():
            try:
                infos = json.loads(self.search_infos_path.read_text())
                if not isinstance(infos, dict):
                    infos, why = None, "infos unreadable"
            except (OSError, ValueError):
                why = "infos unreadable"
        if infos and infos.get("embedder") not in (None, self.embedder_identity):
            why, infos = f"built for embedder {infos.get('embedder')}", None
        index, layout, problem = vx.read_search_checked(self.search_path, infos, self.dim)
        if index is None:
            problem = problem or (why if self.search_path.exists() else None)
            if problem:
                return None, self._search_summary("ignored", None, problem, infos)
            if infos and infos.get("type") == "Flat":
                return None, self._search_summary("flat", None, None, infos)
            if infos and infos.get("type"):  # infos of an IVF index whose file is gone
                return None, self._search_summary("ignored", None, "search.faiss is missing", infos)
            return None, {"state": "absent"}
        found = _Search(index, layout[0], infos, layout[1], layout[2])
        with self.session() as s:  # the id digest first (built from what is stored, perhaps behind it)
            if not full and self._behind_by(s, found.ids) is not None:
                extra = np.zeros(0, np.int64)
            else:
                extra = np.setdiff1d(found.ids, self._db_vector_ids(s))
            if len(extra):
                _, floor = self._tomb_state(s)
                lost = np.setdiff1d(extra, self._deleted(s, extra, floor))
                if len(lost):
                    return None, self._search_summary(
                        "ignored", None, f"holds {len(lost)} ids the database never stored", infos)
        bad, checked = self._search_content_problems(found, full=full)
        if bad:
            return None, self._search_summary(
                "ignored", None, f"{len(bad)} of {checked} checked vectors differ from vectors.faiss", infos)
        state = self._search_summary("ok", found, None)
        state["checked"] = checked
        return found, state

    def _search_content_problems(self, found: _Search, full: bool = False) -> tuple[list[int], int]:
        """Ids whose search-index vector disagrees with the verified flat copy: (bad ids, how many checked).

        IVF,Flat codes are the vectors' bytes: compared exactly, all of them up to FULL_CHECK (or with
        `full`), else a sample of SAMPLE. PQ codes are lossy: each sampled vector, searched for, must find
        itself in the first list probed (at most a quarter may miss, PQ ties)."""
        with self._index_lock:
            live = np.intersect1d(found.ids, vx.index_ids(self.index))
            if not full and len(live) > FULL_CHECK:
                live = np.sort(np.random.default_rng().choice(live, SAMPLE, replace=False))
            if not vx.flat_codes(found.index) and len(live) > FULL_CHECK:
                live = np.sort(np.random.default_rng().choice(live, FULL_CHECK, replace=False))
            reference = self.index.reconstruct_batch(live) if len(live) else np.zeros((0, self.dim), np.float32)
        if not len(live):
            return [], 0
        if vx.flat_codes(found.index):
            at = np.searchsorted(found.ids, live)
            codes = vx.ivf_codes(found.index, found.numbers[at], found.offsets[at])
            differ = np.any(codes != reference.view(np.uint8).reshape(len(live), -1), axis=1)
            return live[differ].tolist(), len(live)
        _, hits = vx.search_ivf(found.index, reference, min(10, len(found.ids)), 1)
        bad = [int(v) for v, hit in zip(live, hits) if v not in hit]
        return (bad if len(bad) > len(live) // 4 else []), len(live)

    def _load_search(self) -> None:
        self._search_files = self._search_file_state()
        found, state = self._read_search()
        with self._index_lock:
            self._search, self.search_state, self._delta = found, state, None

    def _search_delta(self) -> dict:
        """(Under the index lock.) What the live index holds that the search index lacks (added since the
        build: ids with their vectors, searched exactly) and what the search index holds that the live
        index does not (deleted since: skipped by an IDSelector)."""
        if self._delta is None:
            live = vx.index_ids(self.index)
            missing = np.setdiff1d(live, self._search.ids)
            gone = np.setdiff1d(self._search.ids, live)
            matrix = self.index.reconstruct_batch(missing) if len(missing) else np.zeros((0, self.dim), np.float32)
            self._delta = {"missing": missing, "matrix": matrix, "gone": gone,
                           "params": vx.IVFParams(self._search.nprobe, gone)}
        return self._delta

    def _index_added(self, ids: np.ndarray, matrix: np.ndarray) -> None:
        """(Under the index lock.) New ids reached the live index: the search delta gains those it lacks."""
        if self._search is None or self._delta is None:
            return
        at = np.searchsorted(self._search.ids, ids).clip(0, max(0, len(self._search.ids) - 1))
        new = self._search.ids[at] != ids if len(self._search.ids) else np.ones(len(ids), bool)
        if np.any(~new):
            self._delta = None  # an id the search index holds came back: recompute
        elif np.any(new):
            self._delta["missing"] = np.concatenate([self._delta["missing"], ids[new]])
            self._delta["matrix"] = np.concatenate([self._delta["matrix"], matrix[new]])

    def search_report(self) -> dict:
        """The search index's state for `verify`/`stats`: what is on disk and what this process serves."""
        entry = dict(self.search_state)
        entry["path"] = str(self.search_path)
        with self._index_lock:
            entry["serving"] = "ivf" if self._search is not None else "exact"
            if self._search is not None:
                delta = self._search_delta()
                entry.update({"added_since_build": len(delta["missing"]), "deleted_since_build": len(delta["gone"]),
                              "meets_target": bool(self._search.infos.get("meets_target", True))})
        return entry

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
        changed = False
        if state is not None and state != self._file_state:
            index, report = self._load_verified_index()
            with self._index_lock:
                self.index, self.open_report = index, report
                self._file_state = state
                self._delta = None
            changed = True
        if changed or self._search_file_state() != self._search_files:
            self._load_search()
            changed = True
        return changed

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
                fresh = np.setdiff1d(batch_ids, vx.index_ids(self.index))
                if len(fresh):
                    keep = np.isin(batch_ids, fresh)
                    self.index.add_with_ids(matrix[keep], batch_ids[keep])
                    self._index_added(batch_ids[keep], matrix[keep])
                    self._dirty = True
        with self._index_lock:
            try:
                return self.index.reconstruct_batch(ids)
            except RuntimeError:
                gone = np.setdiff1d(ids, vx.index_ids(self.index))
                raise StoreInputError(f"{len(gone)} requested vectors are not in the store "
                                      f"(removed meanwhile?), e.g. id {int(gone[0])}") from None

    def present(self, ids: np.ndarray) -> np.ndarray:
        """The ids among `ids` the store still holds (a source removed meanwhile takes its vectors along)."""
        ids = np.asarray(ids, dtype=np.int64)
        with self._index_lock:
            here = np.isin(ids, vx.index_ids(self.index))
        if here.all():
            return ids
        with self.session() as s:
            stored = set(s.scalars(select(Vector.id).where(Vector.id.in_(ids[~here].tolist()))))
        return ids[here | np.isin(ids, list(stored))]

    def search(self, queries: np.ndarray, candidate_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inner products of each query with exactly the candidates, best first: (similarities, ids).

        The candidates are few (sources x K), so they are scored directly: exact, and independent of
        the store's size, where an ID-filtered FAISS scan grows with it (scripts/bench_lookup.py).
        """
        candidate_ids = np.asarray(candidate_ids, dtype=np.int64)
        try:
            matrix = self.vectors(candidate_ids)
        except StoreInputError:  # some were removed meanwhile (a source removed by another process)
            candidate_ids = self.present(candidate_ids)
            matrix = self.vectors(candidate_ids)
        sims = np.asarray(queries, np.float32) @ matrix.T
        order = np.argsort(-sims, axis=1, kind="stable")
        return np.take_along_axis(sims, order, axis=1), candidate_ids[order]

    def nearest(self, query: np.ndarray, k: int, source_ids: list[int] | None = None,
                roles: tuple[str, ...] = ("resynthesis",), exclude_file: str | None = None, *, exact: bool = False
                ) -> list[tuple[StoredReference, float]]:
        """The k stored vectors closest to `query` over the whole store, keeping only the given roles and
        sources and never an image with the bytes `exclude_file`: best first.

        With a verified search index (and not `exact`): its IVF answer (ids deleted since the build
        skipped) merged with an exact scan of the vectors added since; an exact FAISS scan otherwise,
        and also whenever the IVF probes run out before enough references survive the filters."""
        query = np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1))
        with self._index_lock:
            total = int(self.index.ntotal)
            search = None if exact else self._search
        wanted = max(1, k)
        while True:
            depth = min(total, wanted * 4 + 16)
            if depth == 0:
                return []
            with self._index_lock:
                if search is not None and search is not self._search:
                    search = None  # swapped meanwhile (refresh, rebuild): answer exactly
                if search is None:
                    sims, ids = self.index.search(query, depth)
                    sims, ids = sims[0], ids[0]
                else:
                    sims, ids = self._search_merged(search, query, depth)
            found = [(int(i), float(v)) for i, v in zip(ids, sims) if i >= 0]
            rows = self._references_by_id([i for i, _ in found], source_ids, roles)
            kept = [(rows[i], v) for i, v in found if i in rows and rows[i].file_hash != exclude_file]
            if len(kept) >= k:
                return kept[:k]
            if search is not None and len(found) < depth:
                search = None  # the IVF probes ran out: look again exactly
                continue
            if depth >= total:
                return kept[:k]
            wanted *= 4  # filtered out too many: look deeper

    def _search_merged(self, search: _Search, query: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(Under the index lock.) The IVF search index's top `depth`, deleted ids skipped, merged with the
        exact top of the vectors added since its build (exact scores for both when its codes are PQ)."""
        delta = self._search_delta()
        rescore = self.index.reconstruct_batch if search.rescored else None
        sims, ids = vx.search_ivf(search.index, query, depth, delta["params"], rescore=rescore)
        sims, ids = sims[0], ids[0]
        if len(delta["missing"]):
            extra = delta["matrix"] @ query[0]
            top = np.argpartition(-extra, depth)[:depth] if len(extra) > depth else np.arange(len(extra))
            top = top[np.argsort(-extra[top], kind="stable")]
            sims = np.concatenate([sims, extra[top]])
            ids = np.concatenate([ids, delta["missing"][top]])
            order = np.argsort(-np.where(ids >= 0, sims, -np.inf), kind="stable")[:depth]
            sims, ids = sims[order], ids[order]
        return sims, ids

    def _references_by_id(self, ids: list[int], source_ids: list[int] | None,
                          roles: tuple[str, ...]) -> dict[int, StoredReference]:
        # role and source are compared as expressions (`role || ''`, `source_id + 0`), not as indexed
        # columns: otherwise SQLite plans from ix_images_lookup and scans every image of those roles per
        # call (O(store) per dataset search); from the few vector ids by primary key it is O(ids)
        query = (select(Vector.id, Source.name, Image.seed, Image.file_hash, Image.key)
                 .join(Image, Vector.image_id == Image.id).join(Source, Image.source_id == Source.id)
                 .where((Image.role + "").in_(roles), Vector.embedder == self.embedder_identity))
        if source_ids is not None:
            query = query.where((Image.source_id + 0).in_(source_ids))
        out: dict[int, StoredReference] = {}
        with self.session() as s:
            for start in range(0, len(ids), 500):
                for row in s.execute(query.where(Vector.id.in_(ids[start:start + 500]))):
                    out[row[0]] = StoredReference(*row)
        return out

    # ----- sources ---------------------------------------------------------------------------
    def add_source(self, name: str, kind: str, fingerprint: str, path: str | None = None,
                   params: dict | None = None) -> Source:
        """Register a new source; StoreInputError if the name is taken (also when a race is lost)."""
        taken = StoreInputError(f"source {name!r} already exists (remove it first to change it)")
        try:
            with self._write_session() as s:
                if s.scalar(select(Source.id).where(Source.name == name)) is not None:
                    raise taken
                source = Source(name=name, kind=kind, path=path, params_json=json.dumps(params or {}, sort_keys=True),
                                fingerprint=fingerprint)
                s.add(source)
                s.commit()
                return source
        except IntegrityError:
            raise taken from None

    def ensure_source(self, name: str, kind: str, fingerprint: str, path: str | None = None,
                      params: dict | None = None) -> Source:
        """Get-or-create a source in one statement (two processes registering the same replay source
        both succeed). StoreInputError if the name exists with another kind or fingerprint."""
        with self._write_session() as s:
            insert_ignore(s, Source, {"name": name, "kind": kind, "path": path, "fingerprint": fingerprint,
                                      "params_json": json.dumps(params or {}, sort_keys=True),
                                      "created_at": _utcnow()}, ["name"])
            source = s.scalar(select(Source).where(Source.name == name))
            s.commit()
        if source.kind != kind or source.fingerprint != fingerprint:
            raise StoreInputError(f"source {name!r} already exists as another {source.kind} source "
                                  "(remove it first to change it)")
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
        """Delete a source with its images and vectors; returns how many vectors were dropped.

        Its vector ids are tombstoned in the same transaction. After the commit, its own image files
        inside the store (not referenced by any remaining row) are deleted, and folders left empty.
        """
        self._require_writable()
        source = self.source(name)
        with self._write_session() as s:
            image_ids = select(Image.id).where(Image.source_id == source.id)
            paths = list(s.scalars(select(Image.path).where(Image.source_id == source.id)))
            vector_ids = np.array(s.scalars(select(Vector.id).where(Vector.image_id.in_(image_ids))).all(), np.int64)
            # resyntheses of other sources that pointed at these originals lose the link, not their rows
            s.execute(update(Image).where(Image.original_id.in_(image_ids)).values(original_id=None))
            s.execute(delete(Vector).where(Vector.image_id.in_(image_ids)))
            s.execute(delete(Image).where(Image.source_id == source.id))
            s.execute(delete(Source).where(Source.id == source.id))
            now = time.time()
            for vid in vector_ids.tolist():
                insert_ignore(s, DeletedVector, {"vector_id": vid, "deleted_at": now}, ["vector_id"])
            s.commit()
        crash_point("remove:after-commit")
        if len(vector_ids):
            with self._index_lock:
                self.index.remove_ids(vector_ids)
                self._delta = None
            self.save_index()
        self._remove_unreferenced_files(paths)
        return len(vector_ids)

    def _file_path(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.root / path

    def _own_file(self, stored: str) -> Path | None:
        """The file a row points at if it lies inside the store (below a folder, not a store file)."""
        root = self.root.resolve()
        path = Path(os.path.abspath(self._file_path(stored)))
        try:
            relative = path.relative_to(root)
        except ValueError:
            return None
        return path if len(relative.parts) >= 2 and ".." not in relative.parts else None

    def _referenced(self, s: Session) -> set[Path]:
        return {p for p in (self._own_file(x) for x in s.scalars(select(Image.path))) if p is not None}

    def _remove_unreferenced_files(self, stored_paths: list[str]) -> None:
        candidates = {p for p in (self._own_file(x) for x in stored_paths) if p is not None}
        if not candidates:
            return
        with self.session() as s:
            candidates -= self._referenced(s)
        root = self.root.resolve()
        for path in candidates:
            path.unlink(missing_ok=True)
            folder = path.parent
            while folder != root and root in folder.parents:
                try:
                    folder.rmdir()  # only if empty
                except OSError:
                    break
                folder = folder.parent

    # ----- descriptions and images -----------------------------------------------------------
    def description_id(self, text: str) -> int:
        """Id of a normalised description, created on first use (get-or-create in one statement)."""
        normal = normalise_description(text)
        digest = sha256_text(normal)
        with self.session() as s:
            found = s.scalar(select(Description.id).where(Description.hash == digest))
        if found is not None:
            return found
        with self._write_session() as s:
            insert_ignore(s, Description, {"text": normal, "hash": digest}, ["hash"])
            found = s.scalar(select(Description.id).where(Description.hash == digest))
            s.commit()
        return found

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
        keys = list(keys)
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
        """Record images and vectors in one transaction, then add the new ones to the in-memory index.

        Returns the image ids, in order: a key that is already stored (by this batch, an earlier one
        or another process) yields the existing image's id and adds nothing.
        """
        if not rows:
            return []
        matrix = np.stack([np.asarray(r.vector, np.float32).ravel() for r in rows])
        if matrix.shape[1] != self.dim:
            raise StoreInputError(f"vector size {matrix.shape[1]} does not match the store's {self.dim}")
        if not np.isfinite(matrix).all():
            raise StoreInputError("a vector to store is not finite (NaN or infinity)")
        image_ids, new_ids, new_rows = [], [], []
        with self._write_session() as s:
            for i, (row, vec) in enumerate(zip(rows, matrix)):
                try:
                    result = insert_ignore(s, Image, {
                        "key": row.key, "role": row.role, "source_id": row.source_id,
                        "description_id": row.description_id, "seed": row.seed, "params_hash": row.params_hash,
                        "file_hash": row.file_hash, "path": row.path, "original_id": row.original_id,
                        "created_at": _utcnow()}, ["key"])
                except IntegrityError as exc:  # a foreign key: the source was removed meanwhile
                    raise StoreInputError("an image refers to a source or description that no longer "
                                          "exists (removed by another process)") from exc
                if not made(result):
                    image_ids.append(s.scalar(select(Image.id).where(Image.key == row.key)))
                    continue
                image_id = result.inserted_primary_key[0]
                image_ids.append(image_id)
                data = vec.tobytes()
                vector = s.execute(Vector.__table__.insert().values(
                    image_id=image_id, embedder=self.embedder_identity, data=data, checksum=vx.checksum(data)))
                new_ids.append(vector.inserted_primary_key[0])
                new_rows.append(i)
            s.commit()
        self.last_inserted = len(new_ids)  # how many of `rows` were new (the rest were stored already)
        crash_point("images:after-commit")
        if new_ids:
            with self._index_lock:
                added = np.array(new_ids, np.int64)
                self.index.add_with_ids(matrix[new_rows], added)
                self._index_added(added, matrix[new_rows])
                self._dirty = True
        return image_ids

    def original_id_for_file(self, file_hash: str) -> int | None:
        with self.session() as s:
            return s.scalar(select(Image.id).where(Image.file_hash == file_hash, Image.role == "original").limit(1))

    def image_id_for_key(self, key: str) -> int | None:
        with self.session() as s:
            return s.scalar(select(Image.id).where(Image.key == key))

    # ----- single-flight work across processes -----------------------------------------------
    def claim(self, keys: list[str], owner: str, lease_seconds: float = 600.0) -> list[str]:
        """Take (or renew) leases on `keys`; returns those `owner` now holds: free ones, expired ones
        and its own. After claiming, check `existing_keys` again: a key may have been stored meanwhile."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return []
        now = time.time()
        with self._write_session() as s:
            insert = _dialect_insert(s)
            table = Claim.__table__
            for key in keys:
                stmt = insert(table).values(key=key, owner=owner, expires_at=now + lease_seconds)
                s.execute(stmt.on_conflict_do_update(
                    index_elements=["key"], set_={"owner": stmt.excluded.owner, "expires_at": stmt.excluded.expires_at},
                    where=(table.c.expires_at < now) | (table.c.owner == owner)))
            held = set()
            for k in range(0, len(keys), 500):
                held.update(s.scalars(select(Claim.key).where(Claim.key.in_(keys[k:k + 500]), Claim.owner == owner)))
            s.commit()
        return [key for key in keys if key in held]

    def release(self, keys: list[str], owner: str) -> int:
        """Give up `owner`'s leases on `keys` (stored or abandoned work); returns how many were held."""
        keys = list(dict.fromkeys(keys))
        released = 0
        with self._write_session() as s:
            for k in range(0, len(keys), 500):
                released += s.execute(delete(Claim).where(Claim.key.in_(keys[k:k + 500]),
                                                          Claim.owner == owner)).rowcount
            s.commit()
        return released

    def live_claims(self, keys: list[str]) -> dict[str, str]:
        """key -> owner of the unexpired leases among `keys`."""
        keys = list(dict.fromkeys(keys))
        if not self._has_claims:
            return {}
        now = time.time()
        out: dict[str, str] = {}
        with self.session() as s:
            for k in range(0, len(keys), 500):
                out.update(dict(s.execute(select(Claim.key, Claim.owner).where(
                    Claim.key.in_(keys[k:k + 500]), Claim.expires_at >= now)).all()))
        return out

    def wait_for_keys(self, keys: list[str], timeout: float = 600.0, poll: float = 0.25) -> dict[str, int]:
        """Wait while other processes generate `keys`: returns key -> vector id of the stored ones as
        soon as every key is stored, or none of the missing ones has a live claim (released, expired:
        the caller claims and makes them), or `timeout` seconds passed (whatever is stored by then)."""
        keys = list(dict.fromkeys(keys))
        deadline = time.monotonic() + timeout
        while True:
            found = self.existing_keys(keys)
            rest = [k for k in keys if k not in found]
            if not rest or not self.live_claims(rest) or time.monotonic() >= deadline:
                return found
            time.sleep(max(0.0, min(poll, deadline - time.monotonic())))

    # ----- verification ----------------------------------------------------------------------
    def verify(self, repair: bool = False, files: bool = True) -> dict:
        """Check everything; with `repair`, fix what can be fixed from the database. A JSON-able report.

        Checks: the database's integrity_check; vectors.faiss (readable, type, dimension) against the
        database: every id (missing, deleted, lost) and every vector against its checksum; the stored
        vectors themselves (size, finite, checksum); with `files`, every image row's file (exists,
        sha256 = file_hash); unreferenced image files under images/; leftover `.*.tmp` files; expired
        claims; the search index (search.faiss + search.json: stale or unreadable is a problem, it is
        then ignored). Repair (writable only): rebuild vectors.faiss (and the search index) from the
        database, backfill checksums,
        remove unreferenced image files older than ORPHAN_GRACE_S, temp files of dead processes and
        expired claims. What the database itself lacks cannot be repaired here (restore it from a backup).
        """
        if repair:
            self._require_writable()
        problems: list[str] = []
        report: dict = {"store": str(self.root), "repair": repair, "problems": problems, "repaired": []}
        report["database"] = {"backend": "sqlite" if self.is_sqlite else "postgresql", "location": self.db_label}
        if self.is_sqlite:
            with self.engine.connect() as conn:
                integrity = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check(20)")]
            report["database"]["integrity"] = "ok" if integrity == ["ok"] else integrity[:5]
            if integrity != ["ok"]:
                problems.append(f"{self.db_label} fails its integrity check: {RESTORE}")
        else:
            report["database"]["integrity"] = "ok"  # the server checks its own pages; the rows are checked below

        # the stored vectors themselves
        bad_rows, unchecked = [], 0
        with self.session() as s:
            query = select(Vector.id, Vector.data, Vector.checksum if self._has_checksums else Vector.id)
            for vid, data, check in s.execute(query.where(Vector.embedder == self.embedder_identity)).yield_per(5000):
                vec = np.frombuffer(data, np.float32) if len(data) % 4 == 0 else np.zeros(0, np.float32)
                if vec.shape != (self.dim,) or not np.isfinite(vec).all():
                    bad_rows.append(vid)
                elif not self._has_checksums or check is None:
                    unchecked += 1
                elif check != vx.checksum(data):
                    bad_rows.append(vid)
            db_ids = self._db_vector_ids(s)
            _, floor = self._tomb_state(s)
            image_rows = s.execute(select(Image.id, Image.path, Image.file_hash)).all()
            without_vector = s.scalar(select(func.count(Image.id)).where(~Image.id.in_(
                select(Vector.image_id).where(Vector.embedder == self.embedder_identity))))
            expired = (s.scalar(select(func.count()).select_from(Claim).where(Claim.expires_at < time.time()))
                       if self._has_claims else 0)
            report["database"].update({"vectors": len(db_ids), "bad_vectors": len(bad_rows),
                                       "bad_vector_ids": bad_rows[:10], "vectors_without_checksum": unchecked,
                                       "images": len(image_rows), "images_without_vector": without_vector,
                                       "expired_claims": expired})
            if bad_rows:
                problems.append(f"{len(bad_rows)} stored vectors are malformed or fail their checksum: {self.restore_hint}")
            if without_vector:
                problems.append(f"{without_vector} images have no vector (re-ingest them)")
            digest = self._db_digest(s)
            report["database"]["id_digest"] = ("absent" if digest is None else
                                               "ok" if digest == vx.id_digest(db_ids) else "stale")
            if report["database"]["id_digest"] != "ok":
                problems.append(f"the database's id digest (vector_sets) is {report['database']['id_digest']}: "
                                "every open reads all ids (repair recomputes it)")

            # the index file on disk
            index, why = vx.read_checked(self.index_path, self.dim)
            entry: dict = {"path": str(self.index_path), "readable": index is not None,
                           "problem": why if why else (None if index is not None else "missing")}
            if index is not None:
                have = vx.index_ids(index)
                extra = np.setdiff1d(have, db_ids)
                deleted = self._deleted(s, extra, floor) if len(extra) else extra
                lost = np.setdiff1d(extra, deleted)
                missing = np.setdiff1d(db_ids, have)
                bad = self._content_problems(s, index, np.intersect1d(have, db_ids))
                entry.update({"vectors": int(index.ntotal), "missing": len(missing), "deleted": len(deleted),
                              "lost_from_database": len(lost), "lost_ids": lost[:10].tolist(),
                              "bad_content": len(bad), "bad_ids": bad[:10]})
                if len(lost):
                    problems.append(f"{len(lost)} index vectors are not in the database (it lost data): {self.restore_hint}, "
                                    "or repair to rebuild the index from the database as it is")
                if bad:
                    problems.append(f"{len(bad)} index vectors differ from the database")
                if len(missing) or len(deleted):
                    problems.append(f"index file lags the database (+{len(missing)} -{len(deleted)})")
            elif why or len(db_ids):
                problems.append(f"index file {entry['problem']}")
            report["index"] = entry

        # the search index on disk (read and checked again), and what this process serves
        on_disk, state = self._read_search(full=True)
        search_entry = self.search_report()
        search_entry.update({"on_disk": state["state"], "problem": state.get("problem")})
        search_entry = {k: v for k, v in search_entry.items() if v is not None}
        report["search"] = search_entry
        if state["state"] == "ignored":
            problems.append(f"search index {state.get('problem')}: ignored, exact search serves "
                            "(run `resynth rebuild`)")
        elif on_disk is not None and not on_disk.infos.get("meets_target", True):
            problems.append(f"search index recall@{on_disk.infos.get('k')} {on_disk.infos.get('recall'):.3f} is "
                            f"below its target {on_disk.infos.get('recall_target')}")
        named = on_disk.infos.get("ivfdata") if on_disk is not None else None
        leftover = sorted(p.name for p in self.root.glob("search-*.ivfdata") if p.name != named)
        if leftover:
            search_entry["leftover_lists_files"] = leftover
            problems.append(f"{len(leftover)} search lists files no search index names (a rebuild removes them)")
        del on_disk

        if files:
            report["files"] = self._verify_files(image_rows, problems)
        referenced = {p for p in (self._own_file(x) for _, x, _ in image_rows) if p is not None}
        orphans, recent = self._orphans(referenced)
        temps = self._temp_files(deep=True)
        report["orphans"] = {"count": len(orphans), "recent": len(recent),
                             "examples": [str(p.relative_to(self.root.resolve())) for p in orphans[:10]]}
        report["temp_files"] = {"count": len(temps), "examples": [str(p.relative_to(self.root)) for p in temps[:10]]}
        if orphans:
            problems.append(f"{len(orphans)} image files under images/ belong to no row")
        if temps:
            problems.append(f"{len(temps)} leftover temporary files")

        if repair:
            done = report["repaired"]
            if self._has_checksums:
                filled = self._backfill_checksums()
                if filled:
                    done.append(f"checksums computed for {filled} vectors")
            if report["database"]["id_digest"] != "ok":
                self._recount_vector_sets()  # a writable open installed vector_sets: it is only stale
                done.append("the database's id digest recomputed")
            done.append(f"index rebuilt from the database ({self.rebuild()} vectors)")
            for path in orphans:
                path.unlink(missing_ok=True)
            if orphans:
                done.append(f"removed {len(orphans)} unreferenced image files")
            stale = self.remove_stale_temp_files(deep=True)
            if stale:
                done.append(f"removed {len(stale)} temporary files of dead processes")
            if expired:
                with self._write_session() as s:
                    s.execute(delete(Claim).where(Claim.expires_at < time.time()))
                    s.commit()
                done.append(f"dropped {expired} expired claims")
        report["ok"] = not problems
        return report

    def _verify_files(self, image_rows, problems: list[str]) -> dict:
        missing, mismatched = [], []
        for image_id, stored, file_hash in image_rows:
            path = self._file_path(stored)
            if not path.is_file():
                missing.append(stored)
            elif sha256_file(path) != file_hash:
                mismatched.append(stored)
        if missing:
            problems.append(f"{len(missing)} image files are missing")
        if mismatched:
            problems.append(f"{len(mismatched)} image files differ from their recorded sha256")
        return {"checked": len(image_rows), "missing": len(missing), "missing_examples": missing[:10],
                "mismatched": len(mismatched), "mismatched_examples": mismatched[:10]}

    def _orphans(self, referenced: set[Path]) -> tuple[list[Path], list[Path]]:
        """Unreferenced files under images/: (old enough to remove, too recent to judge)."""
        folder = self.root / "images"
        if not folder.is_dir():
            return [], []
        old, recent = [], []
        now = time.time()
        for path in sorted(folder.resolve().rglob("*")):
            if not path.is_file() or TEMP_RE.match(path.name) or path in referenced:
                continue
            (recent if now - path.stat().st_mtime < ORPHAN_GRACE_S else old).append(path)
        return old, recent

    # ----- re-embedding: a second vector set beside the live one, then one atomic switch ------
    def _adopt_switched_embedder(self) -> None:
        """Finish a `reembed` switch that committed in the database but died before store.json followed."""
        with self.session() as s:
            recorded = s.scalar(select(StoreMeta.value).where(StoreMeta.key == "config")) if self._has_claims else None
        if not recorded:
            return
        config = json.loads(recorded)
        if config["embedder"]["identity"] == self.embedder_identity:
            return
        if not (self.root / config["index_file"]).exists():
            raise self._damaged(f"records a switch to {config['embedder']['identity']} whose "
                                f"index {config['index_file']} is missing")
        self.config, self.embedder_identity, self.dim = config, config["embedder"]["identity"], int(config["dim"])
        if self.writable:
            write_json_atomic(self.root / CONFIG_NAME, config)

    def images_without_vector(self, embedder: str) -> list[tuple[int, Path]]:
        """(image id, file) of every image that has no vector under `embedder` yet (resumable work)."""
        have = select(Vector.image_id).where(Vector.embedder == embedder)
        with self.session() as s:
            rows = s.execute(select(Image.id, Image.path).where(Image.id.not_in(have)).order_by(Image.id)).all()
        return [(image_id, self._file_path(path)) for image_id, path in rows]

    def add_vectors(self, embedder: str, image_ids: list[int], matrix: np.ndarray) -> int:
        """Store vectors of another embedder for existing images (idempotent); the live index is untouched."""
        matrix = np.asarray(matrix, np.float32)
        if len(image_ids) != len(matrix) or not np.isfinite(matrix).all():
            raise StoreInputError("vectors to store must be finite, one per image")
        if embedder == self.embedder_identity:
            raise StoreInputError(f"the store already uses embedder {embedder}")
        added = 0
        with self._write_session() as s:  # holds the write lock: no image is removed meanwhile
            alive = set(s.scalars(select(Image.id).where(Image.id.in_([int(i) for i in image_ids]))))
            for image_id, row in zip(image_ids, matrix):
                if int(image_id) not in alive:  # removed since it was listed: nothing to embed for
                    continue
                data = row.tobytes()
                result = insert_ignore(s, Vector, {"image_id": int(image_id), "embedder": embedder, "data": data,
                                                   "checksum": vx.checksum(data)}, ["image_id", "embedder"])
                added += made(result)
            s.commit()
        return added

    def switch_embedder(self, embedder: dict, dim: int) -> int:
        """Make `embedder`'s vectors the live set, atomically. The new index file is written first; then
        one database transaction re-keys every image (keys name the embedder) and records the new
        config: that commit is the switch (an open after a crash here adopts it, see
        `_adopt_switched_embedder`); store.json follows, and only then are the old vectors, old index and
        search files and the calibration (fitted in the old space) dropped. Refused while any image
        lacks a new vector. Returns the new index size. Other processes must reopen the store."""
        identity = embedder["identity"]
        self._require_writable()
        with self._file_lock():
            left = self.images_without_vector(identity)
            if left:
                raise StoreInputError(f"{len(left)} stored images have no {identity} vector yet: "
                                      "finish `resynth reembed` first")
            old_index = self.index_path
            index_file = f"vectors-{sha256_text(identity)[:16]}.faiss"
            fresh, tomb_seq = self._rebuild_from_db((identity, int(dim)))
            vx.write_atomic(fresh, self.root / index_file)
            config = {k: v for k, v in self.config.items() if k != "calibration"}
            config.update(embedder=embedder, dim=int(dim), index_file=index_file)
            with self._write_session() as s:  # the write lock: no image can be added until the switch commits
                have = select(Vector.image_id).where(Vector.embedder == identity)
                late = s.scalar(select(func.count(Image.id)).where(Image.id.not_in(have)))
                if late:  # added by another process since the index was built: run reembed again
                    raise StoreInputError(f"{late} image(s) were added during the switch and have no {identity} "
                                          "vector yet: run `resynth reembed` again to embed them and switch")
                rows = s.execute(select(Image.id, Image.role, Description.hash, Source.fingerprint, Source.name,
                                        Image.seed, Image.params_hash, Image.file_hash)
                                 .join(Description, Image.description_id == Description.id)
                                 .join(Source, Image.source_id == Source.id)).all()
                s.execute(update(Image), [{"id": row[0], "key": image_key(*row[1:], identity)} for row in rows])
                recorded = {"config": json.dumps(config)}
                if not self.is_sqlite:  # the database's own binding (one store per database) moves too
                    recorded.update(embedder=identity, dim=str(int(dim)))
                s.execute(delete(StoreMeta).where(StoreMeta.key.in_(list(recorded))))
                s.execute(StoreMeta.__table__.insert(), [{"key": k, "value": v} for k, v in recorded.items()])
                crash_point("reembed:before-commit")
                s.commit()  # the switch
            crash_point("reembed:after-commit")
            write_json_atomic(self.root / CONFIG_NAME, config)
            with self._index_lock:
                self.config, self.embedder_identity, self.dim = config, identity, int(dim)
                self.index, self._tomb_seq, self._dirty, self._delta = fresh, tomb_seq, False, None
                self._search, self.search_state = None, {"state": "absent"}
                self._file_state = _file_state(self.index_path)
            with self._write_session() as s:
                s.execute(delete(Vector).where(Vector.embedder != identity))
                s.commit()
            for stale in (old_index, self.search_path, self.search_infos_path):
                if stale != self.index_path:
                    stale.unlink(missing_ok=True)
            self._drop_search_data(keep=None)
            self._search_files = self._search_file_state()
        return int(fresh.ntotal)

    # ----- numbers ---------------------------------------------------------------------------
    def stats(self) -> dict:
        with self.session() as s:
            per_source = s.execute(select(Source.name, Source.kind, Image.role, func.count(Image.id))
                                   .join(Image, Image.source_id == Source.id, isouter=True)
                                   .group_by(Source.name, Source.kind, Image.role)).all()
            descriptions = s.scalar(select(func.count(Description.id)))
            digest = self._db_digest(s)  # the count the triggers keep, else a count of every row
            vectors = digest[0] if digest else s.scalar(select(func.count(Vector.id))
                                                        .where(Vector.embedder == self.embedder_identity))
        sources: dict[str, dict] = {}
        for name, kind, role, count in per_source:
            entry = sources.setdefault(name, {"kind": kind, "originals": 0, "resyntheses": 0})
            if role == "original":
                entry["originals"] = count
            elif role == "resynthesis":
                entry["resyntheses"] = count
        return {"store": str(self.root), "embedder": self.embedder_identity, "dim": self.dim,
                "sources": sources, "descriptions": descriptions, "vectors": vectors,
                "index_vectors": int(self.index.ntotal), "search": self.search_report()}


def _file_state(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns
