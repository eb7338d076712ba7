"""Sources behind an image generation API: OpenAI-compatible (`POST {base}/v1/images/generations`,
the default) or another provider protocol (`engine.providers`: Black Forest Labs, Replicate,
Stability, Google Imagen and Gemini), chosen by the source's `protocol` parameter.

An API source looks like a `DiffusersGenerator` to the rest of resynth (`generate_many`, `calls`,
`load`/`unload`), but every image is a paid, rate-limited network request to a server we do not
trust: answers are size-capped and validated, image URLs are fetched without following redirects
blindly (no requests into private networks), and the API key lives only in the environment.

Deadlines: every network call (a submission attempt, a status poll, an image download) runs under a
total wall-clock deadline of `timeout` seconds, enforced on each socket operation however slowly the
peer sends (`engine.api_http`); a polling loop as a whole ends within `timeout` seconds too. A
server that sends nothing before the deadline is retried like any lost connection; one that was
dripping bytes when the deadline came is not (the source fails at once, naming the deadline).
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import io
import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

import httpx
from PIL import Image

from engine import api_http, providers
from engine.errors import BudgetExceeded, SourceError, UserError, first_line
from engine.providers import Reply
from engine.providers.openai import endpoint_url  # noqa: F401  (re-exported: engine.workspace uses it)
from index.keys import canonical_json, sha256_text

log = logging.getLogger(__name__)

# Read at call time, so tests may lower them.
MAX_PIXELS = 4096 * 4096           # an answer's image, width x height
MAX_IMAGE_BYTES = 32 << 20         # an image file, or an image URL's body
MAX_ERROR_BYTES = 64 << 10         # an error answer: only its message is wanted
MAX_REDIRECTS = 3                  # hops when fetching an image URL, each re-checked
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF_BASE = 1.0                 # seconds; attempt k waits uniform(0, base * 2**k), capped
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 60.0             # a server's Retry-After is honoured up to this many seconds
RETRIES = 4
POLL_FIRST = 0.5                   # seconds before the first status poll; then x POLL_GROWTH, capped
POLL_GROWTH = 1.5
POLL_CAP = 5.0
SEED_PLACEHOLDER = "{seed}"        # an `extra` value equal to this is replaced by the slot's seed

_SIZE = re.compile(r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w-]+=[^;,]*)*;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ApiParams:
    """How to reach one model behind an images API; `cache_hash` covers only what changes an image."""

    url: str
    model: str
    size: str | None = None        # "WxH"; None leaves it to the server
    api_key_env: str | None = None  # the *name* of the environment variable holding the key
    price: float = 0.0              # USD per image, for --max-cost
    rate: float | None = None       # requests per minute, shared by every generator of (url, model)
    concurrency: int = 2
    extra: dict = field(default_factory=dict)  # merged into the request body
    timeout: float = 120.0          # seconds: total deadline of each network call, and of each polling loop
    protocol: str = providers.DEFAULT  # engine.providers: openai, bfl, replicate, stability, imagen, gemini, google

    def to_json(self) -> str:
        return canonical_json(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ApiParams":
        try:
            params = cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise UserError(f"malformed API source parameters: {first_line(exc)}") from None
        params.validate()
        return params

    def cache_hash(self) -> str:
        """Endpoint, model, size, extra, and the protocol unless it is the default (so that sources stored
        before protocols existed keep their keys): not the key, price, rate, concurrency or timeout."""
        fields = {"url": self.endpoint(), "model": self.model, "size": self.size, "extra": self.extra}
        if self.protocol != providers.DEFAULT:
            fields["protocol"] = self.protocol
        return sha256_text(canonical_json(fields))

    def endpoint(self) -> str:
        """The protocol's submission URL (for `openai`, `endpoint_url(url)`)."""
        return providers.get(self.protocol).endpoint(self.url, self.model)

    def validate(self) -> "ApiParams":
        protocol = providers.get(self.protocol)  # an unknown name is a one-line UserError
        parts = urlsplit(self.url.strip()) if isinstance(self.url, str) else None
        if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise UserError(f"API URL must be http:// or https:// with a host, not {self.url!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise UserError("API model must be a non-empty string")
        if self.size is not None and not (isinstance(self.size, str) and _SIZE.match(self.size)):
            raise UserError(f"API image size must look like 1024x1024, not {self.size!r}")
        env = self.api_key_env
        if env is not None and not (isinstance(env, str) and _ENV_NAME.match(env)):
            raise UserError("--api-key-env takes the NAME of an environment variable (letters, digits, _), "
                            "not the key itself")
        if not _number(self.price) or not 0 <= self.price < 1e6:
            raise UserError(f"API price must be a number >= 0 USD per image, not {self.price!r}")
        if self.rate is not None and (not _number(self.rate) or self.rate <= 0):
            raise UserError(f"API rate must be a number > 0 requests per minute, not {self.rate!r}")
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise UserError(f"API concurrency must be an integer >= 1, not {self.concurrency!r}")
        if not _number(self.timeout) or self.timeout <= 0:
            raise UserError(f"API timeout must be a number > 0 seconds, not {self.timeout!r}")
        if not isinstance(self.extra, dict):
            raise UserError("API extra parameters must be a JSON object")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UserError(f"API extra parameters are not JSON: {first_line(exc)}") from None
        reserved = protocol.reserved_for(self.model) & set(self.extra)
        if reserved:
            raise UserError(f"API extra parameters may not set {sorted(reserved)}")
        protocol.validate(self)
        return self


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


class PartialResult(SourceError):
    """Some jobs failed after others were answered: the answered images (None where a job failed, in
    job order) are paid for and must be kept."""

    def __init__(self, cause: SourceError, images: list):
        super().__init__(cause.source, str(cause).split(": ", 1)[-1])
        self.images = images


class Budget:
    """What one command or request may spend on API images, and what it did: each run reserves its
    cost before sending and settles after (received images paid, the rest given back); `saved` is the
    price of the API images the cache answered instead."""

    def __init__(self, limit_usd: float | None = None):
        self.limit_usd = limit_usd
        self.spent = 0.0
        self.images = 0
        self.saved = 0.0
        self._lock = threading.Lock()

    def charge(self, n_images: int, price: float) -> float:
        cost = n_images * price
        with self._lock:
            if self.limit_usd is not None and cost > 0 and self.spent + cost > self.limit_usd + 1e-9:
                raise BudgetExceeded(f"spending {cost:.4f} USD more would exceed --max-cost {self.limit_usd:.4f} "
                                     f"USD (spent {self.spent:.4f} so far)")
            self.spent += cost
        return cost

    def affordable(self, n_images: int, price: float) -> int:
        """How many of `n_images` the rest of the limit pays for."""
        with self._lock:
            if self.limit_usd is None or price <= 0:
                return n_images
            return max(0, min(n_images, int((self.limit_usd - self.spent + 1e-9) // price)))

    def settle(self, reserved: float, received: int, price: float) -> None:
        with self._lock:
            self.spent = max(0.0, self.spent - (reserved - received * price))
            self.images += received

    def cached(self, n_images: int, price: float) -> None:
        with self._lock:
            self.saved += n_images * price

    def to_dict(self) -> dict:
        with self._lock:
            return {"max_cost_usd": self.limit_usd, "images_bought": self.images,
                    "spent_usd": round(self.spent, 6), "saved_by_cache_usd": round(self.saved, 6)}


class _Limiter:
    """Requests per minute (submissions evenly spaced) and jobs in flight for one (endpoint, model).

    A job holds its slot from its first submission until its image is in (status polls and the image
    download included: an asynchronous service's queue counts as in flight); every submission attempt
    of a job, retries included, waits for its turn in the rate."""

    def __init__(self, rate: float | None, concurrency: int):
        self.interval = 60.0 / rate if rate else 0.0
        self.limit = concurrency
        self._cond = threading.Condition()
        self._in_flight = 0
        self._next = 0.0

    def tighten(self, rate: float | None, concurrency: int) -> None:
        """Two sources on one (endpoint, model) share one quota: the stricter setting wins."""
        with self._cond:
            self.interval = max(self.interval, 60.0 / rate if rate else 0.0)
            self.limit = min(self.limit, concurrency)

    @contextmanager
    def job(self) -> Iterator[None]:
        with self._cond:
            while self._in_flight >= self.limit:
                self._cond.wait()
            self._in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify()

    def pace(self, abort: threading.Event | None = None) -> bool:
        """Wait for the next submission's turn; False if `abort` was set meanwhile."""
        with self._cond:
            start = max(time.monotonic(), self._next)
            self._next = start + self.interval
        delay = start - time.monotonic()
        if delay <= 0:
            return True
        if abort is None:
            time.sleep(delay)
            return True
        return not abort.wait(delay)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """A job's slot and its submission's turn at once (one-request protocols)."""
        with self.job():
            self.pace()
            yield


_LIMITERS: dict[tuple[str, str], _Limiter] = {}
_LIMITERS_LOCK = threading.Lock()


def limiter_for(params: ApiParams) -> _Limiter:
    key = (params.endpoint(), params.model)
    with _LIMITERS_LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is None:
            limiter = _LIMITERS[key] = _Limiter(params.rate, params.concurrency)
        else:
            limiter.tighten(params.rate, params.concurrency)
        return limiter


class _Interrupted(Exception):
    """Ctrl-C in the caller's thread: a job stops waiting (retry backoff, polling, its turn)."""


class ApiGenerator:
    """A source whose images come from an images API (`params.protocol`), one request per (prompt, slot)."""

    def __init__(self, name: str, params: ApiParams, fingerprint: str | None = None, *,
                 retries: int = RETRIES, backoff_base: float | None = None, budget: Budget | None = None):
        self.name = name
        self.params = params.validate()
        self.fingerprint = fingerprint
        self.retries = retries
        self.backoff_base = BACKOFF_BASE if backoff_base is None else backoff_base
        self.budget = budget
        self.calls = 0    # images received
        self.spent = 0.0  # USD for those images
        self._protocol = providers.get(params.protocol)
        self._endpoint = params.endpoint()
        parts = urlsplit(self._endpoint)
        self._scheme = parts.scheme.lower()
        self._host = (parts.hostname or "").lower()
        self._limiter = limiter_for(params)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        protocol = "" if self.params.protocol == providers.DEFAULT else f", protocol={self.params.protocol!r}"
        return f"ApiGenerator({self.name!r}, url={self._endpoint!r}, model={self.params.model!r}{protocol})"

    def load(self) -> "ApiGenerator":
        return self

    def unload(self) -> None:
        pass

    def default_batch_size(self) -> int:
        return self.params.concurrency

    def generate(self, prompt: str, seeds: list[int]) -> list[Image.Image]:
        return self.generate_many([(prompt, seed) for seed in seeds])

    def generate_many(self, jobs: list[tuple[str, int]], batch_size: int | None = None,
                      budget: Budget | None = None) -> list[Image.Image]:
        """One image per job, in job order, up to `concurrency` jobs at once (`batch_size` is unused:
        an API has no batches). The cost is reserved before sending (from `budget`, else the generator's
        own): when the limit pays for none of the jobs, nothing is sent (BudgetExceeded); when it pays for
        some, those are bought and PartialResult stops the rest. When some jobs fail after others were
        answered, or the run is interrupted, PartialResult carries the answered images (paid for).
        Ctrl-C sends nothing more; exchanges already under way end by their deadline, and jobs waiting
        (backoff, polling, their turn in the rate) stop at once."""
        jobs = [(str(prompt), int(seed)) for prompt, seed in jobs]
        if not jobs:
            return []
        key = self._api_key()
        price = self.params.price
        budget = budget if budget is not None else self.budget
        affordable = budget.affordable(len(jobs), price) if budget is not None else len(jobs)
        if 0 < affordable < len(jobs):
            # buy what the limit pays for, then stop with the reason (the bought images are kept)
            images = self.generate_many(jobs[:affordable], budget=budget)
            reason = (f"spending {price * (len(jobs) - affordable):.4f} USD more would exceed --max-cost "
                      f"{budget.limit_usd:.4f} USD (spent {budget.spent:.4f} so far)")
            raise PartialResult(SourceError(self.name, reason), images + [None] * (len(jobs) - affordable))
        reserved = budget.charge(len(jobs), price) if budget is not None else 0.0
        done = 0
        stop = threading.Event()   # after a failure, jobs not yet sent are not sent
        abort = threading.Event()  # Ctrl-C: jobs stop waiting too

        def run(client: httpx.Client, prompt: str, seed: int) -> Image.Image | None:
            if stop.is_set():
                return None
            try:
                return self._one(client, key, prompt, seed, abort)
            except _Interrupted:
                stop.set()
                return None
            except SourceError:
                stop.set()
                raise
            except Exception as exc:  # anything unforeseen in a hostile answer is this source's failure
                stop.set()
                raise SourceError(self.name, f"unusable answer: {_redact(first_line(exc), key)}") from None
            except BaseException:
                stop.set()
                raise

        try:
            with api_http.client(self.params.timeout) as client, \
                    ThreadPoolExecutor(self.params.concurrency, thread_name_prefix=f"api-{self.name}") as pool:
                futures = [pool.submit(run, client, prompt, seed) for prompt, seed in jobs]
                try:
                    wait(futures, return_when=FIRST_EXCEPTION)
                except BaseException:  # Ctrl-C: send nothing more, keep (and pay for) what came back
                    stop.set()
                    abort.set()
                    for future in futures:
                        future.cancel()
                    wait(futures)
                    got = [f.result() if f.done() and not f.cancelled() and f.exception() is None else None
                           for f in futures]
                    done = sum(1 for image in got if image is not None)
                    if done:
                        raise PartialResult(SourceError(self.name, "interrupted"), got) from None
                    raise
                if stop.is_set():
                    wait(futures)  # those already sending finish; count what they cost
                    got = [f.result() if not f.cancelled() and f.exception() is None else None for f in futures]
                    done = sum(1 for image in got if image is not None)
                    error = next(f.exception() for f in futures if f.exception() is not None)
                    if done and isinstance(error, SourceError):
                        raise PartialResult(error, got) from error
                    raise error
                images = [f.result() for f in futures]
                done = len(images)
                return images
        finally:
            if budget is not None:
                budget.settle(reserved, done, price)

    def _api_key(self) -> str | None:
        if not self.params.api_key_env:
            return None
        key = (os.environ.get(self.params.api_key_env) or "").strip()
        if not key:
            raise SourceError(self.name, f"environment variable {self.params.api_key_env} is not set")
        if any(ord(c) < 32 or ord(c) == 127 for c in key):
            raise SourceError(self.name, f"environment variable {self.params.api_key_env} holds control "
                                         "characters (a line break?): not a usable key")
        return key

    def _one(self, client: httpx.Client, key: str | None, prompt: str, seed: int,
             abort: threading.Event | None = None) -> Image.Image:
        call = _Call(self, client, key, abort or threading.Event())
        with self._limiter.job():
            data = self._protocol.generate(call, prompt, seed)
        if not isinstance(data, (bytes, bytearray)):
            raise SourceError(self.name, "malformed answer: no image")
        if len(data) > MAX_IMAGE_BYTES:
            raise SourceError(self.name, f"answer image is over the {MAX_IMAGE_BYTES}-byte cap")
        image = self._decode(bytes(data))
        with self._lock:
            self.calls += 1
            self.spent += self.params.price
        return image

    # -- the network, for every protocol ---------------------------------------------------------------
    def _request(self, client: httpx.Client, method: str, url: str, headers: Mapping[str, str],
                 key: str | None, abort: threading.Event, *, json_body: Any = None, content: bytes | None = None,
                 submission: bool = True, until: float | None = None, what: str = "") -> Reply:
        """One exchange with retries on 429/5xx/transport errors (Retry-After honoured), each attempt
        under the total deadline (`timeout`, and what is left before `until`); a 2xx reply read whole.
        Submissions take their turn in the rate; `what` prefixes messages of non-submissions."""
        prefix = f"{what}: " if what else ""
        problem = ""
        for attempt in range(self.retries + 1):
            delay = None
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
                            raw = _read_capped(resp, MAX_IMAGE_BYTES * 4 // 3 + (1 << 20), exchange.at, self.name)
                            return Reply(resp.status_code, resp.headers, raw)
                        raw = _read_capped(resp, MAX_ERROR_BYTES, exchange.at, self.name, truncate=True)
                        problem = f"HTTP {resp.status_code}{_error_message(raw, key)}"
                        if resp.status_code not in RETRY_STATUSES:
                            hint = ""
                            if resp.status_code in (401, 403):
                                env = self.params.api_key_env
                                hint = f" (check the key in ${env})" if env else " (no api_key_env is configured)"
                            raise SourceError(self.name, f"{prefix}the API refused the request: {problem}{hint}")
                        delay = _retry_after(resp.headers)
                except httpx.TimeoutException as exc:
                    if exchange.expired and exchange.received:  # a drip, not a loss: no second helping
                        raise SourceError(self.name, f"{prefix or 'submission: '}{exchange.message()}") from None
                    problem = f"{type(exc).__name__}: {_redact(first_line(exc), key)}"
                except httpx.TransportError as exc:  # connection lost or refused: worth another try
                    problem = f"{type(exc).__name__}: {_redact(first_line(exc), key)}"
                except httpx.HTTPError as exc:
                    raise SourceError(self.name, f"{prefix}request failed: {type(exc).__name__}") from None
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
        raise SourceError(self.name, f"{prefix}gave up after {self.retries + 1} attempts: {problem}")

    def _poll(self, client: httpx.Client, url: str, check: Callable[[Any], Any], key: str | None,
              abort: threading.Event) -> Any:
        """GET `url` until `check(answer)` is not None, backing off; the loop ends within `timeout`."""
        self._check_url(url, "status URL")
        headers = self._protocol.auth(key) if self._key_allowed(url) else {}
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

    def _fetch(self, client: httpx.Client, url: str) -> bytes:
        """GET an answer's image URL without the key, re-checking every redirect hop's host; the whole
        chain (name lookups included) under one total deadline."""
        with api_http.deadline(self.params.timeout) as download:
            try:
                for _ in range(MAX_REDIRECTS + 1):
                    self._check_host(url)
                    with client.stream("GET", url) as resp:
                        if resp.is_redirect and resp.headers.get("location"):
                            url = str(resp.url.join(resp.headers["location"]))
                            continue
                        if resp.status_code != 200:
                            raise SourceError(self.name, f"image URL answered HTTP {resp.status_code}")
                        return _read_capped(resp, MAX_IMAGE_BYTES, download.at, self.name)
            except httpx.TimeoutException as exc:
                if download.expired:
                    raise SourceError(self.name, f"image download: {download.message()}") from None
                raise SourceError(self.name, f"cannot fetch the image URL: {type(exc).__name__}") from None
            except httpx.HTTPError as exc:
                raise SourceError(self.name, f"cannot fetch the image URL: {type(exc).__name__}") from None
        raise SourceError(self.name, f"image URL redirects more than {MAX_REDIRECTS} times")

    def _fetch_any(self, client: httpx.Client, url: Any) -> bytes:
        """An image URL's bytes, or a `data:...;base64,` URI's."""
        if not isinstance(url, str):
            raise SourceError(self.name, "malformed answer: the image URL is not a string")
        match = _DATA_URI.match(url[:300])
        if match:
            return _b64(url[match.end():], "data URI", self.name)
        return self._fetch(client, url)

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
            raise SourceError(self.name, f"cannot resolve the {what}'s host {host!r}") from None
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            if address.version == 6 and address.ipv4_mapped:
                address = address.ipv4_mapped
            if (not address.is_global or address.is_private or address.is_loopback or address.is_link_local
                    or address.is_multicast or address.is_reserved or address.is_unspecified):
                raise SourceError(self.name, f"refused {what} on a non-public address ({host} -> {address})")

    def _decode(self, data: bytes) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
        except Exception as exc:
            raise SourceError(self.name, f"answer image cannot be decoded: {first_line(exc)}") from None
        if width * height > MAX_PIXELS:
            raise SourceError(self.name, f"answer image is {width}x{height}, over the {MAX_PIXELS}-pixel cap")
        try:
            return image.convert("RGB")
        except Exception as exc:
            raise SourceError(self.name, f"answer image cannot be decoded: {first_line(exc)}") from None


class _Call:
    """What a protocol module may do for one image (`engine.providers.Call`)."""

    def __init__(self, generator: ApiGenerator, client: httpx.Client, key: str | None, abort: threading.Event):
        self.name = generator.name
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
                            self.key, self._abort, json_body=json, content=content)

    def json(self, reply: Reply) -> Any:
        return _parse_json(reply, self.name)

    def poll(self, url: str, check: Callable[[Any], Any]) -> Any:
        return self._generator._poll(self._client, url, check, self.key, self._abort)

    def fetch(self, url: str) -> bytes:
        return self._generator._fetch_any(self._client, url)

    def b64(self, text: Any, what: str) -> bytes:
        return _b64(text, what, self.name)

    def fail(self, message: str) -> SourceError:
        return SourceError(self.name, _redact(message, self.key))

    def refused(self, reason: str) -> SourceError:
        return SourceError(self.name, f"the API refused the request: {_redact(reason, self.key)}")


def _parse_json(reply: Reply, name: str) -> Any:
    try:
        return json.loads(reply.body)
    except ValueError:
        raise SourceError(name, "malformed answer: not JSON") from None


def _b64(text: Any, what: str, name: str) -> bytes:
    if not isinstance(text, str):
        raise SourceError(name, f"malformed answer: no {what}")
    if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 8:
        raise SourceError(name, f"answer image is over the {MAX_IMAGE_BYTES}-byte cap")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise SourceError(name, f"malformed answer: {what} is not base64") from None


def _read_capped(resp: httpx.Response, cap: int, deadline: float, name: str, truncate: bool = False) -> bytes:
    """A body read in chunks, stopping at `cap` bytes (an error, or a cut if `truncate`) and at `deadline`."""
    declared = resp.headers.get("content-length", "")
    if not truncate and declared.isdigit() and int(declared) > cap:
        raise SourceError(name, f"answer is {declared} bytes, over the {cap}-byte cap")
    buffer = bytearray()
    for chunk in resp.iter_bytes():
        buffer += chunk
        if len(buffer) > cap:
            if truncate:
                return bytes(buffer[:cap])
            raise SourceError(name, f"answer is over the {cap}-byte cap")
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("answer took longer than the timeout")
    return bytes(buffer)


def _error_message(raw: bytes, key: str | None) -> str:
    """': <the server's message>' from an error body (OpenAI's and Google's error.message, FastAPI's,
    BFL's and Replicate's detail, Stability's errors[0]), one line."""
    try:
        body = json.loads(raw)
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    if not isinstance(message, str) and isinstance(body, dict):
        message = body.get("detail") if isinstance(body.get("detail"), str) else body.get("message")
        errors = body.get("errors")  # Stability: {"name": ..., "errors": ["..."]}
        if not isinstance(message, str) and isinstance(errors, list) and errors and isinstance(errors[0], str):
            message = errors[0]
    if not isinstance(message, str) or not message.strip():
        return ""
    return ": " + _redact(message.strip().splitlines()[0][:300], key)


def _redact(text: str, key: str | None) -> str:
    """Servers echo keys back ("Incorrect API key provided: sk-..."): never let one into a message."""
    if not key:
        return text
    for form in (key, repr(key)[1:-1], key.strip()):
        if form:
            text = text.replace(form, "***")
    return text


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from Retry-After (seconds or an HTTP date) or retry-after-ms, capped."""
    value = headers.get("retry-after-ms")
    try:
        if value is not None:
            return min(RETRY_AFTER_CAP, max(0.0, float(value) / 1000))
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return None
    return min(RETRY_AFTER_CAP, max(0.0, seconds))
