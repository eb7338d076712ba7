"""The catalog: sources, descriptions, images and the references a query is compared with.

Races are normal: unique rows are got-or-created in one statement (`insert_ignore`). Every method
answers from the database and returns its result; the live index is the store's business.
"""
from __future__ import annotations

import json
import time
from functools import cached_property
from dataclasses import dataclass
from typing import Callable

import numpy as np
from sqlalchemy import bindparam, delete, func, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from index import vectors as vx
from index.db import Database, execute, insert_ignore, made, table
from index.errors import StoreInputError, UnknownName, switched_embedder
from index.keys import check_text, known_names, normalise_description, same_name, sha256_text
from index.layout import Layout
from index.schema import DeletedVector, Description, Image, Source, StoreMeta, Vector
from index.schema import _now as _utcnow
from index.search import StoredReference


@dataclass
class NewImage:
    """One image to record, with its CLIP vector."""

    key: str
    role: str
    source_id: int
    description_id: int
    file_hash: str
    path: str
    vector: np.ndarray
    seed: int | None = None
    params_hash: str | None = None
    original_id: int | None = None


@dataclass(frozen=True)
class LabelledVector:
    """A stored image with its vector under the store's embedder (`Store.labelled_vectors`)."""

    id: int
    role: str
    source: str
    description_id: int
    seed: int | None
    original_id: int | None
    file_hash: str
    path: str
    vector: np.ndarray


class AddedImages(list):
    """What `Store.add_images` returns: the image id of every row, in order (a list), and `inserted`,
    how many rows were new (the rest were stored already, perhaps by another process meanwhile)."""

    def __init__(self, image_ids: list[int], inserted: int):
        super().__init__(image_ids)
        self.inserted = inserted


@dataclass
class Recorded:
    """What `Catalog.add_images` recorded: every row's image id, and the new vectors' ids with the rows
    (indices into the batch) they came from."""

    image_ids: list[int]
    vector_ids: list[int]
    rows: list[int]


def _new_key(result) -> int:
    """The primary key an INSERT just made."""
    key = result.inserted_primary_key
    assert key is not None and key[0] is not None
    return int(key[0])


SEED_LIMIT = 2 ** 63  # images.seed is a signed 64-bit column on both backends
NARROW_SEED_LIMIT = 2 ** 31  # ... but 32 bits in an older PostgreSQL store this role could not upgrade


def seed_refused(seed: int, wide: bool) -> StoreInputError:
    if wide:
        return StoreInputError(f"seed {seed} does not fit the store's seed column "
                               "(-2^63 to 2^63-1): record it as None (the image key can hold it)")
    return StoreInputError(f"seed {seed} does not fit this older store's 32-bit seed column: the store's owner "
                           "must open it writable once (any resynth command that writes) to widen it")


def _check_source(name: str, kind: str, fingerprint: str, path: str | None) -> None:
    """Text a source row takes in: the same refused on both backends (keys.check_text)."""
    check_text(name, "source name", controls=True)
    for what, value in (("source kind", kind), ("source fingerprint", fingerprint), ("source path", path)):
        check_text(value, what)


def _no_twin(s: Session, name: str) -> None:
    """A new name that only Unicode form separates from a stored one (NFC "café", NFD "café" from a macOS
    folder) is refused: lookups take either form for the stored source, and two would make that ambiguous."""
    twin = next((n for n in s.scalars(select(Source.name)) if n != name and same_name(n, name)), None)
    if twin is not None:
        raise StoreInputError(f"source {name!r} already exists, spelled in another Unicode form ({ascii(twin)}; "
                              "remove it first to change it)")


