"""The store's database: engines, sessions and a `Dialect` holding every SQLite/PostgreSQL difference.

The rest of the store speaks SQLAlchemy and asks the dialect whenever SQLite and PostgreSQL differ
(catalog queries of tables and triggers, the trigger language, get-or-create, integrity checks), so no
other module branches on the backend.

PostgreSQL guarantees match SQLite's: every write transaction first takes a transaction-scoped advisory
lock (the single writer SQLite's BEGIN IMMEDIATE gives), reads run in REPEATABLE READ snapshots (what a
WAL read transaction gives), and one database holds one store.
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, cast

from sqlalchemy import Table, create_engine, event, text
from sqlalchemy.engine import URL, Connection, CursorResult, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from index.errors import (StoreBusy, StoreDamaged, StoreDenied, StoreError, StoreInputError, StoreReadOnly,
                          StoreUnavailable, unreachable)
from index.failures import DISK_FULL, busy_timeout_s, pg_failure, refuse_write, sqlite_failure, sqlite_file_damage
from index.sharing import share, why_denied

RESTORE = "restore metadata.sqlite from a backup"
_CORRUPT = ("not a database", "malformed", "corrupt", "disk image")
PG_WRITE_LOCK = 0x7265_7379_6E74_6801  # pg_advisory_xact_lock key of a store's single writer ("resynth")
PG_IDLE_WRITER_S = 120.0  # a write transaction idle this long is ended by the server (its client is stopped)
PG_DRIVERS = ("postgresql", "postgresql+psycopg")
PASSWORD_ENV = "RESYNTH_DB_PASSWORD"
QUICK_CHECK_MAX_BYTES = 64 << 20  # PRAGMA quick_check at open only for databases up to this size


# ----- PostgreSQL URLs ---------------------------------------------------------------------------
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


# ----- get-or-create -----------------------------------------------------------------------------
def table(model) -> Table:
    """A mapped class's table (typed: `__table__` is declared as a FromClause)."""
    return cast(Table, model.__table__)


def _dialect_insert(session: Session) -> Any:
    """The backend's INSERT with ON CONFLICT support."""
    name = session.get_bind().dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        return sqlite_insert
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        return pg_insert
    raise StoreError(f"database dialect {name} has no get-or-create support here")


def insert_ignore(session: Session, model, values: dict, conflict: list[str]) -> CursorResult:
    """INSERT ... ON CONFLICT DO NOTHING; `made(result)` says whether a row was made."""
    insert = _dialect_insert(session)
    return execute(session, insert(table(model)).values(**values).on_conflict_do_nothing(index_elements=conflict))


def execute(session: Session, statement) -> CursorResult:
    """`session.execute` of a DML statement, typed as what it returns (rowcount, inserted_primary_key)."""
    return cast(CursorResult, session.execute(statement))


def upsert(session: Session, model, values: dict, conflict: list[str], update: list[str], where):
    """INSERT ... ON CONFLICT DO UPDATE SET `update` columns WHERE `where` (of the existing row)."""
    stmt = _dialect_insert(session)(table(model)).values(**values)
    return session.execute(stmt.on_conflict_do_update(
        index_elements=conflict, set_={c: getattr(stmt.excluded, c) for c in update}, where=where))


def made(result) -> bool:
    """Whether an `insert_ignore` made its row. SQLite reports it in rowcount; PostgreSQL fetches the new
    key with RETURNING (rowcount -1 then), which comes back empty when the conflict skipped the row."""
    if result.rowcount >= 0:
        return result.rowcount == 1
    key = result.inserted_primary_key
    return key is not None and key[0] is not None


# ----- SQLite ------------------------------------------------------------------------------------
def _corruption(exc: BaseException | None) -> str | None:
    """The one-line reason if a database error means the file is damaged (not busy, not a bug)."""
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.IntegrityError):
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if any(word in text.lower() for word in _CORRUPT):
            return text
    return None


def damaged_file(path: Path, what: str) -> StoreDamaged:
    return StoreDamaged(f"{path} {what}: {RESTORE} (vectors.faiss cannot replace it)")


