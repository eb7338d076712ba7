"""The network side of an API source, for every protocol: one exchange with retries and backoff
(429/5xx/lost connections, Retry-After honoured) under the total deadline of `engine.api_http`, status
polling, image-URL downloads that re-check every redirect hop, the rules for where the key may go and
which hosts may be contacted (no private networks: `_restricted` tells `api_http`'s client which hosts
it must check at each connection), and `_Call`, the `engine.providers.Call` a protocol
is handed for one image (its `accepted` records a billed task, engine.api_tasks; a status or image URL
that no longer has the task raises `Gone`). `ApiGenerator` (`engine.api_source`) builds on `ApiExchanges`.

The tunables below are read at call time from this module, so tests may lower them here.
"""
from __future__ import annotations

import ipaddress
import logging
import random
import re
import threading
import time
from typing import Any, Callable, Mapping
from urllib.parse import quote, urlencode, urlsplit

import httpx

from engine import api_answers, api_http, providers
from engine.api_answers import _b64, _error_message, _parse_json, _read_capped, _redact, _retry_after
from engine.api_budget import limiter_for
from engine.api_params import SEED_PLACEHOLDER, ApiParams
from engine.errors import SourceError, first_line
from engine.providers import Reply
from index.faults import crash_point

log = logging.getLogger("engine.api_source")  # one logger for API sources, as before the split

# Read at call time, so tests may lower them.
MAX_REDIRECTS = 3                  # hops when fetching an image URL, each re-checked
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# A submission that failed with one of these, or whose connection was lost or timed out after it was sent,
# may still have been generated and charged: a retry may buy a second image (429/503 and failures to
# connect are refusals before any work). Such an attempt is counted as spent (`maybe_charged`).
MAYBE_CHARGED_STATUSES = frozenset({500, 502, 504})
BACKOFF_BASE = 1.0                 # seconds; attempt k waits uniform(0, base * 2**k), capped
BACKOFF_CAP = 30.0
RETRIES = 4
POLL_FIRST = 0.5                   # seconds before the first status poll; then x POLL_GROWTH, capped
POLL_GROWTH = 1.5
POLL_CAP = 5.0

_DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w-]+=[^;,]*)*;base64,", re.IGNORECASE)


class _Interrupted(Exception):
    """Ctrl-C in the caller's thread: a job stops waiting (retry backoff, polling, its turn)."""


class Refused(SourceError):
    """The API refused this one request (HTTP 400/422 to a submission, a moderation or safety answer): that
    job fails and the source goes on with its other prompts (engine.api_source)."""


# Statuses that refuse one submission for what it asks (its prompt), not the source as a whole
REFUSED_STATUSES = frozenset({400, 422})
# A status or image URL answering these no longer has the task (expired, deleted, a short-lived URL past its
# time): a task resumed from an earlier run is then bought again (engine.api_tasks)
GONE_STATUSES = frozenset({404, 410})
GONE_IMAGE_STATUSES = frozenset({403, 404, 410})  # an expired pre-signed URL answers 403


class Gone(SourceError):
    """The service no longer has this task or its image (HTTP 404/410 to a status poll, 403/404/410 to an
    image URL): as any SourceError for a fresh task; a resumed one is submitted again."""


class Unresolved(SourceError):
    """A URL's host could not be looked up now (the network, not a refusal of the URL): a task recorded with
    that URL is kept for a later run, which checks it again, rather than bought again."""


class _Retryable(Exception):
    """An image URL's answer worth another try (429/5xx), with the wait its Retry-After asks."""

    def __init__(self, problem: str, delay: float | None):
        super().__init__(problem)
        self.problem, self.delay = problem, delay


