"""The FastAPI application: routes, JSON errors, and the upkeep task, over one Service."""
from __future__ import annotations

import asyncio
import json
import logging
import unicodedata
from contextlib import asynccontextmanager
from pathlib import Path, PurePath
from typing import Sequence, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engine.attribute import Query
from engine.describe import clean_prompt
from engine.errors import SourceError, TooLargeError, UserError, kind_of, message_of
from engine.images import FORMATS, check_aspect, check_structure
from engine.options import Options, given_twice, schema
from engine.service.config import Access, Limits
from engine.service.core import Service
from engine.service.errors import ServiceError, body
from engine.service.forms import media_type, read_form
from engine.service.generation import QueueFull
from engine.service.guard import PUBLIC_PATHS, Guard, PixelBudget
from engine.service.uploads import Uploads
from engine.service.sources import MAX_BODY, SourcePolicy
from engine.service import sources as source_changes
from index.errors import StoreDamaged, StoreError

log = logging.getLogger("resynth.service")
STATIC = Path(__file__).parent / "static"
OPTION_FIELDS = tuple(schema())  # the HTTP form fields are the options, declared once in engine.options
READY_DB_SECONDS = 2.0  # /readyz waits this long for the store's database before it answers "not ready"
# The bases of every error engine.errors.kind_of maps. They get their own handlers, which answer
# inside the app like ServiceError's; the catch-all Exception handler answers too but starlette then
# re-raises to the server, which logs a traceback: right for a bug, noise for a user's mistake.
MAPPED_ERRORS = (UserError, SourceError, StoreError, OSError, UnicodeError, MemoryError)  # answered, not re-raised
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


class Admission:
    """What bounds the memory of requests: decoded pixels held by all of them, decodes at once."""

    def __init__(self, limits: Limits):
        self.pixels = PixelBudget(limits.max_pixels_in_flight, limits.pixel_wait)
        self.decodes = asyncio.Semaphore(limits.max_decodes)
        self.decoding = 0
        self.uploads = Uploads(limits)  # bodies still arriving, kept by the Guard

    def stats(self) -> dict:
        return {"pixels_in_flight": self.pixels.used, "pixels_in_flight_peak": self.pixels.peak,
                "pixels_in_flight_limit": self.pixels.capacity, "decoding": self.decoding,
                "uploads_receiving": len(self.uploads.open), "uploads_evicted": self.uploads.evicted}


