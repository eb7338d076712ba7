"""Making, probing and upgrading the store's database schema (both backends, through `db.Dialect`).

Steps of an older database's upgrade, each idempotent: the `checksum` column (backfilled), tombstones
(ids allocated before them count as deleted), claims, the trigger-kept id digest (`vector_sets`), and
(PostgreSQL) a 64-bit `images.seed` (it was INTEGER: 32 bits, short of the seeds manifests carry), and
`pending_tasks` (index.pending).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import cast

from sqlalchemy import Table, delete, func, select, update
from sqlalchemy.exc import DBAPIError

from index import vectors as vx
from index.db import Database, table
from index.errors import StoreDamaged, StoreDenied, StoreInputError
from index.schema import ADDED_TABLES, CORE_TABLES, Base, PendingTask, StoreMeta, Vector, VectorSet

log = logging.getLogger("resynth.store")
PENDING = PendingTask.__table__
SCHEMA = 1  # store_meta "schema": a database a newer resynth changed in a way this one cannot read says more


def _mix(v: str) -> str:
    return f"((({v}.id % {vx.MIX_MOD}) * {vx.MIX_MUL} + {vx.MIX_ADD}) % {vx.MIX_MOD})"


def _add(v: str) -> str:
    m = vx.DIGEST_MOD
    return (f"UPDATE vector_sets SET n = n + 1, id_sum = (id_sum + {v}.id % {m}) % {m}, "
            f"id_mix = (id_mix + {_mix(v)}) % {m} WHERE embedder = {v}.embedder;")


def _drop(v: str) -> str:
    m = vx.DIGEST_MOD
    return (f"UPDATE vector_sets SET n = n - 1, id_sum = (id_sum + {m} - {v}.id % {m}) % {m}, "
            f"id_mix = (id_mix + {m} - {_mix(v)}) % {m} WHERE embedder = {v}.embedder;")


def vector_set_ddl(db: Database) -> list[str]:
    """Triggers that keep vector_sets (count, id sum, id mix sum: index.vectors.id_digest) in step with
    every change to `vectors`, cascades and other tools' writes included."""
    return db.dialect.vector_set_ddl(_add, _drop)


def _bind(conn, embedder: str, dim: int) -> None:
    conn.execute(table(StoreMeta).insert().values(key="embedder", value=embedder))
    conn.execute(table(StoreMeta).insert().values(key="dim", value=str(dim)))


def create_schema(db: Database, embedder: str, dim: int, images: str | None = None) -> None:
    with db.write_engine.begin() as conn:
        Base.metadata.create_all(conn, tables=[cast(Table, t) for t in Base.metadata.sorted_tables if t is not PENDING])
        if "pending_tasks" not in db.dialect.tables(conn):  # a folder joining an older database: maybe not ours
            _add_pending_tasks(conn)
        if conn.scalar(select(StoreMeta.value).where(StoreMeta.key == "tombstones_from")) is None:
            conn.execute(table(StoreMeta).insert().values(key="tombstones_from", value="0"))
        if conn.scalar(select(StoreMeta.value).where(StoreMeta.key == "schema")) is None:
            conn.execute(table(StoreMeta).insert().values(key="schema", value=str(SCHEMA)))
        if db.dialect.binds_database:  # one store per database: a second folder may join it, same embedder only
            bound = conn.scalar(select(StoreMeta.value).where(StoreMeta.key == "embedder"))
            if bound is None:
                _bind(conn, embedder, dim)
                conn.execute(table(StoreMeta).insert().values(key="images", value=images or ""))
            elif bound != embedder:
                raise StoreInputError(f"{db.label} already holds a store bound to embedder {bound}; "
                                      "use another database for another embedder")
            else:
                _check_images(db, conn, images)


def _check_images(db: Database, conn, images: str | None) -> None:
    """A folder joining a database's store keeps its images where the store does: rows name images by a
    path relative to the store folder or its object store, so a join that keeps them elsewhere (its own
    folder beside a bucket, another bucket) read none of the store's images and wrote images no other
    folder of the store could read."""
    recorded = conn.scalar(select(StoreMeta.value).where(StoreMeta.key == "images"))
    if recorded is not None and recorded != (images or ""):
        raise StoreInputError(f"{db.label} holds a store whose images are in {recorded or 'its store folders'}, "
                              f"not {images or 'this folder'}: init this folder with the same --images, or use "
                              "another database")


