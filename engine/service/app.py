"""The FastAPI application: routes, JSON errors, and the upkeep task, over one Service."""
from __future__ import annotations

import asyncio
import json
import logging
import unicodedata
from contextlib import asynccontextmanager
from pathlib import Path, PurePath

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.attribute import Query
from engine.errors import kind_of
from engine.images import FORMATS
from engine.options import Options, schema
from engine.service.core import Service
from engine.service.errors import ServiceError, body, one_line
from engine.service.generation import QueueFull
from engine.service.guard import Guard
from index.keys import normalise_description

log = logging.getLogger("resynth.service")
STATIC = Path(__file__).parent / "static"
OPTION_FIELDS = tuple(schema())  # the HTTP form fields are the options, declared once in engine.options
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "body_too_large", 415: "unsupported_media_type"}

ATTRIBUTE_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"],
    "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": f"one or more images ({', '.join(FORMATS)}); repeat the field for several"},
        "prompt": {"type": "array", "items": {"type": "string"},
                   "description": "the description: one for all images, or one per image in order; "
                                  "omit to use stored metadata or the captioner"},
        **schema()}}}}}}


def create_app(service: Service, token: str | None = None) -> FastAPI:
    """An app serving `service`; with `token`, every route but health and the page shell needs it."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        upkeep = asyncio.create_task(_upkeep(service))
        try:
            yield
        finally:
            upkeep.cancel()
            await asyncio.to_thread(service.close)

    app = FastAPI(title="resynth", version="0.1.0", lifespan=lifespan,
                  description="Training-free attribution of AI-generated images to their generator, by "
                              "resynthesis. Errors are JSON: {\"error\": {\"code\", \"message\"}}.")
    app.state.service = service
    app.add_middleware(Guard, token=token, max_body_bytes=service.limits.max_body_bytes)
    _add_error_handlers(app, service)
    page = (STATIC / "index.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """Readiness: models loaded, worker threads alive."""
        if service.ready():
            return JSONResponse({"status": "ready", "queue": service.generation.depth()})
        return JSONResponse(body("not_ready", "the service is starting or stopping"), status_code=503)

    @app.get("/v1/sources", tags=["store"])
    async def sources() -> dict:
        """Registered sources (model folders are not disclosed)."""
        rows = await asyncio.to_thread(service.store.sources)
        return {"sources": [{"name": s.name, "kind": s.kind, "fingerprint": s.fingerprint,
                             "params": json.loads(s.params_json)} for s in rows]}

    @app.get("/v1/stats", tags=["store"])
    async def stats() -> dict:
        """Store contents and service counters (requests, cache hits, queue, embedding batches)."""
        return await asyncio.to_thread(service.stats)

    @app.post("/v1/attribute", tags=["attribution"], openapi_extra=ATTRIBUTE_BODY)
    async def attribute(request: Request) -> JSONResponse:
        """Attribute one or several images; the JSON of `resynth attribute --json`."""
        queries, options = await _read_request(request, service)
        return JSONResponse(await service.attribute(queries, options))

    return app


async def _read_request(request: Request, service: Service) -> tuple[list[Query], Options]:
    """Multipart form -> decoded queries and options; every problem is a ServiceError."""
    limits = service.limits
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ServiceError(415, "unsupported_media_type", "send multipart/form-data with one or more `image` parts")
    async with request.form(max_files=limits.max_images, max_fields=32, max_part_size=64 * 1024) as form:
        uploads = form.getlist("image")
        if not uploads:
            raise ServiceError(400, "no_image", "send at least one `image` file part")
        if not all(isinstance(u, UploadFile) for u in uploads):
            raise ServiceError(400, "bad_request", "`image` must be a file part, not a text field")
        prompts = form.getlist("prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise ServiceError(400, "bad_request", "`prompt` must be a text field")
        if len(prompts) not in (0, 1, len(uploads)):
            raise ServiceError(400, "bad_request",
                               f"{len(prompts)} prompts for {len(uploads)} images: give one, or one per image")
        for number, prompt in enumerate(prompts, start=1):
            if not normalise_description(prompt):
                raise ServiceError(400, "empty_prompt", f"prompt {number} is empty: give a description with "
                                                        "words in it, or leave the prompt field out")
        given = {name: form.get(name) for name in OPTION_FIELDS}
        options = Options.from_strings({name: v for name, v in given.items() if isinstance(v, str)})
        data = [await u.read(limits.max_image_bytes + 1) for u in uploads]
        labels = [_label(u.filename, i) for i, u in enumerate(uploads)]
    per_image = prompts * len(uploads) if len(prompts) == 1 else prompts or [None] * len(uploads)

    def decode() -> list[Query]:  # the one image reader: same limits, formats and EXIF rule as the CLI
        return [Query.read(raw, prompt, label, max_bytes=limits.max_image_bytes, max_pixels=limits.max_pixels)
                for raw, label, prompt in zip(data, labels, per_image)]

    return await asyncio.to_thread(decode), options


def _label(filename: str | None, index: int) -> str:
    """A display name for results; only ever a string, never used as a path."""
    name = PurePath((filename or "").replace("\\", "/")).name
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")[:120].strip()
    return name or f"image-{index + 1}"


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    def reply(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        service.count(f"error:{code}")
        return JSONResponse(body(code, message), status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def service_error(_request, exc: ServiceError):
        return reply(exc.status, exc.code, exc.message, exc.headers)


    @app.exception_handler(QueueFull)
    async def queue_full(_request, exc: QueueFull):
        return reply(503, "queue_full", f"{exc}; retry shortly", {"Retry-After": "2"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return reply(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return reply(400, "bad_request", "malformed request")

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception):
        kind = kind_of(exc)  # by type, never by message text
        if kind is not None:
            return reply(kind.status, getattr(exc, "code", kind.code), one_line(str(exc)))
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return reply(500, "internal_error", "internal error (details are in the server log)")


async def _upkeep(service: Service) -> None:
    """Swap in rebuilt indexes, follow source changes and save new vectors, off the event loop."""
    while True:
        await asyncio.sleep(service.limits.refresh_seconds)
        try:
            await asyncio.to_thread(service.maintain)
        except Exception:
            log.exception("upkeep failed; retrying at the next tick")
