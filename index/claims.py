"""Single-flight work across processes: a claim row with a lease per piece of work that must happen
once (the generation of one cache key), so a second process waits and reuses rather than repeats."""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import Callable

from sqlalchemy import delete, func, select

from index.db import Database, execute, upsert
from index.errors import StoreError
from index.schema import Claim

log = logging.getLogger("resynth.store")
RELEASE_RETRY_S = 1.0  # between tries of a release the database refused (it restarts, its lock is held)
RELEASE_RETRY_FOR_S = 3600.0  # past this, the leases have expired (claims last 900 s) and others take over


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a lease holder, the writer of a temporary file)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


class Claims:
    def __init__(self, db: Database, existing_keys: Callable[[list[str]], dict[str, int]]):
        self.db = db
        self.existing_keys = existing_keys
        # owner -> {key: generation} of keys whose release failed (retried in the background); a key taken
        # back and refused again gets a new generation, so the retrier drops only what it released
        self._pending: dict[str, dict[str, int]] = {}
        self._generation = itertools.count()
        self._pending_lock = threading.Lock()
        self._retrier: threading.Thread | None = None

    def claim(self, keys: list[str], owner: str, lease_seconds: float = 600.0) -> list[str]:
        """Take (or renew) leases on `keys`; returns those `owner` now holds: free ones, expired ones
        and its own. After claiming, check `existing_keys` again: a key may have been stored meanwhile."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return []
        with self._pending_lock:  # taken back: a release still pending must not drop the new lease
            pending = self._pending.get(owner, {})
            taken = [key for key in keys if pending.pop(key, None) is not None]
            if not pending:
                self._pending.pop(owner, None)
        table = Claim.__table__
        try:
            with self.db.write_session() as s:
                now = self.db.dialect.clock(s, write=True)  # the store's clock, not this process's wall clock
                for key in keys:
                    upsert(s, Claim, {"key": key, "owner": owner, "expires_at": now + lease_seconds}, ["key"],
                           ["owner", "expires_at"], (table.c.expires_at < now) | (table.c.owner == owner))
                held: set[str] = set()
                for k in range(0, len(keys), 500):
                    held.update(s.scalars(select(Claim.key).where(Claim.key.in_(keys[k:k + 500]),
                                                                  Claim.owner == owner)))
                s.commit()
        except BaseException:
            if taken:  # refused (StoreBusy): the old leases stand, so their release is retried as before
                self._retry_later(taken, owner)
            raise
        return [key for key in keys if key in held]

    def release(self, keys: list[str], owner: str) -> int:
        """Give up `owner`'s leases on `keys` (stored or abandoned work); returns how many were held.

        A release the database refuses (a PostgreSQL restart during a generation, a held write lock) is
        retried in the background until it goes through, and the error raised: otherwise the claims of
        this live process held its keys for their whole lease, and another process asking for them
        (the other workers of `serve --workers`) waited that long (15 minutes, measured)."""
        keys = list(dict.fromkeys(keys))
        try:
            return self._delete(keys, owner)
        except StoreError:
            self._retry_later(keys, owner)
            raise

    def _delete(self, keys: list[str], owner: str) -> int:
        released = 0
        with self.db.write_session() as s:
            for k in range(0, len(keys), 500):
                released += execute(s, delete(Claim).where(Claim.key.in_(keys[k:k + 500]),
                                                           Claim.owner == owner)).rowcount
            s.commit()
        return released

    def _retry_later(self, keys: list[str], owner: str) -> None:
        with self._pending_lock:
            pending = self._pending.setdefault(owner, {})
            for key in keys:
                pending[key] = next(self._generation)
            if self._retrier is not None and self._retrier.is_alive():
                return
            self._retrier = threading.Thread(target=self._retry, name="resynth-claims-release", daemon=True)
            self._retrier.start()

    def _retry(self) -> None:
        deadline = time.monotonic() + RELEASE_RETRY_FOR_S
        while time.monotonic() < deadline:
            time.sleep(RELEASE_RETRY_S)
            with self._pending_lock:  # a copy: the lock is not held while the database waits
                todo = {owner: dict(keys) for owner, keys in self._pending.items()}
            try:
                for owner, keys in todo.items():
                    self._release_pending(owner, keys)
            except StoreError:
                continue  # not yet: try again
            except Exception:  # noqa: BLE001 - a bug must not kill the process from a background thread
                log.exception("releasing claims")
                return
            with self._pending_lock:
                if not self._pending:
                    self._retrier = None
                    return

    def _release_pending(self, owner: str, keys: dict[str, int]) -> None:
        """Delete the leases of `keys` (key -> generation) still pending, then drop them from the list.
        A key that claim() took back since the copy keeps its new lease: it is skipped once off the list,
        and the delete matches only the lease as read here (a renewal committed meanwhile changed it)."""
        names = sorted(keys)
        with self.db.write_session() as s:
            seen: dict[str, float] = {}
            for k in range(0, len(names), 500):
                seen.update((key, expires) for key, expires in s.execute(select(Claim.key, Claim.expires_at).where(
                    Claim.key.in_(names[k:k + 500]), Claim.owner == owner)))
            with self._pending_lock:
                now_pending = self._pending.get(owner, {})
                due = [key for key in names if now_pending.get(key) == keys[key]]
            for key in due:
                if key in seen:
                    execute(s, delete(Claim).where(Claim.key == key, Claim.owner == owner,
                                                   Claim.expires_at == seen[key]))
            s.commit()
        with self._pending_lock:
            now_pending = self._pending.get(owner, {})
            for key in due:
                if now_pending.get(key) == keys[key]:
                    del now_pending[key]
            if not now_pending:
                self._pending.pop(owner, None)

    def pending_releases(self) -> int:
        """Keys whose release the database refused and a background thread still retries."""
        with self._pending_lock:
            return sum(len(keys) for keys in self._pending.values())

    def live_claims(self, keys: list[str]) -> dict[str, str]:
        """key -> owner of the unexpired leases among `keys`."""
        keys = list(dict.fromkeys(keys))
        if not self.db.has_claims:
            return {}
        out: dict[str, str] = {}
        with self.db.session() as s:
            now = self.db.dialect.clock(s)
            for k in range(0, len(keys), 500):
                out.update(dict(s.execute(select(Claim.key, Claim.owner).where(
                    Claim.key.in_(keys[k:k + 500]), Claim.expires_at >= now)).all()))
        return out

    def wait_for_keys(self, keys: list[str], timeout: float = 600.0, poll: float = 0.25) -> dict[str, int]:
        """Wait while other processes generate `keys`: returns key -> vector id of the stored ones as
        soon as every key is stored, or none of the missing ones has a live claim (released, expired:
        the caller claims and makes them), or `timeout` seconds passed (whatever is stored by then)."""
        keys = list(dict.fromkeys(keys))
        deadline = time.monotonic() + timeout
        while True:
            found = self.existing_keys(keys)
            rest = [k for k in keys if k not in found]
            if not rest or not self.live_claims(rest) or time.monotonic() >= deadline:
                return found
            time.sleep(max(0.0, min(poll, deadline - time.monotonic())))

    def expired(self, s) -> int:
        """How many leases have expired (in session `s`)."""
        if not self.db.has_claims:
            return 0
        return s.scalar(select(func.count()).select_from(Claim).where(Claim.expires_at < self.db.dialect.clock(s)))

    def drop_expired(self) -> None:
        with self.db.write_session() as s:
            s.execute(delete(Claim).where(Claim.expires_at < self.db.dialect.clock(s, write=True)))
            s.commit()
