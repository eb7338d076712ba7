"""Errors a client sees: a stable code, an HTTP status and one line of text, never a traceback."""
from __future__ import annotations



class ServiceError(Exception):
    """A request the service refuses; `code` is stable so clients can branch on it."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = one_line(message)
        self.headers = headers or {}


def one_line(text: str, limit: int = 500) -> str:
    """First line only, bounded: library messages may quote long user input. The bound is the CLI's
    (engine.errors.message_of): a message is not cut over HTTP where the command line shows it whole."""
    first = (text or "").strip().splitlines()[0] if (text or "").strip() else "error"
    return first if len(first) <= limit else first[: limit - 3] + "..."


def body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": one_line(message)}}