def _check_binding(db: Database, conn, embedder: str, dim: int) -> None:
    """The database's store must be the one store.json describes."""
    rows = dict(conn.execute(select(StoreMeta.key, StoreMeta.value)
                             .where(StoreMeta.key.in_(["embedder", "dim", "config"]))).all())
    switched = json.loads(rows["config"])["embedder"]["identity"] if rows.get("config") else None
    if switched is not None and switched == rows.get("embedder"):
        return  # a `reembed` switch store.json has not caught up with yet: adopted right after the probe
    if rows.get("embedder") not in (None, embedder) or rows.get("dim") not in (None, str(dim)):
        raise StoreInputError(f"{db.label} holds a store bound to embedder {rows.get('embedder')} "
                              f"({rows.get('dim')}-d), not this store's {embedder}")


def _check_schema(db: Database, conn) -> None:
    """Refuse a database a newer resynth has changed (store_meta "schema" above SCHEMA): read by this one,
    its rows would be misread and its writes would miss what the newer schema keeps (none: schema 1)."""
    value = conn.scalar(select(StoreMeta.value).where(StoreMeta.key == "schema"))
    if value is None:
        return
    try:
        version = int(value)
    except ValueError:
        raise db.damaged(f"gives its schema version as {value!r}, not a number") from None
    if version > SCHEMA:
        raise StoreInputError(f"{db.label} was written by a newer resynth (schema version {version}; this resynth "
                              f"reads schema version {SCHEMA} and older): upgrade resynth to open this store")


def check_store_json(db: Database, config_path: Path, embedder: str, dim: int) -> None:
    """store.json must describe the database's vectors: one edited by hand (another embedder, another vector
    size) was refused as a database that lost data, with advice to restore metadata.sqlite from a backup, or
    as a damaged vector; and `verify --repair` rebuilt an empty index for an embedder the database lacks.
    Cheap: the trigger-kept per-embedder counts, and the newest vector's size (a reembed in progress stores
    another embedder's vectors: then that one says nothing here)."""
    if not db.has_vector_sets:
        return
    with db.session() as s:
        counts = {name: n for name, n in s.execute(select(VectorSet.embedder, VectorSet.n)) if n > 0}
        newest = s.execute(select(Vector.embedder, Vector.data).order_by(Vector.id.desc()).limit(1)).first()
    if counts and embedder not in counts:
        others = ", ".join(sorted(counts))
        raise StoreDamaged(f"{config_path} names embedder {embedder}, of which {db.label} holds no vector (it holds "
                           f"vectors of {others}): store.json was edited or belongs to another store; restore it "
                           "from a backup (`resynth reembed` moves a store to another embedder)")
    if newest is not None and newest[0] == embedder and len(newest[1]) != 4 * dim:
        raise StoreDamaged(f"{config_path} gives the vector size {dim}, but the vectors {db.label} holds for "
                           f"{embedder} have {len(newest[1]) // 4} components: store.json was edited; set \"dim\" "
                           f"back to {len(newest[1]) // 4} or restore it from a backup")


def has_vector_set_triggers(db: Database, conn) -> bool:
    """Whether the triggers that keep vector_sets are installed (all of them)."""
    return set(db.dialect.trigger_names) <= db.dialect.triggers(conn)


def probe(db: Database, embedder: str, dim: int) -> None:
    """Cheap sanity of the source of truth: the store's tables, readable, and (SQLite) quick_check if
    small. PostgreSQL checks its own pages; there the store's binding (embedder) is checked instead.
    Records on `db` which of the later additions the database has."""
    try:
        with db.engine.connect() as conn:
            tables = db.dialect.tables(conn)
            missing = [t for t in CORE_TABLES if t not in tables]
            if missing:
                raise db.damaged(f"lacks the store's tables ({', '.join(missing)})")
            conn.exec_driver_sql("SELECT max(id) FROM vectors").all()
            conn.exec_driver_sql("SELECT max(id) FROM images").all()
            result = db.dialect.probe_integrity(conn, db)
            if result != "ok":
                raise db.damaged(f"fails its integrity check ({result.splitlines()[0]})")
            columns = db.dialect.columns(conn, "vectors")
            triggers = has_vector_set_triggers(db, conn)
            narrow = db.dialect.narrow_seeds(conn)
            if "store_meta" in tables:
                _check_schema(db, conn)
            if db.dialect.binds_database and "store_meta" in tables:
                _check_binding(db, conn, embedder, dim)
        db.has_checksums = "checksum" in columns
        db.has_tombstones = "deleted_vectors" in tables
        db.has_claims = "claims" in tables
        db.has_pending_tasks = "pending_tasks" in tables
        db.has_vector_sets = "vector_sets" in tables and triggers
        db.has_wide_seeds = not narrow
    except DBAPIError as exc:
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__
        raise db.dialect.unreadable(db, reason) from None


