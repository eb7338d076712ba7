"""Total wall-clock deadlines for the HTTP calls of API sources, however slowly the peer sends.

httpx's timeouts bound each socket operation, not the exchange: a server that drips its status line,
its headers or its body one byte every few seconds never trips them. Here every exchange runs under
`deadline(seconds)`, a thread-local moment in time, and the client's transport (`client()`) uses a
network backend whose every operation is capped by what is left of it:

- name resolution runs in a helper thread, waited for at most the time left (`resolve`);
- each connect, TLS handshake, send and receive gets `min(its own timeout, time left)`, and none
  starts once the time is up, so the header phase is covered exactly like the body;
- when the time is up the operation raises httpx's timeout error (`ReadTimeout`, `ConnectTimeout`,
  `WriteTimeout`) whose message names the deadline, and the `Deadline` object records that it
  expired and how many bytes the peer had sent by then (a hang sends none; a drip sends some).

An exchange therefore returns or fails within its deadline plus one scheduling tick, whatever the
peer does. Requests made outside `deadline(...)` keep plain per-operation timeouts.

Addresses are checked where they are used: a client built with `restricted` (a predicate on host
names) refuses, with `AddressRefused`, to open a connection to a restricted host unless every address
the name resolves to is public (`is_public`), and connects to the very address it checked (TLS still
verifies the name). A check made earlier, when a source was added or before a redirect was followed,
cannot be undone by a DNS answer that changes in between (rebinding).
"""
from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import httpcore
import httpx

WRITE_CHUNK = 64 << 10  # a send is capped per call: big bodies go out in pieces, each re-capped

_local = threading.local()


class Deadline:
    """One exchange's end in `time.monotonic()` seconds; `expired` and `received` say how it went."""

    def __init__(self, seconds: float, parent: "Deadline | None" = None, shown: float | None = None):
        self.seconds = float(seconds if shown is None else shown)  # as messages name it
        self.at = time.monotonic() + float(seconds)
        if parent is not None and parent.at < self.at:  # nested: the tighter end wins
            self.at, self.seconds = parent.at, parent.seconds
        self.expired = False
        self.received = 0  # bytes the peer sent during this exchange

    def left(self) -> float:
        return self.at - time.monotonic()

    def message(self) -> str:
        sent = f" (the server had sent {self.received} bytes)" if self.received else ""
        return f"no complete answer within the {self.seconds:g} s deadline{sent}"

    def cap(self, timeout: float | None, error: type[Exception]) -> float:
        """`timeout` capped by the time left; `error` (with the deadline's message) once none is left."""
        left = self.left()
        if left <= 0:
            self.expired = True
            raise error(self.message())
        return left if timeout is None else min(timeout, left)


class AddressRefused(Exception):
    """A connection the client may not open: the host resolves to a non-public address. Not an httpx
    error, so that nothing retries it as a lost connection."""


def is_public(address: str) -> bool:
    """Whether an IP address is on the public internet: not loopback, private, link-local (cloud
    metadata), shared, multicast, reserved or unspecified; an IPv4-mapped IPv6 address counts as its IPv4.
    Looked up at call time by the checks, so tests may stand a loopback address in for a public one."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def current() -> Deadline | None:
    return getattr(_local, "deadline", None)


@contextmanager
def deadline(seconds: float, shown: float | None = None) -> Iterator[Deadline]:
    """Every network operation of this thread inside the block ends by `seconds` from now (`shown`: the
    deadline messages name, when `seconds` is what is left of a longer one)."""
    parent = current()
    state = Deadline(seconds, parent, shown)
    _local.deadline = state
    try:
        yield state
    finally:
        _local.deadline = parent
        if parent is not None:
            parent.received += state.received
            parent.expired = parent.expired or state.expired


def _capped(timeout: float | None, error: type[Exception]) -> float | None:
    state = current()
    return timeout if state is None else state.cap(timeout, error)


def _expired_now(error: type[Exception], exc: Exception) -> Exception:
    """The deadline's error in place of a socket timeout that the cap caused, else `exc` itself."""
    state = current()
    if state is not None and state.left() <= 0:
        state.expired = True
        return error(state.message())
    return exc