class ApiExchanges:
    """The requests of one API source (its name, validated `params`, endpoint and shared limiter)."""

    def __init__(self, name: str, params: ApiParams, *, retries: int = RETRIES, backoff_base: float | None = None):
        self.name = name
        self.params = params
        self.retries = retries
        self.backoff_base = BACKOFF_BASE if backoff_base is None else backoff_base
        self._protocol = providers.get(params.protocol)
        self._endpoint = params.endpoint()
        parts = urlsplit(self._endpoint)
        self._scheme = parts.scheme.lower()
        self._host = (parts.hostname or "").lower()
        self._limiter = limiter_for(params)
        token = urlsplit(params.token_url).hostname if params.token_url else None
        self._own_hosts = frozenset(h.lower() for h in (self._host, token) if h)

    def _restricted(self, host: str) -> bool:
        """Whether a connection to `host` must go to public addresses (checked by `api_http` at each
        connection): every host for a source added under the public-only policy, else every host but
        the ones its operator named (the endpoint's, the token URL's): status and image URLs elsewhere."""
        return self.params.public_only or host.lower().strip("[]") not in self._own_hosts

    def _request(self, client: httpx.Client, method: str, url: str, headers: Mapping[str, str],
                 key: str | None, abort: threading.Event, *, json_body: Any = None, content: bytes | None = None,
                 submission: bool = True, until: float | None = None, what: str = "",
                 maybe_charged: Callable[[str], None] | None = None) -> Reply:
        """One exchange with retries on 429/5xx/transport errors (Retry-After honoured), each attempt
        under the total deadline (`timeout`, and what is left before `until`); a 2xx reply read whole.
        Submissions take their turn in the rate; `what` prefixes messages of non-submissions. A submission
        attempt the provider may have charged for is reported to `maybe_charged(problem)`, which counts it
        and raises to stop retrying."""
        prefix = f"{what}: " if what else ""
        problem = ""
        for attempt in range(self.retries + 1):
            delay = None
            charged = False  # this attempt may have been generated and charged
            limit = self.params.timeout
            if until is not None:
                limit = min(limit, until - time.monotonic())
                if limit <= 0:
                    raise SourceError(self.name, f"{prefix}not done within the {self.params.timeout:g} s deadline"
                                                 f"{' (' + problem + ')' if problem else ''}")
            if submission and not self._limiter.pace(abort):
                raise _Interrupted()
            with api_http.deadline(limit, shown=self.params.timeout) as exchange:
                try:
                    with client.stream(method, url, json=json_body, content=content, headers=dict(headers)) as resp:
                        if 200 <= resp.status_code < 300:
                            cap = api_answers.MAX_IMAGE_BYTES * 4 // 3 + (1 << 20)
                            raw = _read_capped(resp, cap, exchange.at, self.name)
                            return Reply(resp.status_code, resp.headers, raw)
                        raw = _read_capped(resp, api_answers.MAX_ERROR_BYTES, exchange.at, self.name, truncate=True)
                        problem = f"HTTP {resp.status_code}{_error_message(raw, key)}"
                        if resp.status_code not in RETRY_STATUSES:
                            hint = ""
                            location = resp.headers.get("location") if resp.is_redirect else None
                            if submission and location:  # http:// for https://, a moved endpoint
                                hint = (f" (redirected to {_redact(location[:200], key)}: submissions do not follow "
                                        "redirects; if the API moved, add the source again with its new URL)")
                            if resp.status_code in (401, 403):
                                env = self.params.api_key_env
                                hint = f" (check the key in ${env})" if env else " (no api_key_env is configured)"
                            refusal = Refused if submission and resp.status_code in REFUSED_STATUSES else SourceError
                            if method == "GET" and resp.status_code in GONE_STATUSES:  # a status poll
                                refusal = Gone
                            raise refusal(self.name, f"{prefix}the API refused the request: {problem}{hint}")
                        delay = _retry_after(resp.headers)
                        charged = resp.status_code in MAYBE_CHARGED_STATUSES
                except api_http.AddressRefused as exc:
                    raise SourceError(self.name, f"{prefix}{exc}") from None
                except httpx.TimeoutException as exc:
                    if exchange.expired and exchange.received:  # a drip, not a loss: no second helping
                        raise SourceError(self.name, f"{prefix or 'submission: '}{exchange.message()}") from None
                    problem = f"{type(exc).__name__}: {_redact(first_line(exc), key)}"
                    charged = isinstance(exc, httpx.ReadTimeout)  # sent whole, no answer yet
                except httpx.TransportError as exc:  # connection lost or refused: worth another try
                    problem = f"{type(exc).__name__}: {_redact(first_line(exc), key)}"
                    charged = isinstance(exc, (httpx.ReadError, httpx.RemoteProtocolError))  # lost after sending
                except httpx.HTTPError as exc:
                    raise SourceError(self.name, f"{prefix}request failed: {type(exc).__name__}") from None
            if submission and charged and maybe_charged is not None:
                maybe_charged(problem)
            if attempt == self.retries:
                break
            if delay is None:
                delay = random.uniform(0.0, min(BACKOFF_CAP, self.backoff_base * 2 ** attempt))
            if until is not None and time.monotonic() + delay >= until:
                raise SourceError(self.name, f"{prefix}not done within the {self.params.timeout:g} s deadline "
                                             f"({problem})")
            log.debug("source %r: %s%s; retry %d/%d in %.2f s", self.name, prefix, problem, attempt + 1,
                      self.retries, delay)
            if abort.wait(delay):
                raise _Interrupted()
        attempts = f"{self.retries + 1} attempt{'s' * (self.retries != 0)}"
        raise SourceError(self.name, f"{prefix}gave up after {attempts}: {problem}")

    def _poll(self, client: httpx.Client, url: str, check: Callable[[Any], Any], key: str | None,
              abort: threading.Event, extra_headers: Mapping[str, str] | None = None) -> Any:
        """GET `url` until `check(answer)` is not None, backing off; the loop ends within `timeout`.
        The key's header and `extra_headers` (credentials too) go only where the key may go."""
        self._check_url(url, "status URL")
        headers = {**(extra_headers or {}), **self._protocol.auth(key)} if self._key_allowed(url) else {}
        until = time.monotonic() + self.params.timeout
        interval = POLL_FIRST
        status = None
        while True:
            reply = self._request(client, "GET", url, headers, key, abort, submission=False, until=until,
                                  what="status poll")
            answer = _parse_json(reply, self.name)
            result = check(answer)
            if result is not None:
                return result
            status = answer.get("status") if isinstance(answer, dict) else None
            wait_for = _retry_after(reply.headers)
            wait_for = interval if wait_for is None else max(wait_for, 0.05)
            if time.monotonic() + wait_for >= until:
                shown = f" (last status {status[:40]!r})" if isinstance(status, str) else ""
                raise SourceError(self.name, f"the result was not ready within the {self.params.timeout:g} s "
                                             f"deadline{shown}")
            if abort.wait(wait_for):
                raise _Interrupted()
            interval = min(POLL_CAP, interval * POLL_GROWTH)

    def _fetch(self, client: httpx.Client, url: str, abort: threading.Event | None = None) -> bytes:
        """GET an answer's image URL without the key, re-checking every redirect hop's host. The image is
        paid for by now, so a lost connection or a 429/5xx is retried (a GET is safe to repeat), with the
        submission's backoff; every attempt and wait (name lookups included) under one total deadline."""
        until = time.monotonic() + self.params.timeout
        problem = ""
        for attempt in range(self.retries + 1):
            delay = None
            with api_http.deadline(max(0.0, until - time.monotonic()), shown=self.params.timeout) as download:
                try:
                    return self._fetch_once(client, url, download)
                except _Retryable as exc:
                    problem, delay = exc.problem, exc.delay
                except api_http.AddressRefused as exc:
                    raise SourceError(self.name, f"image URL: {exc}") from None
                except httpx.TimeoutException as exc:
                    if download.expired:
                        raise SourceError(self.name, f"image download: {download.message()}") from None
                    problem = type(exc).__name__
                except httpx.TransportError as exc:  # connection lost or refused
                    problem = type(exc).__name__
                except httpx.HTTPError as exc:
                    raise SourceError(self.name, f"cannot fetch the image URL: {type(exc).__name__}") from None
            if attempt == self.retries:
                break
            if delay is None:
                delay = random.uniform(0.0, min(BACKOFF_CAP, self.backoff_base * 2 ** attempt))
            if time.monotonic() + delay >= until:
                raise SourceError(self.name, f"image download not done within the {self.params.timeout:g} s "
                                             f"deadline ({problem})")
            log.debug("source %r: image URL: %s; retry %d/%d in %.2f s", self.name, problem, attempt + 1,
                      self.retries, delay)
            if (abort or threading.Event()).wait(delay):
                raise _Interrupted()
        attempts = f"{self.retries + 1} attempt{'s' * (self.retries != 0)}"
        raise SourceError(self.name, f"cannot fetch the image URL after {attempts}: {problem}")

    def _fetch_once(self, client: httpx.Client, url: str, download) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            self._check_host(url)
            with client.stream("GET", url) as resp:
                if resp.is_redirect and resp.headers.get("location"):
                    url = str(resp.url.join(resp.headers["location"]))
                    continue
                if resp.status_code in RETRY_STATUSES:
                    raise _Retryable(f"image URL answered HTTP {resp.status_code}", _retry_after(resp.headers))
                if resp.status_code != 200:
                    error = Gone if resp.status_code in GONE_IMAGE_STATUSES else SourceError
                    raise error(self.name, f"image URL answered HTTP {resp.status_code}")
                return _read_capped(resp, api_answers.MAX_IMAGE_BYTES, download.at, self.name)
        raise SourceError(self.name, f"image URL redirects more than {MAX_REDIRECTS} times")

    def _fetch_any(self, client: httpx.Client, url: Any, abort: threading.Event | None = None) -> bytes:
        """An image URL's bytes, or a `data:...;base64,` URI's."""
        if not isinstance(url, str):
            raise SourceError(self.name, "malformed answer: the image URL is not a string")
        match = _DATA_URI.match(url[:300])
        if match:
            return _b64(url[match.end():], "data URI", self.name)
        return self._fetch(client, url, abort)

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """A task's recorded state (`Call.accepted`): its strings are the URLs to poll, each under the rules
        of a status URL, whether it comes from the service's answer or from the store (a resumed task)."""
        for value in state.values():
            if isinstance(value, str):
                self._check_url(value, "status URL")

    def _check_url(self, url: Any, what: str) -> None:
        if not isinstance(url, str):
            raise SourceError(self.name, f"malformed answer: the {what} is not a string")
        try:
            self._check_host(url, what)
        except ValueError:  # a port out of range, an unparsable netloc
            raise SourceError(self.name, f"malformed answer: the {what} is not a URL") from None

    def _key_allowed(self, url: str) -> bool:
        """The key goes to the endpoint's own host, or over https to a host of the endpoint's site
        (`api.us1.bfl.ai` for `api.bfl.ai`: a subdomain of the endpoint host's parent domain, when that
        parent still has two labels and the endpoint host is a name, not an address)."""
        parts = urlsplit(url)
        host, scheme = (parts.hostname or "").lower(), parts.scheme.lower()
        if host == self._host and scheme in ("https", self._scheme):
            return True
        if scheme != "https" or not host:
            return False
        try:
            ipaddress.ip_address(self._host)
            return False
        except ValueError:
            pass
        labels = self._host.split(".")
        return len(labels) >= 3 and host.endswith("." + ".".join(labels[1:]))

    def _check_host(self, url: str, what: str = "image URL") -> None:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme.lower() not in ("http", "https") or not host:
            raise SourceError(self.name, f"refused {what} scheme {parts.scheme!r}")
        if host == self._host:
            return  # the API's own host serves its own files, wherever it lives
        exchange = api_http.current()
        wait_for = self.params.timeout if exchange is None else max(0.0, exchange.left())
        try:
            infos = api_http.resolve(host, parts.port or 443, wait_for)
        except (OSError, UnicodeError):
            raise Unresolved(self.name, f"cannot resolve the {what}'s host {host!r}") from None
        for info in infos:
            if not api_http.is_public(info[4][0]):
                address = info[4][0]
                raise SourceError(self.name, f"refused {what} on a non-public address ({host} -> {address})")


