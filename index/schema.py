"""SQLite tables (SQLAlchemy ORM). Vector rows carry the ids their FAISS entries use."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import ForeignKey, Index, LargeBinary, String, Text, UniqueConstraint
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
    seed: Mapped[int | None]
    params_hash: Mapped[str | None] = mapped_column(String(64))
    file_hash: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(Text)
    original_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=_now)
    source: Mapped[Source] = relationship()
    description: Mapped[Description] = relationship()


class Vector(Base):
    """A stored CLIP feature; `id` is its FAISS id. AUTOINCREMENT: a deleted id is never reused."""

    __tablename__ = "vectors"
    __table_args__ = (UniqueConstraint("image_id", "embedder"), {"sqlite_autoincrement": True})
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    embedder: Mapped[str] = mapped_column(String(200))
    data: Mapped[bytes] = mapped_column(LargeBinary)
