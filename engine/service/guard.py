"""ASGI middleware in front of every route: bearer token, then the request body size limit.

Both run before the application reads a byte of the body, so an unauthenticated or oversized
upload is refused without being spooled to disk.
"""
from __future__ import annotations

import hmac
import json

from engine.service.errors import body

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/", "/favicon.ico"})


class BodyTooLarge(Exception):
    """Raised from `receive` when a body without (or lying about) Content-Length exceeds the limit."""


async def send_error(send, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body(code, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class Guard:
    def __init__(self, app, token: str | None, max_body_bytes: int):
        self.app = app
        self.token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] not in PUBLIC_PATHS and not self._authorised(headers):
            await send_error(send, 401, "unauthorized", "missing or wrong bearer token",
                             {"WWW-Authenticate": 'Bearer realm="resynth"'})
            return
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_error(send, 400, "bad_request", "malformed Content-Length header")
                return
            if int(declared) > self.max_body_bytes:
                await send_error(send, 413, "body_too_large",
                                 f"request body of {int(declared)} bytes exceeds the limit of {self.max_body_bytes}")
                return
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(f"request body exceeds the limit of {self.max_body_bytes} bytes")
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as exc:  # only if no handler inside answered it already
            if not started:
                await send_error(send, 413, "body_too_large", str(exc))

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, credential = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self.token or b"")
