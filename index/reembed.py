"""Re-embedding: a second vector set beside the live one, then one atomic switch."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable

import numpy as np
from sqlalchemy import delete, func, select, update

from index import segments
from index import vectors as vx
from index.db import Database, insert_ignore, made, table
from index.errors import StoreError, StoreInputError, switched_embedder
from index.faults import crash_point
from index.keys import image_key, sha256_text
from index.layout import Layout, unlink_quietly
from index.schema import Claim, Description, Image, Source, StoreMeta, Vector

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from index.store import Store


def recorded_config(db: Database) -> dict | None:
    """The config the last `reembed` switch committed in the database (None if none did): it, not
    store.json (written after the commit), says which embedder the store uses."""
    with db.session() as s:
        recorded = s.scalar(select(StoreMeta.value).where(StoreMeta.key == "config")) if db.has_claims else None
    return json.loads(recorded) if recorded else None


def adopt_switched_embedder(db: Database, layout: Layout) -> None:
    """Finish a `reembed` switch that committed in the database but died before store.json followed."""
    config = recorded_config(db)
    if config is None:
        return
    if config["embedder"]["identity"] == layout.embedder_identity:
        return
    if not (layout.root / config["index_file"]).exists():
        raise db.damaged(f"records a switch to {config['embedder']['identity']} whose "
                         f"index {config['index_file']} is missing")
    layout.config = config
    if layout.writable:
        layout.save_config()


def images_without_vector(db: Database, layout: Layout, embedder: str) -> list[tuple[int, str, str]]:
    """(image id, file, sha256) of every image that has no vector under `embedder` yet (resumable work): a
    path, or an object's URL for a store with its images in object storage (objects.read_location reads
    both); the hash, so that a file altered or cut since it was stored is refused, never embedded."""
    have = select(Vector.image_id).where(Vector.embedder == embedder)
    with db.session() as s:
        rows = s.execute(select(Image.id, Image.path, Image.file_hash).where(Image.id.not_in(have))
                         .order_by(Image.id)).all()
    return [(image_id, layout.images.locator(path), file_hash) for image_id, path, file_hash in rows]


def add_vectors(db: Database, layout: Layout, embedder: str, image_ids: list[int], matrix: np.ndarray) -> int:
    """Store vectors of another embedder for existing images (idempotent); the live index is untouched."""
    matrix = np.asarray(matrix, np.float32)
    if len(image_ids) != len(matrix) or not np.isfinite(matrix).all():
        raise StoreInputError("vectors to store must be finite, one per image")
    if embedder == layout.embedder_identity:
        raise StoreInputError(f"the store already uses embedder {embedder}")
    added = 0
    with db.write_session() as s:  # holds the write lock: no image is removed meanwhile
        _reuse_superseded(s, embedder)
        alive = set(s.scalars(select(Image.id).where(Image.id.in_([int(i) for i in image_ids]))))
        for image_id, row in zip(image_ids, matrix):
            if int(image_id) not in alive:  # removed since it was listed: nothing to embed for
                continue
            data = row.tobytes()
            result = insert_ignore(s, Vector, {"image_id": int(image_id), "embedder": embedder, "data": data,
                                               "checksum": vx.checksum(data)}, ["image_id", "embedder"])
            added += made(result)
        s.commit()
    return added


def switch_embedder(store: "Store", embedder: dict, dim: int) -> int:
    """Make `embedder`'s vectors the live set, atomically. The new index file is written first; then
    one database transaction re-keys every image (keys name the embedder) and records the new
    config: that commit is the switch (an open after a crash here adopts it, see
    `adopt_switched_embedder`); store.json follows, and only then are the old vectors, old index and
    search files and the calibration (fitted in the old space) dropped. Refused while any image
    lacks a new vector. Returns the new index size. Other processes must reopen the store."""
    db, layout, live = store.db, store.layout, store.live
    identity = embedder["identity"]
    layout.require_writable()
    with layout.file_lock():
        recorded = recorded_config(db)
        if recorded is not None and recorded["embedder"]["identity"] != layout.embedder_identity:
            # another process switched since this one opened: the record below would name this process's old
            # embedder as superseded, and the one actually replaced stayed for good (its vectors, its index file)
            now = recorded["embedder"]["identity"]
            error = StoreError(f"another `resynth reembed` switched the store to {now} since this one opened it: "
                               f"run `resynth reembed` again (the {identity} vectors made so far are kept and "
                               "reused); nothing was switched")
            error.code = "store_switched"
            raise error
        # an earlier switch's leftovers first (the record below replaces its record); not the vectors of the
        # embedder this switch goes back to: this run just made them
        _drop_superseded(db, layout, keep=identity)
        left = images_without_vector(db, layout, identity)
        if left:
            raise StoreInputError(f"{len(left)} stored images have no {identity} vector yet: "
                                  "finish `resynth reembed` first")
        old_index = layout.index_path
        index_file = f"vectors-{sha256_text(identity)[:16]}.faiss"
        fresh, tomb_seq = live.rebuild_from_db((identity, int(dim)))
        vx.write_atomic(fresh, layout.root / index_file)
        config = {k: v for k, v in layout.config.items() if k != "calibration"}
        config.update(embedder=embedder, dim=int(dim), index_file=index_file)
        with db.write_session() as s:  # the write lock: no image can be added until the switch commits
            have = select(Vector.image_id).where(Vector.embedder == identity)
            late = s.scalar(select(func.count(Image.id)).where(Image.id.not_in(have)))
            if late:  # added by another process since the index was built: run reembed again
                raise StoreInputError(f"{late} image(s) were added during the switch and have no {identity} "
                                      "vector yet: run `resynth reembed` again to embed them and switch")
            rows = s.execute(select(Image.id, Image.role, Description.hash, Source.fingerprint, Source.name,
                                    Image.seed, Image.params_hash, Image.file_hash)
                             .join(Description, Image.description_id == Description.id)
                             .join(Source, Image.source_id == Source.id)).all()
            s.execute(update(Image), [{"id": row[0], "key": image_key(*row[1:], identity)} for row in rows])
            # what the switch supersedes, dropped below; recorded in the switch's commit so that a switch
            # stopped after it (Ctrl-C in the DELETE of every old vector, SIGKILL) is finished later, not leaked
            superseded = {"embedder": layout.embedder_identity, "index_file": old_index.name}
            recorded = {"config": json.dumps(config), SUPERSEDED: json.dumps(superseded)}
            if db.dialect.binds_database:  # the database's own binding (one store per database) moves too
                recorded.update(embedder=identity, dim=str(int(dim)))
            s.execute(delete(StoreMeta).where(StoreMeta.key.in_(list(recorded))))
            s.execute(table(StoreMeta).insert(), [{"key": k, "value": v} for k, v in recorded.items()])
            crash_point("reembed:before-commit")
            s.commit()  # the switch
        crash_point("reembed:after-commit")
        layout.save_config(config)  # now layout names the new embedder, dim and index file
        with live.lock:
            live.swap(fresh, tomb_seq)
            store.search_index.drop()
        _drop_superseded(db, layout)
        store.search_index.remove_files()
    return int(fresh.ntotal)


SUPERSEDED = "superseded"  # store_meta: the embedder and index file a committed switch replaced, until dropped


def pending_superseded(db: Database) -> dict | None:
    """What a committed switch replaced and has not dropped yet ({"embedder", "index_file", "vectors"}):
    a `reembed` stopped between its commit and its clean-up. None when nothing is left."""
    if not db.has_claims:
        return None
    with db.session() as s:
        value = s.scalar(select(StoreMeta.value).where(StoreMeta.key == SUPERSEDED))
        if not value:
            return None
        pending = json.loads(value)
        pending["vectors"] = 0 if pending.get("reused") else int(  # a reembed back to it keeps them
            s.scalar(select(func.count()).select_from(Vector).where(Vector.embedder == pending["embedder"])) or 0)
    return pending


def unswitched_vectors(db: Database, live: str) -> dict[str, int]:
    """Vectors of embedders neither live nor superseded: a `reembed` not switched yet (running, stopped, given
    up). A switch once deleted them; it keeps them now (they may be another process's work in progress), so
    verify shows them, or a given-up reembed's stayed unseen."""
    pending = pending_superseded(db)
    skip = {live} | ({pending["embedder"]} if pending and not pending.get("reused") else set())
    with db.session() as s:
        rows = s.execute(select(Vector.embedder, func.count()).where(Vector.embedder.not_in(skip))
                         .group_by(Vector.embedder).order_by(Vector.embedder)).all()
    return {str(name): int(count) for name, count in rows}


RUNNING = "reembed:"  # claims key prefix: a running `reembed`'s lease on its embedder, renewed every batch


def discard_unswitched(db: Database, live: str, dead: Callable[[str], bool] = lambda owner: False,
                       ) -> tuple[dict[str, int], list[str]]:
    """Delete the vectors of every `reembed` neither switched to nor running: a given-up one's stayed for good
    (`unswitched_vectors`). A running one (a live RUNNING lease whose owner is not `dead`: one killed holds its
    lease 15 minutes) keeps its own: the leases are read under the write lock, so a reembed that starts later
    adds after the delete. Returns (embedder -> vectors deleted, the embedders of running reembeds left alone)."""
    if not db.has_claims:
        return {}, []
    with db.write_session() as s:
        # read in the transaction: another process's switch since this one opened made `live` a given-up one
        recorded = s.scalar(select(StoreMeta.value).where(StoreMeta.key == "config"))
        now_live = json.loads(recorded)["embedder"]["identity"] if recorded else live
        if now_live != live:
            raise switched_embedder(now_live)
        value = s.scalar(select(StoreMeta.value).where(StoreMeta.key == SUPERSEDED))
        pending = json.loads(value) if value else None
        skip = {live} | ({pending["embedder"]} if pending and not pending.get("reused") else set())
        now = db.dialect.clock(s, write=True)
        running = sorted(key[len(RUNNING):] for key, owner in s.execute(
            select(Claim.key, Claim.owner).where(Claim.key.startswith(RUNNING, autoescape=True),
                                                 Claim.expires_at >= now)) if not dead(owner))
        rows = s.execute(select(Vector.embedder, func.count()).where(Vector.embedder.not_in(skip | set(running)))
                         .group_by(Vector.embedder).order_by(Vector.embedder)).all()
        for name, _ in rows:
            s.execute(delete(Vector).where(Vector.embedder == name))
        s.commit()
    return {str(name): int(count) for name, count in rows}, running


def reuse_superseded(db: Database, embedder: str) -> None:
    """A `reembed` back to the embedder a committed switch superseded reuses its vectors: from now on the
    clean-up (verify --repair, a rerun of reembed in another process) leaves them, or it deleted the vectors
    that run was resuming from and adding, and its switch then refused."""
    if db.has_claims and db.writable:
        with db.write_session() as s:
            _reuse_superseded(s, embedder)
            s.commit()


def _reuse_superseded(s: "Session", embedder: str) -> None:
    value = s.scalar(select(StoreMeta.value).where(StoreMeta.key == SUPERSEDED))
    pending = json.loads(value) if value else None
    if pending is not None and pending["embedder"] == embedder and not pending.get("reused"):
        s.execute(update(StoreMeta).where(StoreMeta.key == SUPERSEDED)
                  .values(value=json.dumps({**pending, "reused": True})))


def finish_superseded(store: "Store") -> dict | None:
    """Drop what a switch stopped after its commit left behind (`pending_superseded`): run by a rerun of
    `reembed` and by `verify --repair`. Returns what was pending, None if nothing was."""
    layout = store.layout
    if pending_superseded(store.db) is None:
        return None
    layout.require_writable()
    with layout.file_lock():
        return _drop_superseded(store.db, layout)


def _drop_superseded(db: Database, layout: Layout, keep: str | None = None) -> dict | None:
    """(Under the publish lock.) The superseded embedder's vectors (unless it is `keep`), then its index file
    and that file's segments and manifest, then the record: each step is safe to repeat, so a stop anywhere
    is resumed."""
    pending = pending_superseded(db)
    if pending is None or pending["embedder"] == layout.embedder_identity:  # never the live set
        return None
    live = recorded_config(db)
    if live is not None and live["embedder"]["identity"] != layout.embedder_identity:
        # another process switched since this one opened (the switches hold this lock too): its layout would name
        # the live set superseded, and its index path keeps the segments and manifest of no live index
        return None
    if pending["embedder"] != keep:
        with db.write_session() as s:  # read again under the write lock: a reembed back may have claimed them
            value = s.scalar(select(StoreMeta.value).where(StoreMeta.key == SUPERSEDED))
            if value and not json.loads(value).get("reused"):
                s.execute(delete(Vector).where(Vector.embedder == pending["embedder"]))
                s.commit()
    old = layout.root / str(pending["index_file"])
    if old.name != layout.index_path.name and old.parent == layout.root and old.name.endswith(".faiss"):
        unlink_quietly(old)
    segments.remove_orphans(layout.index_path)  # the old file's segments and manifest: no manifest names them
    with db.write_session() as s:
        s.execute(delete(StoreMeta).where(StoreMeta.key == SUPERSEDED))
        s.commit()
    return pending