def check_database_file(path: Path) -> None:
    """Before SQLite sees the file (its connect would create an empty one): there, non-empty, SQLite."""
    if not path.is_file():
        raise damaged_file(path, "is missing")
    if path.stat().st_size == 0:
        raise damaged_file(path, "is empty")
    try:
        with open(path, "rb") as handle:
            header = handle.read(100)
    except PermissionError:
        raise StoreDenied(f"permission denied reading {path}: {why_denied(path, path.parent, os.R_OK)}") from None
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        raise damaged_file(path, "is not a SQLite database (damaged header)")


def drop_own_sidecars(paths: list[Path]) -> None:
    """After a refused open: remove the empty -wal/-shm files SQLite made for this open (they did not
    exist before it), so that a refused open leaves the store's folder as it found it."""
    wal = next((p for p in paths if p.name.endswith("-wal")), None)
    if wal is not None and wal.exists() and wal.stat().st_size:
        return  # holds data someone wrote: not ours to remove
    for path in paths:
        path.unlink(missing_ok=True)


def _no_log(wal: Path, read_only_why: str) -> bool:
    """Whether an open that cannot write may read the file immutable (no locks, no sidecars): only with
    no write-ahead log, whose rows immutable would miss. On a full disk an empty log counts as none: a
    writer that could use it would have sized the -shm file, and then the plain read-only open works."""
    try:
        size = wal.stat().st_size
    except FileNotFoundError:
        return True
    return read_only_why == DISK_FULL and size == 0


def _sqlite_pragmas(writable: bool, path: Path | None = None):
    def apply(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        if writable:
            cursor.execute("PRAGMA journal_mode=WAL")  # readers run during a write
            if path is not None:  # SQLite gives -wal/-shm the database's mode, but this user's group
                for suffix in ("-wal", "-shm"):
                    share(path.with_name(path.name + suffix))
            # every commit copied into the database file at once (a passive checkpoint, by the committing
            # connection): a -wal file deleted or cut under open processes ("cleaning up" temporary-looking
            # files, a backup tool) lost every row committed since the last checkpoint (1000 pages: all the
            # rows of a working day), and a store opened then said "disk I/O error". Costs one more fsync per
            # write transaction (measured: 60 commits of 8 images, 6.5 s -> 9.4 s on a loaded 2-core box)
            cursor.execute("PRAGMA wal_autocheckpoint=1")
        cursor.execute("PRAGMA synchronous=FULL")  # a committed (acknowledged) write survives a crash
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s() * 1000)}")
        cursor.close()
    return apply


class _ShmGuard:
    """SQLite maps metadata.sqlite-shm (its log's index, rebuilt from the log whenever it reads as zeros). Cut
    short in place under a process (a clean-up of files that look temporary), the next read of a mapped page
    past the new end killed the process with SIGBUS. Before each transaction the file is given back the size
    this process saw: the pages read as zeros and SQLite rebuilds them (a cut in the microseconds between
    this check and SQLite's read still kills)."""

    def __init__(self, path: Path):
        self.path = path
        self.seen: tuple[int, int] | None = None  # (inode, size) at the last check

    def check(self) -> None:
        try:
            now = os.stat(self.path)
        except OSError:  # absent: a connection that maps it keeps its inode; a new one makes the file
            return
        seen = self.seen
        if seen is not None and seen[0] == now.st_ino and now.st_size < seen[1]:
            try:
                os.truncate(self.path, seen[1])
            except OSError:  # not this user's to write: as before
                pass
            return
        if seen is None or seen[0] != now.st_ino or now.st_size > seen[1]:
            self.seen = (now.st_ino, now.st_size)


