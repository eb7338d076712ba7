"""`verify`: check everything the store holds against everything else; `repair` what the database can fix."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import func, select

from index import reembed, segments
from index import vectors as vx
from index.db import RESTORE
from index.live import impossible_ids
from index.migrations import backfill_checksums, recount_vector_sets
from index.objects import sha256_bytes
from index.schema import Image, Vector
from index.sharing import why_denied

if TYPE_CHECKING:
    from index.store import Store


def verify(store: "Store", repair: bool = False, files: bool = True) -> dict:
    """Check everything; with `repair`, fix what can be fixed from the database. A JSON-able report.

    Checks: the database's integrity_check; vectors.faiss and the segments its manifest names
    (readable, type, dimension; segment files no manifest names) against the
    database: every id (missing, deleted, lost) and every vector against its checksum (a file that only
    lags, by ids committed or deleted since the last save, is a note: writers save after they commit); the stored
    vectors themselves (size, finite, checksum); with `files`, every image row's file (exists,
    sha256 = file_hash); unreferenced image files under images/; leftover `.*.tmp` files; expired
    claims; the search index (search.faiss + search.json: stale or unreadable is a problem, it is
    then ignored). Repair (writable only): rebuild vectors.faiss (and the search index) from the
    database, backfill checksums,
    remove unreferenced image files older than ORPHAN_GRACE_S, temp files of dead processes and
    expired claims. What the database itself lacks cannot be repaired here (restore it from a backup).
    """
    db, layout = store.db, store.layout
    layout.check_in_place()
    if repair:
        layout.require_writable()
    problems: list[str] = []
    report: dict = {"store": str(layout.root), "repair": repair, "problems": problems, "repaired": [], "notes": []}
    report["database"] = {"backend": db.dialect.backend, "location": db.label}
    with db.engine.connect() as conn:
        integrity = db.dialect.integrity(conn)
    # PostgreSQL checks its own pages ("ok" here); the rows are checked below on both
    report["database"]["integrity"] = "ok" if integrity == ["ok"] else integrity[:5]
    if integrity != ["ok"]:
        problems.append(f"{db.label} fails its integrity check: {RESTORE}")

    # the index files before the database: a vector in them was committed before they were saved, so it is in
    # any snapshot taken after (read the other way round, a writer's save in between read as data the database lost)
    with layout.between_saves() as between:  # files of a save in progress are not leftovers
        index_files = _read_index_files(store, between)
    with db.session() as s:
        db_ids, floor, image_rows, expired = _check_rows(store, s, report, problems)
        report["index"] = _check_index_file(store, s, index_files, db_ids, floor, problems, report["notes"])
    del index_files

    superseded = reembed.pending_superseded(db)
    if superseded is not None:  # left for good before; no damage (a note, as a lagging index is), only space
        report["superseded"] = superseded
        left = (f"the index file {superseded['index_file']} of {superseded['embedder']} (whose vectors a reembed "
                "back to it reuses)" if superseded.get("reused") else
                f"{superseded['vectors']} vectors of {superseded['embedder']} and its index file "
                f"{superseded['index_file']}")
        report["notes"].append(f"a `reembed` stopped after its switch left {left} behind "
                               "(a repair or the rerun of reembed drops them)")

    unswitched = reembed.unswitched_vectors(db, store.embedder_identity)
    if unswitched:  # no damage: kept for the rerun of that reembed, which resumes from them
        report["unswitched"] = unswitched
        report["notes"].append("vectors of a `reembed` not switched to (running, stopped or given up), kept for its "
                               "rerun (`resynth reembed --abandon` deletes them): "
                               + ", ".join(f"{count} of {name}" for name, count in unswitched.items()))

    # the search index on disk (read and checked again), and what this process serves; a rebuild writes its files
    # under the publish lock, so they are read under it too, or, while a rebuild holds it, are not judged
    with layout.between_saves() as between:
        on_disk, state = store.search_index.read(full=True)
        named = on_disk.infos.get("ivfdata") if on_disk is not None else None
        leftover = sorted(p.name for p in layout.root.glob("search-*.ivfdata") if p.name != named)
    search_entry = store.search_report()
    search_entry.update({"on_disk": state["state"], "problem": state.get("problem")})
    search_entry = {k: v for k, v in search_entry.items() if v is not None}
    report["search"] = search_entry
    if not between and (leftover or state["state"] == "ignored"):
        search_entry["in_progress"] = True
        report["notes"].append("a rebuild by another process is in progress: its search index files are checked "
                               "once it is done")
    elif state["state"] == "ignored":
        problems.append(f"search index {state.get('problem')}: ignored, exact search serves "
                        "(run `resynth rebuild`)")
    elif on_disk is not None and not on_disk.infos.get("meets_target", True):
        problems.append(f"search index recall@{on_disk.infos.get('k')} {on_disk.infos.get('recall'):.3f} is "
                        f"below its target {on_disk.infos.get('recall_target')}")
    if leftover and between:
        search_entry["leftover_lists_files"] = leftover
        problems.append(f"{len(leftover)} search lists files no search index names (a rebuild removes them)")
    del on_disk
    hidden = _unreadable_store_files(store)
    if hidden:
        report["unreadable_files"] = [p.name for p in hidden]
        problems.append(f"{len(hidden)} files of the store folder cannot be read by this user, so what needs them "
                        "(a calibration's arrays, the search index) goes without them (the first: "
                        f"{why_denied(hidden[0], layout.root, os.R_OK)})")

    if files:
        report["files"] = _verify_files(store, image_rows, problems)
    images = layout.images  # the store folder, or its object store (objects.py)
    referenced = {p for p in (images.own(x) for _, x, _ in image_rows) if p is not None}
    orphans, recent = images.orphans(referenced)
    temps, writing = layout.live_temp_files(deep=True)  # a live process's are its writes in progress
    report["orphans"] = {"count": len(orphans), "recent": len(recent),
                         "examples": [images.name(p) for p in orphans[:10]]}
    report["temp_files"] = {"count": len(temps), "examples": [str(p.relative_to(layout.root)) for p in temps[:10]]}
    if orphans:
        problems.append(f"{len(orphans)} image files under images/ belong to no row")
    elsewhere = layout.images_elsewhere()
    if elsewhere is not None:
        report["notes"].append(f"images/ leads outside the store (to {elsewhere}): files there that no row names "
                               "are neither reported nor removed")
    if temps:
        problems.append(f"{len(temps)} leftover temporary files")
    if writing:
        report["temp_files"]["in_progress"] = len(writing)
        report["notes"].append(f"{len(writing)} temporary files are being written by live processes (a write in "
                               "progress, not a leftover)")

    if repair:
        done = report["repaired"]
        if db.has_checksums:
            filled = backfill_checksums(db)
            if filled:
                done.append(f"checksums computed for {filled} vectors")
        if report["database"]["id_digest"] != "ok":
            recount_vector_sets(db)  # a writable open installed vector_sets: it is only stale
            done.append("the database's id digest recomputed")
        if superseded is not None and reembed.finish_superseded(store) is not None:
            done.append(f"dropped the index file of {superseded['embedder']} (its vectors are reused)"
                        if superseded.get("reused") else
                        f"dropped {superseded['vectors']} vectors of {superseded['embedder']} and its index file")
        done.append(f"index rebuilt from the database ({store.rebuild()} vectors)")  # one base, no segments
        before = set(report["index"]["segments"]["leftover_files"])
        gone = before - {p.name for p in segments.leftovers(store.index_path)}  # the rebuild removed them
        if gone:
            done.append(f"removed {len(gone)} index segment files")
        images.delete(orphans)
        if orphans:
            done.append(f"removed {len(orphans)} unreferenced image files")
        stale = layout.remove_stale_temp_files(deep=True)
        if stale:
            done.append(f"removed {len(stale)} temporary files of dead processes")
        if expired:
            store.claims.drop_expired()
            done.append(f"dropped {expired} expired claims")
    report["ok"] = not problems
    return report


def _check_rows(store: "Store", s, report: dict, problems: list[str]):
    """The stored vectors themselves (size, finite, checksum) and the counts of the database."""
    db, live = store.db, store.live
    embedder, dim = store.embedder_identity, store.dim
    bad_rows, unchecked = [], 0
    query = select(Vector.id, Vector.data, Vector.checksum if db.has_checksums else Vector.id)
    for vid, data, check in s.execute(query.where(Vector.embedder == embedder)).yield_per(5000):
        vec = np.frombuffer(data, np.float32) if len(data) % 4 == 0 else np.zeros(0, np.float32)
        if vec.shape != (dim,) or not np.isfinite(vec).all():
            bad_rows.append(vid)
        elif not db.has_checksums or check is None:
            unchecked += 1
        elif check != vx.checksum(data):
            bad_rows.append(vid)
    db_ids = live.stored.db_vector_ids(s)
    _, floor = live.stored.tomb_state(s)
    image_rows = s.execute(select(Image.id, Image.path, Image.file_hash)).all()
    without_vector = s.scalar(select(func.count(Image.id)).where(~Image.id.in_(
        select(Vector.image_id).where(Vector.embedder == embedder))))
    expired = store.claims.expired(s)
    report["database"].update({"vectors": len(db_ids), "bad_vectors": len(bad_rows),
                               "bad_vector_ids": bad_rows[:10], "vectors_without_checksum": unchecked,
                               "images": len(image_rows), "images_without_vector": without_vector,
                               "expired_claims": expired})
    if bad_rows:
        problems.append(f"{len(bad_rows)} stored vectors are malformed or fail their checksum: {db.restore_hint}")
    if without_vector:
        problems.append(f"{without_vector} images have no vector (re-ingest them)")
    digest = live.stored.db_digest(s)
    report["database"]["id_digest"] = ("absent" if digest is None else
                                       "ok" if digest == vx.id_digest(db_ids) else "stale")
    if report["database"]["id_digest"] != "ok":
        problems.append(f"the database's id digest (vector_sets) is {report['database']['id_digest']}: "
                        "every open reads all ids (repair recomputes it)")
    return db_ids, floor, image_rows, expired


def _read_index_files(store: "Store", between_saves: bool) -> tuple:
    """The index on disk as verify checks it: (index or None, why not, its manifest's summary, unreadable).
    Unnamed segment files are leftovers only `between_saves` (else in "in_progress": a save is writing them)."""
    index, why = vx.read_checked(store.index_path, store.dim, mapped=True)
    parts = segments.summary(store.index_path)
    unreadable = os.path.isfile(store.index_path) and not os.access(store.index_path, os.R_OK)
    # an index file this user may not read names no segment it can see: they are not leftovers
    unnamed = [] if unreadable else [p.name for p in segments.leftovers(store.index_path)]
    parts["leftover_files"], parts["in_progress"] = (unnamed, []) if between_saves else ([], unnamed)
    return index, why, parts, unreadable


def _check_index_file(store: "Store", s, on_disk: tuple, db_ids: np.ndarray, floor: int, problems: list[str],
                      notes: list[str]) -> dict:
    """The index files read before the database (`_read_index_files`) against it: ids (missing, deleted,
    lost) and content."""
    live = store.live
    index, why, parts, unreadable = on_disk
    entry: dict = {"path": str(store.index_path), "readable": index is not None,
                   "problem": why if why else (None if index is not None else "missing")}
    entry["segments"] = parts
    if index is not None and index.problem:
        parts["manifest"] = index.problem
        problems.append(f"index segments unusable ({index.problem}): left out, the next save writes a new base")
    if parts["leftover_files"]:
        problems.append(f"{len(parts['leftover_files'])} index segment files no manifest names "
                        "(the next save or a repair removes them)")
    if parts["in_progress"]:
        notes.append(f"a save by another process is in progress: {len(parts['in_progress'])} index files it has "
                     "not published yet")
    impossible = impossible_ids(vx.index_ids(index)) if index is not None else 0
    if impossible:
        problems.append(f"{impossible} index ids are ones no database gives (the index file's id map is damaged): "
                        "repair rebuilds the index from the database")
    if index is not None:
        have = vx.index_ids(index)
        have = have[(have >= 1) & (have < vx.DIGEST_MOD)]
        extra = np.setdiff1d(have, db_ids)
        deleted = live.stored.deleted(s, extra, floor) if len(extra) else extra
        lost = np.setdiff1d(extra, deleted)
        missing = np.setdiff1d(db_ids, have)
        bad = live.stored.content_problems(s, index, np.intersect1d(have, db_ids))
        misnumbered = bool(len(lost)) and live.stored.misnumbered(s, index, lost, missing)
        entry.update({"vectors": int(index.ntotal), "missing": len(missing), "deleted": len(deleted),
                      "lost_from_database": 0 if misnumbered else len(lost), "lost_ids": lost[:10].tolist(),
                      "misnumbered": len(lost) if misnumbered else 0, "impossible_ids": impossible,
                      "bad_content": len(bad), "bad_ids": bad[:10]})
        if misnumbered:
            problems.append(f"{len(lost)} index vectors carry ids the database never gave them (the index file's id "
                            "map is damaged): repair rebuilds the index from the database")
        elif len(lost):
            problems.append(f"{len(lost)} index vectors are not in the database (it lost data): "
                            f"{store.db.restore_hint}, or repair to rebuild the index from the database as it is")
        if bad:
            problems.append(f"{len(bad)} index vectors differ from the database")
        if len(missing) or len(deleted):
            # not damage: a writer commits rows before it publishes the file (a server saves every few
            # seconds, a killed one never did), and every open and save catches up from the database
            entry["lag"] = {"missing": len(missing), "deleted": len(deleted)}
            notes.append(f"index file lags the database (+{len(missing)} -{len(deleted)}): vectors committed "
                         "since the last save; the next open or save adds them")
    elif why:
        problems.append(f"index file {entry['problem']}")
    elif unreadable:
        entry["problem"] = "unreadable by this user"  # not damaged: answers come from the database meanwhile
        problems.append(f"the index file was not checked: {why_denied(store.index_path, store.root, os.R_OK)}")
    elif store.index_path.exists() or store.index_path.is_symlink():  # a folder, a device, a dangling link
        entry["problem"] = "not a file"
        problems.append(f"{store.index_path} is not a file (a folder or a broken link?): every save fails until "
                        "it is moved away")
    elif len(db_ids):
        # absent, not damaged: a store's first writer killed (or its folder moved) before its first save; the
        # next open builds it from the database (it was exit 4, "index file missing", after every such kill)
        entry["lag"] = {"missing": len(db_ids), "deleted": 0}
        notes.append(f"index file not written yet (+{len(db_ids)} vectors committed): the next open builds it "
                     "from the database")
    return entry


def _verify_files(store: "Store", image_rows, problems: list[str]) -> dict:
    missing, mismatched, unreadable = [], [], []
    files = store.layout.images  # the store folder, or its object store (objects.py)
    for _, stored, file_hash in image_rows:
        try:
            data = files.read(stored)
        except PermissionError:  # another user's file this one may not read: unchecked, not damaged
            unreadable.append(stored)
            continue
        if data is None:
            missing.append(stored)
        elif sha256_bytes(data) != file_hash:
            mismatched.append(stored)
    if missing:  # rows deleted since the snapshot (`source remove` meanwhile) had their files deleted after
        still: set[str] = set()
        with store.db.session() as s:
            for start in range(0, len(missing), 1000):
                still.update(s.scalars(select(Image.path).where(Image.path.in_(missing[start:start + 1000]))))
        missing = [stored for stored in missing if stored in still]
    if missing:
        problems.append(f"{len(missing)} image files are missing")
    if mismatched:
        problems.append(f"{len(mismatched)} image files differ from their recorded sha256")
    found = {"checked": len(image_rows) - len(unreadable), "missing": len(missing), "missing_examples": missing[:10],
             "mismatched": len(mismatched), "mismatched_examples": mismatched[:10]}
    if unreadable:
        first = why_denied(store.layout.file_path(unreadable[0]), store.root, os.R_OK)
        problems.append(f"{len(unreadable)} image files cannot be read by this user, so were not checked (the "
                        f"first: {first})")
        found.update({"unreadable": len(unreadable), "unreadable_examples": unreadable[:10]})
    return found


def _unreadable_store_files(store: "Store") -> list[Path]:
    """Files in the store folder (the index file and the database are reported on their own) that this
    user may not read: a teammate's calibration array or search file made before files were shared."""
    skip = {store.index_path.name, store.layout.db_path.name}
    try:
        entries = sorted(os.scandir(store.layout.root), key=lambda entry: entry.name)
    except OSError:
        return []
    return [Path(entry.path) for entry in entries if entry.name not in skip and not entry.name.startswith(".")
            and entry.is_file(follow_symlinks=False) and not os.access(entry.path, os.R_OK)]
