"""Errors by kind. The CLI and the HTTP layer map *types* to exit codes and statuses, never message text.

- input mistakes (bad path, image, prompt, option, unknown source): exit 2, HTTP 400/404/413/415
- a source that cannot load or generate: exit 3, HTTP 502, naming the source
- store damage: exit 4, HTTP 503, naming the recovery command
"""
from __future__ import annotations

from dataclasses import dataclass

from index.errors import StoreDamaged, StoreError, StoreInputError, UnknownName


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


class OptionError(UserError):
    """An attribution option out of its bounds or choices."""

    code = "bad_option"


class BudgetExceeded(UserError):
    """The next images would cost more than --max-cost allows: stopped before sending anything."""

    code = "budget_exceeded"


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


def kind_of(exc: BaseException) -> Kind | None:
    """How an exception is shown to a user; None for a bug (a traceback is then the right thing)."""
    if isinstance(exc, UserError):
        return Kind(2, exc.status, exc.code)
    if isinstance(exc, UnknownName):
        return Kind(2, 404, "unknown_source")
    if isinstance(exc, StoreInputError):
        return Kind(2, 400, "bad_request")
    if isinstance(exc, SourceError):
        return Kind(3, 502, "source_failed")
    if isinstance(exc, (StoreDamaged, StoreError)):
        return Kind(4, 503, "store_damaged")
    return None


def first_line(exc: BaseException) -> str:
    """The first line of a library exception, for wrapping it in a UserError."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
