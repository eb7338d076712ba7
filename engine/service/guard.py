"""Admission control in front of every route, before the application reads a byte of the body.

- `Guard` (ASGI middleware): Host and Origin checks when no token is set (DNS rebinding, cross-site
  posts), the bearer token, CORS for allowed origins, the body size limit, a deadline for the whole
  body, a cap on uploads being received and another on API requests handled at once, HEAD for every
  GET route. An unauthenticated, foreign or oversized upload is refused without being spooled to disk.
- `PixelBudget`: decoded pixels held by all requests together.
- `http_protocol`: uvicorn's h11 protocol with a deadline on the request line and headers.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import sys
import time
from http import HTTPStatus
from typing import cast
from urllib.parse import urlsplit

from engine.service.config import Access, Limits
from engine.service.errors import ServiceError, body
from engine.service.uploads import (DRAIN_SECONDS, BodyTimeout, BodyTooLarge, BodyTooSlow, Busy, Upload, Uploads,
                                    discard_body, expects_continue)

# The API's documentation, readable in a browser without the token (a browser cannot add an
# Authorization header to a page it navigates to): the schema is the same for every server and holds no
# data. Its "Authorize" button takes the token for the calls made from it, which still need it.
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/", "/favicon.ico", *DOCS_PATHS})  # no token needed, not counted
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})  # answered whatever the Host or Origin
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})
DEFAULT_PORTS = {"http": 80, "https": 443}


async def send_error(send, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body(code, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def split_host(value: str) -> tuple[str, int | None] | None:
    """'Name:port', '[v6]:port' or a bare name -> (lower-case name, port or None); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, _, port = value.partition(":")
        if ":" in port:
            return None
    if port and not port.isdigit():
        return None
    name = name.rstrip(".")
    return (name, int(port) if port else None) if name else None


