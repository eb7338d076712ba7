"""A paid task is paid for once: the durable records of tasks an images API accepted but we have not stored.

A submit-then-poll service (Black Forest Labs, Replicate, fal.ai, Adobe Firefly: `ImageProtocol.resumable`)
bills a task when it accepts it. Before this module, a run that stopped before the image was stored (the
polling loop past `--timeout`, a kill or Ctrl-C while polling, a failed download of the finished image)
lost the task, and the next run of the same resynthesis bought it again.

Now `call.accepted(state)` commits a record (the protocol, the endpoint, where to poll: never a key or a token)
in the store's `pending_tasks` table (`index.pending`), under the image's cache key less the embedder
(`Plan.task_key`: a `reembed` re-keys stored images, not tasks), before the first poll; it is deleted once the
image is committed. The next run that generates that image (the one holding its claim,
`engine.resynthesis.generate_once`: so one process at a time) resumes the task first: it polls the recorded URL
under the same rules as a fresh answer's (`_Call.poll`: public addresses only, the key only to the endpoint's
own site). A service that no longer has the task (HTTP 404/410, "Task not found", a failed task, an expired
image URL) costs one warning and a new submission. A record older than `RESUME_FOR_S`, or of another endpoint
or protocol, is dropped without a request. Any other failure (the deadline again, the network) keeps the record
for the next run.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from index.errors import StoreError
from index.pending import PendingTasks, pending_tasks

log = logging.getLogger("engine.api_source")

# How long a recorded task is worth resuming: services keep a task and its result for minutes to days
# (Replicate deletes an API prediction's files after an hour; BFL's result URLs last minutes). A resume past
# that costs one poll and a warning; a record older than this is dropped without a request. One definition.
RESUME_FOR_S = 24 * 3600.0
RECORD_VERSION = 1


class TaskBook:
    """The records of one batch of jobs of a source: job i is task key `keys[i]` (`Plan.task_key`)."""

    def __init__(self, pending: PendingTasks, source: str, keys: list[str]):
        self._pending = pending
        self.source = source
        self.keys = list(keys)
        self._found: dict[str, dict[str, Any]] = {}
        self._touched: set[str] = set()  # keys with a record written or found: dropped once stored
        self._lock = threading.Lock()
        self._warned = False  # a store that cannot record (a role without grants on the table) warns once a batch

    def load(self) -> None:
        """Read the records of this batch's keys, dropping those past `RESUME_FOR_S` unasked."""
        try:
            found = self._pending.get(self.keys)
        except StoreError as exc:  # the database is away: nothing to resume now, the generation goes on
            log.warning("source %r: cannot read its recorded tasks: %s", self.source, exc)
            return
        stale = [key for key, (_, age) in found.items() if age > RESUME_FOR_S]
        if stale:
            log.info("source %r: %d recorded task(s) older than %g h dropped unasked", self.source, len(stale),
                     RESUME_FOR_S / 3600)
            try:
                self._pending.drop(stale, older_than=RESUME_FOR_S)
            except StoreError as exc:  # a locked database: the fresh records read above are still resumed
                log.info("source %r: cannot drop %d old task records now: %s", self.source, len(stale), exc)
        with self._lock:
            self._found = {key: record for key, (record, age) in found.items() if age <= RESUME_FOR_S}
            self._touched.update(found)

    def slot(self, index: int) -> "Slot":
        return Slot(self, self.keys[index])

    def record(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._found.get(key)

    def save(self, key: str, protocol: str, endpoint: str, state: dict[str, Any]) -> None:
        record = {"v": RECORD_VERSION, "protocol": protocol, "endpoint": endpoint, "state": state}
        try:
            self._pending.put(key, self.source, record)
        except StoreError as exc:  # the task is under way: poll it now, it is only not resumable later
            with self._lock:
                first, self._warned = not self._warned, True
            log.log(logging.WARNING if first else logging.INFO, "source %r: cannot record an accepted task (a stop "
                    "before it is stored would buy it again): %s", self.source, exc)
            return
        with self._lock:
            self._found.pop(key, None)
            self._touched.add(key)

    def forget(self, key: str) -> None:
        with self._lock:
            self._found.pop(key, None)
            if key not in self._touched:
                return
            self._touched.discard(key)
        try:
            self._pending.drop([key])
        except StoreError as exc:  # left for the next run, which finds it gone or past RESUME_FOR_S
            log.info("source %r: cannot drop a finished task's record now: %s", self.source, exc)

    def stored(self, keys: list[str]) -> None:
        """`keys` are committed to the store: their records go (with every record past `RESUME_FOR_S`)."""
        with self._lock:
            done = [key for key in keys if key in self._touched]
            self._touched.difference_update(done)
        if not done:
            return
        try:
            self._pending.drop(done, older_than=RESUME_FOR_S)
        except StoreError as exc:  # harmless: a stored key is never resumed, and the record ages out
            log.info("source %r: cannot drop %d stored task records now: %s", self.source, len(done), exc)


class Slot:
    """One job's record, as `engine.api_exchange._Call` uses it."""

    def __init__(self, book: TaskBook, key: str):
        self.book, self.key = book, key

    @property
    def record(self) -> dict[str, Any] | None:
        return self.book.record(self.key)

    def save(self, protocol: str, endpoint: str, state: dict[str, Any]) -> None:
        self.book.save(self.key, protocol, endpoint, state)

    def forget(self) -> None:
        self.book.forget(self.key)


def book_for(generator: Any, store: Any, source: str, keys: list[str]) -> TaskBook | None:
    """A loaded TaskBook for a generator whose service bills tasks before they are ready, else None."""
    if not getattr(generator, "resumes_tasks", False):
        return None
    book = TaskBook(pending_tasks(store), source, keys)
    book.load()
    return book
