"""What the machine's refusals mean for the store: OS, SQLite and PostgreSQL errors a user's machine can
cause, as typed one-line errors (index.errors) that name the cause and the way out.

Advice to restore from a backup is given only when a check of the file says it is damaged
(`sqlite_file_damage`): a healthy database on a read-only mount, a locked one or a full disk never
get it.
"""
from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from index.errors import (StoreBusy, StoreDenied, StoreError, StoreFull, StoreInputError, StoreReadOnly,
                          StoreUnavailable)
from index.sharing import why_denied

BUSY_ENV = "RESYNTH_BUSY_TIMEOUT_S"
BUSY_TIMEOUT_S = 30.0
NOTHING_LOST = "nothing acknowledged was lost"
DISK_FULL = "no space left on the device"  # why an open on a full disk reads without writing (store.Store)


def env_seconds(name: str, default: float) -> float:
    """A duration from the environment variable `name`, `default` when unset or empty; anything but a
    number >= 0 is one line (a typo silently waiting 30 s instead of the 300 asked for would hide)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0:  # NaN too
        raise StoreInputError(f"{name}={raw[:40]!r} is not a number of seconds >= 0 (unset it for the default "
                              f"{default:g} s)")
    return value


def busy_timeout_s() -> float:
    """How long a writer waits for another's write lock (SQLite busy_timeout, PostgreSQL lock_timeout)."""
    return env_seconds(BUSY_ENV, BUSY_TIMEOUT_S)


def read_only_reason(root: Path) -> str | None:
    """Why this process cannot write the store folder, or None when it can."""
    try:
        if os.statvfs(root).f_flag & os.ST_RDONLY:
            return "read-only filesystem"
    except OSError:
        return None
    if not os.access(root, os.W_OK | os.X_OK):
        return f"{PERMISSION}: {why_denied(root, root)}"
    for name in IN_PLACE:  # the files a write changes in place (the rest is replaced by a rename)
        path = root / name
        if os.path.lexists(path) and not os.access(path, os.W_OK):
            return f"{PERMISSION}: {why_denied(path, root)}"
    return None


PERMISSION = "permission denied"
IN_PLACE = ("metadata.sqlite", "metadata.sqlite-wal", "metadata.sqlite-shm")


def read_only(root: Path, reason: str, doing: str = "this command writes to it") -> StoreReadOnly:
    if reason.startswith(PERMISSION + ":"):  # names the file and the fix: keep the line short
        return StoreReadOnly(f"the store at {root} is read-only ({reason}); {doing}, and commands that only read "
                             "(stats, source list, verify, a cached attribute) work here")
    return StoreReadOnly(f"the store at {root} is read-only ({reason}): {doing}; run it where the store can be written "
                         "(read-only commands such as stats, source list and verify work here)")


def refuse_write(root: Path, read_only_why: str | None) -> StoreReadOnly | StoreFull:
    """The error for a write asked of a read-only store: opened so, unable to write its folder, or opened
    on a full disk (then the write is refused as the full disk it would meet)."""
    if read_only_why == DISK_FULL:
        return full(root, "this command writes to the store")
    if read_only_why:
        return read_only(root, read_only_why)
    return StoreReadOnly(f"store {root} is open read-only")


def full(where: Path, doing: str) -> StoreFull:
    return StoreFull(f"no space left on the device holding {where} ({doing}): free some space and run the "
                     f"command again; {NOTHING_LOST}")


def _space_left(folder: Path) -> int | None:
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def os_failure(exc: BaseException, path: Path, doing: str, root: Path | None = None) -> StoreError | None:
    """An OSError of a store file write as a typed error (None: not one a machine causes); `root`, the store
    folder, makes a permission fix one for the whole store."""
    if not isinstance(exc, OSError):
        return None
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return full(path.parent, doing)
    if code == errno.EROFS:
        return read_only(path.parent, "read-only filesystem", doing)
    if code in (errno.EACCES, errno.EPERM):
        return StoreDenied(f"permission denied on {path} ({doing}): {why_denied(path, root)}; {NOTHING_LOST}")
    if code == errno.EIO:
        return StoreUnavailable(f"input/output error on {path} ({doing}): check the disk; {NOTHING_LOST}")
    return None


