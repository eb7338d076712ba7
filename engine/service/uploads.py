"""Request bodies: the uploads still arriving (bounded, the slowest giving way when full), the errors
`receive` raises about a body, and reading a refused body to its end so its answer is read.

A request whose body is still arriving is not handled yet: slow or stalled uploads (slowloris) wait
among the uploads (`Limits.max_uploads`), not among the requests handled (`Limits.max_requests`).
"""
from __future__ import annotations

import asyncio
import time

from engine.service.config import Limits
from engine.service.errors import ServiceError

DRAIN_SECONDS = 2.0  # before a refusal, what is left of its body is read and dropped for up to this long
EVICT_AFTER = 1.0  # seconds an upload runs before its rate counts (see Uploads)


class BodyTooLarge(ServiceError):
    """Raised from `receive` when a body without (or lying about) Content-Length exceeds the limit."""

    def __init__(self, limit: int):
        super().__init__(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")


class Busy(ServiceError):
    """503: the server is at one of its limits (`what` it is at: requests handled, uploads, their bytes)."""

    def __init__(self, what: str):
        super().__init__(503, "busy", f"the server is {what}, its limit; retry shortly", {"Retry-After": "2"})

    @classmethod
    def requests(cls, count: int, doing: str) -> "Busy":
        return cls(f"{doing} {count} request{'s' * (count != 1)}")


class BodyTooSlow(ServiceError):
    """408 for an upload evicted to make room (see Uploads); the connection closes."""

    def __init__(self, rate: float, floor: int):
        super().__init__(408, "body_too_slow", f"the request body arrived at {rate:.0f} bytes/s while the server "
                                               f"was full of uploads (it keeps those above {floor} bytes/s)",
                         {"Connection": "close"})


class Upload:
    """One request whose body is still arriving."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.received = 0
        self.evicted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def rate(self, now: float) -> float:
        return self.received / max(now - self.started, 1e-3)


class Uploads:
    """Requests whose body is still arriving, at most `limits.max_uploads`. When they are that many, a
    new one takes the place of the slowest below `limits.min_upload_rate` (after its first EVICT_AFTER
    seconds), which gets 408: stalled or trickling uploads (slowloris) then cost their sender real
    bandwidth, and cannot keep others out. When none is that slow, the new one gets 503.

    The bytes they hold (spooled to disk past `Limits.spool_bytes`: on a tmpfs /tmp, memory) are bounded
    too, by `limits.max_upload_bytes`: past it the slowest upload gives way, or the one growing gets 503.
    Without that bound, uploads sent fast up to their last bytes and then stalled held up to
    max_uploads x max_body_bytes (8 GiB at the defaults) until their deadline."""

    def __init__(self, limits: Limits):
        self.limit = limits.max_uploads
        self.floor = limits.min_upload_rate
        self.capacity = limits.max_upload_bytes
        self.open: set[Upload] = set()
        self.held = 0  # bytes received by the open uploads
        self.evicted = 0

    def enter(self) -> Upload | None:
        if len(self.open) >= self.limit and not self._evict_slowest():
            return None
        upload = Upload()
        self.open.add(upload)
        return upload

    def leave(self, upload: Upload | None) -> None:
        if upload is not None and upload in self.open:
            self.open.discard(upload)
            self.held -= upload.received

    def grow(self, upload: Upload, received: int) -> None:
        """`upload` has now received `received` bytes; past the bytes budget, a slower one gives way or this
        one is refused (Busy, 503)."""
        if upload in self.open:
            self.held += received - upload.received
        upload.received = received
        while self.held > self.capacity and upload in self.open:
            if not self._evict_slowest(spare=upload):
                held = self.held
                self.leave(upload)
                raise Busy(f"holding {held} bytes of uploads still arriving, over {self.capacity}")

    def _evict_slowest(self, spare: Upload | None = None) -> bool:
        now = time.monotonic()
        slow = [u for u in self.open
                if u is not spare and now - u.started >= EVICT_AFTER and u.rate(now) < self.floor]
        if not slow:
            return False
        upload = min(slow, key=lambda u: u.rate(now))
        self.leave(upload)
        upload.evicted.set_result(None)
        self.evicted += 1
        return True


class BodyTimeout(ServiceError):
    """Raised from `receive` when the body has not fully arrived by its deadline; the connection closes."""

    def __init__(self, seconds: float):
        super().__init__(408, "body_timeout", f"the request body did not arrive within {seconds:g} seconds",
                         {"Connection": "close"})


def expects_continue(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"expect", b"").lower() == b"100-continue"


async def discard_body(receive, until: float, cap: int) -> bool:
    """Read and drop a request's body until its end (True), `until` (monotonic) or `cap` bytes. Closing a
    socket with unread data sends a reset, and clients that send the whole body before reading (urllib,
    requests) then reported "connection reset by peer" or "broken pipe" instead of the JSON answer."""
    drained = 0
    while drained <= cap:
        try:
            async with asyncio.timeout(max(0.0, until - time.monotonic())):
                message = await receive()
        except TimeoutError:
            return False
        if message["type"] != "http.request":
            return False
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False
