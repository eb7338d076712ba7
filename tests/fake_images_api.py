"""A local fake of an OpenAI-compatible images API, for tests: uvicorn in a thread on 127.0.0.1.

    with FakeImagesApi(make=pipeline_fn, key="sk-test") as api:
        api.url; api.log; api.queue("429", "500"); api.mode = "hang"

Behaviours (queued for the next requests, else the persistent `mode`, else a normal answer):
"429" (Retry-After: `retry_after`), "500", "hang" (answers after `hang_seconds`), "malformed" (not
JSON), "empty" (no data), "undecodable" (base64 of garbage), "bad-b64" (not base64), "oversized"
(5000x5000 PNG), "url" (an image URL on this server), "url-private" (an image URL on 10.0.0.1),
"redirect-private" (a URL here that redirects to 169.254.169.254), "redirect-loop", "401"
(echoing the key it was given, as real servers do), "content-policy" (400), "error-200" (an error under
status 200, echoing the key), "moved" (a 301 to https://api.example.com).

`FakeProviderApi` adds stand-ins of the other provider protocols on the same server (Black Forest
Labs, Replicate, Stability, Google Imagen and Gemini, fal.ai, Ideogram, Adobe Firefly with its IMS
token endpoint), and `DripServer` is a raw socket server that
sends its answers' headers or body one byte at a time (for the total deadlines).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import secrets
import socket
import threading
import time
from collections import deque
from typing import Callable

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from PIL import Image

BEHAVIOURS = {"ok", "429", "500", "hang", "malformed", "empty", "undecodable", "bad-b64", "oversized", "url",
              "url-private", "url-bad-port", "redirect-private", "redirect-loop", "401", "content-policy", "error-200",
              "moved"}


def default_make(prompt: str, index: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A deterministic noise image drawn from a hash of the prompt."""
    seed = int.from_bytes(hashlib.sha256(f"{prompt}\0{index}".encode()).digest()[:8], "little")
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class FakeImagesApi:
    def __init__(self, make: Callable[[str, int], Image.Image] = default_make, key: str | None = None,
                 retry_after: str = "1", hang_seconds: float = 5.0, delay: float = 0.0):
        self.make = make
        self.key = key                    # if set, anything but "Bearer <key>" gets 401
        self.retry_after = retry_after    # the Retry-After header of "429"
        self.hang_seconds = hang_seconds
        self.delay = delay                # seconds every generation request takes (to observe concurrency)
        self.mode: str | None = None
        self.download_failures = 0        # the next image-URL downloads answered 503 (a CDN hiccup)
        self.log: list[dict] = []         # one entry per request: time, end, path, headers, body, status
        self.max_in_flight = 0
        self._queue: deque[str] = deque()
        self._files: dict[str, bytes] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._make_lock = threading.Lock()  # pipelines are not thread-safe
        self._in_flight = 0
        self._closing = False
        self._oversized: bytes | None = None
        self.app = self._build_app()
        self.url = ""

    # -- control ----------------------------------------------------------------------------------
    def queue(self, *behaviours: str) -> None:
        for behaviour in behaviours:
            assert behaviour in BEHAVIOURS, behaviour
        with self._lock:
            self._queue.extend(behaviours)

    def generation_log(self) -> list[dict]:
        with self._lock:
            return [entry for entry in self.log if entry["path"].endswith("/images/generations")]

    def __enter__(self) -> "FakeImagesApi":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="error", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake images API did not start")
            time.sleep(0.01)
        self._sock = sock
        return self

    def __exit__(self, *exc) -> None:
        self._closing = True
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    # -- server -----------------------------------------------------------------------------------
    def _next_behaviour(self) -> str:
        with self._lock:
            return self._queue.popleft() if self._queue else (self.mode or "ok")

    def _store(self, data: bytes) -> str:
        name = f"{next(self._ids)}.png"
        self._files[name] = data
        return name

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def record(request: Request, call_next):
            body = await request.body()
            entry = {"time": time.monotonic(), "end": None, "path": request.url.path, "method": request.method,
                     "query": request.url.query, "raw": body,
                     "headers": dict(request.headers), "authorization": request.headers.get("authorization"),
                     "body": _json_or_none(body), "status": None}
            with self._lock:
                self.log.append(entry)
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
            try:
                response = await call_next(request)
                entry["status"] = response.status_code
                return response
            finally:
                with self._lock:
                    self._in_flight -= 1
                entry["end"] = time.monotonic()

        async def generations(request: Request):
            body = await request.json()
            if self.delay:
                await asyncio.sleep(self.delay)
            given = request.headers.get("authorization", "")
            behaviour = self._next_behaviour()
            if behaviour == "401" or (self.key is not None and given != f"Bearer {self.key}"):
                shown = given.removeprefix("Bearer ")
                return JSONResponse({"error": {"message": f"Incorrect API key provided: {shown}. You can find "
                                               "your API key at https://example.invalid/keys.",
                                               "type": "invalid_request_error", "code": "invalid_api_key"}}, 401)
            if behaviour == "429":
                return JSONResponse({"error": {"message": "Rate limit reached"}}, 429,
                                    headers={"Retry-After": self.retry_after})
            if behaviour == "500":
                return JSONResponse({"error": {"message": "The server had an error"}}, 500)
            if behaviour == "content-policy":
                return JSONResponse({"error": {"message": "Your request was rejected as a result of our safety "
                                               "system.", "type": "invalid_request_error",
                                               "code": "content_policy_violation"}}, 400)
            if behaviour == "hang":
                end = time.monotonic() + self.hang_seconds
                while time.monotonic() < end and not self._closing:
                    await asyncio.sleep(0.02)
            if behaviour == "malformed":
                return PlainTextResponse("<html>502 Bad Gateway</html>")
            if behaviour == "error-200":  # a proxy's error under status 200
                return JSONResponse({"error": {"message": f"Billing hard limit reached for {given}"}})
            if behaviour == "moved":
                return RedirectResponse("https://api.example.com/v1/images/generations", 301)
            if behaviour == "empty":
                return JSONResponse({"data": []})
            if behaviour == "undecodable":
                return JSONResponse({"data": [{"b64_json": base64.b64encode(b"definitely not an image").decode()}]})
            if behaviour == "bad-b64":
                return JSONResponse({"data": [{"b64_json": "!!! not base64 !!!"}]})
            if behaviour == "oversized":
                if self._oversized is None:
                    self._oversized = png_bytes(Image.new("1", (5000, 5000)))
                return JSONResponse({"data": [{"b64_json": base64.b64encode(self._oversized).decode()}]})
            if behaviour == "url-private":
                return JSONResponse({"data": [{"url": "http://10.0.0.1/image.png"}]})
            if behaviour == "url-bad-port":  # a URL no parser accepts
                return JSONResponse({"data": [{"url": "https://img.example.com:99999/x.png"}]})
            if behaviour == "redirect-private":
                return JSONResponse({"data": [{"url": f"{self.url}/redirect/private"}]})
            if behaviour == "redirect-loop":
                return JSONResponse({"data": [{"url": f"{self.url}/redirect/loop-0"}]})
            size = _size(body.get("size"))
            image = await asyncio.to_thread(self._call_make, str(body.get("prompt", "")), size)
            data = png_bytes(image)
            if behaviour == "url":
                return JSONResponse({"data": [{"url": f"{self.url}/files/{self._store(data)}"}]})
            return JSONResponse({"data": [{"b64_json": base64.b64encode(data).decode()}]})

        app.post("/v1/images/generations")(generations)
        app.post("/images/generations")(generations)

        @app.get("/files/{name}")
        async def files(name: str):
            with self._lock:
                hiccup, self.download_failures = self.download_failures > 0, max(0, self.download_failures - 1)
            if hiccup:
                return Response(status_code=503)
            data = self._files.get(name)
            return Response(data, media_type="image/png") if data is not None else Response(status_code=404)

        @app.get("/redirect/{what}")
        async def redirect(what: str):
            if what == "private":
                return RedirectResponse("http://169.254.169.254/latest/meta-data/", 302)
            step = int(what.removeprefix("loop-")) + 1
            return RedirectResponse(f"/redirect/loop-{step}", 302)

        return app

    def _call_make(self, prompt: str, size: tuple[int, int] | None) -> Image.Image:
        with self._make_lock:
            if self.make is default_make and size:
                return default_make(prompt, 0, size)
            return self.make(prompt, 0)