def split_origin(value: str) -> tuple[str, str, int] | None:
    """'scheme://host[:port]' -> (scheme, lower-case host, port); None for 'null' or anything else."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    return scheme, parts.hostname.rstrip("."), port or DEFAULT_PORTS[scheme]


def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def is_loopback(name: str) -> bool:
    ip = _ip(name)
    return ip.is_loopback if ip is not None else (name in LOOPBACK_NAMES or name.endswith(".localhost"))


class Guard:
    def __init__(self, app, access: Access, limits: Limits, uploads: Uploads | None = None):
        self.app = app
        self.access = access
        self.limits = limits
        self.token = access.token.encode() if access.token else None
        bound = access.host.strip("[]").lower().rstrip(".")
        self.bound_ip = _ip(bound)
        self.wildcard = self.bound_ip is not None and self.bound_ip.is_unspecified
        self.names = {bound, *(h.strip("[]").lower().rstrip(".") for h in access.allow_hosts)}
        self.any_host = "*" in access.allow_hosts
        self.origins = {o.strip().lower().rstrip("/") for o in access.allow_origins}
        self.any_origin = "*" in self.origins
        self.active = 0  # API requests being handled now
        self.uploads = uploads or Uploads(limits)  # API requests whose body is still arriving (not handled yet)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if size + sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > self.limits.max_header_bytes:
            # uvicorn's h11 limit only applies to headers still arriving; these came in one piece
            await send_error(send, 431, "headers_too_large", f"request line and headers exceed "
                                                             f"{self.limits.max_header_bytes} bytes",
                             {"Connection": "close"})
            return
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in (b"host", b"origin") and headers.get(name, value) != value:
                await send_error(send, 400, "bad_request", f"conflicting {name.decode()} headers")
                return
            headers[name] = value
        if b"transfer-encoding" in headers and b"content-length" in headers:
            # h11 goes by Transfer-Encoding and would keep the connection: what follows the chunked end, a
            # request a proxy reading by Content-Length took for body ("smuggled"), would be answered next.
            # RFC 9112 6.3: refuse, or answer, but close the connection either way.
            await send_error(send, 400, "bad_request", "both Content-Length and Transfer-Encoding were sent: send "
                                                       "one of them", {"Connection": "close"})
            return
        path = scope["path"]
        origin = headers.get(b"origin", b"").decode("latin-1") or None
        if self.token is None and self.access.check and path not in HEALTH_PATHS:
            refusal = self._foreign(scope, headers, origin)
            if refusal is not None:
                await self._refuse(send, receive, headers, 403, *refusal)
                return
        cors = self._cors(origin)
        if cors and scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            await self._preflight(send, cors)
            return
        extra = {"Access-Control-Allow-Origin": cors, "Vary": "Origin"} if cors else {}
        if self.token is not None and path not in PUBLIC_PATHS and not self._authorised(headers):
            await self._refuse(send, receive, headers, 401, "unauthorized", "missing or wrong bearer token",
                               {"WWW-Authenticate": 'Bearer realm="resynth"', **extra})
            return
        limit = self.limits.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_error(send, 400, "bad_request", "malformed Content-Length header", extra)
                return
            if int(declared) > limit:
                await send_error(send, 413, "body_too_large",  # not drained: it could not be read to its end
                                 f"request body of {int(declared)} bytes exceeds the limit of {limit}", extra)
                return
        counted = path not in PUBLIC_PATHS
        # A request with a body waits among the uploads until its last byte, then among the requests
        # handled: slow or stalled uploads (slowloris) cannot take the handling slots from everyone else.
        upload: Upload | None = None
        if counted and (declared not in (None, b"0") or b"transfer-encoding" in headers):
            upload = self.uploads.enter()
            if upload is None:
                busy = Busy.requests(len(self.uploads.open), "receiving")
                await self._refuse(send, receive, headers, 503, busy.code, busy.message, {**busy.headers, **extra})
                return
        elif counted and self.active >= self.limits.max_requests:
            busy = Busy.requests(self.active, "handling")
            await send_error(send, 503, busy.code, busy.message, {**busy.headers, **extra})
            return
        head = scope["method"] == "HEAD"  # answered as the GET of the same path, without the body
        if head:
            scope = {**scope, "method": "GET"}
        received, started, body_done, read, refused = 0, False, False, False, False
        deadline = time.monotonic() + self.limits.body_timeout
        handling = counted and upload is None

        def admit() -> None:
            """The whole body is in: the request leaves the uploads and is handled (or refused, busy)."""
            nonlocal upload, handling
            if upload is not None:
                self.uploads.leave(upload)
                upload = None
                if self.active >= self.limits.max_requests:
                    raise Busy.requests(self.active, "handling")
                handling = True
                self.active += 1

        async def next_message():
            """receive(), unless this upload is evicted first (BodyTooSlow)."""
            if upload is None:
                return await receive()
            waiter = asyncio.ensure_future(receive())
            try:
                await asyncio.wait((waiter, upload.evicted), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not waiter.done():
                    waiter.cancel()
            if upload.evicted.done():
                raise BodyTooSlow(upload.rate(time.monotonic()), self.uploads.floor)
            return waiter.result()

        async def guarded_receive():
            nonlocal received, body_done, read, refused
            read = True
            if body_done:  # later calls only wait for a disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await next_message()
            except TimeoutError:
                refused = True
                raise BodyTimeout(self.limits.body_timeout) from None
            except BodyTooSlow:
                refused = True
                raise
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if upload is not None:
                    try:
                        self.uploads.grow(upload, received)
                    except Busy:
                        refused = True
                        raise
                if received > limit:
                    refused = True
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
                if body_done:
                    admit()
            else:
                body_done = True
            return message

        async def drain() -> None:
            """Before a refusal's answer, what is left of its body (see discard_body); not after a timeout or an
            oversized body, nor when the client waits for `100 Continue`, which reading would send."""
            nonlocal body_done
            if body_done or refused or (not read and expects_continue(headers)):
                return
            body_done = await discard_body(receive, min(deadline, time.monotonic() + DRAIN_SECONDS), limit - received)

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    await drain()
                if extra:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      *((k.lower().encode(), v.encode()) for k, v in extra.items())]}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        self.active += handling
        try:
            await self.app(scope, guarded_receive, tracked_send)
        except (BodyTooLarge, BodyTimeout, BodyTooSlow, Busy) as exc:  # if no handler inside answered it already
            if not started:
                await send_error(send, exc.status, exc.code, exc.message, {**exc.headers, **extra})
        except asyncio.CancelledError:
            # Only uvicorn cancels a request's task: when its graceful stop (30 s) runs out with the request still
            # running. Raised on, it became a plain-text 500 and a traceback in the log, once per request.
            if not started:
                await send_error(send, 503, "shutting_down", "the server stopped before this request was answered: "
                                 "retry", {"Connection": "close", "Retry-After": "2", **extra})
        finally:
            self.uploads.leave(upload)
            self.active -= handling

    async def _refuse(self, send, receive, headers: dict[bytes, bytes], status: int, code: str, message: str,
                      extra: dict[str, str] | None = None) -> None:
        """A refusal before the app runs; what the client already sends of a body is read and dropped first
        (DRAIN_SECONDS, max_body_bytes), unless it waits for `100 Continue`."""
        if not expects_continue(headers) and (headers.get(b"content-length", b"0") != b"0"
                                              or b"transfer-encoding" in headers):
            await discard_body(receive, time.monotonic() + DRAIN_SECONDS, self.limits.max_body_bytes)
        await send_error(send, status, code, message, extra)

    # ----- who may call ------------------------------------------------------------------------------
    def host_allowed(self, name: str) -> bool:
        """A name this server answers to; an IP address cannot be rebound, a domain name can."""
        if self.any_host or name in self.names or is_loopback(name):
            return True
        ip = _ip(name)
        return ip is not None and (self.wildcard or ip == self.bound_ip)

    def _foreign(self, scope, headers: dict[bytes, bytes], origin: str | None) -> tuple[str, str] | None:
        """(code, message) when the Host or Origin header is not this server's; None when both are."""
        raw = headers.get(b"host", b"").decode("latin-1")
        host = split_host(raw) if raw else ("", None)  # no Host at all (HTTP/1.0): not from a browser
        if host is None or (raw and not self.host_allowed(host[0])):
            shown = (host[0] if host else raw)[:100] or "(none)"
            return ("forbidden_host", f"requests for host {shown!r} are refused (a page may be using DNS "
                                      f"rebinding to reach this server): start the server with "
                                      f"--allow-host {shown} or with a token to accept them")
        if origin is None or self.any_origin or origin.strip().lower().rstrip("/") in self.origins:
            return None
        parsed = split_origin(origin)
        if parsed is not None:
            scheme, name, port = parsed
            server_port = (scope.get("server") or (None, None))[1]
            ports = {server_port, host[1] if host[1] is not None else DEFAULT_PORTS[scheme]}
            if port in ports and ((host[0] and name == host[0]) or is_loopback(name) or name in self.names):
                return None
        return ("forbidden_origin", f"requests from pages at {origin[:100]!r} are refused (cross-site): start "
                                    f"the server with --allow-origin {origin[:100]} to accept them")

    def _cors(self, origin: str | None) -> str | None:
        """The Origin to echo in Access-Control-Allow-Origin: only one allowed by --allow-origin."""
        if origin is None or split_origin(origin) is None:
            return None
        if self.any_origin or origin.strip().lower().rstrip("/") in self.origins:
            return origin.strip()
        return None

    async def _preflight(self, send, origin: str) -> None:
        raw = [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin"),
               (b"access-control-allow-methods", b"GET, POST"),
               (b"access-control-allow-headers", b"authorization, content-type"),
               (b"access-control-max-age", b"600"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 204, "headers": raw})
        await send({"type": "http.response.body", "body": b""})

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, credential = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self.token or b"")


