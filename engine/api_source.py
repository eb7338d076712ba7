"""Sources behind an OpenAI-compatible images API (`POST {base}/v1/images/generations`).

An API source looks like a `DiffusersGenerator` to the rest of resynth (`generate_many`, `calls`,
`load`/`unload`), but every image is a paid, rate-limited network request to a server we do not
trust: answers are size-capped and validated, image URLs are fetched without following redirects
blindly (no requests into private networks), and the API key lives only in the environment.
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
import socket
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
from PIL import Image

from engine.errors import BudgetExceeded, SourceError, UserError, first_line
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
SEED_PLACEHOLDER = "{seed}"        # an `extra` value equal to this is replaced by the slot's seed

_SIZE = re.compile(r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_BODY_KEYS = {"prompt", "n"}  # one image per request is what `calls`, budget and order rely on


def endpoint_url(url: str) -> str:
    """The generations endpoint for a base URL (scheme and host lower-cased, no trailing slash)."""
    parts = urlsplit(url.strip())
    base = f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path}".rstrip("/")
    query = f"?{parts.query}" if parts.query else ""  # e.g. Azure's ?api-version=...
    if base.endswith("/images/generations"):  # the endpoint itself was given
        return base + query
    return base + ("/images/generations" if base.endswith("/v1") else "/v1/images/generations") + query


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
    timeout: float = 120.0          # seconds per request

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
        """Endpoint, model, size and extra: not the key, price, rate, concurrency or timeout."""
        return sha256_text(canonical_json({"url": endpoint_url(self.url), "model": self.model,
                                           "size": self.size, "extra": self.extra}))

    def validate(self) -> "ApiParams":
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
        if _RESERVED_BODY_KEYS & set(self.extra):
            raise UserError(f"API extra parameters may not set {sorted(_RESERVED_BODY_KEYS & set(self.extra))}")
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
    """Requests per minute (evenly spaced) and requests in flight for one (endpoint, model)."""

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
    def slot(self) -> Iterator[None]:
        with self._cond:
            while self._in_flight >= self.limit:
                self._cond.wait()
            self._in_flight += 1
            start = max(time.monotonic(), self._next)
            self._next = start + self.interval
        try:
            time.sleep(max(0.0, start - time.monotonic()))
            yield
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify()


_LIMITERS: dict[tuple[str, str], _Limiter] = {}
_LIMITERS_LOCK = threading.Lock()


def limiter_for(params: ApiParams) -> _Limiter:
    key = (endpoint_url(params.url), params.model)
    with _LIMITERS_LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is None:
            limiter = _LIMITERS[key] = _Limiter(params.rate, params.concurrency)
        else:
            limiter.tighten(params.rate, params.concurrency)
        return limiter


class ApiGenerator:
    """A source whose images come from an OpenAI-compatible images API, one request per (prompt, slot)."""

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
        self._endpoint = endpoint_url(params.url)
        self._host = (urlsplit(self._endpoint).hostname or "").lower()
        self._limiter = limiter_for(params)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ApiGenerator({self.name!r}, url={self._endpoint!r}, model={self.params.model!r})"

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
        """One image per job, in job order, up to `concurrency` requests at once (`batch_size` is unused:
        an API has no batches). The cost is reserved before sending (from `budget`, else the generator's
        own): when the limit pays for none of the jobs, nothing is sent (BudgetExceeded); when it pays for
        some, those are bought and PartialResult stops the rest. When some jobs fail after others were
        answered, or the run is interrupted, PartialResult carries the answered images (paid for)."""
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
        stop = threading.Event()  # after a failure, jobs not yet sent are not sent

        def run(client: httpx.Client, prompt: str, seed: int) -> Image.Image | None:
            if stop.is_set():
                return None
            try:
                return self._one(client, key, prompt, seed)
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
            with httpx.Client(follow_redirects=False, timeout=httpx.Timeout(self.params.timeout),
                              trust_env=False) as client, \
                    ThreadPoolExecutor(self.params.concurrency, thread_name_prefix=f"api-{self.name}") as pool:
                futures = [pool.submit(run, client, prompt, seed) for prompt, seed in jobs]
                try:
                    wait(futures, return_when=FIRST_EXCEPTION)
                except BaseException:  # Ctrl-C: send nothing more, keep (and pay for) what came back
                    stop.set()
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

    def _one(self, client: httpx.Client, key: str | None, prompt: str, seed: int) -> Image.Image:
        body = {"model": self.params.model, "prompt": prompt, "n": 1, "response_format": "b64_json"}
        if self.params.size:
            body["size"] = self.params.size
        body.update({k: seed if v == SEED_PLACEHOLDER else v for k, v in self.params.extra.items()})
        answer = self._post(client, key, body)
        try:
            item = answer["data"][0]
            b64, url = item.get("b64_json"), item.get("url")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise SourceError(self.name, "malformed answer: no data[0]") from None
        if isinstance(b64, str):
            try:
                data = base64.b64decode("".join(b64.split()), validate=True)
            except (binascii.Error, ValueError):
                raise SourceError(self.name, "malformed answer: b64_json is not base64") from None
            if len(data) > MAX_IMAGE_BYTES:
                raise SourceError(self.name, f"answer image is over the {MAX_IMAGE_BYTES}-byte cap")
        elif isinstance(url, str):
            data = self._fetch(client, url)
        else:
            raise SourceError(self.name, "malformed answer: data[0] has neither b64_json nor url")
        image = self._decode(data)
        with self._lock:
            self.calls += 1
            self.spent += self.params.price
        return image

    def _post(self, client: httpx.Client, key: str | None, body: dict) -> Any:
        """POST with retries on 429/5xx/transport errors (Retry-After honoured); the parsed JSON answer."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        problem = ""
        for attempt in range(self.retries + 1):
            delay = None
            try:
                with self._limiter.slot(), client.stream("POST", self._endpoint, json=body, headers=headers) as resp:
                    deadline = time.monotonic() + self.params.timeout
                    if 200 <= resp.status_code < 300:
                        raw = _read_capped(resp, MAX_IMAGE_BYTES * 4 // 3 + (1 << 20), deadline, self.name)
                        try:
                            return json.loads(raw)
                        except ValueError:
                            raise SourceError(self.name, "malformed answer: not JSON") from None
                    raw = _read_capped(resp, MAX_ERROR_BYTES, deadline, self.name, truncate=True)
                    problem = f"HTTP {resp.status_code}{_error_message(raw, key)}"
                    if resp.status_code not in RETRY_STATUSES:
                        hint = ""
                        if resp.status_code in (401, 403):
                            env = self.params.api_key_env
                            hint = f" (check the key in ${env})" if env else " (no api_key_env is configured)"
                        raise SourceError(self.name, f"the API refused the request: {problem}{hint}")
                    delay = _retry_after(resp.headers)
            except httpx.TransportError as exc:  # connection, timeout: worth another try
                problem = f"{type(exc).__name__}: {_redact(first_line(exc), key)}"
            except httpx.HTTPError as exc:
                raise SourceError(self.name, f"request failed: {type(exc).__name__}") from None
            if attempt == self.retries:
                break
            if delay is None:
                delay = random.uniform(0.0, min(BACKOFF_CAP, self.backoff_base * 2 ** attempt))
            log.debug("source %r: %s; retry %d/%d in %.2f s", self.name, problem, attempt + 1, self.retries, delay)
            time.sleep(delay)
        raise SourceError(self.name, f"gave up after {self.retries + 1} attempts: {problem}")

    def _fetch(self, client: httpx.Client, url: str) -> bytes:
        """GET an answer's image URL without the key, re-checking every redirect hop's host."""
        deadline = time.monotonic() + self.params.timeout
        for _ in range(MAX_REDIRECTS + 1):
            self._check_host(url)
            try:
                with client.stream("GET", url) as resp:
                    if resp.is_redirect and resp.headers.get("location"):
                        url = str(resp.url.join(resp.headers["location"]))
                        continue
                    if resp.status_code != 200:
                        raise SourceError(self.name, f"image URL answered HTTP {resp.status_code}")
                    return _read_capped(resp, MAX_IMAGE_BYTES, deadline, self.name)
            except httpx.HTTPError as exc:
                raise SourceError(self.name, f"cannot fetch the image URL: {type(exc).__name__}") from None
        raise SourceError(self.name, f"image URL redirects more than {MAX_REDIRECTS} times")

    def _check_host(self, url: str) -> None:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme.lower() not in ("http", "https") or not host:
            raise SourceError(self.name, f"refused image URL scheme {parts.scheme!r}")
        if host == self._host:
            return  # the API's own host serves its own files, wherever it lives
        try:
            infos = socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            raise SourceError(self.name, f"cannot resolve image host {host!r}") from None
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            if address.version == 6 and address.ipv4_mapped:
                address = address.ipv4_mapped
            if (not address.is_global or address.is_private or address.is_loopback or address.is_link_local
                    or address.is_multicast or address.is_reserved or address.is_unspecified):
                raise SourceError(self.name, f"refused image URL on a non-public address ({host} -> {address})")

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
    """': <the server's message>' from an OpenAI-style error body (or FastAPI's detail), one line."""
    try:
        body = json.loads(raw)
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    if not isinstance(message, str) and isinstance(body, dict):
        message = body.get("detail") if isinstance(body.get("detail"), str) else body.get("message")
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