def sqlite_file_damage(path: Path) -> str | None:
    """Why the SQLite file at `path` is damaged, or None when it checks out: header, then quick_check
    through a connection that writes nothing (immutable: no locks, no sidecar files)."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(100)
    except OSError:
        return None  # unreadable is not damaged: permissions, a missing mount
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return "damaged header"
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro&immutable=1", uri=True)
        try:
            result = conn.execute("PRAGMA quick_check(1)").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc).splitlines()[0] if str(exc) else "unreadable"
    if not result or result[0] != "ok":
        return str(result[0]).splitlines()[0] if result else "fails its integrity check"
    return None


def sqlite_failure(exc: BaseException | None, path: Path, read_only_why: str | None) -> StoreError | None:
    """A SQLite error a machine causes (full, locked, read-only, denied, I/O) as a typed error; None for
    corruption (checked elsewhere) and for bugs."""
    if not isinstance(exc, sqlite3.Error) or isinstance(exc, sqlite3.IntegrityError):
        return None
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if name == "SQLITE_FULL" or "database or disk is full" in text:
        return full(path.parent, f"writing {path.name}")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text:
        return StoreBusy(f"{path} is locked by another program (waited {busy_timeout_s():g} s for its lock): "
                         f"close that program or try again later; {NOTHING_LOST}")
    if read_only_why == DISK_FULL and (name.startswith("SQLITE_READONLY") or "readonly database" in text):
        return full(path.parent, f"writing {path.name}")
    if name.startswith("SQLITE_READONLY") or "readonly database" in text:
        return read_only(path.parent, read_only_why or "the database file cannot be written")
    if name in ("SQLITE_PERM", "SQLITE_AUTH"):
        return StoreDenied(f"permission denied on {path}: give this user access to the store folder")
    if name.startswith("SQLITE_IOERR") or "disk I/O error" in text:
        space = _space_left(path.parent)
        if space is not None and space < (1 << 20):
            return full(path.parent, f"writing {path.name}")
        return StoreUnavailable(f"{path}: {text} (the disk refused a read or write): check the disk and try "
                                f"again; {NOTHING_LOST}")
    if name.startswith("SQLITE_CANTOPEN") or "unable to open database file" in text:
        length = len(os.fsencode(os.path.realpath(path)))  # SQLite follows links: a shorter one does not help
        if length + len("-journal") > SQLITE_MAX_PATH:
            return StoreInputError(f"SQLite opens no database whose path passes {SQLITE_MAX_PATH - len('-journal')} "
                                   f"bytes, and the store's is {length} ({path}, links followed): move the store "
                                   "to a shorter path")
        if not os.path.lexists(path) and not os.access(path.parent, os.W_OK | os.X_OK):  # `init` in a folder
            return StoreDenied(f"permission denied creating {path.name}: {why_denied(path)}")  # someone else's
        if not os.access(path, os.R_OK):
            return StoreDenied(f"permission denied reading {path}: {why_denied(path, path.parent, os.R_OK)}")
        if read_only_why == DISK_FULL:
            return full(path.parent, f"opening {path.name}'s write-ahead log")
        if read_only_why:
            return StoreReadOnly(f"the store at {path.parent} is read-only ({read_only_why}) and its database "
                                 "has a write-ahead log SQLite cannot open without writing: open the store once "
                                 "where it can be written (that completes the log), then read it here")
        return StoreUnavailable(f"cannot open {path} ({text}): check the store folder's permissions and disk")
    return None


# SQLite's unix VFS takes paths of at most 512 bytes, its "-journal" name included (MAX_PATHNAME): a store
# folder deeper than about 490 bytes was "unable to open database file: check the permissions", misleading
SQLITE_MAX_PATH = 512


# what a server out of connection slots answers a login (the role's or database's CONNECTION LIMIT,
# max_connections), which reaches the driver as a bare OperationalError
TOO_MANY_CONNECTIONS = ("too many connections for", "sorry, too many clients already",
                        "remaining connection slots are reserved")


def pg_failure(exc: BaseException | None, label: str) -> StoreError | None:
    """A PostgreSQL refusal a machine causes (lock timeout, disk full, permission denied) as a typed error."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - no driver, no PostgreSQL errors
        return None
    if not isinstance(exc, psycopg.Error):
        return None
    state = getattr(exc, "sqlstate", None) or ""
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    if state in ("55P03", "40P01"):  # lock_not_available (lock_timeout), deadlock_detected
        return StoreBusy(f"{label} is locked by another program (waited {busy_timeout_s():g} s for the store's "
                         f"write lock): close that program or try again later; {NOTHING_LOST}")
    if state == "53100":  # disk_full
        return StoreFull(f"{label} has no space left ({reason}): free space on the database server and run "
                         f"the command again; {NOTHING_LOST}")
    if not state and any(said in str(exc) for said in TOO_MANY_CONNECTIONS):  # refused at login: libpq gives no state
        state = "53300"
    if state.startswith("53"):  # insufficient resources (memory, connections)
        return StoreUnavailable(f"{label} is out of resources ({reason}): try again later; {NOTHING_LOST}")
    if state == "42501":  # insufficient_privilege
        return StoreDenied(f"{label} denied access ({reason}): grant this role access to the store's tables")
    return None