class PixelBudget:
    """Decoded pixels held by all requests together; a request waits for room up to `wait` seconds.

    Used from the event loop only (no lock needed); `release` never waits, so it is safe in `finally`.
    Waiters are woken on every release and re-check; no order among them is promised.
    """

    def __init__(self, capacity: int, wait: float):
        self.capacity = capacity
        self.wait = wait
        self.used = 0
        self.peak = 0
        self._waiters: list[asyncio.Event] = []

    async def acquire(self, pixels: int) -> None:
        deadline = time.monotonic() + self.wait
        while self.used + pixels > self.capacity:
            event = asyncio.Event()
            self._waiters.append(event)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await event.wait()
            except TimeoutError:
                raise ServiceError(503, "busy", f"{self.used} decoded pixels are held by other requests; this "
                                                f"one needs {pixels} more (the limit is {self.capacity}): "
                                                "retry shortly", {"Retry-After": "2"}) from None
            finally:
                self._waiters.remove(event)
        self.used += pixels
        self.peak = max(self.peak, self.used)

    def release(self, pixels: int) -> None:
        self.used -= pixels
        for event in self._waiters:
            event.set()


# uvicorn's warnings about what a client sent: a request h11 cannot parse (answered by send_400_response
# below), an Upgrade header (one line, and one more advising a WebSocket library this server does not use).
# The client gets its answer; a line each would let any client write the operator's log at will.
CLIENT_NOISE = ("Invalid HTTP request received.", "Unsupported upgrade request.",
                "No supported WebSocket library detected")


