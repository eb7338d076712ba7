"""SQLite tables (SQLAlchemy ORM). Vector rows carry the ids their FAISS entries use."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import BigInteger, Float, ForeignKey, Index, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Source(Base):
    """A candidate generator: a diffusers pipeline folder, or `replay` (resyntheses already on disk)."""

    __tablename__ = "sources"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(20))
    path: Mapped[str | None] = mapped_column(Text)
    params_json: Mapped[str] = mapped_column(Text, default="{}")
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Description(Base):
    __tablename__ = "descriptions"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class Image(Base):
    """An original (labelled with its true source) or a resynthesis (made by `source` from `description`)."""

    __tablename__ = "images"
    __table_args__ = (Index("ix_images_lookup", "role", "source_id", "description_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)  # cache key for resyntheses
    role: Mapped[str] = mapped_column(String(20))
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"))
    description_id: Mapped[int] = mapped_column(ForeignKey("descriptions.id"))
    seed: Mapped[int | None] = mapped_column(BigInteger)  # 64-bit: manifests and A1111 carry seeds past 2^31
    params_hash: Mapped[str | None] = mapped_column(String(64))
    file_hash: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(Text)
    original_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=_now)
    source: Mapped[Source] = relationship()
    description: Mapped[Description] = relationship()


class Vector(Base):
    """A stored CLIP feature; `id` is its FAISS id. AUTOINCREMENT: a deleted id is never reused.

    `checksum` (vectors.checksum of `data`) lets the FAISS copy be verified; NULL on rows written by
    an older resynth or a bulk loader (then `data` itself is the reference).
    """

    __tablename__ = "vectors"
    __table_args__ = (UniqueConstraint("image_id", "embedder"), {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    embedder: Mapped[str] = mapped_column(String(200))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    checksum: Mapped[str | None] = mapped_column(String(32))


class DeletedVector(Base):
    """Tombstone of a removed vector id: an id in the FAISS file that is neither stored nor here means
    the database lost data (and the index must not be "repaired" from it)."""

    __tablename__ = "deleted_vectors"
    __table_args__ = ({"sqlite_autoincrement": True},)
    seq: Mapped[int] = mapped_column(primary_key=True)
    vector_id: Mapped[int] = mapped_column(unique=True)
    deleted_at: Mapped[float] = mapped_column(Float)


class Claim(Base):
    """A lease on a piece of work that must happen once (the generation of one cache key)."""

    __tablename__ = "claims"
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    owner: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[float] = mapped_column(Float)


class PendingTask(Base):
    """Work a paid service accepted and this store has not stored yet (index.pending): an opaque JSON
    record under a key the engine gives, so a later process resumes it rather than pays twice."""

    __tablename__ = "pending_tasks"
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    record: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class StoreMeta(Base):
    """Small facts about the database itself (e.g. `tombstones_from`: ids up to it predate tombstones)."""

    __tablename__ = "store_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class VectorSet(Base):
    """Per embedder, an order-independent digest of the stored vector ids (index.vectors.id_digest),
    kept by database triggers on every insert, delete and update of `vectors`, so an open compares
    the index file with the database in O(1) instead of reading every id. Never trusted blindly: a
    mismatch only sends the open to the full comparison."""

    __tablename__ = "vector_sets"
    embedder: Mapped[str] = mapped_column(String(200), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)
    id_sum: Mapped[int] = mapped_column(BigInteger)
    id_mix: Mapped[int] = mapped_column(BigInteger)


CORE_TABLES = ("sources", "descriptions", "images", "vectors")
ADDED_TABLES = (DeletedVector.__table__, Claim.__table__, StoreMeta.__table__, VectorSet.__table__,
                PendingTask.__table__)