def _sqlite_engine(path: Path, mode: str, immutable: bool = False, read_only_why: str | None = None) -> Engine:
    """An engine on exactly this file: mode rwc (create), rw (must exist) or ro (never writes the file).

    `immutable` (a folder nobody can write, with no write-ahead log in it: no writer can exist) reads
    without locks, so SQLite creates no -wal/-shm file where it could not anyway."""
    uri = path.resolve().as_uri() + f"?mode={mode}" + ("&immutable=1" if immutable else "")

    def connect():
        return sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=busy_timeout_s())

    engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool)
    event.listen(engine, "connect", _sqlite_pragmas(mode != "ro", path))
    shm = _ShmGuard(path.with_name(path.name + "-shm"))

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:  # explicit transactions; writers take the write lock up front (no BUSY upgrade)
        shm.check()
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

    @event.listens_for(engine, "handle_error")
    def _on_error(context) -> None:
        reason = _corruption(context.original_exception)
        if reason:
            raise damaged_file(path, f"is damaged ({reason})") from None
        problem = sqlite_failure(context.original_exception, path, read_only_why)
        if problem is not None:
            raise problem from None

    return engine


# ----- PostgreSQL --------------------------------------------------------------------------------
def _pg_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _pg_error(exc: BaseException | None, label: str) -> StoreError | None:
    """A PostgreSQL error that is not a bug in resynth, as a one-line StoreError (never "file damaged":
    the server owns its files). Connection failures, timeouts, an unknown database or role."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - no driver, no PostgreSQL errors
        return None
    problem = pg_failure(exc, label)
    if problem is not None:
        return problem
    if getattr(exc, "sqlstate", None) == "25P03":  # idle_in_transaction_session_timeout (PG_IDLE_WRITER_S)
        return StoreUnavailable(f"{label} ended this process's write transaction, idle for {PG_IDLE_WRITER_S:g} s "
                                "(was the process stopped?): nothing of it was committed; run the command again")
    if isinstance(exc, psycopg.OperationalError):
        state = getattr(exc, "sqlstate", None) or ""
        if not state or state.startswith(("08", "57P", "3D", "28")):  # no connection, shut down, no db, no login
            return unreachable(f"cannot reach {label}: {_pg_reason(exc)}")
        return StoreError(f"{label}: {_pg_reason(exc)}")
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return StoreReadOnly(f"{label} is open read-only")
    if isinstance(exc, psycopg.DataError) and "NUL" in str(exc):  # a safety net: keys.check_text refuses first
        return StoreInputError("text with a NUL character cannot be stored (PostgreSQL refuses it): remove it")
    return None


def _pg_engine(url: URL, mode: str, label: str) -> Engine:
    """An engine on a PostgreSQL database: pooled with pre-ping (several machines, server restarts),
    REPEATABLE READ snapshots for reads, and read-only sessions for a read-only open (`mode` "ro")."""
    password = os.environ.get(PASSWORD_ENV)
    if password:
        url = url.set(password=password)
    # lock_timeout: a writer waits for the write lock as long as SQLite's busy_timeout lets it (30 s)
    options = f"-c lock_timeout={int(busy_timeout_s() * 1000)}"
    if mode == "ro":
        options += " -c default_transaction_read_only=on"
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
            # a writer stopped (SIGSTOP, a frozen machine, a cut network) mid-transaction held the lock, and
            # every other writer of the store was refused, for as long as it stayed stopped: the server now
            # ends a write transaction left idle this long (the write lock goes with it; nothing committed)
            conn.exec_driver_sql(f"SET LOCAL idle_in_transaction_session_timeout = {int(PG_IDLE_WRITER_S * 1000)}")
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_WRITE_LOCK})")

    @event.listens_for(engine, "handle_error")
    def _on_error(context) -> None:
        if getattr(context, "is_pre_ping", False):
            return  # the pool reconnects on its own
        problem = _pg_error(context.original_exception, label)
        if problem is not None:
            raise problem from None

    return engine


# ----- dialects ----------------------------------------------------------------------------------
class Dialect:
    """What differs between the backends; one instance per store, chosen once at open."""

    backend: str
    trigger_names: tuple[str, ...]
    binds_database: bool  # whether the database records which store (embedder) it holds

    def tables(self, conn) -> set[str]:
        raise NotImplementedError

    def columns(self, conn, table: str) -> set[str]:
        raise NotImplementedError

    def triggers(self, conn) -> set[str]:
        raise NotImplementedError

    def vector_set_ddl(self, add: Callable[[str], str], drop: Callable[[str], str]) -> list[str]:
        """Triggers that run `add("NEW")` on insert, `drop("OLD")` on delete and both on update."""
        raise NotImplementedError

    def raw_sql(self, conn, statement: str) -> None:
        conn.exec_driver_sql(statement)

    def id_floor(self, conn, tables: set[str]) -> int:
        """The highest vector id the database ever handed out (deleted ones included), 0 if unknown."""
        return 0

    def narrow_seeds(self, conn) -> bool:
        """Whether images.seed is a 32-bit column (made by an older resynth), too small for 64-bit seeds."""
        return False  # SQLite: every INTEGER column holds 64 bits

    def integrity(self, conn, quick: bool = False) -> list[str]:
        """The database's own integrity check: ["ok"] or its first complaints."""
        return ["ok"]

    def probe_integrity(self, conn, db: "Database") -> str:
        """The check an open affords: "ok" or the first complaint (PostgreSQL checks its own pages)."""
        return "ok"

    def unreadable(self, db: "Database", reason: str) -> StoreError:
        """The error for a database the open probe could not read (`reason`: the driver's first line)."""
        return unreachable(f"cannot reach {db.label}: {reason}")

    def clock(self, session, write: bool = False) -> float:
        """Now, in seconds since the epoch, on the clock every user of this database shares (claims' leases
        are written and compared on it); `write`: `session` is a write session, which may record what it needs."""
        return time.time()


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _missing_table(exc: Exception) -> bool:
    return "no such table" in str(exc)