def resolve(host: str, port: int, timeout: float | None) -> list[tuple]:
    """`socket.getaddrinfo(host, port, TCP)`, given up after `timeout` seconds (a resolver can hang:
    the lookup runs in a daemon thread that is left to finish on its own). Raises OSError."""
    try:
        ipaddress.ip_address(host.strip("[]").split("%")[0])
        return socket.getaddrinfo(host.strip("[]"), port, proto=socket.IPPROTO_TCP)  # a literal: no lookup
    except ValueError:
        pass
    answer: dict[str, Any] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            answer["infos"] = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except Exception as exc:  # handed to the caller
            answer["error"] = exc
        done.set()

    threading.Thread(target=lookup, name="api-resolve", daemon=True).start()
    if not done.wait(timeout):
        raise socket.timeout(f"resolving {host!r} took longer than {timeout:g} s")
    if "error" in answer:
        raise answer["error"]
    return answer["infos"]


class _Stream(httpcore.NetworkStream):
    """A socket stream whose every operation is capped by the thread's deadline."""

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        capped = _capped(timeout, httpcore.ReadTimeout)
        try:
            data = self._inner.read(max_bytes, capped)
        except httpcore.ReadTimeout as exc:
            raise _expired_now(httpcore.ReadTimeout, exc) from None
        state = current()
        if state is not None:
            state.received += len(data)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        for start in range(0, len(view), WRITE_CHUNK):
            capped = _capped(timeout, httpcore.WriteTimeout)
            try:
                self._inner.write(bytes(view[start:start + WRITE_CHUNK]), capped)
            except httpcore.WriteTimeout as exc:
                raise _expired_now(httpcore.WriteTimeout, exc) from None

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        capped = _capped(timeout, httpcore.ConnectTimeout)
        try:
            return _Stream(self._inner.start_tls(ssl_context, server_hostname, capped))
        except httpcore.ConnectTimeout as exc:
            raise _expired_now(httpcore.ConnectTimeout, exc) from None

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    """httpcore's synchronous backend with bounded name resolution and deadline-capped streams; hosts
    for which `restricted(host)` is true are connected to only when all their addresses are public."""

    def __init__(self, restricted: Callable[[str], bool] | None = None) -> None:
        self._inner = httpcore.SyncBackend()
        self._restricted = restricted

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        try:
            infos = resolve(host, port, _capped(timeout, httpcore.ConnectTimeout))
        except socket.timeout as exc:
            raise _expired_now(httpcore.ConnectTimeout, httpcore.ConnectTimeout(str(exc))) from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from None
        if self._restricted is not None and self._restricted(host):
            for info in infos:  # all of them, as when the source was added: none is tried if one is refused
                if not is_public(info[4][0]):
                    raise AddressRefused(f"refused: {host} resolves to a non-public address {info[4][0]}")
        error: Exception = httpcore.ConnectError(f"no address for {host!r}")
        for info in infos:  # every address in turn, as socket.create_connection would
            address = info[4][0]
            try:
                stream = self._inner.connect_tcp(address, port, _capped(timeout, httpcore.ConnectTimeout),
                                                 local_address, socket_options)
                return _Stream(stream)
            except httpcore.ConnectTimeout as exc:
                error = _expired_now(httpcore.ConnectTimeout, exc)
                state = current()
                if state is not None and state.expired:  # no time left for the next address
                    raise error from None
            except httpcore.ConnectError as exc:
                error = exc
        raise error

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        return _Stream(self._inner.connect_unix_socket(path, _capped(timeout, httpcore.ConnectTimeout),
                                                       socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport over `_Backend` (no proxies from the environment, verified TLS; `restricted`:
    the hosts that must resolve to public addresses, checked at each connection)."""

    def __init__(self, limits: httpx.Limits = httpx.Limits(max_connections=100, max_keepalive_connections=20,
                                                            keepalive_expiry=5.0),
                 verify: ssl.SSLContext | None = None, restricted: Callable[[str], bool] | None = None):
        super().__init__(trust_env=False, limits=limits)
        # httpx builds its pool in __init__ without a way to pass a network backend: rebuild it with ours
        self._pool = httpcore.ConnectionPool(
            ssl_context=verify if verify is not None else httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_Backend(restricted))


def client(timeout: float, verify: ssl.SSLContext | None = None,
           restricted: Callable[[str], bool] | None = None) -> httpx.Client:
    """A client for API sources: no redirects followed, no environment proxies, per-operation
    `timeout`, and every operation capped by the calling thread's `deadline(...)` (`verify`: the TLS
    context, certifi's roots by default; `restricted(host)`: whether connections to `host` must go to
    public addresses, raising `AddressRefused` otherwise)."""
    return httpx.Client(transport=DeadlineTransport(verify=verify, restricted=restricted), follow_redirects=False,
                        timeout=httpx.Timeout(timeout), trust_env=False)
