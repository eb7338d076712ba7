"""What API sources may spend and how fast they may ask: the `Budget` (--max-cost, reserved before
sending, settled after) and the per-(endpoint, model) rate and concurrency limiter shared by every
generator of that pair. No network here. Re-exported by `engine.api_source`.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from engine.api_params import ApiParams
from engine.errors import BudgetExceeded


class Budget:
    """What one command or request may spend on API images, and what it did: each run reserves its
    cost before sending and settles after (received images paid, the rest given back); `saved` is the
    price of the API images the cache answered instead."""

    def __init__(self, limit_usd: float | None = None):
        self.limit_usd = limit_usd
        self.spent = 0.0
        self.images = 0
        self.saved = 0.0
        self.uncertain = 0.0  # of `spent`: failed attempts the provider may have charged for (maybe_charged)
        self._lock = threading.Lock()

    def charge(self, n_images: int, price: float) -> float:
        cost = n_images * price
        with self._lock:
            if self.limit_usd is not None and cost > 0 and self.spent + cost > self.limit_usd + 1e-9:
                raise BudgetExceeded(f"spending {cost:.4f} USD more would exceed --max-cost {self.limit_usd:.4f} "
                                     f"USD (spent {self.spent:.4f} so far)")
            self.spent += cost
        return cost

    def maybe_charged(self, price: float) -> bool:
        """A failed attempt the provider may have charged for (it was sent whole): counted as spent, never
        given back, since it may have happened. True while the total stays within the limit, so that the
        job's retry, paid by the job's reservation, may go."""
        with self._lock:
            self.spent += price
            self.uncertain += price
            return self.limit_usd is None or self.spent <= self.limit_usd + 1e-9

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
            out = {"max_cost_usd": self.limit_usd, "images_bought": self.images,
                   "spent_usd": round(self.spent, 6), "saved_by_cache_usd": round(self.saved, 6)}
            if self.uncertain:  # counted as spent: the provider may have charged for those attempts
                out["maybe_charged_usd"] = round(self.uncertain, 6)
            return out


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
