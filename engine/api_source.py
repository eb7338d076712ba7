"""Sources behind an image generation API: OpenAI-compatible (`POST {base}/v1/images/generations`,
the default) or another provider protocol (`engine.providers`: Black Forest Labs, Replicate,
Stability, Google Imagen and Gemini, fal.ai, Ideogram, Adobe Firefly), chosen by the source's `protocol`
parameter.

An API source looks like a `DiffusersGenerator` to the rest of resynth (`generate_many`, `calls`,
`load`/`unload`), but every image is a paid, rate-limited network request to a server we do not
trust: answers are size-capped and validated, image URLs are fetched without following redirects
blindly (no requests into private networks), and the API key lives only in the environment.

Deadlines: every network call (a submission attempt, a status poll, an image download) runs under a
total wall-clock deadline of `timeout` seconds, enforced on each socket operation however slowly the
peer sends (`engine.api_http`); a polling loop as a whole ends within `timeout` seconds too. A
server that sends nothing before the deadline is retried like any lost connection; one that was
dripping bytes when the deadline came is not (the source fails at once, naming the deadline).

Module map (each re-exported here): `engine.api_params` (ApiParams and its checks), `engine.api_budget`
(Budget, the rate and concurrency limiter), `engine.api_exchange` (requests, retries, polling, downloads,
host checks, the protocols' `Call`), `engine.api_answers` (size caps, parsing untrusted answers),
`engine.api_tasks` (durable records of accepted tasks, so a task is paid for once). This
module owns `ApiGenerator` itself: the key, the budget's reservation and settlement, and the concurrent
run of a batch of jobs with its partial results. Tunables are read at call time from the module that
defines them (`api_exchange.POLL_FIRST`, `api_answers.MAX_IMAGE_BYTES`, ...).
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Callable, cast

import httpx
from PIL import Image

from engine import api_answers, api_http, providers
from engine.api_answers import (  # noqa: F401  (re-exported)
    MAX_ERROR_BYTES, MAX_IMAGE_BYTES, MAX_PIXELS, RETRY_AFTER_CAP, _b64, _decode, _error_message, _parse_json,
    _read_capped, _redact, _retry_after)
from engine.api_budget import Budget, _Limiter, limiter_for  # noqa: F401  (re-exported)
from engine.api_exchange import (  # noqa: F401  (re-exported)
    BACKOFF_BASE, BACKOFF_CAP, MAX_REDIRECTS, POLL_CAP, POLL_FIRST, POLL_GROWTH, RETRIES, RETRY_STATUSES, ApiExchanges,
    Gone, Refused, Unresolved, _Call, _Interrupted)
from engine.api_params import SEED_PLACEHOLDER, ApiParams  # noqa: F401  (re-exported)
from engine.api_tasks import Slot, TaskBook
from engine.errors import BudgetExceeded, SourceError, first_line  # noqa: F401  (BudgetExceeded re-exported)
from engine.providers.openai import endpoint_url  # noqa: F401  (re-exported: engine.workspace uses it)

log = logging.getLogger(__name__)


class PartialResult(SourceError):
    """Some jobs failed after others were answered: the answered images (None where a job failed, in
    job order) are paid for and must be kept. `per_job`: only the refused jobs failed (their prompts), the
    source is sound and its other jobs go on; else the source stopped at the failure."""

    per_job = False

    # set by engine.resynthesis on the way up: the (text, key, seed) jobs it stored, images made per text
    stored: list[tuple[str, str, int]]
    made: dict[str, int]

    def __init__(self, cause: SourceError, images: list):
        super().__init__(cause.source, str(cause).split(": ", 1)[-1])
        self.images = images


class ApiGenerator(ApiExchanges):
    """A source whose images come from an images API (`params.protocol`), one request per (prompt, slot)."""

    def __init__(self, name: str, params: ApiParams, fingerprint: str | None = None, *,
                 retries: int = RETRIES, backoff_base: float | None = None, budget: Budget | None = None):
        super().__init__(name, params.validate(), retries=retries, backoff_base=backoff_base)
        self.fingerprint = fingerprint
        self.budget = budget
        self.calls = 0    # images received
        self.spent = 0.0  # USD for those images
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

    @property
    def resumes_tasks(self) -> bool:
        """Whether its service bills a task before it is ready (submit, then poll): then `generate_many`
        takes a `TaskBook` (engine.api_tasks) and resumes the tasks an earlier run recorded."""
        return self._protocol.resumable

    def generate_many(self, jobs: list[tuple[str, int]], batch_size: int | None = None,
                      budget: Budget | None = None, tasks: TaskBook | None = None) -> list[Image.Image]:
        """One image per job, in job order, up to `concurrency` jobs at once (`batch_size` is unused:
        an API has no batches). The cost is reserved before sending (from `budget`, else the generator's
        own): when the limit pays for none of the jobs, nothing is sent (BudgetExceeded); when it pays for
        some, those are bought and PartialResult stops the rest. When some jobs fail after others were
        answered, or the run is interrupted, PartialResult carries the answered images (paid for).
        Ctrl-C sends nothing more; exchanges already under way end by their deadline, and jobs waiting
        (backoff, polling, their turn in the rate) stop at once. With `tasks` (job i is its key i), a task
        accepted by the service is recorded before it is polled, and one an earlier run recorded is resumed
        rather than bought again (engine.api_tasks)."""
        jobs = [(str(prompt), int(seed)) for prompt, seed in jobs]
        if not jobs:
            return []
        key = self._api_key()
        price = self.params.price
        budget = budget if budget is not None else self.budget
        affordable = budget.affordable(len(jobs), price) if budget is not None else len(jobs)
        if budget is not None and 0 < affordable < len(jobs):
            # buy what the limit pays for, then stop with the reason (the bought images are kept)
            images = self.generate_many(jobs[:affordable], budget=budget, tasks=tasks)
            reason = (f"spending {price * (len(jobs) - affordable):.4f} USD more would exceed --max-cost "
                      f"{budget.limit_usd:.4f} USD (spent {budget.spent:.4f} so far)")
            raise PartialResult(SourceError(self.name, reason), images + [None] * (len(jobs) - affordable))
        reserved = budget.charge(len(jobs), price) if budget is not None else 0.0
        done = 0

        def maybe_charged(problem: str) -> None:
            """An attempt the provider may have charged for: counted, and no retry past the limit."""
            log.warning("source %r: a submission failed after it was sent (%s): the provider may have charged "
                        "for it", self.name, problem)
            if budget is not None and not budget.maybe_charged(price):
                raise SourceError(self.name, f"{problem}; not retried: the provider may have charged for that "
                                             f"attempt, and another would exceed --max-cost "
                                             f"{budget.limit_usd:.4f} USD")
        stop = threading.Event()   # after a failure, jobs not yet sent are not sent
        abort = threading.Event()  # Ctrl-C: jobs stop waiting too
        refusals: list[Refused] = []  # jobs the API refused for their prompt (the source goes on)
        answered = [0]
        tally = threading.Lock()

        def run(client: httpx.Client, index: int, prompt: str, seed: int) -> Image.Image | None:
            if stop.is_set():
                return None
            try:
                slot = tasks.slot(index) if tasks is not None else None
                image = self._one(client, key, prompt, seed, abort, maybe_charged, slot)
                with tally:
                    answered[0] += 1
                return image
            except Refused as exc:  # this prompt's refusal; two before any answer: the source's (a bad model)
                with tally:
                    refusals.append(exc)
                    systematic = len(refusals) >= 2 and not answered[0]
                if systematic:
                    stop.set()
                    raise
                return None
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
            with api_http.client(self.params.timeout, restricted=self._restricted) as client, \
                    ThreadPoolExecutor(self.params.concurrency, thread_name_prefix=f"api-{self.name}") as pool:
                futures = [pool.submit(run, client, index, prompt, seed) for index, (prompt, seed) in enumerate(jobs)]
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
                    error = next(e for e in (f.exception() for f in futures) if e is not None)
                    if done and isinstance(error, SourceError):
                        raise PartialResult(error, got) from error
                    raise error
                got = [f.result() for f in futures]
                done = sum(1 for image in got if image is not None)
                if refusals:  # only refused jobs lack an image
                    partial = PartialResult(refusals[0], got)
                    partial.per_job = True
                    raise partial
                return cast(list[Image.Image], got)  # none is None: nothing refused, no stop
        finally:
            if budget is not None:
                budget.settle(reserved, done, price)

    def _resume(self, call: _Call, slot: Slot) -> bytes | None:
        """The image of the task an earlier run recorded for this job, or None (nothing recorded; the
        service no longer has it: then one warning, and the caller submits anew)."""
        record = slot.record
        if record is None:
            return None
        state = record.get("state")
        if record.get("protocol") != self.params.protocol or record.get("endpoint") != self._endpoint \
                or not isinstance(state, dict):
            slot.forget()  # not this source's task (its cache key says it is): never polled
            return None
        try:
            self._check_state(state)  # the host rules of a fresh answer's URLs, before anything is sent
        except Unresolved:  # the network, not the record: kept for the next run (this job fails, as on a lost poll)
            raise
        except SourceError as exc:
            log.warning("source %r: a task an earlier run recorded cannot be polled (%s): submitting it again",
                        self.name, str(exc).removeprefix(f"source {self.name!r}: "))
            slot.forget()
            return None
        try:
            return self._protocol.resume(call, state)
        except (Gone, Refused) as exc:
            reason = str(exc).removeprefix(f"source {self.name!r}: ")
            log.warning("source %r: a task an earlier run paid for is gone (%s): submitting it again", self.name,
                        reason)
            slot.forget()
            return None

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
             abort: threading.Event | None = None,
             maybe_charged: Callable[[str], None] | None = None, slot: Slot | None = None) -> Image.Image:
        call = _Call(self, client, key, abort or threading.Event(), maybe_charged, slot)
        with self._limiter.job():
            data = self._resume(call, slot) if slot is not None else None
            if data is None:
                try:
                    data = self._protocol.generate(call, prompt, seed)
                except Refused:  # the service's last word on this task: nothing to resume
                    if slot is not None:
                        slot.forget()
                    raise
        try:
            if not isinstance(data, (bytes, bytearray)):
                raise SourceError(self.name, "malformed answer: no image")
            if len(data) > api_answers.MAX_IMAGE_BYTES:
                raise SourceError(self.name, f"answer image is over the {api_answers.MAX_IMAGE_BYTES}-byte cap")
            image = _decode(bytes(data), self.name)
        except SourceError as exc:  # an answer came back, so the image was billed: counted, though unusable
            if slot is not None:
                slot.forget()  # finished: resuming would fetch the same unusable image
            if maybe_charged is not None:
                maybe_charged(str(exc).removeprefix(f"source {self.name!r}: "))
            raise
        with self._lock:
            self.calls += 1
            self.spent += self.params.price
        return image
