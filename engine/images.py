"""Reading query and dataset images safely: one-line errors, RGB out, bytes hashed."""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import UserError

# Decompression-bomb guard: far above any generator's output (e.g. 4096 x 4096 = 16.8 MP).
MAX_PIXELS = 64_000_000


def read_image(path: Path) -> tuple[Image.Image, str]:
    """Decode `path` to RGB and return it with the sha256 of its bytes."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"image not found: {path}")
    if path.is_dir():
        raise UserError(f"expected an image file, got a folder: {path}")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_PIXELS:
                raise UserError(f"image too large ({opened.width}x{opened.height} pixels): {path}")
            image = ImageOps.exif_transpose(opened).convert("RGB")  # as a viewer shows it
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode image {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return image, hashlib.sha256(data).hexdigest()


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