def create_app(service: Service, token: str | None = None, access: Access | None = None,
               source_policy: SourcePolicy | None = None) -> FastAPI:
    """An app serving `service`; with `token`, every route but health and the page shell needs it.

    `access` says who may call (`resynth serve` always passes one, with the Host and Origin checks
    on); without it, only `token` applies and the Host and Origin headers are not checked.
    `source_policy` bounds what POST/DELETE /v1/sources may do (default: paths under the store's folder).
    """
    access = access or Access(token=token, check=False)
    policy = source_policy or SourcePolicy()

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
    _document_security(app, access.token is not None)
    app.state.service = service
    app.state.admission = admission = Admission(service.limits)
    app.add_middleware(Guard, access=access, limits=service.limits, uploads=admission.uploads)
    thumbs = Thumbnails(service)
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
        """Readiness: models loaded, worker threads alive, the store's database answering (within
        READY_DB_SECONDS: a probe must not hang on a database that does not answer)."""
        if not service.ready():
            return JSONResponse(body("not_ready", "the service is starting or stopping"), status_code=503)
        try:
            reachable = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(service.probe_store())),
                                               READY_DB_SECONDS)
        except asyncio.TimeoutError:
            reachable = False
        if not reachable:
            return JSONResponse(body("database_unreachable", "the store's database does not answer"),
                                status_code=503)
        return JSONResponse({"status": "ready", "queue": service.generation.depth()})

    @app.get("/v1/sources", tags=["store"])
    async def sources() -> dict:
        """Registered sources: the rows of `resynth source list --json` without their folders."""
        rows = await asyncio.to_thread(service.ws.list_sources)
        return {"sources": [{k: v for k, v in row.items() if k != "path"} for row in rows]}

    @app.post("/v1/sources", tags=["store"], status_code=201, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                           "params": {"type": "object", "description": "the kind's parameters, named as in "
                                                                       "`resynth source add --help`"}}}}}}})
    async def add_source(request: Request) -> JSONResponse:
        """Add a source like `resynth source add`: the same kinds, checks and one-line errors (422), within
        the server's policy: paths only under its sources folder, API keys only from the environment
        variables it lists, API URLs only on public addresses (403 otherwise)."""
        if media_type(request) != "application/json":
            raise ServiceError(415, "unsupported_media_type", "send application/json")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise ServiceError(413, "body_too_large", f"a source declaration is at most {MAX_BODY} bytes")
        return JSONResponse(await source_changes.add(service, policy, bytes(raw)), status_code=201)

    @app.delete("/v1/sources/{name}", tags=["store"])
    async def remove_source(name: str) -> dict:
        """Remove a source with its resyntheses, like `resynth source remove` (404 for an unknown name)."""
        return await source_changes.remove(service, policy, name)

    @app.get("/v1/stats", tags=["store"])
    async def stats() -> dict:
        """Store contents and service counters (requests, cache hits, queue, embedding batches)."""
        return {**await asyncio.to_thread(service.stats), "admission": admission.stats()}

    @app.post("/v1/attribute", tags=["attribution"], openapi_extra=ATTRIBUTE_BODY)
    async def attribute(request: Request) -> JSONResponse:
        """Attribute one or several images; the JSON of `resynth attribute --json`."""
        queries, options, held = await _read_request(request, service, admission)
        try:
            return JSONResponse(await service.attribute(queries, options))
        finally:
            queries.clear()  # the decoded images go before their pixels are given back
            admission.pixels.release(held)

    @app.post("/v1/report", tags=["attribution"], openapi_extra=ATTRIBUTE_BODY, response_class=HTMLResponse)
    async def case_report(request: Request) -> Response:
        """The same request as /v1/attribute, answered as a self-contained HTML case report (a download):
        the queries, their evidence images, scores and verdicts, and the store's sources, embedder,
        options and versions. Resyntheses made by an earlier /v1/attribute are reused, not regenerated."""
        queries, options, held = await _read_request(request, service, admission)
        try:
            data = await service.attribute(queries, options)
            page = await asyncio.to_thread(_case_report, service, data, queries, options)
        finally:
            queries.clear()
            admission.pixels.release(held)
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="resynth-report.html"',
                                 "Cache-Control": "no-store"})

    @app.get("/v1/images/{image_id}/thumb", tags=["store"],
             responses={200: {"content": {"image/jpeg": {}}}, 304: {"description": "not modified"}})
    async def thumb(image_id: int, request: Request) -> Response:
        """A stored image (a resynthesis or an original, by the id an answer's `closest` gives) as a JPEG
        of at most THUMB_SIDE pixels a side. Only ids reach the store: the file is the catalog's."""
        found = await asyncio.to_thread(thumbs.get, image_id)
        if found is None:
            raise ServiceError(404, "not_found", f"no stored image {image_id}")
        data, etag = found
        headers = {"ETag": etag, "Cache-Control": "private, max-age=86400"}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    return app


THUMB_SIDE = 256  # longest side of a thumbnail the server makes
THUMBS_KEPT = 1024  # thumbnails kept in memory (about 10 kB each)


