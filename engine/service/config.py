"""Limits of the service (request options are engine.options.Options, shared with the CLI)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.images import MAX_PIXELS

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