class Catalog:
    def __init__(self, db: Database, layout: Layout):
        self.db, self.layout = db, layout

    @property
    def embedder(self) -> str:
        return self.layout.embedder_identity

    # ----- sources ----------------------------------------------------------------------------
    def add_source(self, name: str, kind: str, fingerprint: str, path: str | None = None,
                   params: dict | None = None) -> Source:
        """Register a new source; StoreInputError if the name is taken (also when a race is lost)."""
        _check_source(name, kind, fingerprint, path)
        taken = StoreInputError(f"source {name!r} already exists (remove it first to change it)")
        try:
            with self.db.write_session() as s:
                if s.scalar(select(Source.id).where(Source.name == name)) is not None:
                    raise taken
                _no_twin(s, name)
                source = Source(name=name, kind=kind, path=path, params_json=json.dumps(params or {}, sort_keys=True),
                                fingerprint=fingerprint)
                s.add(source)
                s.commit()
                return source
        except IntegrityError:
            raise taken from None

    def ensure_source(self, name: str, kind: str, fingerprint: str, path: str | None = None,
                      params: dict | None = None) -> Source:
        """Get-or-create a source in one statement (two processes registering the same replay source
        both succeed). StoreInputError if the name exists with another kind or fingerprint."""
        _check_source(name, kind, fingerprint, path)
        with self.db.write_session() as s:
            if s.scalar(select(Source.id).where(Source.name == name)) is None:
                _no_twin(s, name)
            insert_ignore(s, Source, {"name": name, "kind": kind, "path": path, "fingerprint": fingerprint,
                                      "params_json": json.dumps(params or {}, sort_keys=True),
                                      "created_at": _utcnow()}, ["name"])
            source = s.scalar(select(Source).where(Source.name == name))
            s.commit()
        assert source is not None  # just got-or-created under the write lock
        if source.kind != kind or source.fingerprint != fingerprint:
            raise StoreInputError(f"source {name!r} already exists as another {source.kind} source "
                                  "(remove it first to change it)")
        return source

    def sources(self) -> list[Source]:
        with self.db.session() as s:
            return list(s.scalars(select(Source).order_by(Source.name)))

    def source(self, name: str) -> Source:
        """The source named `name`. Any stored name is found (one added before the invisible and bidi
        characters were refused can still be looked up and removed); only new names get the full check."""
        check_text(name, "source name")  # NUL: no backend stores it
        with self.db.session() as s:
            found = s.scalar(select(Source).where(Source.name == name))
        if found is None:  # typed in another Unicode form than stored (a macOS folder name ingested): the same name
            twins = [x for x in self.sources() if same_name(x.name, name)]
            if len(twins) == 1:
                return twins[0]
            raise UnknownName(f"unknown source {name!r} (known: {known_names(x.name for x in self.sources())})")
        return found

    def delete_source(self, source: Source) -> tuple[np.ndarray, list[str]]:
        """Delete a source's rows, tombstoning its vector ids in the same transaction: (vector ids,
        the stored paths of its images)."""
        with self.db.write_session() as s:
            image_ids = select(Image.id).where(Image.source_id == source.id)
            paths = list(s.scalars(select(Image.path).where(Image.source_id == source.id)))
            vector_ids = np.array(s.scalars(select(Vector.id).where(Vector.image_id.in_(image_ids))).all(), np.int64)
            # resyntheses of other sources that pointed at these originals lose the link, not their rows
            s.execute(update(Image).where(Image.original_id.in_(image_ids)).values(original_id=None))
            s.execute(delete(Vector).where(Vector.image_id.in_(image_ids)))
            s.execute(delete(Image).where(Image.source_id == source.id))
            s.execute(delete(Source).where(Source.id == source.id))
            now = time.time()
            for vid in vector_ids.tolist():
                insert_ignore(s, DeletedVector, {"vector_id": vid, "deleted_at": now}, ["vector_id"])
            s.commit()
        return vector_ids, paths

    def remove_unreferenced_files(self, stored_paths: list[str]) -> None:
        """Delete the store's own files among `stored_paths` that no remaining row points at."""
        files = self.layout.images  # the store folder, or its object store
        candidates = {p for p in (files.own(x) for x in stored_paths) if p is not None}
        if not candidates:
            return
        with self.db.session() as s:
            candidates -= {p for p in (files.own(x) for x in s.scalars(select(Image.path))) if p is not None}
        files.remove(candidates)

    # ----- descriptions -----------------------------------------------------------------------
    def description_id(self, text: str) -> int:
        """Id of a normalised description, created on first use (get-or-create in one statement)."""
        normal = normalise_description(text)
        digest = sha256_text(normal)
        with self.db.session() as s:
            found = s.scalar(select(Description.id).where(Description.hash == digest))
        if found is not None:
            return found
        with self.db.write_session() as s:
            insert_ignore(s, Description, {"text": normal, "hash": digest}, ["hash"])
            made_id = s.scalar(select(Description.id).where(Description.hash == digest))
            s.commit()
        assert made_id is not None  # just got-or-created under the write lock
        return made_id

    def find_description_id(self, text: str) -> int | None:
        """Id of a stored description, without creating it (lookups stay read-only)."""
        with self.db.reads() as s:
            return s.scalar(self._lookups["description"], {"hash": sha256_text(normalise_description(text))})

    def description_for_file(self, file_hash: str) -> str | None:
        """A stored description of an image with these bytes (an ingested original), if any."""
        with self.db.reads() as s:
            return s.scalar(select(Description.text).join(Image, Image.description_id == Description.id)
                            .where(Image.file_hash == file_hash).order_by(Image.role).limit(1))

    # ----- images -----------------------------------------------------------------------------
    def existing_keys(self, keys: list[str]) -> dict[str, int]:
        """Map of key -> vector id for the keys already stored (the cache lookup)."""
        keys = list(keys)
        found: dict[str, int] = {}
        with self.db.reads() as s:
            for start in range(0, len(keys), 500):
                rows = s.execute(self._lookups["keys"], {"keys": keys[start:start + 500], "embedder": self.embedder})
                found.update({key: vid for key, vid in rows})
        return found

    def record_images(self, rows: list[NewImage], matrix: np.ndarray) -> Recorded:
        """Record images and vectors in one transaction; a key already stored (by this batch, an earlier
        one or another process) yields the existing image's id and adds nothing."""
        limit = SEED_LIMIT if self.db.has_wide_seeds else NARROW_SEED_LIMIT
        for row in rows:  # before anything is written: a refused row refuses the batch
            for what, value in (("image key", row.key), ("image path", row.path), ("file hash", row.file_hash),
                                ("image role", row.role), ("params hash", row.params_hash)):
                check_text(value, what)
            if row.seed is not None and not -limit <= row.seed < limit:
                raise seed_refused(row.seed, self.db.has_wide_seeds)
        out = Recorded([], [], [])
        with self.db.write_session() as s:
            if self.db.has_claims:  # in the transaction: a `reembed` switch commits before or after it whole
                recorded = s.scalar(select(StoreMeta.value).where(StoreMeta.key == "config"))
                identity = json.loads(recorded)["embedder"]["identity"] if recorded else self.embedder
                if identity != self.embedder:  # vectors of the old space would have no vector of the live one
                    raise switched_embedder(identity)
            held = self._originals_held(s, rows)
            for i, (row, vec) in enumerate(zip(rows, matrix)):
                if row.role == "original" and row.file_hash in held:
                    source_id, description_id, image_id, name = held[row.file_hash]
                    if source_id != row.source_id:
                        held_by = repr(name) if name else "another source"
                        raise StoreInputError(f"original {row.path} is stored already as an original of {held_by} "
                                              "(stored meanwhile by another process): an image has one true source")
                    if description_id != row.description_id:  # one image, one description: the stored one
                        out.image_ids.append(image_id)
                        continue
                try:
                    result = insert_ignore(s, Image, {
                        "key": row.key, "role": row.role, "source_id": row.source_id,
                        "description_id": row.description_id, "seed": row.seed, "params_hash": row.params_hash,
                        "file_hash": row.file_hash, "path": row.path, "original_id": row.original_id,
                        "created_at": _utcnow()}, ["key"])
                except IntegrityError as exc:  # a foreign key: the source was removed meanwhile
                    raise StoreInputError("an image refers to a source or description that no longer "
                                          "exists (removed by another process)") from exc
                if not made(result):
                    existing = s.scalar(select(Image.id).where(Image.key == row.key))
                    assert existing is not None  # the conflict was this key's row
                    out.image_ids.append(existing)
                    continue
                image_id = _new_key(result)
                out.image_ids.append(image_id)
                if row.role == "original":
                    held[row.file_hash] = (row.source_id, row.description_id, image_id, "")
                data = vec.tobytes()
                vector = execute(s, table(Vector).insert().values(
                    image_id=image_id, embedder=self.embedder, data=data, checksum=vx.checksum(data)))
                out.vector_ids.append(_new_key(vector))
                out.rows.append(i)
            s.commit()
        return out

    @staticmethod
    def _originals_held(s: Session, rows: list[NewImage]) -> dict[str, tuple[int, int, int, str]]:
        """Stored originals with the bytes of the batch's originals (file hash -> source id, description id,
        image id, source name), read inside the write transaction: ingest's earlier check of the manifest
        cannot see what another process stores between that check and this commit."""
        wanted = sorted({row.file_hash for row in rows if row.role == "original"})
        held: dict[str, tuple[int, int, int, str]] = {}
        for start in range(0, len(wanted), 500):
            query = (select(Image.file_hash, Image.source_id, Image.description_id, Image.id, Source.name)
                     .join(Source, Image.source_id == Source.id)
                     .where(Image.role == "original", Image.file_hash.in_(wanted[start:start + 500]))
                     .order_by(Image.id))
            for file_hash, source_id, description_id, image_id, name in s.execute(query):
                held.setdefault(file_hash, (source_id, description_id, image_id, name))
        return held

    def original_id_for_file(self, file_hash: str) -> int | None:
        with self.db.session() as s:
            return s.scalar(select(Image.id).where(Image.file_hash == file_hash, Image.role == "original").limit(1))

    def originals_by_file(self, file_hashes: list[str]) -> dict[str, tuple[str, str]]:
        """The stored originals with these bytes, as file hash -> (source name, description hash): a
        manifest's original checked against the store in a few round trips, not one per row."""
        found: dict[str, tuple[str, str]] = {}
        with self.db.session() as s:
            for start in range(0, len(file_hashes), 500):
                chunk = file_hashes[start:start + 500]
                query = (select(Image.file_hash, Source.name, Description.hash)
                         .join(Source, Image.source_id == Source.id)
                         .join(Description, Image.description_id == Description.id)
                         .where(Image.role == "original", Image.file_hash.in_(chunk)).order_by(Image.id))
                for file_hash, source, description in s.execute(query):
                    found.setdefault(file_hash, (source, description))
        return found

    def image_id_for_key(self, key: str) -> int | None:
        with self.db.session() as s:
            return s.scalar(select(Image.id).where(Image.key == key))

    def labelled_vectors(self) -> list[LabelledVector]:
        """Every image with a vector under the store's embedder, with its labels, by image id."""
        query = (select(Image.id, Image.role, Source.name, Image.description_id, Image.seed, Image.original_id,
                        Image.file_hash, Image.path, Vector.data)
                 .join(Source, Image.source_id == Source.id).join(Vector, Vector.image_id == Image.id)
                 .where(Vector.embedder == self.embedder).order_by(Image.id))
        with self.db.session() as s:
            return [LabelledVector(*row[:8], vector=np.frombuffer(row[8], np.float32).copy())
                    for row in s.execute(query)]

    def path_recorded(self, stored: str) -> bool:
        """Whether an image row names the file `stored` (a scan: asked only when that file exists already)."""
        with self.db.session() as s:
            return s.scalar(select(Image.id).where(Image.path == stored).limit(1)) is not None

    def image_path(self, image_id: int) -> str | None:
        """The stored path of one image (relative to the store, or absolute for ingested files)."""
        if not _row_id(image_id):
            return None
        with self.db.session() as s:
            return s.scalar(select(Image.path).where(Image.id == image_id))

    def image_file_row(self, image_id: int) -> tuple[str, str] | None:
        """(stored path, sha256) of one image, or None when there is no such image."""
        if not _row_id(image_id):
            return None
        with self.db.session() as s:
            row = s.execute(select(Image.path, Image.file_hash).where(Image.id == image_id)).first()
        return (row[0], row[1]) if row is not None else None

    def image_ids_of_vectors(self, vector_ids: list[int]) -> dict[int, int]:
        """vector id -> image id, for the ids that are stored (any embedder)."""
        if not vector_ids:
            return {}
        with self.db.session() as s:
            rows = s.execute(select(Vector.id, Vector.image_id).where(Vector.id.in_(vector_ids))).all()
        return {int(v): int(i) for v, i in rows}

    # ----- references -------------------------------------------------------------------------
    def _references(self):
        checksum = Vector.checksum if self.db.has_checksums else literal(None)  # an older store opened read-only
        return (select(Vector.id, Source.name, Image.seed, Image.file_hash, Image.key, Image.id, checksum)
                .join(Image, Vector.image_id == Image.id).join(Source, Image.source_id == Source.id))

    def resyntheses(self, description_id: int, source_ids: list[int] | None = None) -> list[StoredReference]:
        """Every stored resynthesis vector of one description (optionally of some sources only)."""
        params = {"description": description_id, "embedder": self.embedder, "sources": source_ids}
        with self.db.reads() as s:
            query = self._lookups["resyntheses" if source_ids is None else "resyntheses of sources"]
            return [StoredReference(*row) for row in s.execute(query, params).all()]

    def originals(self, source_ids: list[int], per_source: int) -> list[StoredReference]:
        """Up to `per_source` stored labelled originals of each source (oldest first), any description."""
        query = (self._references()
                 .where(Image.role == "original", Image.source_id.in_(source_ids), Vector.embedder == self.embedder)
                 .order_by(Source.name, Image.id))
        kept: dict[str, int] = {}
        out = []
        with self.db.session() as s:
            for row in s.execute(query):
                if kept.get(row[1], 0) < per_source:
                    kept[row[1]] = kept.get(row[1], 0) + 1
                    out.append(StoredReference(*row))
        return out

    def references_by_id(self, ids: list[int], source_ids: list[int] | None,
                         roles: tuple[str, ...]) -> dict[int, StoredReference]:
        """Rows of these vector ids, of the given roles (and sources), for this embedder."""
        query = self._lookups["by id" if source_ids is None else "by id of sources"]
        params = {"roles": list(roles), "embedder": self.embedder, "sources": source_ids}
        out: dict[int, StoredReference] = {}
        with self.db.reads() as s:
            for start in range(0, len(ids), 500):
                for row in s.execute(query, {**params, "ids": ids[start:start + 500]}).all():
                    out[row[0]] = StoredReference(*row)
        return out

    @cached_property
    def _lookups(self) -> dict:
        """The statements of a cached query's lookups, built once with bound parameters (building one
        per call cost about as much as running it)."""
        def listed(name: str):
            return bindparam(name, expanding=True)

        embedder = Vector.embedder == bindparam("embedder")
        resyntheses = (self._references()
                       .where(Image.role == "resynthesis", Image.description_id == bindparam("description"), embedder)
                       .order_by(Source.name, Image.seed, Image.id))
        # role and source are compared as expressions (`role || ''`, `source_id + 0`), not as indexed
        # columns: otherwise SQLite plans from ix_images_lookup and scans every image of those roles per
        # call (O(store) per dataset search); from the few vector ids by primary key it is O(ids)
        by_id = self._references().where((Image.role + "").in_(listed("roles")), embedder,
                                         Vector.id.in_(listed("ids")))
        return {"description": select(Description.id).where(Description.hash == bindparam("hash")),
                "keys": (select(Image.key, Vector.id).join(Vector, Vector.image_id == Image.id)
                         .where(Image.key.in_(listed("keys")), embedder)),
                "resyntheses": resyntheses,
                "resyntheses of sources": resyntheses.where(Image.source_id.in_(listed("sources"))),
                "by id": by_id,
                "by id of sources": by_id.where((Image.source_id + 0).in_(listed("sources")))}

    # ----- numbers ----------------------------------------------------------------------------
    def counts(self, digest_of: Callable[[Session], tuple[int, int, int] | None]) -> dict:
        """Per source (kind, originals, resyntheses), descriptions, vectors (the count the id digest keeps,
        else a count of every row)."""
        with self.db.session() as s:
            per_source = s.execute(select(Source.name, Source.kind, Image.role, func.count(Image.id))
                                   .join(Image, Image.source_id == Source.id, isouter=True)
                                   .group_by(Source.name, Source.kind, Image.role)).all()
            descriptions = s.scalar(select(func.count(Description.id)))
            digest = digest_of(s)
            vectors = digest[0] if digest else s.scalar(select(func.count(Vector.id))
                                                        .where(Vector.embedder == self.embedder))
        sources: dict[str, dict] = {}
        for name, kind, role, count in per_source:
            entry = sources.setdefault(name, {"kind": kind, "originals": 0, "resyntheses": 0})
            if role == "original":
                entry["originals"] = count
            elif role == "resynthesis":
                entry["resyntheses"] = count
        return {"sources": sources, "descriptions": descriptions, "vectors": vectors}


def _row_id(value) -> bool:
    """An id a row can have: a positive integer that fits a 64-bit column (a caller's id may be anything)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2 ** 63
