"""Paths as a user writes them: `~`, `~user` and `$VAR` / `${VAR}` expanded wherever a path enters.

A shell expands `~` only when it is unquoted and at the start of a word (`--clip-checkpoint=~/x` and
`"~/x"` reach resynth as they are), and Python never does: so every entry point (CLI arguments, the
Python API, the service's configuration, paths stored in a store's config) goes through `expand_path`.
It also takes a bytes path (as `os` functions do; pathlib refuses them) and refuses, in one line, what is
no path at all (an int, a list, None where a path is required) or a path holding a NUL byte, which no
system call accepts and which Python reports only deep inside, as a bare ValueError.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Union, overload

from engine.errors import ArgumentTypeError, UserError

PathLike = Union[str, bytes, os.PathLike]
SHOWN = 160  # characters of a path a message shows: its start and its end


def expand(text: str) -> str:
    """`~`/`~user` and environment variables expanded; an undefined variable stays as written (as in
    a shell's `set -u`-free behaviour, so the resulting "not found" message shows the `$NAME`)."""
    return os.path.expanduser(os.path.expandvars(text))


def as_text(path: object, what: str = "path") -> str:
    """The text of a path given as str, bytes or os.PathLike (bytes decoded as the OS does); an
    ArgumentTypeError for anything else, a UserError for a NUL byte."""
    if isinstance(path, (str, bytes, os.PathLike)) and not isinstance(path, bytearray):
        try:
            text = os.fsdecode(path)
        except TypeError:  # a PathLike whose __fspath__ returns something else
            text = None
        if isinstance(text, str):
            if "\0" in text:
                raise UserError(f"{what} holds a NUL byte: {shown(text)}", code="bad_path")
            return text
    subject = "a path" if what == "path" else what
    raise ArgumentTypeError(f"{subject} must be a str, bytes or os.PathLike, not {type(path).__name__}"
                            + (f" {path!r:.60}" if isinstance(path, (int, float)) else ""))


@overload
def expand_path(path: PathLike, what: str = ...) -> Path: ...
@overload
def expand_path(path: None, what: str = ...) -> None: ...
def expand_path(path: PathLike | None, what: str = "path") -> Path | None:
    """`path` as a Path with `~` and `$VAR` expanded (not resolved: relative stays relative); None stays None."""
    if path is None:
        return None
    if isinstance(path, Path):
        text = str(path)
        if "\0" in text:
            raise UserError(f"{what} holds a NUL byte: {shown(text)}", code="bad_path")
        return path if "~" not in text and "$" not in text else Path(expand(text))
    return Path(expand(as_text(path, what)))


def expand_optional(path: PathLike | None) -> str | None:
    """`expand_path` as a string (for APIs that keep paths as text); None and "" stay as they are."""
    if path is None or path == "":
        return path  # type: ignore[return-value]
    return str(expand_path(path))


def path_argument(text: str) -> str:
    """argparse `type=` for path options: the expanded text (quoted `~/x` and `--flag=~/x` included)."""
    return expand(text)


def shown(path: object) -> str:
    """A path as one line can show it: control characters (a newline in a file name) and bytes that are
    not UTF-8 (kept by Python as lone surrogates) escaped, so a message names the file that exists."""
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    if not text.isprintable():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes of the name: show them as \xNN, as `ls -b` does
            text = os.fsencode(text).decode("utf-8", "backslashreplace")
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    # a path of thousands of characters would push what is wrong with it out of a bounded message
    return text if len(text) <= SHOWN else f"{text[:SHOWN // 2 - 2]}...{text[-(SHOWN // 2 - 1):]}"


def not_a_file(path: Path) -> str | None:
    """Why `path` cannot be read as an ordinary file (missing, a dangling link, a link loop, a folder, a
    FIFO, a device, a socket), in words; None when it is a regular file (links followed)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        try:
            os.lstat(path)
        except OSError:
            return "not found"
        try:
            return f"a symbolic link to a missing file ({shown(os.readlink(path))})"
        except OSError:
            return "not found"
    except OSError as exc:  # ELOOP, ENOTDIR (a file where a folder is named), ENAMETOOLONG, EACCES ...
        if exc.errno == errno.ELOOP:
            return "a loop of symbolic links"
        if exc.errno == errno.ENOTDIR:
            return "not found"
        return f"unreadable ({(exc.strerror or type(exc).__name__).lower()})"
    mode = info.st_mode
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((words for test, words in kinds if test(mode)), "not a regular file")


def check_output_file(path: PathLike, what: str) -> None:
    """Refuse, before any work, an output path that an atomic write (a temporary file, then a rename over
    the path) would fail on after the work or, worse, replace: `--report /dev/null` run as root renamed an
    HTML file over the device node. A missing file (or a dangling link) is fine; so is a regular one."""
    target = Path(as_text(path, what))
    _check_name_length(target, what)
    why = not_a_file(target) if os.path.lexists(target) else None
    if why is not None and why != "not found" and not why.startswith("a symbolic link to a missing"):
        raise UserError(f"{what} {shown(target)} is {why}: give the path of a file to write", code="not_a_file")
    folder = target.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not os.path.isdir(folder):
        raise UserError(f"{what} {shown(target)} cannot be written: {shown(folder)} is not a folder",
                        code="not_a_directory")


def temporary_suffix_bytes() -> int:
    """What this process's atomic write adds to a name for its temporary file (".{name}.{pid}.tmp"): a fixed 24
    refused names of 232 to 242 bytes that the file system took with their temporary file."""
    return len(f"..{os.getpid()}.tmp")


def _check_name_length(target: Path, what: str) -> None:
    """An output name the file system takes only without its temporary file's suffix, or not at all, failed
    with a traceback (ENAMETOOLONG) after the work it was to hold: `--report` after the attribution."""
    folder = target.parent
    while not os.path.isdir(folder) and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    suffix = temporary_suffix_bytes()
    for part in target.parts:
        size = len(os.fsencode(part))
        if size + (suffix if part == target.name else 0) > limit:
            raise UserError(f"{what}: the name {shown(part)[:60]}... is {size} bytes, and a file or folder name "
                            f"holds at most {limit} here ({limit - suffix} for a file written "
                            "through a temporary one): give a shorter name", code="name_too_long")
