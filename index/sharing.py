"""Team-shared stores: what the store creates in a folder its group may write is the group's to write too.

A store folder that is group-writable (`chmod g+ws`, group `lab`) is shared by that group, the way git's
`core.sharedRepository=group` shares a repository, without a setting: every file and folder the store
creates there gets the folder's group and its group bits (read and write; search and setgid on folders),
whatever the creating user's umask. Without it, one teammate with umask 022 left a 644 `metadata.sqlite`
or 755 image folders that every other member then could not write: the store turned read-only for them,
or a generation failed after its work was done. Only bits are added (never taken away), never for
others than the group, and only on what this process owns (only the owner may chmod).

Also the words for a refused permission: whose the path is, its mode, and what would let this user write.
"""
from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

FILE_BITS = stat.S_IRGRP | stat.S_IWGRP
FOLDER_BITS = stat.S_IRWXG | stat.S_ISGID


def shared_by(folder: Path) -> os.stat_result | None:
    """`folder`'s stat when its group may write it (a team's store folder); None otherwise."""
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return info if info.st_mode & stat.S_IWGRP else None


def share(path: Path, folder: os.stat_result | None = None) -> None:
    """Give `path` (a file or folder this process just created) the group and group bits of the folder it
    is in, when that folder is shared (`shared_by`). Housekeeping: a refusal leaves the path as it is."""
    folder = folder if folder is not None else shared_by(path.parent)
    if folder is None:
        return
    try:
        info = os.lstat(path)
        if info.st_uid != os.geteuid() or stat.S_ISLNK(info.st_mode):
            return  # only the owner may change it; a link is never followed
        if info.st_gid != folder.st_gid:
            os.chown(path, -1, folder.st_gid)  # allowed to a member of that group (as setgid would give)
        wanted = (folder.st_mode & FOLDER_BITS) if stat.S_ISDIR(info.st_mode) else (folder.st_mode & FILE_BITS)
        mode = stat.S_IMODE(info.st_mode)
        if mode | wanted != mode or info.st_gid != folder.st_gid:
            os.chmod(path, mode | wanted)  # after chown, which may clear setgid bits
    except OSError:
        pass


def make_folders(folder: Path, top: Path) -> None:
    """`folder` and any missing folders above it (up to `top`, which must exist), each shared as made."""
    missing = []
    current = folder
    while current != top and not current.is_dir() and top in current.parents:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if path.is_dir():
                continue  # another process made it meanwhile (and shared it)
            raise
        share(path)


def _name(lookup, number: int) -> str:
    try:
        return lookup(number)[0]
    except (KeyError, OverflowError):
        return str(number)


def whose(path: Path) -> str | None:
    """`path`'s owner, group and mode as `ls -l` would show them (e.g. "alice:lab, mode 644")."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (f"{_name(pwd.getpwuid, info.st_uid)}:{_name(grp.getgrgid, info.st_gid)}, "
            f"mode {stat.S_IMODE(info.st_mode):03o}")


def refusing(path: Path, want: int = os.W_OK) -> Path:
    """What refuses this user `want` (os.W_OK: a write, os.R_OK: a read) of `path`: a folder above it that
    may not be searched, else the file itself, else (a file to create) the nearest folder above it."""
    for folder in reversed(path.parents):
        if not os.path.isdir(folder):
            break
        if not os.access(folder, os.X_OK):
            return folder
    if os.path.lexists(path):
        return path
    folder = path.parent
    while not os.path.isdir(folder) and folder != folder.parent:
        folder = folder.parent
    return folder if want == os.W_OK and not os.access(folder, os.W_OK | os.X_OK) else path


def why_denied(path: Path, root: Path | None = None, want: int = os.W_OK) -> str:
    """Why this user may not write (or with `want` os.R_OK, read) `path`: what refuses (`refusing`), whose
    it is and what would let this user in; one clause of a one-line message. With `root` (the store
    folder) the path is shown relative to it and the fix is for the whole store (the next file would
    refuse next)."""
    target = refusing(path, want)
    shown, fixed, recursive = str(target), target, ""
    if root is not None and (target == root or root in target.parents):
        shown = "its folder" if target == root else str(target.relative_to(root))
        fixed, recursive = root, "-R "
    owner = whose(target)
    if owner is None:
        return f"{shown} cannot be looked at by this user"
    info = os.stat(target)
    user = _name(pwd.getpwuid, os.geteuid())
    bit, verb = ("w", "writable") if want == os.W_OK else ("r", "readable")
    if info.st_uid == os.geteuid():
        fix = f"`chmod {recursive}u+{bit} {fixed}` (it is this user's)"
    elif info.st_gid in os.getgroups() or info.st_gid == os.getegid():
        fix = f"its owner can `chmod {recursive}g+{bit} {fixed}` (a team store: keep its folders `g+ws`)"
    elif want == os.W_OK and not os.path.lexists(path):  # to create: the folder it goes in is someone else's
        fix = f"use a folder {user} may write (or run it as {_name(pwd.getpwuid, info.st_uid)})"
    else:
        fix = (f"run it as {_name(pwd.getpwuid, info.st_uid)}, or share the store with a group of {user}'s "
               f"(`chgrp -R`, `chmod -R g+{bit}`)")
    return f"{shown} is {owner}, not {verb} by {user}: {fix}"
