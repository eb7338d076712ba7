"""A local fake of an OpenAI-compatible images API, for tests: uvicorn in a thread on 127.0.0.1.

    with FakeImagesApi(make=pipeline_fn, key="sk-test") as api:
        api.url; api.log; api.queue("429", "500"); api.mode = "hang"

Behaviours (queued for the next requests, else the persistent `mode`, else a normal answer):
"429" (Retry-After: `retry_after`), "500", "hang" (answers after `hang_seconds`), "malformed" (not
JSON), "empty" (no data), "undecodable" (base64 of garbage), "bad-b64" (not base64), "oversized"
(5000x5000 PNG), "url" (an image URL on this server), "url-private" (an image URL on 10.0.0.1),
"redirect-private" (a URL here that redirects to 169.254.169.254), "redirect-loop", "401"
(echoing the key it was given, as real servers do), "content-policy" (400).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
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
              "url-private", "url-bad-port", "redirect-private", "redirect-loop", "401", "content-policy"}


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
            entry = {"time": time.monotonic(), "end": None, "path": request.url.path,
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
