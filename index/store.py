"""A store directory: SQLite metadata (the source of truth) + a FAISS index kept in agreement with it.

The metadata may instead live in PostgreSQL (`Store.create(..., db_url="postgresql+psycopg://user@host/db")`,
recorded in store.json without any password: libpq reads PGPASSWORD, resynth also RESYNTH_DB_PASSWORD).
The guarantees are the same (index/db.py says how).

`Store` composes the parts, each in its own module:
  layout.py      the folder: file names, the one atomic write, the publish lock, leftovers
  db.py          engines, sessions, and the Dialect holding every SQLite/PostgreSQL difference
  migrations.py  schema creation, the open probe, upgrades of older databases
  catalog.py     sources, descriptions, images, references
  live.py        the live vector index: verified at open, merged from the database, published
  segments.py    its files: a base never rewritten, append-only segments and removed ids, named by a manifest
  objects.py     image files in the store folder or in object storage (s3://, gs://), hash-checked reads
  search.py      the dataset-search index (IVF) lifecycle and `nearest`
  claims.py      leases on work that must happen once across processes
  pending.py     records of paid outside work accepted but not stored yet (resumed later, not paid twice)
  verify.py      verify / repair
  reembed.py     vectors of another embedder and the atomic switch to them
  failures.py    what the machine's refusals (full disk, held locks, read-only, denied) mean, as typed errors
  faults.py      named crash, skip and observation points for the fault tests

Trust rules:
* The database is never created implicitly: only `Store.create` makes one. `open` first checks that
  metadata.sqlite is there, non-empty, a SQLite file with the store's tables, and answers a probe;
  otherwise it raises StoreDamaged and touches no file. A read-only open never writes a store file.
* Write order: image file, then one database transaction (image + vector rows with a checksum each),
  then the in-memory FAISS index, saved under a cross-process lock after merging whatever other processes
  committed or deleted: what a save adds is a new segment file, and the manifest naming the files is
  replaced atomically (temp file, fsync, rename) last (live.py says what an open makes of files left
  behind or ahead).
* Races are normal: unique rows are got-or-created in one statement, and a claim row with a lease
  makes a generation happen once across processes (`claim` / `release` / `wait_for_keys`).
* Storage that refuses: a folder this process cannot write (read-only mount, permissions) opens
  read-only and writes nothing (SQLite reads it immutable when no write-ahead log is there); a full
  disk, a write lock held past RESYNTH_BUSY_TIMEOUT_S (30 s) or a denied permission is one typed line
  (index.errors.StoreUnavailable and subclasses); nothing acknowledged is lost and the store reopens.
* Text is kept alike on both backends: control characters in descriptions become spaces
  (keys.normalise_description); in source names they are refused, NUL anywhere else too (keys.check_text).
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
from sqlalchemy.orm import Session

from index import ivf, migrations, objects, reembed, sharing
from index import vectors as vx
from index.catalog import AddedImages, Catalog, LabelledVector, NewImage
from index.claims import Claims
from index.db import RESTORE, Database, db_label, insert_ignore, made, parse_db_url  # noqa: F401 - re-exported
from index.errors import StoreDamaged, StoreDenied, StoreFull, StoreInputError, moved_store, switched_embedder
from index.failures import DISK_FULL, os_failure, read_only_reason
from index.faults import crash_point, skipped
from index.layout import (CONFIG_NAME, DB_NAME, FORMAT, INDEX_NAME, LOCK_NAME, SEARCH_INFOS,  # noqa: F401
                          SEARCH_NAME, Layout, creating, read_config, write_json_atomic)
from index.live import LiveIndex, OpenReport  # noqa: F401 - re-exported
from index.schema import Source  # noqa: F401 - re-exported: the row type sources() returns
from index.search import SearchIndex, StoredReference
from index.verify import verify

log = logging.getLogger(__name__)

__all__ = ["Store", "NewImage", "AddedImages", "StoredReference", "LabelledVector", "OpenReport", "CONFIG_NAME",
           "DB_NAME", "INDEX_NAME", "SEARCH_NAME", "SEARCH_INFOS"]


def _has_config(root: Path) -> bool:
    """Whether `root` holds a store.json; a path the system cannot even look up (a name past 255 bytes) is one
    line (it was a traceback from `resynth stats` and `init`)."""
    try:
        return (root / CONFIG_NAME).exists()
    except OSError as exc:
        raise StoreInputError(f"cannot look for a store at {root}: {exc.strerror or exc}") from None


class Store:
    """Open with `Store.create` (new) or `Store.open` (existing); use as a context manager."""

    def __init__(self, root: Path, config: dict, writable: bool, *, create: bool = False, repair: bool = False):
        # a folder this process cannot write (read-only mount, permissions) opens read-only: reads answer,
        # writes are refused in one line naming why (failures.read_only)
        why = None if create else read_only_reason(root)
        try:
            self._open_parts(root, config, writable, why, create, repair)
        except StoreFull:
            # a full disk refuses even a reader's -shm file (SQLite sizes it before the first read): open
            # as on a read-only mount instead, which writes nothing; writes are then refused as StoreFull
            if create or why is not None or config.get("db"):
                raise
            self._open_parts(root, config, False, DISK_FULL, create, repair)

    def _open_parts(self, root: Path, config: dict, writable: bool, why: str | None, create: bool,
                    repair: bool) -> None:
        writable = writable and why is None
        self.root, self.writable, self.repair = root, writable, repair
        self._config_problem: str | None = None  # the bad store.json refresh last reported
        self._switched: str | None = None  # the embedder another process's `reembed` switched the store to
        self.layout = Layout(root, config, writable, why)
        self.db = Database(root, config, "rwc" if create else ("rw" if writable else "ro"), writable, why)
        self.catalog = Catalog(self.db, self.layout)
        self.claims = Claims(self.db, self.catalog.existing_keys)
        self.live = LiveIndex(self.db, self.layout, repair)
        self.search_index = SearchIndex(self.live, self.layout)
        try:
            if create:
                migrations.create_schema(self.db, self.embedder_identity, self.dim, config.get("images"))
                if not config.get("db"):  # SQLite makes it 644 whatever the umask: a team's folder shares it
                    sharing.share(root / DB_NAME)
            migrations.probe(self.db, self.embedder_identity, self.dim)
            reembed.adopt_switched_embedder(self.db, self.layout)
            migrations.check_store_json(self.db, self.layout.config_path, self.embedder_identity, self.dim)
            if writable:
                migrations.migrate(self.db, self.embedder_identity, self.dim)
                self.layout.remove_stale_temp_files()
            self.live.load()
            self.search_index.load()
        except BaseException as exc:
            # a refused open leaves the folder as it found it: no empty -wal/-shm of its own behind
            self.db.dispose(refused=isinstance(exc, (StoreDamaged, StoreFull)))
            raise

    # ----- lifecycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, embedder: dict, dim: int, captioner: str | None = None,
               db_url: str | None = None, images: str | None = None) -> "Store":
        """A new store (the only way a database is made), or the existing one at `root`.

        `db_url` (postgresql+psycopg://USER@HOST:PORT/DBNAME, no password) puts the metadata and vectors in
        that PostgreSQL database instead of metadata.sqlite; a database holds one store: joining one bound
        to another embedder is refused. `images` (s3://BUCKET/PREFIX, gs://...: index/objects.py) keeps the
        generated image files in that object store instead of the store folder."""
        root = Path(root)
        config_path = root / CONFIG_NAME
        url = parse_db_url(db_url) if db_url else None
        images = objects.parse_images_url(images) if images else None
        if _has_config(root):
            return cls._join(root, embedder, captioner, url, images)
        if images is not None:
            objects.ObjectImages(images).check()  # before anything is made: a wrong bucket or key is one line
        new_folder = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = os_failure(exc, root, "creating the store folder")
            if problem is None:  # a name too long (255 bytes a name, 4096 a path), a file where a folder goes
                raise StoreInputError(f"cannot create a store folder at {root}: {exc.strerror or exc}") from None
            raise problem from exc
        if new_folder:
            sharing.share(root)  # made in a team's folder: the team's store (its mode decides for all below)
        config = {"format": FORMAT, "embedder": embedder, "dim": dim, "captioner": captioner}
        if url is not None:
            config["db"] = url.render_as_string(hide_password=False)  # parse_db_url refused any password
        if images is not None:
            config["images"] = images  # the URL only: credentials come from the environment
        with creating(root):  # two inits at once: the second waits, then joins or is refused as a later one is
            if _has_config(root):
                return cls._join(root, embedder, captioner, url, images)
            try:
                store = cls(root, config, writable=True, create=True)
            except BaseException:
                if new_folder and root.is_dir() and not any(root.iterdir()):
                    root.rmdir()  # e.g. the server refused: leave no empty store folder behind
                raise
            try:
                write_json_atomic(config_path, config)  # last: store.json marks a complete store
            except BaseException:
                with contextlib.suppress(Exception):
                    store.close()  # its connections: the error to report is the write's
                raise
        return store

    @classmethod
    def _join(cls, root: Path, embedder: dict, captioner: str | None, url, images: str | None) -> "Store":
        """`create` where store.json is there: the store, unless it is bound otherwise (one line)."""
        existing = read_config(root)
        if existing["embedder"]["identity"] != embedder["identity"]:
            raise StoreInputError(f"store {root} is already bound to embedder {existing['embedder']['identity']}; "
                                  f"use another --store for {embedder['identity']}, or move this store to it "
                                  "with `resynth reembed`")
        if url is not None and existing.get("db") != url.render_as_string(hide_password=False):
            where = db_label(parse_db_url(existing["db"])) if existing.get("db") else "metadata.sqlite"
            raise StoreInputError(f"store {root} already keeps its metadata in {where}; use another --store")
        if images is not None and existing.get("images") != images:
            raise StoreInputError(f"store {root} already keeps its images in "
                                  f"{existing.get('images') or 'its folder'}; use another --store")
        store = cls.open(root)
        if captioner and captioner != store.config.get("captioner"):
            store.update_config(captioner=captioner)
        return store

    @classmethod
    def open(cls, root: Path, writable: bool = True, repair: bool = False) -> "Store":
        """Open an existing store. `repair=True` accepts the database as it is when the index holds
        vectors the database lost (the index is rebuilt from it) instead of raising StoreDamaged."""
        root = Path(root)
        if not _has_config(root):
            if (root / DB_NAME).is_file():  # store.json deleted: "create one" read as "start over"
                raise StoreDamaged(f"{root} has a {DB_NAME} but no {CONFIG_NAME}: restore {CONFIG_NAME} from a "
                                   "backup, or run `resynth init` there with the store's embedder to write it again "
                                   "(the rows are kept; another embedder or vector size is refused)")
            raise StoreInputError(f"no store at {root} (create one with `resynth init`)")
        return cls(root, read_config(root), writable, repair=repair)

    def update_config(self, **changes) -> None:
        self.layout.require_writable()
        self.layout.save_config({**self.config, **changes})

    def close(self) -> None:
        """Publish what this process added to the index (unless the "close:publish" fault point skips
        it, as a process that dies here would), then let go of the database."""
        try:
            if self.writable and self.live.dirty and not self._switched and not skipped("close:publish"):
                self.save_index()
        finally:
            self.db.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def session(self) -> Session:
        """A session for reads (and ORM writes that need no get-or-create)."""
        return self.db.session()

    # ----- what the store is -----------------------------------------------------------------
    @property
    def config(self) -> dict:
        return self.layout.config

    @property
    def embedder_identity(self) -> str:
        return self.layout.embedder_identity

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def index_path(self) -> Path:
        return self.layout.index_path

    @property
    def search_path(self) -> Path:
        return self.layout.search_path

    @property
    def search_infos_path(self) -> Path:
        return self.layout.search_infos_path

    @property
    def index(self):
        """The live FAISS index (IDMap2 over a flat index; ids are the database's vector ids)."""
        return self.live.index

    @property
    def open_report(self) -> OpenReport:
        return self.live.report

    @property
    def search_state(self) -> dict:
        return self.search_index.state

    def vector_ids(self) -> np.ndarray:
        """Every vector id the database stores for the live embedder, sorted (reads them all)."""
        return self.live.stored.db_vector_ids()

    # ----- the live index and the search index -----------------------------------------------
    def remove_stale_temp_files(self, deep: bool = False) -> list[str]:
        return self.layout.remove_stale_temp_files(deep) + self.live.remove_stale_segments()

    def save_index(self) -> None:
        """Publish the in-memory index atomically, merged with what other processes committed/deleted
        (nothing once the store switched embedder under this process: its index is of the old space; nor once
        its folder moved: logged, not raised, so a server's upkeep and shutdown stay one line)."""
        if self.layout.moved():  # the files at the old path are another store's, or none (check_in_place)
            log.warning("%s", moved_store(self.root))
        elif not self._switched:
            self.live.publish()

    def _current(self) -> None:
        """Refuse work in the space of an embedder the store no longer uses. A server left running across
        a `reembed` bought every image again (its keys name the old embedder), stored vectors of the old
        space, wrote the old index file back and then reported the database as having lost data."""
        if self._switched:
            raise switched_embedder(self._switched)
        self.layout.check_in_place()

    def rebuild(self, search: bool = True, *, flat_max: int | None = None, memory_budget_bytes: int | None = None,
                threads: int | None = None, shard_map: ivf.ShardMap | None = None) -> int:
        """Recreate the FAISS index from stored vectors and swap it in atomically; returns its size.

        With `search`, also (re)build the search index offline (see `SearchIndex.build`; `shard_map` fills
        its shards elsewhere, e.g. on Ray); the parameters default to store.json's "search" entry, then
        to vectors.FLAT_MAX / MEMORY_BUDGET / BUILD_THREADS / SHARD_SIZE.
        Everything happens under the cross-process lock (other writers' saves wait for it)."""
        self.layout.require_writable()
        with self.layout.file_lock():
            fresh, tomb_seq = self.live.rebuild_from_db()
            vx.write_atomic(fresh, self.index_path)
            built = (self.search_index.build(fresh, flat_max, memory_budget_bytes, threads, shard_map)
                     if search else None)
            mapped, _ = vx.read_checked(self.index_path, self.dim, mapped=True)  # the private copy goes
            with self.live.lock:
                self.live.swap(fresh if mapped is None else mapped, tomb_seq)
                if built is not None:
                    self.search_index.adopt(built)
        return int(fresh.ntotal)

    def search_report(self) -> dict:
        return self.search_index.report()

    def refresh(self) -> bool:
        """Pick up what another process changed: store.json (e.g. `resynth calibrate`) and a replaced
        index file (e.g. `resynth rebuild`), which is verified and swapped in; True if the index changed."""
        path = self.layout.config_path
        try:
            try:
                config = json.loads(path.read_text())
            except ValueError:
                raise StoreDamaged(f"store config {path} is malformed: restore it from a backup") from None
            if self.layout.adoptable(config):
                self.layout.config = config
            elif not self._switched and self._store_json_is_current():  # a `reembed` switched the store
                self._switched = config["embedder"]["identity"]
                log.warning("%s", switched_embedder(self._switched))
            self._config_problem = None
        except OSError:
            pass  # keep the config this process has (a file unreadable for now)
        except StoreDamaged as exc:
            # a bad store.json written by someone else: keep serving what this process has, say so once
            # (not one StoreDamaged per request); the next open refuses it in one line
            if str(exc) != self._config_problem:
                log.warning("keeping the store config in use: %s", exc)
                self._config_problem = str(exc)
        if self._switched:
            return False  # its index file holds the new space's vectors: nothing this process may serve
        changed = self.live.reload_if_replaced()
        if changed:
            self.search_index.load()
        return self.search_index.reload_if_replaced() or changed

    def _store_json_is_current(self) -> bool:
        """Whether a store.json naming another embedder reflects a switch away from this process's one:
        not when the database records this process's embedder (a `reembed` killed after its commit left
        store.json naming the old one; this process adopted the new one at open)."""
        recorded = reembed.recorded_config(self.db)
        return recorded is None or recorded["embedder"]["identity"] != self.embedder_identity

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return self.live.vectors(ids)

    def present(self, ids: np.ndarray) -> np.ndarray:
        return self.live.present(ids)

    def search(self, queries: np.ndarray, candidate_ids: np.ndarray, checksums: dict[int, str] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        self._current()
        return self.live.search(queries, candidate_ids, checksums)

    def nearest(self, query: np.ndarray, k: int, source_ids: list[int] | None = None,
                roles: tuple[str, ...] = ("resynthesis",), exclude_file: str | None = None, *, exact: bool = False
                ) -> list[tuple[StoredReference, float]]:
        """The k stored vectors closest to `query` over the whole store, of the given roles and sources,
        never an image with the bytes `exclude_file`: best first (see SearchIndex.nearest)."""
        self._current()

        def references(ids: list[int]) -> dict[int, StoredReference]:
            return self.catalog.references_by_id(ids, source_ids, roles)
        return self.search_index.nearest(query, k, references, exclude_file, exact=exact)

    def nearest_many(self, queries: np.ndarray, k: int, source_ids: list[int] | None = None,
                     roles: tuple[str, ...] = ("resynthesis",), exclude_files: list[str | None] | None = None, *,
                     exact: bool = False) -> list[list[tuple[StoredReference, float]]]:
        """`nearest` for each row of `queries` in one search call (see SearchIndex.nearest_many)."""
        self._current()

        def references(ids: list[int]) -> dict[int, StoredReference]:
            return self.catalog.references_by_id(ids, source_ids, roles)
        excluded: list[str | None] = list(exclude_files) if exclude_files is not None else [None] * len(queries)
        return self.search_index.nearest_many(queries, k, references, excluded, exact=exact)

    # ----- the catalog -----------------------------------------------------------------------
    def add_source(self, name: str, kind: str, fingerprint: str, path: str | None = None,
                   params: dict | None = None) -> Source:
        return self.catalog.add_source(name, kind, fingerprint, path, params)

    def ensure_source(self, name: str, kind: str, fingerprint: str, path: str | None = None,
                      params: dict | None = None) -> Source:
        return self.catalog.ensure_source(name, kind, fingerprint, path, params)

    def sources(self) -> list[Source]:
        return self.catalog.sources()

    def source(self, name: str) -> Source:
        return self.catalog.source(name)

    def remove_source(self, name: str) -> int:
        """Delete a source with its images and vectors; returns how many vectors were dropped.

        Its vector ids are tombstoned in the same transaction. After the commit, its own image files
        inside the store (not referenced by any remaining row) are deleted, and folders left empty.
        """
        self.layout.require_writable()
        vector_ids, paths = self.catalog.delete_source(self.source(name))
        crash_point("remove:after-commit")
        if len(vector_ids):
            self.live.remove(vector_ids)
            self.save_index()
        self.catalog.remove_unreferenced_files(paths)
        return len(vector_ids)

    def description_id(self, text: str) -> int:
        return self.catalog.description_id(text)

    def find_description_id(self, text: str) -> int | None:
        return self.catalog.find_description_id(text)

    def description_for_file(self, file_hash: str) -> str | None:
        return self.catalog.description_for_file(file_hash)

    def existing_keys(self, keys: list[str]) -> dict[str, int]:
        return self.catalog.existing_keys(keys)

    def resyntheses(self, description_id: int, source_ids: list[int] | None = None) -> list[StoredReference]:
        return self.catalog.resyntheses(description_id, source_ids)

    def originals(self, source_ids: list[int], per_source: int) -> list[StoredReference]:
        return self.catalog.originals(source_ids, per_source)

    def original_id_for_file(self, file_hash: str) -> int | None:
        return self.catalog.original_id_for_file(file_hash)

    def originals_by_file(self, file_hashes: list[str]) -> dict[str, tuple[str, str]]:
        return self.catalog.originals_by_file(file_hashes)

    def image_id_for_key(self, key: str) -> int | None:
        return self.catalog.image_id_for_key(key)

    def image_file(self, image_id: int) -> Path | None:
        """An image's local file by its id (a path the catalog records, never one a caller gives), or None
        when there is no such image, its file is gone, or it lives in object storage (see image_bytes)."""
        stored = self.catalog.image_path(image_id)
        if stored is None or (not Path(stored).is_absolute() and self.config.get("images")):
            return None
        path = self.layout.file_path(stored)
        return path if path.is_file() else None

    def image_bytes(self, image_id: int) -> bytes | None:
        """An image's bytes by its id, wherever they live, checked against the sha256 the catalog keeps:
        None when there is no such image, its file is gone or its bytes differ (verify says which)."""
        try:
            return self.checked_image(image_id)
        except StoreDamaged:
            return None

    def checked_image(self, image_id: int) -> bytes | None:
        """As image_bytes, but None only when there is no such image: a file that is gone or differs from its
        sha256 is StoreDamaged, one this process may not read StoreDenied (a server shows these apart)."""
        row = self.catalog.image_file_row(image_id)
        if row is None:
            return None
        stored, file_hash = row
        # an ingested original's file lies where the user keeps it: its path is not for HTTP clients
        outside = Path(stored).is_absolute()
        where = "an original outside the store" if outside else stored
        try:
            data = self.layout.images.read(stored)
        except OSError as exc:
            if outside and isinstance(exc, PermissionError):
                raise StoreDenied(f"the file of stored image {image_id} ({where}) cannot be read by this process "
                                  "(permission denied): `resynth verify` names it") from None
            raise os_failure(exc, Path(self.layout.images.locator(stored)), "reading a stored image") or exc from None
        if data is None or objects.sha256_bytes(data) != file_hash:
            why = "is gone" if data is None else "differs from its recorded sha256 (altered or cut)"
            raise StoreDamaged(f"the file of stored image {image_id} ({where}) {why}: `resynth verify` lists "
                               "every stored file that is lost or altered")
        return data

    def check_images_writable(self, relatives: list[str]) -> None:
        """Refuse, as write_image would, files this process may not write at `relatives`, before anything is
        spent on making them (StoreReadOnly, StoreDenied)."""
        self.layout.require_writable()
        self.layout.images.check_writable(relatives)

    def write_image(self, relative: str, data: bytes) -> str:
        """Write a generated image's file atomically at `relative` (inside the store, or under its object
        store's prefix) before its row is recorded; returns its sha256, the row's file_hash."""
        self.layout.require_writable()
        if self._kept(relative, data):
            return objects.sha256_bytes(data)
        return self.layout.images.write(relative, data)

    def _kept(self, relative: str, data: bytes) -> bool:
        """Whether the file at `relative` must stay as it is: other bytes another process committed a row for.
        A generation that outlived its claim (hung past its renewals, stopped, its clock off) had its key
        taken over and stored by another process, then wrote its own image over that one when it went on:
        the row's sha256 and vector then described a file that was gone. Its row is dropped as a duplicate key."""
        if not isinstance(self.layout.images, objects.LocalImages):
            return False
        old = objects.read_local(self.layout.file_path(relative))
        return old is not None and old != data and self.catalog.path_recorded(relative)

    def image_ids_of_vectors(self, vector_ids: list[int]) -> dict[int, int]:
        """vector id -> image id, for those stored."""
        return self.catalog.image_ids_of_vectors(vector_ids)

    def labelled_vectors(self) -> list[LabelledVector]:
        """Every image with a vector under the store's embedder: id, role, source name, description id,
        seed, original id, file hash, path and the vector (float32), ordered by image id."""
        return self.catalog.labelled_vectors()

    def add_images(self, rows: list[NewImage]) -> AddedImages:
        """Record images and vectors in one transaction, then add the new ones to the in-memory index.

        Returns the image ids, in order (a list), with `.inserted`: how many of `rows` were new. A key
        that is already stored (by this batch, an earlier one or another process) yields the existing
        image's id and adds nothing."""
        if not rows:
            return AddedImages([], 0)
        matrix = np.stack([np.asarray(r.vector, np.float32).ravel() for r in rows])
        if matrix.shape[1] != self.dim:
            raise StoreInputError(f"vector size {matrix.shape[1]} does not match the store's {self.dim}")
        if not np.isfinite(matrix).all():
            raise StoreInputError("a vector to store is not finite (NaN or infinity)")
        self.layout.check_in_place()  # rows naming files in a folder this process no longer has in hand
        recorded = self.catalog.record_images(rows, matrix)
        crash_point("images:after-commit")
        if recorded.vector_ids:
            self.live.add(np.array(recorded.vector_ids, np.int64), matrix[recorded.rows])
        return AddedImages(recorded.image_ids, len(recorded.vector_ids))

    # ----- claims, verify, re-embedding, numbers ---------------------------------------------
    def claim(self, keys: list[str], owner: str, lease_seconds: float = 600.0) -> list[str]:
        self._current()
        return self.claims.claim(keys, owner, lease_seconds)

    def release(self, keys: list[str], owner: str) -> int:
        return self.claims.release(keys, owner)

    def live_claims(self, keys: list[str]) -> dict[str, str]:
        return self.claims.live_claims(keys)

    def wait_for_keys(self, keys: list[str], timeout: float = 600.0, poll: float = 0.25) -> dict[str, int]:
        return self.claims.wait_for_keys(keys, timeout, poll)

    def verify(self, repair: bool = False, files: bool = True) -> dict:
        return verify(self, repair, files)

    def images_without_vector(self, embedder: str) -> list[tuple[int, str, str]]:
        return reembed.images_without_vector(self.db, self.layout, embedder)

    def add_vectors(self, embedder: str, image_ids: list[int], matrix: np.ndarray) -> int:
        return reembed.add_vectors(self.db, self.layout, embedder, image_ids, matrix)

    def switch_embedder(self, embedder: dict, dim: int) -> int:
        return reembed.switch_embedder(self, embedder, dim)

    def discard_unswitched(self, dead: Callable[[str], bool] = lambda owner: False,
                           ) -> tuple[dict[str, int], list[str]]:
        self._current()
        self.layout.require_writable()
        return reembed.discard_unswitched(self.db, self.embedder_identity, dead)

    def reachable(self) -> bool:
        """Whether the database answers a trivial query now (a readiness probe: PostgreSQL may be down)."""
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with self.db.reads() as conn:
                conn.exec_driver_sql("SELECT 1")
        except (SQLAlchemyError, OSError):
            return False
        return True

    def stats(self) -> dict:
        counts = self.catalog.counts(self.live.stored.db_digest)
        return {"store": str(self.root), "embedder": self.embedder_identity, "dim": self.dim, **counts,
                "index_vectors": int(self.index.ntotal), "search": self.search_report()}
