"""A store folder on disk: the names of its files, the one atomic-write helper every file write uses,
the cross-process publish lock and the housekeeping of temporary and image files.

Shared by the store's parts as their view of the store itself: `Layout` also holds the config
(store.json, which names the live index file and the embedder) and whether this process may write.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import numbers
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

from index.claims import pid_alive
from index.errors import StoreBusy, StoreDamaged, StoreError, StoreInputError, StoreUnavailable, moved_store
from index.failures import NOTHING_LOST, os_failure, refuse_write
from index.faults import crash_point
from index.objects import ImageFiles, image_files
from index.sharing import share

CONFIG_NAME = "store.json"
DB_NAME = "metadata.sqlite"
INDEX_NAME = "vectors.faiss"
SEARCH_NAME = "search.faiss"  # the search index (IVF) built by rebuild(); absent while exact search suffices
SEARCH_INFOS = "search.json"  # what rebuild() chose and measured for it (type, count, nprobe, recall, timings)
LOCK_NAME = "store.lock"
LOCK_ENV, LOCK_TIMEOUT_S = "RESYNTH_LOCK_TIMEOUT_S", 600.0  # the publish lock's wait (a rebuild at 1M holds it)
LOCK_NOTICE_S = 1.0  # a wait for the publish lock longer than this is said (once)
FORMAT = 1
ORPHAN_GRACE_S = 600.0  # an unreferenced image file younger than this may be a commit in flight
TEMP_RE = re.compile(r"^\..+\.(\d+)\.tmp$")
INDEX_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\.faiss$")  # a bare name in the folder: vectors[-<hash>].faiss

log = logging.getLogger(__name__)


def temp_path(path: Path) -> Path:
    """Where a write of `path` is prepared: beside it (same filesystem, so the rename is atomic), named
    by this process so that leftovers of dead writers can be told apart and removed."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], point: str) -> None:
    """Write beside the target, fsync, rename, fsync the folder: a reader sees the old file or the new
    one, never half. `point` names the crash point between the fsync and the rename. A failed write
    leaves no temporary file behind."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        publish(tmp, path, point)  # fsyncs it
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. a read-only filesystem: then there is no temporary file either
        cause = _os_cause(exc)
        if isinstance(cause, OSError):
            raise (os_failure(cause, path, f"writing {path.name}") or _unclassified(cause, path)) from exc
        raise


def _unclassified(exc: OSError, path: Path) -> StoreError:
    """Any other OSError of a store file write, still one line: something that is not a file in the file's
    place (a folder, a link loop), or a refusal failures.py does not name."""
    why = exc.strerror or type(exc).__name__
    if exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENOTEMPTY, errno.EEXIST):
        return StoreDamaged(f"cannot write {path} ({why}): something that is not the store's file is in its place; "
                            "move it away and run the command again")
    return StoreUnavailable(f"cannot write {path} ({why}): {NOTHING_LOST}; the same command succeeds once the "
                            "cause is gone")


def _os_cause(exc: BaseException) -> BaseException:
    """The OSError behind `exc`: FAISS reports a failed write of its writer callback as RuntimeError."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    return seen if seen is not None else exc


def publish(prepared: Path, path: Path, point: str | None = None) -> None:
    """The second half of `atomic_write`, for a file another library wrote (FAISS's on-disk lists):
    fsync it, rename it over `path`, fsync the folder."""
    with open(prepared, "rb") as handle:
        os.fsync(handle.fileno())
    share(prepared)  # in a team's folder: the group's to write, whatever this user's umask
    if point:
        crash_point(point)
    os.replace(prepared, path)
    fsync_dir(path.parent)