def migrate(db: Database, embedder: str, dim: int) -> None:
    """Bring a database made by an older resynth up to date (writable opens only): checksum column
    (backfilled), tombstones, claims, vector_sets, 64-bit seeds. Ids allocated before tombstones existed
    count as deleted. A read-only open keeps the old shape: it reads the same."""
    if db.has_checksums and db.has_tombstones and db.has_claims and db.has_vector_sets and db.has_wide_seeds \
            and db.has_pending_tasks:
        return
    wide = True
    with db.write_engine.begin() as conn:
        if "checksum" not in db.dialect.columns(conn, "vectors"):
            conn.exec_driver_sql("ALTER TABLE vectors ADD COLUMN checksum VARCHAR(32)")
        if db.dialect.narrow_seeds(conn):  # checked again under the write lock: another open may have done it
            wide = _widen_seeds(conn)
        tables = db.dialect.tables(conn)
        Base.metadata.create_all(conn, tables=[cast(Table, t) for t in ADDED_TABLES if t is not PENDING])
        pending = "pending_tasks" in tables or _add_pending_tasks(conn)
        if conn.scalar(select(StoreMeta.value).where(StoreMeta.key == "tombstones_from")) is None:
            floor = max(db.dialect.id_floor(conn, tables), int(conn.scalar(select(func.max(Vector.id))) or 0))
            conn.execute(table(StoreMeta).insert().values(key="tombstones_from", value=str(floor)))
        if db.dialect.binds_database and \
                conn.scalar(select(StoreMeta.value).where(StoreMeta.key == "embedder")) is None:
            _bind(conn, embedder, dim)
        if not has_vector_set_triggers(db, conn):  # in the same transaction: no insert slips past the count
            for statement in vector_set_ddl(db):
                db.dialect.raw_sql(conn, statement)
            recount_vector_sets(db, conn)
    db.has_checksums = db.has_tombstones = db.has_claims = db.has_vector_sets = True
    db.has_wide_seeds, db.has_pending_tasks = wide, pending
    backfill_checksums(db)


def _add_pending_tasks(conn) -> bool:
    """CREATE the pending_tasks table (index.pending); False (the store works without it: paid tasks are then
    not resumable across runs) when this role may write the tables but not create one."""
    try:
        with conn.begin_nested():  # a refused CREATE must not abort the upgrade's other steps
            Base.metadata.create_all(conn, tables=[cast(Table, PENDING)])
    except StoreDenied:
        log.warning("the store's database lacks the pending_tasks table and this role may not create it: a paid "
                    "task stopped before its image is stored is bought again (the store's owner adds the table by "
                    "opening the store writable once, then grants this role SELECT, INSERT, UPDATE, DELETE on "
                    "pending_tasks)")
        return False
    return True


def _widen_seeds(conn) -> bool:
    """ALTER images.seed to BIGINT; False (the store keeps working with 32-bit seeds, see
    catalog.record_images) when this role may write the tables but does not own them."""
    log.warning("upgrading images.seed to 64 bits (one time; the table is locked while it runs)")
    try:
        with conn.begin_nested():  # a refused ALTER must not abort the upgrade's other steps
            conn.exec_driver_sql("ALTER TABLE images ALTER COLUMN seed TYPE BIGINT")
    except StoreDenied:  # "must be owner of table images" (db.py's handle_error names it so)
        log.warning("images.seed stays 32 bits: this role does not own the table (the store's owner widens it "
                    "by opening the store writable once)")
        return False
    return True


def recount_vector_sets(db: Database, conn=None) -> None:
    """Recompute vector_sets from the vectors table (one scan, under the write lock)."""
    if conn is None:
        with db.write_engine.begin() as conn:
            return recount_vector_sets(db, conn)
    conn.execute(delete(VectorSet))
    mix = f"(((id % {vx.MIX_MOD}) * {vx.MIX_MUL} + {vx.MIX_ADD}) % {vx.MIX_MOD})"
    db.dialect.raw_sql(conn, f"INSERT INTO vector_sets (embedder, n, id_sum, id_mix) SELECT embedder, count(*), "
                             f"sum(id) % {vx.DIGEST_MOD}, sum({mix}) % {vx.DIGEST_MOD} FROM vectors GROUP BY embedder")


def backfill_checksums(db: Database, batch: int = 2000) -> int:
    done = 0
    while True:
        with db.write_session() as s:
            rows = s.execute(select(Vector.id, Vector.data).where(Vector.checksum.is_(None)).limit(batch)).all()
            for vid, data in rows:
                s.execute(update(Vector).where(Vector.id == vid).values(checksum=vx.checksum(data)))
            s.commit()
        done += len(rows)
        if len(rows) < batch:
            return done