def _size(value) -> tuple[int, int] | None:
    try:
        width, height = str(value).split("x")
        return int(width), int(height)
    except ValueError:
        return None


def _json_or_none(body: bytes):
    import json

    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


# -- other provider protocols ------------------------------------------------------------------------

PROVIDER_BEHAVIOURS = {"ok", "429", "500", "401", "malformed", "moderated", "url-private", "poll-private",
                       "json"}


class FakeProviderApi(FakeImagesApi):
    """Stand-ins of the non-OpenAI provider protocols, on the same loopback server:

    - Black Forest Labs: `POST /v1/{model}` (x-key) -> `{id, polling_url}`; `GET /v1/get_result?id=`
      answers `Pending` `pending_polls` times, then `Ready` with `result.sample` (a URL here).
    - Replicate: `POST /v1/models/{owner}/{name}/predictions` or `/v1/predictions` (Bearer) -> a
      `starting` prediction with `urls.get` (or `succeeded` at once when `replicate_sync`);
      `GET /v1/predictions/{id}` answers `processing`, then `succeeded` with `output` (a list of URLs).
    - Stability: multipart `POST /v2beta/stable-image/generate/{route}` (Bearer) -> PNG bytes with a
      `finish-reason` header (or JSON when asked with `Accept: application/json`).
    - Google: `POST /v1beta/models/{model}:predict` and `:generateContent` (x-goog-api-key).

    - fal.ai: `POST /fal-ai/{app}/...` (`Authorization: Key`) -> `{request_id, status_url, response_url}`;
      `GET .../requests/{id}/status` answers `IN_QUEUE` `pending_polls` times, then `COMPLETED`;
      `GET .../requests/{id}` the result `{images: [{url}], has_nsfw_concepts}`.
    - Ideogram: multipart `POST /v1/ideogram-v3/generate`, JSON `POST /v2/image/generate/{model}` and
      legacy `POST /generate` (`Api-Key`) -> `{data: [{url, seed, prompt, resolution, is_image_safe}]}`.
    - Adobe Firefly: `POST /ims/token/v3` (a form with client_id `FIREFLY_CLIENT_ID` and the key as
      client_secret) -> `{access_token, expires_in}`; `POST /v3/images/generate-async` (`x-api-key`
      client id, `Authorization: Bearer` an issued token) -> `{jobId, statusUrl}`; `GET /v3/status/{id}`
      answers `running`, then `succeeded` with `result.outputs[0].image.url`. `token_queue` takes
      "429"/"500" for the token endpoint; `token_requests()` lists its requests (not submissions).

    Submissions take the next queued behaviour (`queue`): "429", "500", "401" (echoing the key),
    "malformed" (not JSON), "moderated" (the service's refusal: BFL `Content Moderated` at the poll,
    Replicate `failed`, Stability `CONTENT_FILTERED`, Imagen `raiFilteredReason`, Gemini
    `blockReason`, fal `has_nsfw_concepts`, Ideogram `is_image_safe: false`, Firefly `failed`),
    "url-private" (the image URL on 10.0.0.1), "poll-private" (the polling URL on
    10.0.0.1). Polls take `poll_queue` behaviours ("429", "500"), else answer normally. Every request
    is in `log` (method, path, query, headers, body, raw bytes, form for multipart); `form_log` holds
    the multipart fields received.
    """

    FIREFLY_CLIENT_ID = "ff-client-7e6d5c4b3a29"

    def __init__(self, *args, pending_polls: int = 1, replicate_sync: bool = False, **kwargs):
        self.pending_polls = pending_polls
        self.replicate_sync = replicate_sync
        self.poll_queue: deque[str] = deque()
        self.token_queue: deque[str] = deque()
        self.issued: list[str] = []  # Firefly access tokens handed out
        self.tasks: dict[str, dict] = {}
        self.form_log: list[dict] = []
        super().__init__(*args, **kwargs)

    def queue(self, *behaviours: str) -> None:
        for behaviour in behaviours:
            assert behaviour in BEHAVIOURS | PROVIDER_BEHAVIOURS, behaviour
        with self._lock:
            self._queue.extend(behaviours)

    def expire(self) -> None:
        """The service forgets every task and result it holds (its retention passed): polls of them answer
        as for an unknown task (BFL `Task not found`, Replicate/fal/Firefly 404)."""
        with self._lock:
            self.tasks.clear()
            self._files.clear()

    def submissions(self) -> list[dict]:
        with self._lock:
            return [e for e in self.log if e["method"] == "POST" and e["path"] != "/ims/token/v3"]

    def token_requests(self) -> list[dict]:
        with self._lock:
            return [e for e in self.log if e["path"] == "/ims/token/v3"]

    def polls(self) -> list[dict]:
        with self._lock:
            return [e for e in self.log if e["method"] == "GET" and not e["path"].startswith("/files/")]

    def downloads(self) -> list[dict]:
        with self._lock:
            return [e for e in self.log if e["path"].startswith("/files/")]

    def _refusal(self, given: str | None):
        shown = (given or "").removeprefix("Bearer ")
        return JSONResponse({"detail": f"Invalid API key: {shown}"}, 401)

    def _submission(self, request: Request, header: str, expected: str | None):
        """(behaviour, early response or None) for a submission, after the key check."""
        given = request.headers.get(header)
        behaviour = self._next_behaviour()
        if behaviour == "401" or (self.key is not None and given != expected):
            return behaviour, self._refusal(given)
        if behaviour == "429":
            return behaviour, JSONResponse({"detail": "Too many requests"}, 429,
                                           headers={"Retry-After": self.retry_after})
        if behaviour == "500":
            return behaviour, JSONResponse({"detail": "Internal error"}, 500)
        if behaviour == "malformed":
            return behaviour, PlainTextResponse("<html>502 Bad Gateway</html>")
        return behaviour, None

    def _poll_failure(self):
        with self._lock:
            behaviour = self.poll_queue.popleft() if self.poll_queue else "ok"
        if behaviour == "429":
            return JSONResponse({"detail": "slow down"}, 429, headers={"Retry-After": "0.2"})
        if behaviour == "500":
            return JSONResponse({"detail": "poll failed"}, 500)
        return None

    async def _image(self, prompt: str, size: tuple[int, int] | None) -> bytes:
        if self.delay:
            await asyncio.sleep(self.delay)
        image = await asyncio.to_thread(self._call_make, prompt, size or (24, 24))
        return png_bytes(image)

    def _task(self, behaviour: str, data: bytes) -> str:
        task = f"t{next(self._ids)}"
        url = "http://10.0.0.1/image.png" if behaviour == "url-private" else f"{self.url}/files/{self._store(data)}"
        with self._lock:
            self.tasks[task] = {"polls": 0, "behaviour": behaviour, "url": url}
        return task

    def _advance(self, task: str) -> dict | None:
        with self._lock:
            state = self.tasks.get(task)
            if state is not None:
                state["polls"] += 1
            return state

    def _build_app(self) -> FastAPI:
        app = super()._build_app()
        bearer = lambda: f"Bearer {self.key}"  # noqa: E731

        # Replicate (registered before BFL's /v1/{model}, which would take /v1/predictions)
        async def replicate_submit(request: Request):
            behaviour, early = self._submission(request, "authorization", bearer())
            if early is not None:
                return early
            body = await request.json()
            inputs = body.get("input") or {}
            size = (inputs["width"], inputs["height"]) if "width" in inputs else None
            task = self._task(behaviour, await self._image(str(inputs.get("prompt", "")), size))
            poll = "http://10.0.0.1/v1/predictions/x" if behaviour == "poll-private" else \
                f"{self.url}/v1/predictions/{task}"
            prediction = {"id": task, "status": "starting", "input": inputs,
                          "urls": {"get": poll, "cancel": f"{poll}/cancel"}}
            if self.replicate_sync and request.headers.get("prefer", "").startswith("wait") \
                    and behaviour not in ("moderated", "poll-private"):
                prediction.update(status="succeeded", output=self.tasks[task]["url"])
            return JSONResponse(prediction, 201)

        app.post("/v1/predictions")(replicate_submit)
        app.post("/v1/models/{owner}/{name}/predictions")(replicate_submit)

        @app.get("/v1/predictions/{task}")
        async def replicate_get(task: str, request: Request):
            if self.key is not None and request.headers.get("authorization") != bearer():
                return self._refusal(request.headers.get("authorization"))
            failure = self._poll_failure()
            if failure is not None:
                return failure
            state = self._advance(task)
            if state is None:
                return JSONResponse({"detail": "Not found."}, 404)
            if state["polls"] <= self.pending_polls:
                return JSONResponse({"id": task, "status": "processing", "output": None})
            if state["behaviour"] == "moderated":
                return JSONResponse({"id": task, "status": "failed", "output": None,
                                     "error": "NSFW content detected. Try running it again.\nsecond line"})
            return JSONResponse({"id": task, "status": "succeeded", "output": [state["url"]]})

        # Black Forest Labs
        @app.get("/v1/get_result")
        async def bfl_result(id: str, request: Request):
            if self.key is not None and request.headers.get("x-key") != self.key:
                return self._refusal(request.headers.get("x-key"))
            failure = self._poll_failure()
            if failure is not None:
                return failure
            state = self._advance(id)
            if state is None:
                return JSONResponse({"id": id, "status": "Task not found"})
            if state["polls"] <= self.pending_polls:
                return JSONResponse({"id": id, "status": "Pending", "result": None})
            if state["behaviour"] == "moderated":
                return JSONResponse({"id": id, "status": "Content Moderated", "result": None,
                                     "details": {"Moderation Reasons": ["Derivative Works Filter"]}})
            return JSONResponse({"id": id, "status": "Ready",
                                 "result": {"sample": state["url"], "prompt": "...", "seed": 1}})

        @app.post("/v1/{model}")
        async def bfl_submit(model: str, request: Request):
            behaviour, early = self._submission(request, "x-key", self.key)
            if early is not None:
                return early
            body = await request.json()
            size = (body["width"], body["height"]) if "width" in body else None
            task = self._task(behaviour, await self._image(str(body.get("prompt", "")), size))
            polling = "http://10.0.0.1/v1/get_result?id=x" if behaviour == "poll-private" else \
                f"{self.url}/v1/get_result?id={task}"
            return JSONResponse({"id": task, "polling_url": polling})

        # Stability
        @app.post("/v2beta/stable-image/generate/{route}")
        async def stability(route: str, request: Request):
            behaviour, early = self._submission(request, "authorization", bearer())
            if early is not None:
                return early
            form = {k: v for k, v in (await request.form()).items()}
            with self._lock:
                self.form_log.append({"route": route, **form})
            data = await self._image(str(form.get("prompt", "")), _ratio_size(form.get("aspect_ratio")))
            finish = "CONTENT_FILTERED" if behaviour == "moderated" else "SUCCESS"
            if behaviour == "json" or "application/json" in request.headers.get("accept", ""):
                return JSONResponse({"image": base64.b64encode(data).decode(), "finish_reason": finish, "seed": 3})
            return Response(data, media_type="image/png", headers={"finish-reason": finish, "seed": "3"})

        # Google
        @app.post("/v1beta/models/{target}")
        async def google(target: str, request: Request):
            behaviour, early = self._submission(request, "x-goog-api-key", self.key)
            if early is not None:
                return early
            model, _, method = target.partition(":")
            body = await request.json()
            if method == "predict":
                prompt = body["instances"][0]["prompt"]
                if behaviour == "moderated":
                    return JSONResponse({"predictions": [{"raiFilteredReason": "It may violate our policies."}]})
                data = await self._image(prompt, _ratio_size(body.get("parameters", {}).get("aspectRatio")))
                return JSONResponse({"predictions": [{"mimeType": "image/png",
                                                      "bytesBase64Encoded": base64.b64encode(data).decode()}]})
            if method == "generateContent":
                prompt = body["contents"][0]["parts"][0]["text"]
                if behaviour == "moderated":
                    return JSONResponse({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}})
                ratio = (body.get("generationConfig", {}).get("imageConfig") or {}).get("aspectRatio")
                data = await self._image(prompt, _ratio_size(ratio))
                return JSONResponse({"candidates": [{"content": {"role": "model", "parts": [
                    {"text": "Here is your image."},
                    {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(data).decode()}}]},
                    "finishReason": "STOP"}], "modelVersion": model})
            return JSONResponse({"error": {"message": f"unknown method {method}"}}, 404)

        self._other_routes(app)
        return app

    def _other_routes(self, app: FastAPI) -> None:
        """fal.ai, Ideogram and Adobe Firefly."""
        def completed(state: dict, prompt: str = "") -> dict:
            flagged = state["behaviour"] == "moderated"
            return {"images": [{"url": state["url"], "width": 16, "height": 16, "content_type": "image/png"}],
                    "has_nsfw_concepts": [flagged], "seed": 7, "prompt": prompt}

        # fal.ai
        def fal_key(request: Request):
            given = request.headers.get("authorization")
            return None if self.key is None or given == f"Key {self.key}" else self._refusal(given)

        @app.get("/fal-ai/{app_id}/requests/{task}/status")
        async def fal_status(app_id: str, task: str, request: Request):
            failure = fal_key(request) or self._poll_failure()
            if failure is not None:
                return failure
            state = self._advance(task)
            if state is None:
                return JSONResponse({"detail": "Request not found"}, 404)
            if state["polls"] <= self.pending_polls:
                return JSONResponse({"status": "IN_QUEUE", "queue_position": 0,
                                     "response_url": f"{self.url}/fal-ai/{app_id}/requests/{task}"}, 202)
            return JSONResponse({"status": "COMPLETED", "response_url": f"{self.url}/fal-ai/{app_id}/requests/{task}"})

        @app.get("/fal-ai/{app_id}/requests/{task}")
        async def fal_result(app_id: str, task: str, request: Request):
            failure = fal_key(request) or self._poll_failure()
            if failure is not None:
                return failure
            with self._lock:
                state = self.tasks.get(task)
            if state is None:
                return JSONResponse({"detail": "Request not found"}, 404)
            return JSONResponse(completed(state))

        @app.post("/fal-ai/{rest:path}")
        async def fal_submit(rest: str, request: Request):
            behaviour, early = self._submission(request, "authorization", f"Key {self.key}")
            if early is not None:
                return early
            body = await request.json()
            size = body.get("image_size")
            dims = (size["width"], size["height"]) if isinstance(size, dict) else None
            task = self._task(behaviour, await self._image(str(body.get("prompt", "")), dims))
            queue = "http://10.0.0.1" if behaviour == "poll-private" else self.url
            app_id = rest.split("/")[0]
            return JSONResponse({"request_id": task, "status_url": f"{queue}/fal-ai/{app_id}/requests/{task}/status",
                                 "response_url": f"{queue}/fal-ai/{app_id}/requests/{task}",
                                 "cancel_url": f"{queue}/fal-ai/{app_id}/requests/{task}/cancel"})

        # Ideogram
        async def ideogram(request: Request, prompt: str, resolution: str | None):
            behaviour = request.state.behaviour
            dims = _size(resolution) if resolution and "x" in resolution else None
            if resolution and resolution.startswith("RESOLUTION_"):
                dims = tuple(int(v) for v in resolution.split("_")[1:3])  # type: ignore[assignment]
            if behaviour == "moderated":
                return JSONResponse({"created": "2026-01-01T00:00:00Z", "data": [
                    {"prompt": prompt, "resolution": resolution, "seed": 5, "is_image_safe": False}]})
            data = await self._image(prompt, dims)
            url = "http://10.0.0.1/image.png" if behaviour == "url-private" else \
                f"{self.url}/files/{self._store(data)}"
            return JSONResponse({"created": "2026-01-01T00:00:00Z", "data": [
                {"url": url, "prompt": prompt, "resolution": resolution, "seed": 5, "is_image_safe": True,
                 "style_type": "GENERAL"}]})

        @app.post("/v1/ideogram-v3/generate")
        async def ideogram_v3(request: Request):
            behaviour, early = self._submission(request, "api-key", self.key)
            if early is not None:
                return early
            form = {k: v for k, v in (await request.form()).items()}
            with self._lock:
                self.form_log.append({"route": "ideogram-v3", **form})
            request.state.behaviour = behaviour
            return await ideogram(request, str(form.get("prompt", "")), form.get("resolution"))

        @app.post("/v2/image/generate/{model}")
        async def ideogram_v2(model: str, request: Request):
            behaviour, early = self._submission(request, "api-key", self.key)
            if early is not None:
                return early
            body = await request.json()
            request.state.behaviour = behaviour
            return await ideogram(request, str(body.get("prompt", "")), body.get("resolution"))

        @app.post("/generate")
        async def ideogram_legacy(request: Request):
            behaviour, early = self._submission(request, "api-key", self.key)
            if early is not None:
                return early
            body = (await request.json()).get("image_request") or {}
            request.state.behaviour = behaviour
            return await ideogram(request, str(body.get("prompt", "")), body.get("resolution"))

        # Adobe Firefly and its token endpoint (Adobe IMS)
        @app.post("/ims/token/v3")
        async def ims_token(request: Request):
            with self._lock:
                behaviour = self.token_queue.popleft() if self.token_queue else "ok"
            if behaviour == "429":
                return JSONResponse({"error": "too_many_requests"}, 429, headers={"Retry-After": self.retry_after})
            if behaviour == "500":
                return JSONResponse({"error": "server_error"}, 500)
            form = {k: v for k, v in (await request.form()).items()}
            secret, client = form.get("client_secret"), form.get("client_id")
            if form.get("grant_type") != "client_credentials" or client != self.FIREFLY_CLIENT_ID or \
                    (self.key is not None and secret != self.key):
                return JSONResponse({"error": "invalid_client",
                                     "error_description": f"invalid client_secret parameter {secret}"}, 401)
            token = "eyJ-ff-" + secrets.token_hex(16)
            with self._lock:
                self.issued.append(token)
            return JSONResponse({"access_token": token, "token_type": "bearer", "expires_in": 86399})

        def firefly_credentials(request: Request):
            token = (request.headers.get("authorization") or "").removeprefix("Bearer ")
            if request.headers.get("x-api-key") != self.FIREFLY_CLIENT_ID or token not in self.issued:
                return JSONResponse({"error_code": "401013", "message": "Oauth token is not valid"}, 401)
            return None

        @app.post("/v3/images/generate-async")
        async def firefly_submit(request: Request):
            behaviour, early = self._submission(request, "x-api-key", self.FIREFLY_CLIENT_ID)
            early = early or firefly_credentials(request)
            if early is not None:
                return early
            body = await request.json()
            size = body.get("size")
            dims = (size["width"], size["height"]) if isinstance(size, dict) else None
            task = self._task(behaviour, await self._image(str(body.get("prompt", "")), dims))
            status = "http://10.0.0.1" if behaviour == "poll-private" else self.url
            return JSONResponse({"jobId": task, "statusUrl": f"{status}/v3/status/{task}",
                                 "cancelUrl": f"{status}/v3/cancel/{task}"}, 202)

        @app.get("/v3/status/{task}")
        async def firefly_status(task: str, request: Request):
            failure = firefly_credentials(request) or self._poll_failure()
            if failure is not None:
                return failure
            state = self._advance(task)
            if state is None:
                return JSONResponse({"error_code": "not_found", "message": "job not found"}, 404)
            if state["polls"] <= self.pending_polls:
                return JSONResponse({"jobId": task, "status": "running"})
            if state["behaviour"] == "moderated":
                return JSONResponse({"jobId": task, "status": "failed",
                                     "message": "The input text contains content which is not allowed.\nmore"})
            return JSONResponse({"jobId": task, "status": "succeeded", "result": {
                "size": {"width": 16, "height": 16}, "outputs": [{"seed": 3, "image": {"url": state["url"]}}],
                "contentClass": "art"}})