class _DropClientNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(CLIENT_NOISE))


def _quiet_client_noise() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropClientNoise) for f in logger.filters):
        logger.addFilter(_DropClientNoise())


class _Lingering:
    """A connection's transport whose close(), while the client is still sending a refused request's body,
    lingers: the answer's end is marked (FIN), what still arrives is dropped unread, and the socket is closed
    when the client closes or at the body deadline. Closed at once, the unread bytes made the kernel send a
    reset, and a client still sending (requests, urllib: a big upload refused) saw "connection reset by peer"
    or "broken pipe" instead of the answer."""

    def __init__(self, transport, protocol):
        self._transport, self._protocol = transport, protocol
        self.lingering = False
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        import h11

        conn = getattr(self._protocol, "conn", None)
        # not in a graceful stop (uvicorn waits for every connection: one refusal held the stop for body_timeout)
        if (self.lingering or self._transport.is_closing() or conn is None or conn.their_state is not h11.SEND_BODY
                or not self._transport.can_write_eof() or getattr(self._protocol, "stopping", False)):
            self._close_now()
            return
        self.lingering = True
        cycle = getattr(self._protocol, "cycle", None)
        if cycle is not None:  # the body uvicorn read ahead (up to 320 KB), never to be read now: held to the close
            cycle.body = bytearray()
        self._transport.resume_reading()
        self._transport.write_eof()
        self._timer = self._protocol.loop.call_later(self._protocol.linger_seconds, self._close_now)

    def _close_now(self) -> None:
        """Close; the transport then waits for the client to read what is still buffered, with no deadline:
        --send-timeout only began past the buffer's high-water mark, so a client reading nothing held a connection
        for good when less than that was left over the kernel's buffers. Aborted once it reads none of it for
        send_timeout instead."""
        self._transport.close()
        self.forget()  # a linger's deadline, or a watch begun by an earlier close
        self._watch(None)

    def _watch(self, before: int | None) -> None:
        left = self._transport.get_write_buffer_size()
        if not left:
            return
        if left == before:
            self._transport.abort()
            return
        self._timer = self._protocol.loop.call_later(self._protocol.send_seconds, self._watch, left)

    def forget(self) -> None:
        """The connection is gone: its deadlines would keep the closed transport alive."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def http_protocol(limits: Limits):
    """uvicorn's h11 protocol, plus a deadline from a request's first byte to its last header, and one on
    an answer that the client does not read.

    uvicorn itself only times out idle keep-alive connections: a client that connects and sends
    nothing, or trickles its headers, would hold a connection for ever. And once a client's socket
    buffers are full (it pipelined requests and reads no answer), uvicorn's `send` waits for them to
    drain with no deadline: the request's handler, and its --max-requests slot, were held for as long
    as the client kept the connection (two such clients took a server with --max-requests 2).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    _quiet_client_noise()
    timeout = limits.header_timeout
    send_timeout = limits.send_timeout
    payload = json.dumps(body("header_timeout", f"the request headers did not arrive within {timeout:g} "
                                                "seconds")).encode()
    late = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    full = Busy(f"holding {limits.max_connections} connections")
    payload = json.dumps(body(full.code, full.message)).encode()
    crowded = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
               b"retry-after: 2\r\ncontent-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)

    class HeaderDeadlineProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _send_timer: asyncio.TimerHandle | None = None
        linger_seconds = limits.body_timeout  # a refused body still arriving is read and dropped this long at most
        _refused = False
        stopping = False  # uvicorn's graceful stop has begun: no lingering from now on
        send_seconds = send_timeout  # a closed connection waits this long at most for the client to read the rest

        def connection_made(self, transport) -> None:
            # every connection holds its headers while they arrive (up to max_header_bytes) until the header
            # deadline: with the file limit raised to 65536, connections alone could hold 2 GB (memory_bound)
            if len(self.server_state.connections) >= limits.max_connections:
                self._refused = True  # never handed to uvicorn: it neither reads nor tracks it
                transport.write(crowded)
                transport.close()
                return
            super().connection_made(cast(asyncio.Transport, _Lingering(transport, self)))
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._refused or getattr(self.transport, "lingering", False):  # a refused body: dropped unparsed
                return
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self._header_timer is None:
                    self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            if self._refused:
                return
            self._disarm()
            self._reading_again()
            if isinstance(self.transport, _Lingering):
                self.transport.forget()
            super().connection_lost(exc)  # wakes a `send` waiting on the buffers: it returns, the handler ends

        def on_response_complete(self) -> None:
            # read before uvicorn starts the next pipelined request, whose body may still be arriving: that one
            # was taken for this one's and its connection closed unanswered
            unfinished = self.conn.their_state is h11.SEND_BODY
            super().on_response_complete()
            if unfinished and not self.transport.is_closing():
                # answered before its body ended (a refusal, drained for DRAIN_SECONDS at most): uvicorn would read
                # and drop the rest with no deadline, its keep-alive timer restarted at every byte
                self.transport.close()  # a _Lingering transport: it marks the end and drops the rest first

        def shutdown(self) -> None:
            self.stopping = True
            super().shutdown()

        def pause_writing(self) -> None:  # the transport's buffer is over its high-water mark
            if self._refused:
                return
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = self.loop.call_later(send_timeout, self._not_reading)

        def resume_writing(self) -> None:  # the client read enough: a slow reader is not dropped
            if self._refused:
                return
            self._reading_again()
            super().resume_writing()

        def _reading_again(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _not_reading(self) -> None:
            """The client read nothing for send_timeout: abort (close() would wait for the buffer to drain)."""
            self._send_timer = None
            self.transport.abort()

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a request h11 cannot parse (a malformed request line, conflicting
            Content-Length, headers over the size limit) is plain text; ours is the one-line JSON error
            of every other refusal. Called from uvicorn's `except h11.RemoteProtocolError`, whose
            status hint (431: headers too large, 501: an unknown Transfer-Encoding) it keeps."""
            exc = sys.exc_info()[1]
            status = getattr(exc, "error_status_hint", 400) if isinstance(exc, h11.RemoteProtocolError) else 400
            if status == 431:
                code, text = "headers_too_large", f"request line and headers exceed {limits.max_header_bytes} bytes"
            elif status == 501:
                code, text = "not_implemented", "unsupported Transfer-Encoding (only chunked is accepted)"
            else:
                status, code, text = 400, "bad_request", "malformed HTTP request (the request line or a header "\
                                                         "could not be parsed)"
            payload = json.dumps(body(code, text)).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                       (b"connection", b"close")]
            try:
                for event in (h11.Response(status_code=status, headers=headers,
                                                   reason=HTTPStatus(status).phrase), h11.Data(data=payload),
                              h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event) or b"")
            except h11.LocalProtocolError:  # a response was already under way: nothing more can be said
                pass
            self.transport.close()

        def _headers_late(self) -> None:
            self._header_timer = None
            if (self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE
                    and not self.transport.is_closing()):
                self.transport.write(late)
                self.transport.close()

    return HeaderDeadlineProtocol
