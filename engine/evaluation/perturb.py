"""Post-processing applied to queries only (the references stay clean), as images meet it in the wild."""
from __future__ import annotations

import io
from typing import Callable

from PIL import Image, ImageFilter

from engine.errors import UserError

# kind -> strengths, mildest first (quality for codecs, scale factor, kept side fraction, blur sigma)
LADDERS: dict[str, tuple[float, ...]] = {
    "jpeg": (100, 90, 75, 50),
    "webp": (100, 90, 75, 50),
    "resize": (2.0, 1.5, 0.75, 0.5),
    "crop": (0.9, 0.75, 0.5),
    "blur": (0.5, 1.0, 2.0),
}


def _encode(image: Image.Image, fmt: str, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def jpeg(image: Image.Image, quality: float) -> Image.Image:
    return _encode(image, "JPEG", int(quality))


def webp(image: Image.Image, quality: float) -> Image.Image:
    return _encode(image, "WEBP", int(quality))


def resize(image: Image.Image, factor: float) -> Image.Image:
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, keep: float) -> Image.Image:
    """Keep the central `keep` fraction of each side."""
    w, h = max(1, round(image.width * keep)), max(1, round(image.height * keep))
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h))


def blur(image: Image.Image, sigma: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=sigma))


FUNCTIONS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "jpeg": jpeg, "webp": webp, "resize": resize, "crop": center_crop, "blur": blur}


def transform(kind: str, strength: float) -> Callable[[Image.Image], Image.Image]:
    function = FUNCTIONS[kind]
    return lambda image: function(image, strength)


def parse_perturbations(text: str | None) -> list[tuple[str, float]]:
    """`all`, or a comma list of kinds (`jpeg,blur`) and kind=strength items (`jpeg=60,resize=0.5`)."""
    if not text:
        return []
    out: list[tuple[str, float]] = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        kind, _, value = item.partition("=")
        if kind == "all":
            out += [(k, s) for k, ladder in LADDERS.items() for s in ladder]
            continue
        if kind not in LADDERS:
            raise UserError(f"--perturb: unknown perturbation {kind!r} (choose from all, {', '.join(LADDERS)})")
        if not value:
            out += [(kind, s) for s in LADDERS[kind]]
            continue
        try:
            strength = float(value)
        except ValueError:
            raise UserError(f"--perturb: {item!r} needs a number after =") from None
        if kind in ("jpeg", "webp") and not 1 <= strength <= 100:
            raise UserError(f"--perturb: {kind} quality must be within 1..100")
        if kind in ("resize", "crop", "blur") and strength <= 0 or kind == "crop" and strength > 1:
            raise UserError(f"--perturb: {kind} strength {strength} is out of range")
        out.append((kind, strength))
    return list(dict.fromkeys(out))


def label(kind: str, strength: float) -> str:
    return f"{kind}-{strength:g}"