def _ratio_size(ratio) -> tuple[int, int] | None:
    """A small image of an aspect ratio 'W:H' (8 pixels per unit)."""
    try:
        width, height = str(ratio).split(":")
        return int(width) * 8, int(height) * 8
    except ValueError:
        return None


# -- a server that drips -----------------------------------------------------------------------------

class DripServer:
    """A raw HTTP/1.1 server on 127.0.0.1 (a thread per connection) for the total deadlines.

        with DripServer({"/v1/images/generations": (200, {"content-type": "application/json"}, body)},
                        drip={"/v1/images/generations": "headers"}, interval=0.05) as server:
            server.url; server.log

    `routes` maps a path to (status, headers, body) or to a callable(server, method, path, body)
    returning that. `drip` maps a path to "headers" (the status line and headers go out one byte
    every `interval` seconds, then the body) or "body" (headers at once with Content-Length, the body
    one byte at a time); other paths answer at once. Every connection is closed after one answer.
    `log` lists (method, path, start, end) per request; `end` is when the server stopped sending
    (the client hung up, or all was sent)."""

    def __init__(self, routes: dict, drip: dict | None = None, interval: float = 0.05, padding: int = 2000,
                 tls=None):
        self.tls = tls  # an ssl.SSLContext for the server side: https
        self.routes = routes
        self.drip = drip or {}
        self.interval = interval
        self.padding = padding  # bytes of an extra header, so a dripped answer takes long
        self.log: list[dict] = []
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "DripServer":
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._acceptor.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)
        self._sock.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        if self.tls is not None:
            try:
                conn.settimeout(5)
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                conn.close()
                return
        with conn:
            conn.settimeout(5)
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, body = data.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                               if line.lower().startswith("content-length:")), 0)
                while len(body) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    body += chunk
            except (OSError, ValueError):
                return
            path = target.split("?", 1)[0]
            entry = {"method": method, "path": path, "start": time.monotonic(), "end": None}
            self.log.append(entry)
            answer = self.routes.get(path, (404, {}, b"not found"))
            status, headers, payload = answer(self, method, path, body) if callable(answer) else answer
            head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            head += f"content-length: {len(payload)}\r\nconnection: close\r\n"
            head += f"x-padding: {'p' * self.padding}\r\n\r\n"
            mode = self.drip.get(path)
            try:
                if mode == "headers":
                    self._drip(conn, head.encode())
                    conn.sendall(payload)
                elif mode == "body":
                    conn.sendall(head.encode())
                    self._drip(conn, payload)
                else:
                    conn.sendall(head.encode() + payload)
            except OSError:
                pass
            entry["end"] = time.monotonic()

    def _drip(self, conn: socket.socket, data: bytes) -> None:
        for i in range(len(data)):
            if self._closing.is_set():
                return
            conn.sendall(data[i:i + 1])
            time.sleep(self.interval)