def unlink_quietly(path: Path) -> bool:
    """Delete a leftover (a dead writer's temporary file, a superseded segment): whether it is gone. A
    refusal (read-only, permission, I/O) leaves it for later rather than failing a command whose work is
    done: leftovers are reported by verify and removed by the next save or repair."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        return False
    return True


def lock_timeout_s() -> float:
    """How long a save waits for another process's publish lock (RESYNTH_LOCK_TIMEOUT_S): long enough for
    a rebuild of a large store, but a lock held by a hung program ends in one line, never a hang."""
    from index.failures import env_seconds

    return env_seconds(LOCK_ENV, LOCK_TIMEOUT_S)


def _wait_for_lock(fd: int, path: Path) -> None:
    started = time.monotonic()
    deadline, said = started + lock_timeout_s(), False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not said and time.monotonic() - started >= LOCK_NOTICE_S:  # minutes of silence read as a hang
                log.warning("%s is held by another process (a save, a rebuild, a verify): waiting for it, %g s at "
                            "most (%s)", path, lock_timeout_s(), LOCK_ENV)
                said = True
            if time.monotonic() >= deadline:
                raise StoreBusy(f"{path} is held by another process (waited {lock_timeout_s():g} s for the store's "
                                f"publish lock; {LOCK_ENV} sets how long): let it finish or stop it, then run the "
                                f"command again; {NOTHING_LOST}") from None
            time.sleep(0.02)
        except OSError as exc:
            raise _lock_refused(exc, path) from exc


NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _lock_refused(exc: OSError, path: Path) -> StoreError:
    """A publish lock the file system will not give (NFS without its lock daemon, some FUSE and network
    file systems: ENOLCK, ENOTSUP): one line, never a traceback, and never a save without the lock (two
    processes would publish over each other)."""
    if exc.errno in NO_LOCKS:
        return StoreUnavailable(f"the file system holding {path} does not support file locks "
                                f"({exc.strerror or errno.errorcode.get(exc.errno or 0, 'refused')}), which the "
                                f"store needs to publish its index: keep the store on a local file system (or "
                                f"enable locking there); {NOTHING_LOST}")
    return os_failure(exc, path, "taking the store's publish lock") or _unclassified(exc, path)


def _open_lock(path: Path) -> int:
    """store.lock for flock: made group-writable in a team's folder; another user's lock file this user may
    only read still serves (flock needs no write access), so a teammate's umask cannot block saves."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY)
    share(path)
    return fd


@contextmanager
def creating(folder: Path) -> Iterator[None]:
    """Held by a store's creation from its first file to store.json: flock on the store folder itself (no file of
    its own), so two `init`s at once cannot both find no store.json and bind the folder each to its embedder."""
    fd = _open_quietly(folder)  # None for a folder this user may write but not read: creation says what is wrong
    try:
        if fd is not None:
            try:
                _wait_for_lock(fd, folder)
            except StoreError as exc:
                # held past the wait; a file system without locks makes nothing to race for here, nor NFS, whose
                # flock is a byte-range lock that wants a descriptor open for writing (EBADF for a folder's)
                if not isinstance(exc.__cause__, OSError) or exc.__cause__.errno not in (*NO_LOCKS, errno.EBADF):
                    raise
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _open_quietly(path: Path) -> int | None:
    """A read-only descriptor of `path` to flock, or None where there is none to open."""
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


def write_json_atomic(path: Path, value: dict, point: str = "config:before-replace") -> None:
    data = json.dumps(value, indent=2, sort_keys=True).encode()

    def write(handle: IO[bytes]) -> None:
        handle.write(data)
    atomic_write(path, write, point)


def file_state(path: Path) -> tuple[int, int] | None:
    """(inode, mtime): changes whenever another process replaces the file."""
    try:
        stat = path.stat()
    except OSError:  # absent, or not a file that can be read (a link loop): as good as absent
        return None
    return stat.st_ino, stat.st_mtime_ns


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_config(path: Path, config: object) -> None:
    """StoreDamaged unless `config` (store.json at `path`) is usable: an embedder identity, a positive
    whole vector size and an index file that is a vectors file of this store (`index_file_name`)."""
    try:
        identity = config["embedder"]["identity"]  # type: ignore[index]
    except (KeyError, TypeError):
        identity = None
    if not isinstance(config, dict) or not isinstance(identity, str) or not identity:
        raise StoreDamaged(f"store config {path} is malformed: restore it from a backup")
    dim = config.get("dim")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim <= 0:
        raise StoreDamaged(f"{path} gives the vector size as {dim!r}, not a positive whole number: restore "
                           "store.json from a backup")
    index_file_name(path, config)


def read_config(root: Path) -> dict:
    """store.json, refused in one line when it is not one this resynth reads (Layout checks the rest)."""
    path = root / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
        config["embedder"]["identity"], config["dim"]
    except (ValueError, KeyError, TypeError):
        raise StoreDamaged(f"store config {path} is malformed: restore it from a backup") from None
    except OSError as exc:
        raise StoreDamaged(f"store config {path} cannot be read ({exc.strerror or type(exc).__name__}): make it "
                           "readable or restore it from a backup") from None
    version = config.get("format")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT:
        raise StoreInputError(f"store {root} was made by a newer resynth (store format {version}; this resynth "
                              f"reads format {FORMAT}): upgrade resynth to open it")
    if version != FORMAT or isinstance(version, bool):
        raise StoreDamaged(f"{path} gives the store format as {version!r}, not one this resynth writes ({FORMAT}): "
                           "restore store.json from a backup")
    return config


