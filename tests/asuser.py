"""The child side of tests/test_permissions.py: a process forked from tests/procs.py's warm server that takes
a private mount namespace (so that the folders it needs are reachable), becomes a user, and runs `resynth`.
Kept apart from the test module so that the child imports no pytest."""
from __future__ import annotations

import ctypes
import os
import pwd
import stat
import sys
import tempfile
from pathlib import Path

CLONE_NEWNS, MS_REC, MS_PRIVATE, MS_BIND, MS_MOVE, MNT_DETACH = 0x20000, 0x4000, 0x40000, 0x1000, 0x2000, 2


def _mount(libc, source: str | None, target: str, kind: str | None, flags: int, data: str | None = None) -> None:
    def encode(text: str | None) -> bytes | None:
        return text.encode() if text is not None else None
    if libc.mount(encode(source), encode(target), encode(kind), flags, encode(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def _expose(paths: list[Path]) -> None:
    """In a private mount namespace: make each of `paths` reachable by every user. A folder above one that
    others may not search (/root, pytest's /tmp/pytest-of-root) is covered by an empty 755 tmpfs into
    which the paths below it are bound back; nothing else of it is visible, and only in this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    hidden: dict[Path, list[Path]] = {}
    for path in paths:
        blocked = next((p for p in reversed(path.parents) if not os.stat(p).st_mode & stat.S_IXOTH), None)
        if blocked is not None:
            hidden.setdefault(blocked, []).append(path)
    for folder, below in hidden.items():
        staging = tempfile.mkdtemp(prefix="rsyn-expose-")
        _mount(libc, "tmpfs", staging, "tmpfs", 0, "mode=755")
        for k, path in enumerate(below):
            os.mkdir(f"{staging}/{k}")
            _mount(libc, str(path), f"{staging}/{k}", None, MS_BIND | MS_REC)
        _mount(libc, "tmpfs", str(folder), "tmpfs", 0, "mode=755")
        for k, path in enumerate(below):
            target = folder / path.relative_to(folder)
            target.mkdir(parents=True, exist_ok=True, mode=0o755)
            _mount(libc, f"{staging}/{k}", str(target), None, MS_MOVE)
        libc.umount2(staging.encode(), MNT_DETACH)
        os.rmdir(staging)  # an empty folder of the real /tmp: leave none behind


def as_user(user: str, umask: int, argv: list[str], env: dict[str, str], expose: list[Path], out: str,
             err: str) -> None:
    """The child: output files (opened as root), the namespace, then the user; `resynth argv` (or, for
    ["-c", CODE], the Python code)."""
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    _expose(expose)
    info = pwd.getpwnam(user)
    os.setgroups(os.getgrouplist(user, info.pw_gid))
    os.setgid(info.pw_gid)
    os.setuid(info.pw_uid)
    os.umask(umask)
    os.chdir("/")
    os.environ.clear()
    os.environ.update(env)
    if argv[:1] == ["-c"]:  # Python code instead of a command (as `python -c`)
        exec(compile(argv[1], "<as_user>", "exec"), {"__name__": "__main__"})
        sys.stdout.flush(), sys.stderr.flush()
        sys.exit(0)
    from engine.cli import main

    code = main(argv)
    sys.stdout.flush(), sys.stderr.flush()
    sys.exit(code)
