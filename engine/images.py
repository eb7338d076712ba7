"""The one image reader for CLI, service and ingest: size checked before reading, pixels before
decoding, formats allow-listed, EXIF orientation applied (as a viewer shows it), RGB out.

One file therefore gives one vector whichever way it arrives.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import TooLargeError, UnsupportedError, UserError

# Decompression-bomb guard: far above any generator's output (e.g. 4096 x 4096 = 16.8 MP).
MAX_PIXELS = 64_000_000
MAX_BYTES = 64 << 20
# Formats Pillow reads that generators and browsers actually produce; anything else (PSD, EPS through
# Ghostscript, ICO, ...) is refused before its plugin parses more than the header.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

ImageInput = Union[str, Path, bytes, bytearray, Image.Image]


def read_image(source: ImageInput, label: str | None = None, max_bytes: int = MAX_BYTES,
               max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, str]:
    """RGB image and a sha256 identifying it: of the file's bytes, or of the pixels of a PIL image."""
    if isinstance(source, Image.Image):
        image = source.convert("RGB")
        _check_pixels(image.width, image.height, max_pixels, label or "image")
        digest = hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()
        return image, digest
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        label = label or "image"
    else:
        path = Path(source)
        label = label or str(path)
        data = _read_file(path, max_bytes)
    if not data:
        raise UserError(f"{label}: the image is empty", code="empty_image")
    if len(data) > max_bytes:
        raise TooLargeError(f"{label}: {len(data)} bytes, the limit is {max_bytes}", code="image_too_large")
    return decode(data, label, max_pixels), hashlib.sha256(data).hexdigest()


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UserError(f"image not found: {path}", code="not_found") from None
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc.strerror or type(exc).__name__}") from None
    if path.is_dir():
        raise UserError(f"expected an image file, got a folder: {path}")
    if size > max_bytes:  # checked before reading a byte
        raise TooLargeError(f"{path}: {size} bytes, the limit is {max_bytes}", code="image_too_large")
    try:
        with open(path, "rb") as handle:
            return handle.read(max_bytes + 1)
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc.strerror or type(exc).__name__}") from None


def _check_pixels(width: int, height: int, max_pixels: int, label: str) -> None:
    if width * height > max_pixels:
        raise TooLargeError(f"{label}: {width}x{height} pixels, the limit is {max_pixels}", code="image_too_large")


def decode(data: bytes, label: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.format not in FORMATS:
                raise UnsupportedError(f"{label}: {opened.format} images are not accepted "
                                       f"(accepted: {', '.join(FORMATS)})", code="unsupported_image")
            _check_pixels(opened.width, opened.height, max_pixels, label)  # header only: nothing decoded yet
            return ImageOps.exif_transpose(opened).convert("RGB")
    except UserError:
        raise
    except Image.DecompressionBombError:  # Pillow's own hard stop
        raise TooLargeError(f"{label}: too many pixels (the limit is {max_pixels})", code="image_too_large") from None
    except UnidentifiedImageError:  # its own text names a BytesIO object: useless to a user
        raise UserError(f"cannot decode image {label}: not a {', '.join(FORMATS)} image",
                        code="undecodable_image") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot decode image {label}: {reason}", code="undecodable_image") from None


def check_header(path: Path, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> None:
    """Cheap early check (no pixel decoded): the file exists, is an accepted format and within limits."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}", code="not_found")
    if path.stat().st_size > max_bytes:
        raise TooLargeError(f"{path}: {path.stat().st_size} bytes, the limit is {max_bytes}", code="image_too_large")
    try:
        with Image.open(path) as opened:
            if opened.format not in FORMATS:
                raise UnsupportedError(f"{path}: {opened.format} images are not accepted", code="unsupported_image")
            _check_pixels(opened.width, opened.height, max_pixels, str(path))
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise TooLargeError(f"{path}: too many pixels (the limit is {max_pixels})", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "not an image" if isinstance(exc, UnidentifiedImageError) else (str(exc).splitlines() or ["?"])[0]
        raise UserError(f"cannot decode image {path}: {reason}", code="undecodable_image") from None


def save_png_atomic(image: Image.Image, path: Path) -> str:
    """Write a PNG via a temporary name and rename; returns the sha256 of the written bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()