def index_file_name(path: Path, config: dict) -> str:
    """The index file store.json (at `path`) names (a re-embedded store names a new one, so the switch is
    one atomic replace of store.json). Only a bare `*.faiss` name other than the search index's: a
    store.json edited to name metadata.sqlite, store.json or a path outside the folder would have the
    next save replace that file with an index."""
    name = config.get("index_file", INDEX_NAME)
    if not isinstance(name, str) or not INDEX_FILE_RE.match(name) or name == SEARCH_NAME:
        raise StoreDamaged(f"{path} names {name!r} as its index file, not a vectors file of this store: restore "
                           f"store.json from a backup (or set \"index_file\" to \"{INDEX_NAME}\")")
    return name


class Layout:
    """The store folder, its config and whether this process writes to it."""

    def __init__(self, root: Path, config: dict, writable: bool, read_only_why: str | None = None):
        self.root = root
        self.config = config
        self.writable = writable
        self.read_only_why = read_only_why  # why this process cannot write the folder, if it cannot
        self._images: ImageFiles | None = None
        check_config(self.config_path, config)  # a store.json naming another file is refused at open
        self._place = _folder_identity(root)  # which folder `root` named at open (check_in_place)
        self._real_root = Path(os.path.realpath(root))  # every link followed (inside)

    def adoptable(self, config: object) -> bool:
        """Whether store.json as re-read from disk (`config`) may replace this store's config: False for
        another embedder's (a switch is picked up by reopening, as before); StoreDamaged for a file an
        open would refuse, or one giving this embedder another vector size."""
        check_config(self.config_path, config)
        assert isinstance(config, dict)  # check_config says so
        if config["embedder"]["identity"] != self.embedder_identity:
            return False
        if config["dim"] != self.dim:
            raise StoreDamaged(f"{self.config_path} gives {self.embedder_identity} the vector size {config['dim']}, "
                               f"not {self.dim}: restore store.json from a backup")
        return True

    @property
    def images(self) -> ImageFiles:
        """Where the image files live: this folder, or the object store config["images"] names (objects.py)."""
        if self._images is None:
            self._images = image_files(self)
        return self._images

    @property
    def embedder_identity(self) -> str:
        return self.config["embedder"]["identity"]

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def db_path(self) -> Path:
        return self.root / DB_NAME

    @property
    def index_path(self) -> Path:
        """The index file store.json names (`index_file_name` says which names are taken)."""
        return self.root / index_file_name(self.config_path, self.config)

    @property
    def search_path(self) -> Path:
        return self.root / SEARCH_NAME

    @property
    def search_infos_path(self) -> Path:
        return self.root / SEARCH_INFOS

    def require_writable(self) -> None:
        if not self.writable:
            raise refuse_write(self.root, self.read_only_why)
        self.check_in_place()

    def check_in_place(self) -> None:
        """Refuse work once the store folder was moved, renamed or replaced under this process (a link
        retargeted, a backup restored in its place). Its open database file moved with the folder, but
        paths did not: a server kept writing images, vectors.faiss and store.lock into a new folder at
        the old path while the rows went to the moved database, whose images were then missing."""
        if self.moved():
            raise moved_store(self.root)

    def moved(self) -> bool:
        return self._place is not None and _folder_identity(self.root) != self._place

    def save_config(self, config: dict | None = None) -> None:
        """Write store.json (atomically); then `config`, if given, is this store's config."""
        write_json_atomic(self.config_path, self.config if config is None else config)
        if config is not None:
            self.config = config

    @contextmanager
    def file_lock(self) -> Iterator[None]:
        """Cross-process lock for publishing vectors.faiss (flock on store.lock in the store folder)."""
        self.require_writable()
        lock = self.root / LOCK_NAME
        try:
            fd = _open_lock(lock)
        except OSError as exc:
            raise (os_failure(exc, lock, "taking the store's publish lock") or _unclassified(exc, lock)) from exc
        try:
            _wait_for_lock(fd, self.root / LOCK_NAME)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextmanager
    def between_saves(self) -> Iterator[bool]:
        """For a reader that must see the index files as no save is between its steps (verify's leftovers): the
        publish lock taken shared while it reads, if free now; yields False when another process holds it (a
        save in progress: the files it wrote are not published yet). Never waits, never makes store.lock."""
        fd = _open_quietly(self.root / LOCK_NAME)  # None: absent (no save ever ran) or unreadable
        free = True
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    free = False
                except OSError:  # a file system without locks: saves refuse there, so none is in progress
                    pass
            yield free
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    # ----- image files and leftovers (in this folder; objects.py for the object-store side) ------
    def file_path(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.root / path

    def inside(self, path: Path) -> Path | None:
        """`path` with every link followed, if that lies below a folder of the store (not a store file);
        None when a link leads out of it. Paths are compared only in this form: a store opened through a
        link (or a path with one) named its rows' files by the link and listed images/ by the real path,
        so `verify` took every image for an orphan and `--repair` deleted them all."""
        real = Path(os.path.realpath(path))
        try:
            relative = real.relative_to(self._real_root)
        except ValueError:
            return None
        return real if len(relative.parts) >= 2 else None

    def own_file(self, stored: str) -> Path | None:
        """The file a row points at if it lies inside the store (below a folder, not a store file)."""
        return self.inside(self.file_path(stored))

    def images_folder(self) -> Path | None:
        """images/ (links followed) when it is a folder inside the store; None when there is none, or when
        it leads outside (a link to another disk): files there are not the store's to list or delete."""
        folder = Path(os.path.realpath(self.root / "images"))
        return folder if self._real_root in folder.parents and folder.is_dir() else None

    def images_elsewhere(self) -> Path | None:
        """Where images/ leads when a link takes it outside the store (verify notes it)."""
        folder = self.root / "images"
        return Path(os.path.realpath(folder)) if folder.is_dir() and self.images_folder() is None else None

    def remove_files(self, paths: set[Path]) -> None:
        """Delete image files, and the folders they leave empty (up to the store folder). After the commit
        that dropped their rows: one the machine will not delete stays an orphan (verify reports it,
        repair removes it), never a failed command."""
        root = self.root.resolve()
        for path in paths:
            unlink_quietly(path)
            folder = path.parent
            while folder != root and root in folder.parents:
                try:
                    folder.rmdir()  # only if empty
                except OSError:
                    break
                folder = folder.parent

    def temp_files(self, deep: bool = False) -> list[Path]:
        found = [p for p in self.root.glob(".*.tmp") if TEMP_RE.match(p.name)]
        folder = self.images_folder() if deep else None
        if folder is not None:
            found += [p for p in _files_below(folder) if TEMP_RE.match(p.name)]
        return found

    def live_temp_files(self, deep: bool = False) -> tuple[list[Path], list[Path]]:
        """`temp_files` as (left by dead writers, being written by a live process of this machine)."""
        dead: list[Path] = []
        live: list[Path] = []
        for path in self.temp_files(deep):
            match = TEMP_RE.match(path.name)
            (live if match and pid_alive(int(match.group(1))) else dead).append(path)
        return dead, live

    def remove_stale_temp_files(self, deep: bool = False) -> list[str]:
        """Remove `.NAME.<pid>.tmp` leftovers whose writer is dead (at the root; under images/ if deep).
        Housekeeping, never a reason to fail: nothing on a read-only store, and a leftover the machine
        will not let go stays (verify reports it)."""
        if not self.writable:
            return []
        removed = []
        for path in self.temp_files(deep):
            match = TEMP_RE.match(path.name)
            pid = int(match.group(1)) if match else 0
            if pid != os.getpid() and not pid_alive(pid) and unlink_quietly(path):
                removed.append(str(path.relative_to(self.root)))
        return removed

    def orphans(self, referenced: set[Path]) -> tuple[list[Path], list[Path]]:
        """Unreferenced files under images/: (old enough to remove, too recent to judge)."""
        folder = self.images_folder()
        if folder is None:
            return [], []
        old: list[Path] = []
        recent: list[Path] = []
        now = time.time()
        for path in sorted(_files_below(folder)):
            if TEMP_RE.match(path.name) or path in referenced:
                continue
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue  # removed meanwhile
            (recent if now - mtime < ORPHAN_GRACE_S else old).append(path)
        return old, recent


def _files_below(folder: Path) -> Iterator[Path]:
    """Plain files under `folder`, never through a link (a linked folder or file may lead out of the store)."""
    for parent, _, names in os.walk(folder):
        for name in names:
            path = Path(parent) / name
            if not path.is_symlink() and path.is_file():
                yield path


def _folder_identity(root: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(root)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino
