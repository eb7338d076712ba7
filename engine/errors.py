"""Errors by kind. The CLI and the HTTP layer map *types* to exit codes and statuses, never message text.

- input mistakes (bad path, image, prompt, option, unknown source): exit 2, HTTP 400/404/413/415
- a source that cannot load or generate: exit 3, HTTP 502, naming the source
- store damage: exit 4, HTTP 503, naming the recovery command
- what the machine refuses (full disk, read-only mount, permission, a lock held elsewhere, I/O error):
  exit 5, HTTP 503 (507 for a full disk), naming the path and the way out
- a folder given for a file, a file that is not UTF-8, a name past the file system's limit: input mistakes
  (exit 2, HTTP 400)
- memory the machine would not give (MemoryError, a framework's OutOfMemoryError): exit 5, HTTP 503
"""
from __future__ import annotations

import errno
import json
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from index.errors import (StoreBusy, StoreDamaged, StoreDenied, StoreError, StoreFull, StoreInputError, StoreReadOnly,
                          StoreUnavailable, UnknownName)


class UserError(Exception):
    """A mistake in the user's input: one line, never a traceback (exit 2, HTTP 400).

    `code` is the stable name an HTTP client branches on; subclasses set the status.
    """

    status = 400
    code = "bad_request"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code:
            self.code = code


class NotFoundError(UserError):
    """A named thing (source, file) does not exist (HTTP 404)."""

    status = 404
    code = "not_found"


class TooLargeError(UserError):
    """An input over a size or pixel limit (HTTP 413)."""

    status = 413
    code = "too_large"


class UnsupportedError(UserError):
    """An input of a kind resynth does not read (HTTP 415)."""

    status = 415
    code = "unsupported_media_type"


class ArgumentTypeError(UserError, TypeError):
    """A library call given a value of the wrong type (an int for a path, a str for a list of names): a
    UserError, so one `except engine.UserError` catches every input mistake, and a TypeError, as Python
    code expects of it; raised at the call, in one line, not as an AttributeError deep inside."""

    code = "bad_argument"


class OptionError(UserError):
    """An attribution option out of its bounds or choices."""

    code = "bad_option"


class BudgetExceeded(UserError):
    """The next images would cost more than --max-cost allows: stopped before sending anything."""

    code = "budget_exceeded"


class OverBudget(str):
    """Why a source could not be scored, when --max-cost stopped it (a BudgetExceeded): text, as every
    failure an answer carries, marked so that a query whose every failed source was stopped by the limit
    is the user's budget_exceeded (exit 2, HTTP 400), not a failure of the sources (exit 3, HTTP 502)."""


class SourceError(Exception):
    """A source's pipeline cannot load or generate (exit 3, HTTP 502)."""

    def __init__(self, source: str, message: str):
        super().__init__(f"source {source!r}: {message}")
        self.source = source


@dataclass(frozen=True)
class Kind:
    exit_code: int
    status: int
    code: str


# What the machine refuses, whoever asks: a full disk, a read-only mount, a permission, a lock held by
# another program, a failing device. Not the input's fault and not a bug: exit 5, HTTP 503 (507 for a
# full disk), with one line naming the cause and the way out.
ENVIRONMENT_EXIT = 5
_FULL, _READ_ONLY, _PERMISSION, _LOCKED, _IO, _FILES = (
    "storage_full", "read_only", "permission_denied", "store_locked", "io_error", "too_many_open_files")
_ERRNO = {errno.ENOSPC: _FULL, errno.EDQUOT: _FULL, errno.EFBIG: _FULL, errno.EROFS: _READ_ONLY,
          errno.EACCES: _PERMISSION, errno.EPERM: _PERMISSION, errno.EIO: _IO, errno.EMFILE: _FILES,
          errno.ENFILE: _FILES}
# SQLite's primary result codes (sqlite3 exceptions carry them as `sqlite_errorcode` since Python 3.11)
_SQLITE = {13: _FULL, 8: _READ_ONLY, 3: _PERMISSION, 23: _PERMISSION, 5: _LOCKED, 6: _LOCKED, 10: _IO}
# PostgreSQL SQLSTATEs (psycopg exceptions carry them as `sqlstate`)
_SQLSTATE = {"53100": _FULL, "25006": _READ_ONLY, "42501": _PERMISSION, "55P03": _LOCKED, "40P01": _LOCKED,
             "58030": _IO}
_STATUS = {_FULL: 507}
_STORE_REFUSALS = ((StoreReadOnly, _READ_ONLY), (StoreFull, _FULL), (StoreBusy, _LOCKED), (StoreDenied, _PERMISSION),
                   (StoreUnavailable, "store_unavailable"))
_ADVICE = {
    _FULL: "the disk is full: free some space and run the command again (everything committed before is kept)",
    _READ_ONLY: "the filesystem or database is read-only: commands that only read (stats, source list, verify, "
                "cached attribute) still work; for this one, make it writable or copy the store elsewhere",
    _PERMISSION: "permission denied: check the owner and mode of the path (or run as a user allowed to use it)",
    _LOCKED: "another program holds the database's lock: retry when it has finished",
    _IO: "the device reported an I/O error: check the disk before retrying",
    _FILES: "too many open files: raise the limit (ulimit -n) or run fewer processes at once",
}
_MEMORY = "out_of_memory"
_MEMORY_ADVICE = ("out of memory: close other programs, raise the memory limit (ulimit -v, the container's) or "
                  "give fewer or smaller images at once; everything committed before is kept")


def environment_code(exc: BaseException | None) -> str | None:
    """The stable code of what the machine refused, for `exc` or the error that caused it; else None."""
    seen = 0
    while exc is not None and seen < 8:
        code = None
        if isinstance(exc, OSError) and exc.errno in _ERRNO:
            code = _ERRNO[exc.errno]
        elif isinstance(exc, PermissionError):
            code = _PERMISSION
        elif isinstance(sqlite_code := getattr(exc, "sqlite_errorcode", None), int):
            code = _SQLITE.get(sqlite_code & 0xFF)
        elif isinstance(sqlstate := getattr(exc, "sqlstate", None), str):
            code = _SQLSTATE.get(sqlstate) or ("storage_full" if sqlstate.startswith("53") else None)
        if code:
            return code
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def kind_of(exc: BaseException) -> Kind | None:
    """How an exception is shown to a user; None for a bug (a traceback is then the right thing)."""
    if isinstance(exc, UserError):
        return Kind(2, exc.status, exc.code)
    if isinstance(exc, UnknownName):
        return Kind(2, 404, "unknown_source")
    refusal = _refusal_code(exc)  # the store's own word for what the machine refused beats its causes
    if refusal is not None:
        return Kind(ENVIRONMENT_EXIT, _STATUS.get(refusal, 503), refusal)
    if isinstance(exc, StoreInputError):
        return Kind(2, 400, "bad_request")
    if isinstance(exc, SourceError):
        return Kind(3, 502, "source_failed")
    if out_of_memory(exc):
        return Kind(ENVIRONMENT_EXIT, 503, _MEMORY)
    environment = environment_code(exc)
    if environment is not None and (isinstance(exc, StoreError) or _is_os_level(exc)):
        return Kind(ENVIRONMENT_EXIT, _STATUS.get(environment, 503), getattr(exc, "code", None) or environment)
    if isinstance(exc, (StoreDamaged, StoreError)):
        return Kind(4, 503, getattr(exc, "code", None) or "store_damaged")
    if isinstance(exc, IsADirectoryError):
        return Kind(2, 400, "is_a_directory")
    if isinstance(exc, NotADirectoryError):
        return Kind(2, 400, "not_a_directory")
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:  # a name the user gave: a traceback before
        return Kind(2, 400, "name_too_long")
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return Kind(2, 404, "not_found")
    if isinstance(exc, UnicodeDecodeError):
        return Kind(2, 400, "not_utf8")
    return None


def out_of_memory(exc: BaseException | None) -> bool:
    """Whether `exc`, or the error that caused it, is memory the machine would not give: a MemoryError (numpy's
    and Pillow's too: a large image decoded under a memory limit) or torch's OutOfMemoryError, known by its
    name so that this module loads no torch. It was a traceback, exit 1: not a bug, and nothing is lost."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, MemoryError) or any(t.__name__ == "OutOfMemoryError" for t in type(exc).__mro__):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _refusal_code(exc: BaseException) -> str | None:
    return next((code for refused, code in _STORE_REFUSALS if isinstance(exc, refused)), None)


def _is_os_level(exc: BaseException) -> bool:
    """An OSError, or a database driver's error (sqlite3, psycopg), as opposed to a Python bug."""
    return isinstance(exc, OSError) or hasattr(exc, "sqlite_errorcode") or hasattr(exc, "sqlstate")


def message_of(exc: BaseException, paths: bool = True) -> str:
    """The one line a user reads: the error's own text for resynth's errors; for what the machine
    refused, the path and the way out; for a file that is not UTF-8, where. `paths=False` (HTTP
    answers) leaves out the paths an OS error names: a client is not told the server's file layout."""
    if isinstance(exc, (UserError, SourceError, StoreError)):
        text = _one_line(str(exc)) or type(exc).__name__
        environment = _refusal_code(exc) or (environment_code(exc) if isinstance(exc, StoreError) else None)
        advice = _ADVICE.get(environment or "")
        head, _, remedy = (advice or "").partition(": ")
        if advice and head not in text and remedy.split(" (")[0].split(";")[0] not in text:  # not said twice
            text = f"{text} ({advice})"
        return _bounded(text)
    if out_of_memory(exc):
        said = _one_line(str(exc))  # numpy's and torch's name the size they asked for; MemoryError() is empty
        return _bounded(f"{_MEMORY_ADVICE} ({said})" if said else _MEMORY_ADVICE)
    environment = environment_code(exc)
    if environment is not None:
        where = _where(exc) if paths else ""
        return _bounded(f"{where}: {_ADVICE[environment]}" if where else _ADVICE[environment])
    name = exc.filename if paths and isinstance(exc, OSError) else "(path withheld)"
    if isinstance(exc, IsADirectoryError):
        return _bounded(f"expected a file, got a folder: {name}")
    if isinstance(exc, NotADirectoryError):
        return _bounded(f"expected a folder, got a file: {name}")
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return _bounded(f"not found: {name}")
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return _bounded(f"name too long: {name} (a file or folder name holds at most 255 bytes, a whole path 4096): "
                        "give a shorter one")
    if isinstance(exc, UnicodeDecodeError):
        return _bounded(f"text is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
                        "save the file as UTF-8")
    return _bounded(_one_line(str(exc)) or type(exc).__name__)


def _where(exc: BaseException | None) -> str:
    """The file an OS error names (searching its causes), else the operation's own first line."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.filename:
            target = f" -> {exc.filename2}" if exc.filename2 else ""
            return f"{exc.strerror or 'error'}: {exc.filename}{target}"
        if not isinstance(exc, OSError) and str(exc).strip():
            return _one_line(str(exc))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _bounded(text: str, limit: int = 500) -> str:
    """At most `limit` characters, cut in the middle: a long path early in a message (a deep store folder)
    cut the end off, and with it the cause and the way out the message exists for."""
    if len(text) <= limit:
        return text
    head = (limit - 3) // 2
    return text[:head] + "..." + text[len(text) - (limit - 3 - head):]


def with_article(noun: str) -> str:
    """`a diffusers`, `an api`: the article a sentence needs before a kind's name."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def plural(count: int, noun: str) -> str:
    """"1 source", "2 sources": every count a message shows, in one place for every layer."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """An OS error while writing the user's output file `path` names it: a write() or fsync() that fails
    names no file, so "the disk is full" left the user to guess which disk (the store's or the output's)."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None or (exc.filename is not None and not str(exc.filename).endswith(".tmp")):
            raise  # already names its file (a folder in the way, say): that one, not the output
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), os.fspath(path)) from exc


def first_line(exc: BaseException) -> str:
    """The first line of a library exception, for wrapping it in a UserError."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C
INTERRUPTED_TEXT = "interrupted (everything committed so far is kept)"
_CTRL_C = threading.Event()


def on_ctrl_c(signum: int, frame: object) -> None:
    """The command line's SIGINT handler: Python's own (KeyboardInterrupt), remembered. A library that a Ctrl-C
    lands in may turn it into an error of its own (diffusers: "Unable to load weights" for a pipeline being
    loaded), which read as a failed source: the run went on for every other source and answered, exit 0."""
    _CTRL_C.set()
    raise KeyboardInterrupt


def ctrl_c_pressed() -> bool:
    """Whether on_ctrl_c has run since the command began (engine.cli clears it)."""
    return _CTRL_C.is_set()


def came_from_ctrl_c(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is among `exc`'s causes and contexts: a library that turned a Ctrl-C into its own
    error inside its handler (diffusers' "Unable to load weights") leaves it there, where no CLI handler ran (the
    Python API: the call went on with every other source and answered)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen or len(seen) > 64:
            continue
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        todo += [current.__cause__, current.__context__]
    return False


def forget_ctrl_c() -> None:
    _CTRL_C.clear()


def report(message: str, code: str, exit_code: int, as_json: bool) -> None:
    """The one line of a command's failure on stderr: text, or with --json one object a script parses."""
    if as_json:
        print(json.dumps({"error": message, "kind": code, "exit_code": exit_code}), file=sys.stderr)
    else:
        print(f"resynth: error: {message}" if exit_code != INTERRUPTED else f"resynth: {message}", file=sys.stderr)


def wants_json(argv: list[str]) -> bool:
    """--json before any `--`: a command's failures are then reported as one JSON object."""
    return "--json" in argv[: argv.index("--") if "--" in argv else len(argv)]
