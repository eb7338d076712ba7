"""Whole-file SHA-256 of model weights, remembered across processes.

`source add` records every weight file's whole SHA-256, and each process that generates checks it again: at the
0.3-0.45 GB/s this machine hashes, a 7 GB SDXL folder cost 16 s per process (a repository snapshot with its own
.ckpt files beside the folders, 20 GB and more). A digest is remembered under the file's identity and stat (path,
device, inode, size, mtime, ctime): no write() leaves all of them as they were (the kernel sets ctime at every write
and utime, and no call of a user's sets it back; a program writing through a memory map updates them only when a
clean page is first written, and NFS may answer a stat from attributes cached for up to a minute). Timestamps are
coarse (a kernel tick), so a write in the same tick as the hash could keep them: a digest is remembered only when
the file's stat did not change while it was read and its ctime is SETTLED_S older than the first stat (git's
"racily clean" rule).

The memory is this process's dict and, for files of PERSIST_FROM bytes or more, a per-user SQLite file
($RESYNTH_HASH_CACHE, else $XDG_CACHE_HOME/resynth/file-hashes.sqlite, else ~/.cache/resynth/...). It is only ever
a cache: a cache file that is missing, locked, on a full or read-only disk, damaged, or not this user's alone
(another user's, or writable by others: a planted digest would pass an edited weight file as unchanged) is
passed over and the file hashed. RESYNTH_HASH_CACHE=off turns the file off.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Callable

SETTLED_S = 2.0
PERSIST_FROM = 64 << 20  # smaller files hash faster than a cache file opens
_HASHES: dict[tuple, str] = {}
_LOCK = threading.Lock()
_OFF = {"off", "0", "no", "none", "false"}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's whole content, read once per unchanged file (per process, and per user for big ones)."""
    path = Path(path)
    started = time.time_ns()  # before the first stat: an edit after it, in the same tick, must not be remembered
    key = _identity(path)
    with _LOCK:
        known = _HASHES.get(key)
    if known is None and key[3] >= PERSIST_FROM:
        known = _recall(key)
    if known is not None:
        with _LOCK:
            _HASHES[key] = known
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if _identity(path) == key and key[5] < started - SETTLED_S * 1e9:
        with _LOCK:
            _HASHES[key] = value
        if key[3] >= PERSIST_FROM:
            _remember(key, value)
    return value


def _identity(path: Path) -> tuple:
    info = path.stat()
    return (str(path.resolve()), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def cache_path() -> Path | None:
    """Where digests are remembered for this user; None when turned off or no home is known."""
    given = os.environ.get("RESYNTH_HASH_CACHE")
    if given is not None and given.strip().lower() in _OFF:
        return None
    if given:
        return Path(os.path.expanduser(given))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):  # no home known (expanduser left "~"), or a relative XDG value the spec says to ignore
        return None
    return Path(base) / "resynth" / "file-hashes.sqlite"


def _trusted(path: Path, kind: Callable[[int], bool] = stat.S_ISREG) -> bool:
    """This user's own file (or folder), writable by nobody else, and no link a planted file could hide behind."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return kind(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022


def _all_trusted(where: Path) -> bool:
    """The cache file, its folder (where another user could plant a hot journal SQLite plays back on opening)
    and any journal or log beside it: all this user's alone."""
    sidecars = [where.with_name(where.name + suffix) for suffix in ("-journal", "-wal", "-shm")]
    return (_trusted(where.parent, stat.S_ISDIR) and _trusted(where)
            and all(_trusted(side) for side in sidecars if os.path.lexists(side)))


def _connect(create: bool) -> sqlite3.Connection | None:
    where = cache_path()
    if where is None:
        return None
    if not os.path.lexists(where):
        if not create:
            return None
        where.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # ours and private from the start
    if not _all_trusted(where):
        return None
    connection = sqlite3.connect(where, timeout=0.2, isolation_level=None)
    try:
        connection.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, dev INTEGER, ino INTEGER, "
                           "size INTEGER, mtime INTEGER, ctime INTEGER, sha256 TEXT)")
    except BaseException:
        connection.close()
        raise
    return connection


def _recall(key: tuple) -> str | None:
    try:
        connection = _connect(create=False)
        if connection is None:
            return None
        with closing(connection):
            row = connection.execute("SELECT dev, ino, size, mtime, ctime, sha256 FROM digests WHERE path = ?",
                                     (os.fsencode(key[0]),)).fetchone()
    except (OSError, sqlite3.Error) as exc:
        _forget_damaged(exc)
        return None
    if row is None or tuple(row[:5]) != key[1:] or not _is_digest(row[5]):
        return None
    return str(row[5])


def _remember(key: tuple, value: str) -> None:
    try:
        connection = _connect(create=True)
        if connection is None:
            return
        with closing(connection):
            connection.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (os.fsencode(key[0]), *key[1:], value))  # bytes: a name need not be UTF-8
    except (OSError, sqlite3.Error) as exc:  # locked, full, read-only: the next process hashes again
        _forget_damaged(exc)


def _forget_damaged(exc: Exception) -> None:
    """A damaged SQLite cache file is ours and worthless: remove it so the next one is sound. A file that is no
    SQLite file at all stays (RESYNTH_HASH_CACHE naming a user's own file by mistake must not delete it)."""
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        where = cache_path()
        try:
            if where is not None and _all_trusted(where):
                with open(where, "rb") as handle:
                    if handle.read(16) == b"SQLite format 3\0":
                        where.unlink()
        except OSError:
            pass


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)