def _boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def _since_boot() -> float:
    """CLOCK_BOOTTIME as the machine counts it: a process in a time namespace (a container restored by CRIU,
    `unshare --time`) sees it shifted by its namespace's offset, which the boot id, shared by all, does not say."""
    since = time.clock_gettime(time.CLOCK_BOOTTIME)
    try:
        for line in Path("/proc/self/timens_offsets").read_text().splitlines():
            name, seconds, nanoseconds = line.split()
            if name in ("boottime", str(time.CLOCK_BOOTTIME)):
                since -= int(seconds) + int(nanoseconds) / 1e9
    except (OSError, ValueError):
        pass
    return since


class SqliteDialect(Dialect):
    backend = "sqlite"
    trigger_names = ("vector_sets_insert", "vector_sets_delete", "vector_sets_update")
    binds_database = False

    def __init__(self) -> None:
        self._epoch: tuple[str, float] | None = None  # (boot id, wall time at boot as this store recorded it)

    def clock(self, session, write: bool = False) -> float:
        """SQLite's users are processes of one machine (its write-ahead log needs shared memory), so their shared
        clock is the time since boot (CLOCK_BOOTTIME: no step of the wall clock moves it) plus the wall time at
        boot as the first writer of this boot read it, recorded in store_meta ("clock:<boot id>"). A process
        whose wall clock is stepped (an NTP correction, a resumed VM, a clock set an hour off) took live claims
        over, or kept its own past their lease; now neither, as on PostgreSQL's server clock. Where no boot id is
        known (not Linux) or none is recorded yet (a read before this boot's first claim), the wall clock."""
        boot = _boot_id()
        if boot is None:
            return time.time()
        since_boot = _since_boot()
        if self._epoch is None or self._epoch[0] != boot:
            key = f"clock:{boot}"
            try:
                recorded = session.execute(text("SELECT value FROM store_meta WHERE key = :key"), {"key": key}).scalar()
                if recorded is None and write:  # used, not kept: this transaction may yet roll back
                    session.execute(text("DELETE FROM store_meta WHERE key LIKE 'clock:%'"))  # earlier boots'
                    epoch = time.time() - since_boot
                    session.execute(text("INSERT INTO store_meta (key, value) VALUES (:key, :value)"),
                                    {"key": key, "value": repr(epoch)})
                    return epoch + since_boot
            except Exception as exc:  # noqa: BLE001 - a store from before store_meta: the wall clock, as before
                if not _missing_table(exc):
                    raise
                recorded = None
            if recorded is None:
                return time.time()
            self._epoch = (boot, float(recorded))
        return self._epoch[1] + since_boot

    def tables(self, conn) -> set[str]:
        return set(conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'").scalars())

    def columns(self, conn, table: str) -> set[str]:
        return {row[1] for row in conn.exec_driver_sql(f"PRAGMA table_info({table})")}

    def triggers(self, conn) -> set[str]:
        return set(conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='trigger'").scalars())

    def vector_set_ddl(self, add, drop) -> list[str]:
        ensure = "INSERT OR IGNORE INTO vector_sets (embedder, n, id_sum, id_mix) VALUES (NEW.embedder, 0, 0, 0);"
        return [f"DROP TRIGGER IF EXISTS {name}" for name in self.trigger_names] + [
            f"CREATE TRIGGER vector_sets_insert AFTER INSERT ON vectors BEGIN {ensure} {add('NEW')} END",
            f"CREATE TRIGGER vector_sets_delete AFTER DELETE ON vectors BEGIN {drop('OLD')} END",
            f"CREATE TRIGGER vector_sets_update AFTER UPDATE OF id, embedder ON vectors "
            f"BEGIN {drop('OLD')} {ensure} {add('NEW')} END"]

    def id_floor(self, conn, tables: set[str]) -> int:
        if "sqlite_sequence" not in tables:
            return 0
        return int(conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name='vectors'").scalar() or 0)

    def integrity(self, conn, quick: bool = False) -> list[str]:
        pragma = "PRAGMA quick_check(1)" if quick else "PRAGMA integrity_check(20)"
        return [str(r[0]) for r in conn.exec_driver_sql(pragma)]

    def probe_integrity(self, conn, db: "Database") -> str:
        if db.path.stat().st_size > QUICK_CHECK_MAX_BYTES:
            return "ok"  # too large to check at every open; `verify` checks it whole
        return self.integrity(conn, quick=True)[0]

    def unreadable(self, db: "Database", reason: str) -> StoreError:
        if "locked" in reason or "busy" in reason:
            return StoreBusy(f"{db.path} is locked by another process; try again")
        damage = sqlite_file_damage(db.path)  # restore advice only for a file that really is damaged
        if damage:
            return damaged_file(db.path, f"cannot be read ({reason}; {damage})")
        return StoreUnavailable(f"{db.path} cannot be opened ({reason}), though the file itself checks out: "
                                "check the store folder's permissions and disk, then try again")


class PostgresDialect(Dialect):
    backend = "postgresql"
    trigger_names = ("resynth_vector_sets",)
    binds_database = True

    def tables(self, conn) -> set[str]:
        return set(conn.exec_driver_sql("SELECT table_name FROM information_schema.tables "
                                        "WHERE table_schema = current_schema()").scalars())

    def columns(self, conn, table: str) -> set[str]:
        return set(conn.exec_driver_sql("SELECT column_name FROM information_schema.columns WHERE table_schema = "
                                        f"current_schema() AND table_name = '{table}'").scalars())

    def triggers(self, conn) -> set[str]:
        return set(conn.exec_driver_sql("SELECT tgname FROM pg_trigger WHERE tgrelid = "
                                        "to_regclass('vectors') AND NOT tgisinternal").scalars())

    def vector_set_ddl(self, add, drop) -> list[str]:
        ensure = ("INSERT INTO vector_sets (embedder, n, id_sum, id_mix) VALUES (NEW.embedder, 0, 0, 0) "
                  "ON CONFLICT (embedder) DO NOTHING;")
        return ["DROP TRIGGER IF EXISTS resynth_vector_sets ON vectors",
                "CREATE OR REPLACE FUNCTION resynth_vector_sets() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF TG_OP <> 'INSERT' THEN {drop('OLD')} END IF; "
                f"IF TG_OP <> 'DELETE' THEN {ensure} {add('NEW')} END IF; RETURN NULL; END $$",
                "CREATE TRIGGER resynth_vector_sets AFTER INSERT OR DELETE OR UPDATE OF id, embedder ON vectors "
                "FOR EACH ROW EXECUTE FUNCTION resynth_vector_sets()"]

    def raw_sql(self, conn, statement: str) -> None:
        conn.exec_driver_sql(statement.replace("%", "%%"))  # psycopg's paramstyle: '%' operators doubled

    def id_floor(self, conn, tables: set[str]) -> int:
        return int(conn.exec_driver_sql(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM vectors_id_seq").scalar() or 0)

    def clock(self, session, write: bool = False) -> float:
        """The server's clock: claims' leases are written and compared on it, so one client whose clock is
        off (skewed, stepped by NTP) neither takes live claims over nor holds its own past their lease."""
        return float(session.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar())

    def narrow_seeds(self, conn) -> bool:
        return conn.exec_driver_sql("SELECT data_type FROM information_schema.columns WHERE table_schema = "
                                    "current_schema() AND table_name = 'images' AND column_name = 'seed'"
                                    ).scalar() == "integer"


class Database:
    """The store's engines and sessions, its dialect, and how messages name it.

    `mode`: "rwc" (create), "rw" or "ro" (a read-only open never writes)."""

    def __init__(self, root: Path, config: dict, mode: str, writable: bool, read_only_why: str | None = None):
        self.writable = writable
        self.read_only_why = read_only_why  # why this process cannot write the store folder, if it cannot
        self.root = root
        self.url: URL | None = None
        self.new_sidecars: list[Path] = []  # -wal/-shm files absent before this open
        if config.get("db"):
            try:
                self.url = parse_db_url(config["db"])
            except StoreInputError:
                raise StoreDamaged(f"store config {root / 'store.json'} has an unusable database URL: "
                                   "restore it from a backup") from None
            self.dialect: Dialect = PostgresDialect()
            self.label = db_label(self.url)
            self.restore_hint = f"restore {self.label} from a backup"
            self.short_name = self.label
            self.engine = _pg_engine(self.url, mode, self.label)
            # writers see each statement's latest committed state once they hold the write lock
            self.write_engine = self.engine.execution_options(immediate=True, isolation_level="READ COMMITTED")
        else:
            self.path = root / "metadata.sqlite"
            self.dialect = SqliteDialect()
            self.label, self.restore_hint, self.short_name = str(self.path), RESTORE, self.path.name
            if mode != "rwc":
                check_database_file(self.path)
            sidecars = [self.path.with_name(self.path.name + suffix) for suffix in ("-wal", "-shm")]
            self.new_sidecars = [p for p in sidecars if not p.exists()]
            immutable = mode == "ro" and read_only_why is not None and _no_log(sidecars[0], read_only_why)
            self.engine = _sqlite_engine(self.path, mode, immutable, read_only_why)
            self.write_engine = self.engine.execution_options(immediate=True)
        self._read_factory = sessionmaker(self.engine, expire_on_commit=False)
        self._write_factory = sessionmaker(self.write_engine, expire_on_commit=False)
        # what an older database lacks (set by migrations.probe; all True once migrated)
        self.has_checksums = self.has_tombstones = self.has_claims = self.has_vector_sets = True
        self.has_wide_seeds = self.has_pending_tasks = True

    def session(self) -> Session:
        return self._read_factory()

    def reads(self) -> Connection:
        """A connection for the lookups a cached query makes (a few Core SELECTs, no ORM objects): the
        same engine, transaction and error handling as `session`, at about two thirds of its cost."""
        return self.engine.connect()

    def write_session(self) -> Session:
        """A session whose transaction takes the store's write lock at BEGIN (no lock-upgrade failures)."""
        if not self.writable:
            raise refuse_write(self.root, self.read_only_why)
        return self._write_factory()

    def damaged(self, what: str) -> StoreDamaged:
        return StoreDamaged(f"{self.label} {what}: {self.restore_hint} (vectors.faiss cannot replace it)")

    def dispose(self, refused: bool = False) -> None:
        """Close every connection; after a refused open, also the sidecar files this open made."""
        self.engine.dispose()
        if refused:
            drop_own_sidecars(self.new_sidecars)
