"""Reading a request's multipart form within the service's limits, each refusal with its own code.

starlette's parser reports every limit as one 400 with free text; a client needs to tell "too many
images" (413, send fewer) from a malformed body (400, a bug of its own). Its file parts also stay in
memory up to 1 MiB each before spilling to disk; ours spill at `Limits.spool_bytes`, which
`Limits.memory_bound` counts for every upload being received.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from engine.service.config import Limits
from engine.service.errors import ServiceError


# The parser logs a warning per malformed body ("Did not find CR at end of boundary"): the client gets its
# 400 bad_multipart and /v1/stats counts it; a hostile client should not write a log line per request.
logging.getLogger("python_multipart.multipart").setLevel(logging.ERROR)


def media_type(request: Request) -> str:
    """The Content-Type's media type alone, lower case ('multipart/form-data'): a type merely starting
    with the right name ('multipart/form-dataX', 'application/jsonx') is another type."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


@asynccontextmanager
async def read_form(request: Request, limits: Limits, file_fields: tuple[str, ...] = ()) -> AsyncIterator[FormData]:
    """The form of a multipart request; its files are closed (and removed from disk) on exit. A part of
    `file_fields` sent without a filename is refused when its headers are read, before the text fields'
    size and UTF-8 checks would blame its bytes (`curl -F 'image=<q.png'`)."""

    class Parser(MultiPartParser):
        spool_max_size = limits.spool_bytes
        ended = False

        def on_end(self) -> None:  # the closing boundary was read
            self.ended = True

        def on_headers_finished(self) -> None:
            super().on_headers_finished()
            name = self._current_part.field_name
            if self._current_part.file is None and name in file_fields:
                raise ServiceError(400, "bad_request", f"`{name}` must be a file part, not a text field")

        def on_part_end(self) -> None:
            """starlette reads a text field that is not UTF-8 as Latin-1 (a prompt of Latin-1 bytes became
            mojibake, attributed): refused, as the CLI and Python refuse such a prompt. A request declaring
            another charset keeps it."""
            part = self._current_part
            if part.file is None and self._charset == "utf-8":
                try:
                    part.data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ServiceError(400, "not_utf8", f"the text field {part.field_name[:40]!r} is not valid UTF-8 "
                                                        f"(byte 0x{part.data[exc.start]:02x} at offset {exc.start}): "
                                                        "send text fields as UTF-8") from None
            super().on_part_end()

    parser = Parser(request.headers, request.stream(), max_files=limits.max_images, max_fields=limits.max_fields,
                    max_part_size=limits.max_field_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise refusal(exc.message, limits) from None
    if not parser.ended:  # a body cut short (a Content-Length too small): its last part may be half a file
        await form.close()
        raise ServiceError(400, "bad_multipart", "the multipart body ended before its closing boundary "
                                                 "(a truncated upload, or a Content-Length too small)")
    try:
        yield form
    finally:
        await form.close()


def refusal(message: str, limits: Limits) -> ServiceError:
    """starlette's parser error as a ServiceError; its only distinction is the text (pinned by a test)."""
    if message.startswith("Too many files"):
        return ServiceError(413, "too_many_images", f"more than {limits.max_images} file parts: send at most "
                                                    f"{limits.max_images} images per request")
    if message.startswith("Too many fields"):
        return ServiceError(413, "too_many_fields", f"more than {limits.max_fields} text fields: send a prompt "
                                                    "(or one per image) and the options you need")
    if message.startswith(("Part exceeded", "Field exceeded")):
        return ServiceError(413, "field_too_large", f"a text field is over {limits.max_field_bytes // 1024} KiB")
    return ServiceError(400, "bad_multipart", f"malformed multipart body: {message}")
