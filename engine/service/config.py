"""Limits and request options of the service, validated in one place."""
from __future__ import annotations

from dataclasses import dataclass

from engine.aggregate import AGGREGATIONS, DEFAULT_AGGREGATION, DEFAULT_PER_SOURCE
from engine.images import MAX_PIXELS
from engine.service.errors import ServiceError

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one server accepts and how hard it works; the defaults suit a small team on one machine."""

    max_body_bytes: int = 64 * MiB
    max_image_bytes: int = 20 * MiB
    max_pixels: int = MAX_PIXELS
    max_images: int = 16  # images per request
    max_per_source: int = 16  # K: each one may cost a generation per source
    queue_size: int = 16  # generation jobs waiting; more are refused with 503
    max_loaded: int = 2  # pipelines resident at once, whichever requests loaded them (real ones take GBs)
    batch_window: float = 0.004  # seconds the embedder waits to fill a batch
    max_batch: int = 32  # images per CLIP forward pass
    refresh_seconds: float = 1.0  # how often to look for a replaced index file
    save_seconds: float = 5.0  # how often newly generated vectors are saved to the index file


@dataclass(frozen=True)
class Options:
    """The CLI's attribution options; hashable, so an Attributor can be kept per distinct set."""

    per_source: int = DEFAULT_PER_SOURCE
    aggregation: str = DEFAULT_AGGREGATION
    sources: tuple[str, ...] | None = None
    seed: int = 0

    @classmethod
    def parse(cls, fields: dict[str, str], limits: Limits) -> "Options":
        """From form fields (all strings); a bad value is a 400 with the field's name."""
        per_source = _integer(fields, "per_source", DEFAULT_PER_SOURCE, 1, limits.max_per_source)
        seed = _integer(fields, "seed", 0, 0, 2**31 - 1)
        aggregation = fields.get("aggregation", "").strip() or DEFAULT_AGGREGATION
        if aggregation not in AGGREGATIONS:
            raise ServiceError(400, "bad_option", f"aggregation must be one of {', '.join(AGGREGATIONS)}")
        sources = None
        if fields.get("sources", "").strip():
            sources = tuple(sorted({s.strip() for s in fields["sources"].split(",") if s.strip()}))
        return cls(per_source, aggregation, sources or None, seed)


def _integer(fields: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = fields.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ServiceError(400, "bad_option", f"{name} must be an integer, got {raw[:40]!r}") from None
    if not low <= value <= high:
        raise ServiceError(400, "bad_option", f"{name} must be between {low} and {high}")
    return value
