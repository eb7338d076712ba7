"""Limits of the service and who may call it (request options are engine.options.Options, shared with the CLI)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.images import MAX_ASPECT, MAX_PIXELS

MiB = 1 << 20
# What one open connection holds besides its headers (uvicorn's protocol, h11's state, the transport):
# measured 2000 connections of 30 KB of headers each at +50 MB, so about 25 KB each, 30 KB of it headers
CONNECTION_BYTES = 16 * 1024


@dataclass(frozen=True)
class Limits:
    """What one server accepts and how hard it works; the defaults suit a small team on one machine.

    Memory: decoded images are what costs (3 bytes per pixel as RGB, whatever the file's size: a
    one-bit PNG of 8000 x 8000 pixels is 17 KB on the wire and 192 MB decoded). Pixel counts are read
    from image headers before anything is decoded; a request over `max_request_pixels` is refused
    (413), at most `max_pixels_in_flight` decoded pixels are held by all requests together (a request
    waits up to `pixel_wait` seconds for room, then 503), at most `max_decodes` decodes run at once,
    and at most `max_requests` API requests are handled at once (503 beyond). A request whose body is
    still arriving is not handled yet: up to `max_uploads` of those are received at once (503 beyond), so
    slow or stalled uploads cannot take the handling slots from everyone else; when that many arrive, the
    slowest under `min_upload_rate` gives way to a new one (408), else the new one gets 503. `memory_bound()` is the
    resulting worst-case growth of the server's resident memory.
    """

    max_body_bytes: int = 64 * MiB
    max_image_bytes: int = 20 * MiB
    max_pixels: int = MAX_PIXELS  # per image
    max_images: int = 16  # images per request
    max_request_pixels: int = 64_000_000  # all images of one request together (e.g. 16 x 2000 x 2000)
    max_pixels_in_flight: int = 128_000_000  # decoded pixels held by all requests at once
    max_decodes: int = 2  # images decoded at once
    pixel_wait: float = 30.0  # seconds a request waits for room among the pixels in flight (503 after)
    max_requests: int = 32  # API requests handled at once (503 beyond); health checks are not counted
    max_uploads: int = 128  # requests whose body is still arriving; not yet handled
    min_upload_rate: int = 32 * 1024  # bytes/s: slower uploads give way to new ones when max_uploads arrive
    max_upload_bytes: int = 1024 * MiB  # bytes held by all uploads still arriving (spooled to disk mostly)
    spool_bytes: int = 256 * 1024  # an uploaded file part kept in memory up to this, then on disk
    max_fields: int = 32  # text fields of a form
    max_field_bytes: int = 64 * 1024  # one text field of a form
    max_per_source: int = 16  # K: each one may cost a generation per source
    max_cost: float | None = None  # USD one request may spend on API sources (None: only the request's own max_cost)
    queue_size: int = 16  # generation jobs waiting; more are refused with 503
    max_loaded: int = 2  # pipelines resident at once, whichever requests loaded them (real ones take GBs)
    batch_window: float = 0.004  # seconds the embedder waits to fill a batch
    max_batch: int = 32  # images per CLIP forward pass
    refresh_seconds: float = 1.0  # how often to look for a replaced index file
    save_seconds: float = 5.0  # how often newly generated vectors are saved to the index file
    body_timeout: float = 30.0  # seconds from the end of the headers to the end of the body (408 after)
    header_timeout: float = 10.0  # seconds from a connection's (or request's) first byte to its last header
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    send_timeout: float = 30.0  # seconds an answer may wait on a client that reads none of it (then dropped)
    max_header_bytes: int = 32 * 1024  # request line and headers together (400/431 above)
    max_connections: int = 4096  # open connections (each may hold max_header_bytes); past it a new one gets 503
    # CLIP preprocessing scales an image's short side to the model's input side S and keeps its ratio:
    # an image thinner than S grows to (S x ratio) x S pixels before the centre crop. The bound assumes
    # S up to `preprocess_side` (ViT-L/14-336 has 336; 448 covers the larger open_clip towers) and up to
    # `preprocess_threads` images preprocessed at once (the embedder's pool on CUDA; one on CPU).
    preprocess_side: int = 448
    preprocess_threads: int = 8

    def __post_init__(self) -> None:
        if self.max_request_pixels > self.max_pixels_in_flight:
            raise ValueError("max_request_pixels must not exceed max_pixels_in_flight: such a request "
                             "could never be admitted")

    def memory_bound(self) -> int:
        """Worst-case growth in bytes of the server's resident memory from requests, past its start.

        - decoded images held (RGB): 3 B x max_pixels_in_flight
        - embedding: the CLIP preprocessing copies each image it converts (3 B), and one batch may
          hold every image in flight: 3 B x max_pixels_in_flight
        - decoding scratch: each running decode holds the file's own pixels (up to 4 B each) and a
          copy made by EXIF orientation (4 B) besides its RGB result, plus the file's bytes:
          max_decodes x (8 B x largest image + max_image_bytes)
        - captioning (prompt-less requests, one at a time): the processor copies a request's images:
          6 B x max_request_pixels
        - uploads being received or handled: each file part is kept in memory up to spool_bytes
          before it spills to disk, plus the text fields:
          (max_requests + max_uploads) x (max_images x spool_bytes + max_fields x max_field_bytes)
        - open connections: each holds its headers while they arrive, and its own state:
          max_connections x (max_header_bytes + CONNECTION_BYTES)
        - preprocessing geometry: an image whose short side is below the model's input side S is scaled
          up, long side too, before the centre crop; PIL holds RGB at 4 B a pixel, in two resampling
          passes. With sides at most MAX_ASPECT:1 (images.MAX_ASPECT, refused beyond from the header),
          each pass holds at most MAX_ASPECT x S^2 pixels:
          preprocess_threads x (8 B x MAX_ASPECT + 16 B) x preprocess_side^2
          (measured at S = 448: 30.6 MiB for one image at the ratio limit; without the limit, 1.5 GB
          for a 2000 x 1 image, and a few-KB PNG of 60000 x 1 pixels grew a server by 1.1 GB)
        Model weights, threads and the interpreter are the baseline, not growth. This holds with
        `resynth serve`, which makes glibc return freed images to the system at once (see
        commands._return_large_frees_to_the_os); without that, per-thread heaps keep them and the
        resident size creeps up burst after burst.
        """
        largest = min(self.max_pixels, self.max_request_pixels)
        return (6 * self.max_pixels_in_flight
                + self.max_decodes * (8 * largest + self.max_image_bytes)
                + 6 * self.max_request_pixels
                + (self.max_requests + self.max_uploads) * self.form_bytes()
                + self.max_connections * (self.max_header_bytes + CONNECTION_BYTES)
                + self.preprocess_threads * self.upscale_bytes())

    def form_bytes(self) -> int:
        """The most one request's form holds in memory while it arrives and is handled (see memory_bound)."""
        return self.max_images * self.spool_bytes + self.max_fields * self.max_field_bytes

    def upscale_bytes(self) -> int:
        """The most one image's preprocessing may allocate by scaling a thin image up (see memory_bound)."""
        # two resampling passes at 4 B a pixel, then the S x S crop (4 B) and its float tensor (12 B)
        return (8 * MAX_ASPECT + 16) * self.preprocess_side ** 2


@dataclass(frozen=True)
class Access:
    """Who may call the server.

    With a bearer `token`, every route but health and the page shell needs it. Without one, any
    local program may call, so browsers are kept out instead: the Host header must name this server
    (a loopback name, the bound `host`, an IP address when bound to all interfaces, or one of
    `allow_hosts`), which defeats DNS rebinding, and an Origin header, when a browser sends one, must
    be this server's own (same port; loopback, the Host named, or allowed) or one of `allow_origins`
    ("*": any), which defeats cross-site form posts. `check=False` turns both checks off (for an app
    mounted behind a proxy that does its own).
    """

    token: str | None = None
    host: str = "127.0.0.1"
    allow_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    check: bool = True