class _Call:
    """What a protocol module may do for one image (`engine.providers.Call`)."""

    def __init__(self, generator: ApiExchanges, client: httpx.Client, key: str | None, abort: threading.Event,
                 maybe_charged: Callable[[str], None] | None = None, task: Any = None):
        self.name = generator.name
        self.task = task  # this job's engine.api_tasks.Slot (its durable record), or None
        self._maybe_charged = maybe_charged
        self.params = generator.params
        self.endpoint = generator._endpoint
        self.key = key
        self._generator = generator
        self._client = client
        self._abort = abort

    def extra(self, seed: int) -> dict:
        return {k: seed if v == SEED_PLACEHOLDER else v for k, v in self.params.extra.items()}

    def submit(self, *, json: Any = None, content: bytes | None = None,
               headers: Mapping[str, str] | None = None) -> Reply:
        gen = self._generator
        return gen._request(self._client, "POST", self.endpoint, {**(headers or {}), **gen._protocol.auth(self.key)},
                            self.key, self._abort, json_body=json, content=content,
                            maybe_charged=self._maybe_charged)

    def json(self, reply: Reply) -> Any:
        return _parse_json(reply, self.name)

    def accepted(self, state: Mapping[str, Any]) -> None:
        try:
            self._generator._check_state(state)
        except Unresolved:  # not refused, only not looked up now: recorded (a poll looks it up again, and fails)
            pass
        except SourceError:  # refused by the host rules: never recorded, and a poll of it is refused likewise
            return  # (an answer that already holds the image, Replicate's or Firefly's, is still read)
        self._record(state)
        crash_point("api:accepted")  # recorded, not yet polled: a kill here must not cost a second purchase

    def _record(self, state: Mapping[str, Any]) -> None:
        if self.task is None:
            return
        if self.key and any(isinstance(value, str) and (self.key in value or quote(self.key, safe="") in value)
                            for value in state.values()):  # a status URL that carries the key: never stored
            log.warning("source %r: the service's status URL carries the key: the task is not recorded (a stop "
                        "before its image is stored buys it again)", self.name)
            return
        self.task.save(self._generator.params.protocol, self.endpoint, dict(state))

    def poll(self, url: str, check: Callable[[Any], Any], headers: Mapping[str, str] | None = None) -> Any:
        return self._generator._poll(self._client, url, check, self.key, self._abort, headers)

    def post_form(self, url: str, fields: Mapping[str, str], what: str) -> Reply:
        return self._generator._request(self._client, "POST", url,
                                        {"Content-Type": "application/x-www-form-urlencoded"}, self.key,
                                        self._abort, content=urlencode(dict(fields)).encode(), submission=False,
                                        what=what)

    def fetch(self, url: str) -> bytes:
        return self._generator._fetch_any(self._client, url, self._abort)

    def b64(self, text: Any, what: str) -> bytes:
        return _b64(text, what, self.name)

    def fail(self, message: str) -> SourceError:
        return SourceError(self.name, _redact(message, self.key))

    def refused(self, reason: str) -> SourceError:
        return Refused(self.name, f"the API refused the request: {_redact(reason, self.key)}")

    def gone(self, reason: str) -> SourceError:
        return Gone(self.name, _redact(reason, self.key))
