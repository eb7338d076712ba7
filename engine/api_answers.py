"""Reading what an images API answers, which we do not trust: the size caps, bodies read in capped
chunks, JSON and base64 parsing, image decoding under a pixel cap, the server's error message (with the
key redacted from it) and Retry-After. Pure functions of a reply; no requests are made here.

The caps are read at call time (`api_answers.MAX_IMAGE_BYTES`, ...), so tests may lower them here.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import time
from email.utils import parsedate_to_datetime
from typing import Any, Mapping

import httpx
from PIL import Image

from engine.errors import SourceError, first_line
from engine.images import FORMATS
from engine.providers import Reply

# Read at call time, so tests may lower them.
MAX_PIXELS = 4096 * 4096           # an answer's image, width x height
MAX_IMAGE_BYTES = 32 << 20         # an image file, or an image URL's body
MAX_ERROR_BYTES = 64 << 10         # an error answer: only its message is wanted
RETRY_AFTER_CAP = 60.0             # a server's Retry-After is honoured up to this many seconds


def _decode(data: bytes, name: str) -> Image.Image:
    """An answer's image file as RGB, refused over `MAX_PIXELS` or when it cannot be decoded."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # no ICO: its plugin decodes while opening
        width, height = image.size
    except Exception as exc:
        raise SourceError(name, f"answer image cannot be decoded: {first_line(exc)}") from None
    if width * height > MAX_PIXELS:
        raise SourceError(name, f"answer image is {width}x{height}, over the {MAX_PIXELS}-pixel cap")
    try:
        return image.convert("RGB")
    except Exception as exc:
        raise SourceError(name, f"answer image cannot be decoded: {first_line(exc)}") from None


def _parse_json(reply: Reply, name: str) -> Any:
    try:
        return json.loads(reply.body)
    except ValueError:
        raise SourceError(name, "malformed answer: not JSON") from None


def _b64(text: Any, what: str, name: str) -> bytes:
    if not isinstance(text, str):
        raise SourceError(name, f"malformed answer: no {what}")
    if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 8:
        raise SourceError(name, f"answer image is over the {MAX_IMAGE_BYTES}-byte cap")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise SourceError(name, f"malformed answer: {what} is not base64") from None


def _read_capped(resp: httpx.Response, cap: int, deadline: float, name: str, truncate: bool = False) -> bytes:
    """A body read in chunks, stopping at `cap` bytes (an error, or a cut if `truncate`) and at `deadline`."""
    declared = resp.headers.get("content-length", "")
    if not truncate and declared.isdigit() and int(declared) > cap:
        raise SourceError(name, f"answer is {declared} bytes, over the {cap}-byte cap")
    buffer = bytearray()
    for chunk in resp.iter_bytes():
        buffer += chunk
        if len(buffer) > cap:
            if truncate:
                return bytes(buffer[:cap])
            raise SourceError(name, f"answer is over the {cap}-byte cap")
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("answer took longer than the timeout")
    return bytes(buffer)


def _error_message(raw: bytes, key: str | None) -> str:
    """': <the server's message>' from an error body (OpenAI's and Google's error.message, FastAPI's,
    BFL's and Replicate's detail, Stability's errors[0]), one line."""
    try:
        body = json.loads(raw)
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    if not isinstance(message, str) and isinstance(body, dict):
        message = body.get("detail") if isinstance(body.get("detail"), str) else body.get("message")
        errors = body.get("errors")  # Stability: {"name": ..., "errors": ["..."]}
        if not isinstance(message, str) and isinstance(errors, list) and errors and isinstance(errors[0], str):
            message = errors[0]
    if not isinstance(message, str) or not message.strip():
        return ""
    return ": " + _redact(message.strip().splitlines()[0][:300], key)


def _redact(text: str, key: str | None) -> str:
    """Servers echo keys back ("Incorrect API key provided: sk-..."): never let one into a message."""
    if not key:
        return text
    for form in (key, repr(key)[1:-1], key.strip()):
        if form:
            text = text.replace(form, "***")
    return text


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from Retry-After (seconds or an HTTP date) or retry-after-ms, capped."""
    value = headers.get("retry-after-ms")
    try:
        if value is not None:
            return min(RETRY_AFTER_CAP, max(0.0, float(value) / 1000))
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return None
    return min(RETRY_AFTER_CAP, max(0.0, seconds))
