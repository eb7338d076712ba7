"""Records of paid work an outside service has accepted but the store does not hold yet.

An images API that answers "accepted, poll here" has billed the image before it is ready. If the process then
stops (the polling deadline, a kill, a failed download), the next run would pay again. A pending task is an
opaque JSON record (the engine's: where to poll, never a secret) under a key the engine gives (the image's
cache key less the embedder), written (committed) before polling starts and deleted once the image is stored,
so a later process, on this machine or another, resumes the task instead. The store knows nothing of what a
record means; ages are measured on the store's shared clock (`Dialect.clock`), as claims' leases are.

Who may resume a key is settled by its claim (index.claims): only the claimant generates it.
"""
from __future__ import annotations

import json
from typing import Any

from sqlalchemy import delete, func, select

from index.db import Database, execute, upsert
from index.schema import PendingTask

_CHUNK = 500


class PendingTasks:
    """The `pending_tasks` table of one store's database (`pending_tasks(store)`)."""

    def __init__(self, db: Database):
        self.db = db

    def put(self, key: str, source: str, record: dict[str, Any]) -> None:
        """Record (or replace) the task that will become `key`, committed when this returns."""
        if not self.db.has_pending_tasks:  # an older database opened without its upgrade: nothing to resume
            return
        text = json.dumps(record, sort_keys=True, separators=(",", ":"))
        with self.db.write_session() as s:
            now = self.db.dialect.clock(s, write=True)
            upsert(s, PendingTask, {"key": key, "source": source, "record": text, "created_at": now}, ["key"],
                   ["source", "record", "created_at"], None)
            s.commit()

    def get(self, keys: list[str]) -> dict[str, tuple[dict[str, Any], float]]:
        """key -> (record, age in seconds) of the tasks recorded for `keys`; unreadable records are left out."""
        keys = list(dict.fromkeys(keys))
        if not keys or not self.db.has_pending_tasks:
            return {}
        out: dict[str, tuple[dict[str, Any], float]] = {}
        with self.db.session() as s:
            now = self.db.dialect.clock(s)
            for k in range(0, len(keys), _CHUNK):
                rows = s.execute(select(PendingTask.key, PendingTask.record, PendingTask.created_at)
                                 .where(PendingTask.key.in_(keys[k:k + _CHUNK])))
                for key, text, created in rows:
                    try:
                        record = json.loads(text)
                    except ValueError:
                        continue
                    if isinstance(record, dict):
                        out[key] = (record, max(0.0, now - created))
        return out

    def drop(self, keys: list[str], older_than: float | None = None) -> int:
        """Delete the records of `keys`, and with `older_than` (seconds) every record older than that;
        returns how many went."""
        keys = list(dict.fromkeys(keys))
        if not self.db.has_pending_tasks or (not keys and older_than is None):
            return 0
        dropped = 0
        with self.db.write_session() as s:
            for k in range(0, len(keys), _CHUNK):
                dropped += execute(s, delete(PendingTask).where(PendingTask.key.in_(keys[k:k + _CHUNK]))).rowcount
            if older_than is not None:
                cutoff = self.db.dialect.clock(s, write=True) - older_than
                dropped += execute(s, delete(PendingTask).where(PendingTask.created_at < cutoff)).rowcount
            s.commit()
        return dropped

    def by_source(self, within: float | None = None) -> dict[str, int]:
        """How many tasks are recorded, per source name (`resynth stats`: bought, image not stored yet); with
        `within` (seconds) only those younger than that (an older one is dropped unasked, not resumed)."""
        if not self.db.has_pending_tasks:
            return {}
        with self.db.session() as s:
            query = select(PendingTask.source, func.count()).group_by(PendingTask.source)
            if within is not None:
                query = query.where(PendingTask.created_at >= self.db.dialect.clock(s) - within)
            return {str(name): int(n) for name, n in s.execute(query)}

    def count(self) -> int:
        """How many tasks are recorded."""
        if not self.db.has_pending_tasks:
            return 0
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(PendingTask)) or 0)


def pending_tasks(store: Any) -> PendingTasks:
    """The pending-task records of an open `index.store.Store`."""
    return PendingTasks(store.db)
