"""Errors a client sees: a stable code, an HTTP status and one line of text, never a traceback."""
from __future__ import annotations

from engine.errors import UserError


class ServiceError(Exception):
    """A request the service refuses; `code` is stable so clients can branch on it."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = one_line(message)
        self.headers = headers or {}


def one_line(text: str, limit: int = 300) -> str:
    """First line only, bounded: library messages may quote long user input."""
    first = (text or "").strip().splitlines()[0] if (text or "").strip() else "error"
    return first if len(first) <= limit else first[: limit - 3] + "..."


def from_user_error(exc: UserError) -> ServiceError:
    """Library mistakes keep their message; the ones with a REST meaning get their own status."""
    message = str(exc)
    if message.startswith("unknown source"):
        return ServiceError(404, "unknown_source", message)
    if message.startswith("empty prompt"):
        return ServiceError(400, "empty_prompt", message)
    if message.startswith("no description"):
        return ServiceError(400, "no_description", message)
    return ServiceError(400, "bad_request", message)


def body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": one_line(message)}}