class Thumbnails:
    """Thumbnails of stored images by id, made once and kept (least recently used first out)."""

    def __init__(self, service: Service):
        import threading
        from collections import OrderedDict

        self.service = service
        self.kept: OrderedDict[tuple, tuple[bytes, str]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, image_id: int) -> tuple[bytes, str] | None:
        """(JPEG bytes, ETag), or None when there is no such image. The catalog is asked every time (an id whose
        image was removed is not answered from memory) and the bytes checked against its sha256, so an altered
        file is never shown as evidence; the rendering is kept per (id, content). A file that is gone, altered or
        undecodable is StoreDamaged, one the server may not read StoreDenied: a 503 naming it, not a 404."""
        import hashlib
        import io

        from engine.images import read_image

        if isinstance(image_id, bool) or not 0 < image_id < 2 ** 63:
            return None
        data = self.service.store.checked_image(image_id)
        if data is None:
            return None
        key = (image_id, hashlib.sha256(data).hexdigest())
        with self.lock:
            if key in self.kept:
                self.kept.move_to_end(key)
                return self.kept[key]
        try:
            image, _ = read_image(data)
            image.thumbnail((THUMB_SIDE, THUMB_SIDE))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
        except (UserError, OSError) as exc:  # the recorded bytes themselves do not decode
            raise StoreDamaged(f"stored image {image_id} cannot be decoded ({exc}): `resynth verify` lists every "
                               "stored file that is lost or altered") from None
        data = buffer.getvalue()
        found = (data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"')
        with self.lock:
            self.kept[key] = found
            if len(self.kept) > THUMBS_KEPT:
                self.kept.popitem(last=False)
        return found


def _case_report(service: Service, data: dict, queries: list[Query], options: Options) -> str:
    from engine import casereport

    command = "POST /v1/report " + json.dumps({k: v for k, v in options.to_dict().items() if v is not None},
                                              sort_keys=True)
    head = casereport.header(service.ws, command, options, store_label=service.store.root.name)
    return casereport.to_string(head, casereport.entries_of(data, [q.image for q in queries]), service.store,
                                index=casereport.index_of(data))


async def _read_request(request: Request, service: Service,
                        admission: Admission) -> tuple[list[Query], Options, int]:
    """Multipart form -> decoded queries, options and the pixels held for them (the caller gives them
    back); every problem is a ServiceError or a UserError.

    Pixel counts come from the image headers before anything is decoded: a request over its budget
    is refused, then it waits for room among the pixels all requests hold, then it decodes in one of
    a few decode slots, one image at a time, reading each file's bytes only then.
    """
    limits = service.limits
    if request.url.query:  # options in the URL were ignored: an answer over sources the client had excluded
        raise ServiceError(400, "unexpected_query", "options are fields of the multipart form, not query "
                                                    f"parameters: move {request.url.query[:80]!r} into the form")
    if media_type(request) != "multipart/form-data":
        raise ServiceError(415, "unsupported_media_type", "send multipart/form-data with one or more `image` parts")
    async with read_form(request, limits, file_fields=("image",)) as form:
        image_parts = form.getlist("image")
        if not image_parts:
            raise ServiceError(400, "no_image", "send at least one `image` file part")
        if not all(isinstance(u, UploadFile) for u in image_parts):
            raise ServiceError(400, "bad_request", "`image` must be a file part, not a text field")
        uploads = cast(list[UploadFile], image_parts)  # every one checked just above
        prompt_parts = form.getlist("prompt")
        if not all(isinstance(p, str) for p in prompt_parts):
            raise ServiceError(400, "bad_request", "`prompt` must be a text field")
        prompts = cast(list[str], prompt_parts)  # every one checked just above
        if len(prompts) not in (0, 1, len(uploads)):
            raise ServiceError(400, "bad_request",
                               f"{len(prompts)} prompts for {len(uploads)} image{'s' * (len(uploads) != 1)}: "
                               "give one, or one per image")
        for number, prompt in enumerate(prompts, start=1):
            try:
                clean_prompt(prompt)  # the library's check: the CLI's and Python's code and message
            except UserError as exc:
                raise type(exc)(str(exc) if len(prompts) == 1 else f"prompt {number}: {exc}", code=exc.code) from None
        Options.check_fields(form.keys())  # a misspelt option is refused, not ignored (engine.options)
        files_for = [name for name in OPTION_FIELDS if any(not isinstance(v, str) for v in form.getlist(name))]
        if files_for:  # `curl -F sources=@list.txt`: a file part was dropped, and the answer covered every source
            raise ServiceError(400, "bad_option", f"`{files_for[0]}` must be a text field, not a file part "
                                                  f"(curl: -F '{files_for[0]}=VALUE' or --form-string)")
        twice = [name for name in OPTION_FIELDS if len(form.getlist(name)) > 1]
        if twice:  # only the last would count: a client's list of sources silently cut to one (the CLI's words)
            raise given_twice(twice[0], len(form.getlist(twice[0])))
        given = {name: form.get(name) for name in OPTION_FIELDS}
        options = Options.from_strings({name: v for name, v in given.items() if isinstance(v, str)})
        labels = [_label(u.filename, i) for i, u in enumerate(uploads)]
        per_image: Sequence[str | None] = (prompts * len(uploads) if len(prompts) == 1
                                           else prompts or [None] * len(uploads))
        files = [u.file for u in uploads]
        pixels = _charge(await asyncio.to_thread(_sizes, files), labels, limits)

        def decode() -> list[Query]:  # the one image reader: same limits, formats and EXIF rule as the CLI
            queries = []
            for file, label, prompt in zip(files, labels, per_image):
                file.seek(0)
                raw = file.read(limits.max_image_bytes + 1)
                queries.append(Query.read(raw, prompt, label, max_bytes=limits.max_image_bytes,
                                          max_pixels=limits.max_pixels))
                del raw
            return queries

        await admission.pixels.acquire(pixels)
        try:
            async with admission.decodes:
                admission.decoding += 1
                try:
                    queries = await asyncio.to_thread(decode)
                finally:
                    admission.decoding -= 1
        except BaseException:
            admission.pixels.release(pixels)
            raise
    return queries, options, pixels


def _sizes(files) -> list[tuple[int, int] | None]:
    """Width and height from each file's header (nothing decoded); None where it is not an accepted
    image, which the image reader then reports."""
    sizes: list[tuple[int, int] | None] = []
    for file in files:
        file.seek(0)
        try:
            check_structure(file)  # hardening: Pillow walks a file's blocks in Python; too many cost seconds
            with Image.open(file, formats=FORMATS) as opened:
                sizes.append((opened.width, opened.height))
        except Exception:  # noqa: BLE001 - any failure here is reported by the reader, by type
            sizes.append(None)
    return sizes


def _charge(sizes: list[tuple[int, int] | None], labels: list[str], limits: Limits) -> int:
    """Pixels of a request, refused (413) over the per-image or per-request limit."""
    total = 0
    for size, label in zip(sizes, labels):
        if size is None:
            continue
        width, height = size
        if width * height > limits.max_pixels:
            raise TooLargeError(f"{label}: {width}x{height} pixels, the limit is {limits.max_pixels}",
                                code="image_too_large")
        check_aspect(width, height, label)  # what preprocessing would scale up: refused before decoding
        total += width * height
    if total > limits.max_request_pixels:
        raise TooLargeError(f"{len(sizes)} image{'s' * (len(sizes) != 1)} of {total} pixels in all: the limit per "
                            f"request is {limits.max_request_pixels}", code="request_too_large")
    return total


def _label(filename: str | None, index: int) -> str:
    """A display name for results; only ever a string, never used as a path. A browser sends `"` in a file
    name as %22 (and a line break as %0A, %0D: dropped below with the other control characters)."""
    name = PurePath((filename or "").replace("%22", '"').replace("%0A", "\n").replace("%0D", "\r")
                    .replace("\\", "/")).name
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")[:120].strip()
    return name or f"image-{index + 1}"


def _document_security(app: FastAPI, token: bool) -> None:
    """With a token, the OpenAPI schema declares bearer authentication (the /docs page then has an
    "Authorize" button that sends it); health routes are marked as needing none."""
    if not token:
        return
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "the server's token (--token or $RESYNTH_TOKEN)"}}
            schema["security"] = [{"bearer": []}]
            for path in PUBLIC_PATHS:
                for operation in schema.get("paths", {}).get(path, {}).values():
                    operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    def reply(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        service.count(f"error:{code}")
        return JSONResponse(body(code, message), status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def service_error(_request, exc: ServiceError):
        return reply(exc.status, exc.code, exc.message, exc.headers)


    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, _exc: ClientDisconnect):
        service.count("client_disconnected")  # not an error of ours: no traceback, no internal_error
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=400)  # nobody reads it: the server drops it

    @app.exception_handler(QueueFull)
    async def queue_full(_request, exc: QueueFull):
        return reply(503, "queue_full", f"{exc}; retry shortly", {"Retry-After": "2"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):  # a 405 keeps its Allow header
        return reply(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail),
                     dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return reply(400, "bad_request", "malformed request")

    async def any_error(request: Request, exc: Exception):
        kind = kind_of(exc)  # by type, never by message text
        if kind is not None:  # what the machine refused is said without the server's paths
            return reply(kind.status, kind.code, _without_store_path(message_of(exc, paths=False), service))
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return reply(500, "internal_error", "internal error (details are in the server log)")

    for mapped in MAPPED_ERRORS:
        app.add_exception_handler(mapped, any_error)
    app.add_exception_handler(Exception, any_error)


def _without_store_path(message: str, service: Service) -> str:
    """The store's own messages name its folder ("the store at /srv/x is read-only"): over HTTP the folder
    is named by its last part, as /v1/stats and the case report name it, never by the server's path."""
    root = Path(service.store.root)
    for shown in sorted({str(root), str(root.resolve())}, key=len, reverse=True):
        if len(shown) > 1:
            message = message.replace(shown, root.name or "the store")
    return message


async def _upkeep(service: Service) -> None:
    """Swap in rebuilt indexes, follow source changes and save new vectors, off the event loop."""
    while True:
        await asyncio.sleep(service.limits.refresh_seconds)
        try:
            await asyncio.to_thread(service.maintain)
        except Exception:
            log.exception("upkeep failed; retrying at the next tick")
