"""Decoding uploaded bytes: formats allow-listed, pixel count checked before any pixel is decoded."""
from __future__ import annotations

import hashlib
import io

from PIL import Image, UnidentifiedImageError

from engine.images import MAX_PIXELS
from engine.service.errors import ServiceError

# Formats Pillow reads that generators and browsers actually produce; anything else (PSD, EPS
# through Ghostscript, ICO, ...) is refused before its plugin parses more than the header.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def decode_upload(data: bytes, max_bytes: int, max_pixels: int = MAX_PIXELS, label: str = "image"
                  ) -> tuple[Image.Image, str]:
    """RGB image and sha256 of the uploaded bytes, or a 400 ServiceError saying what is wrong."""
    if not data:
        raise ServiceError(400, "empty_image", f"{label}: the upload is empty")
    if len(data) > max_bytes:
        raise ServiceError(400, "image_too_large", f"{label}: {len(data)} bytes, the limit is {max_bytes}")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as opened:
            width, height = opened.size  # header only: nothing decoded yet
            if width * height > max_pixels:
                raise ServiceError(400, "image_too_large",
                                   f"{label}: {width}x{height} pixels, the limit is {max_pixels}")
            image = opened.convert("RGB")
    except ServiceError:
        raise
    except Image.DecompressionBombError:  # Pillow's own hard stop, far beyond any sane limit
        raise ServiceError(400, "image_too_large", f"{label}: too many pixels (the limit is {max_pixels})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, UnidentifiedImageError):  # its text names a BytesIO object: useless to a client
            raise ServiceError(400, "undecodable_image",
                               f"{label}: not a {', '.join(FORMATS)} image") from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ServiceError(400, "undecodable_image", f"{label}: cannot decode ({reason})") from None
    return image, hashlib.sha256(data).hexdigest()
