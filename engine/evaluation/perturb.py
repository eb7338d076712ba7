"""Post-processing applied to queries only (the references stay clean), as images meet it in the wild."""
from __future__ import annotations

import io
import math
import zlib
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from engine.errors import UserError

# kind -> strengths, mildest first: quality for the codecs, scale factor, kept side fraction, blur sigma;
# then the rest of the reference paper's query protocol (docs/evaluation.md): longest side before JPEG 85
# (social), median filter size, degrees of rotation, share of colour removed (grey), noise sigma in 0..255.
# The first five kinds and their ladders are as they were; the others are added after them.
LADDERS: dict[str, tuple[float, ...]] = {
    "jpeg": (100, 90, 75, 50),
    "webp": (100, 90, 75, 50),
    "resize": (2.0, 1.5, 0.75, 0.5),
    "crop": (0.9, 0.75, 0.5),
    "blur": (0.5, 1.0, 2.0),
    "social": (1080, 512),
    "median": (3, 5),
    "rotate": (5, 10),
    "grey": (1.0,),
    "noise": (5, 10, 20),
}
SOCIAL_QUALITY = 85  # what social networks re-encode at, after bringing the longest side to 1080 px
NOISE_SEED = 0


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


def social(image: Image.Image, longest: float = 1080) -> Image.Image:
    """As a social network serves an upload: the longest side brought down to `longest` px when larger
    (bicubic, aspect kept), then JPEG at quality 85."""
    image = image.convert("RGB")
    side = max(image.size)
    if side > longest:
        factor = longest / side
        image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))),
                             Image.Resampling.BICUBIC)
    return _encode(image, "JPEG", SOCIAL_QUALITY)


def median(image: Image.Image, size: float) -> Image.Image:
    """Median filter over a size x size window (odd size)."""
    return image.convert("RGB").filter(ImageFilter.MedianFilter(int(size)))


def rotate(image: Image.Image, degrees: float) -> Image.Image:
    """Rotated `degrees` anticlockwise about the centre (bicubic), cropped to the largest centred rectangle
    of the same shape that has no empty corner, and scaled back to the original size."""
    image = image.convert("RGB")
    w, h = image.size
    turned = image.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=False)
    c, s = abs(math.cos(math.radians(degrees))), abs(math.sin(math.radians(degrees)))
    keep = min(w / (w * c + h * s), h / (w * s + h * c))
    cw, ch = max(1, math.floor(w * keep)), max(1, math.floor(h * keep))
    left, top = (w - cw) // 2, (h - ch) // 2
    return turned.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)


def grey(image: Image.Image, amount: float = 1.0) -> Image.Image:
    """Greyscale (ITU-R 601 luma, PIL's "L"), back to three equal RGB channels; `amount` < 1 removes only
    that share of the colour."""
    image = image.convert("RGB")
    luma = image.convert("L").convert("RGB")
    return luma if amount >= 1 else Image.blend(image, luma, float(amount))


def noise(image: Image.Image, sigma: float, seed: int = NOISE_SEED) -> Image.Image:
    """Additive Gaussian noise of standard deviation `sigma` (pixel values 0..255), rounded and clipped.
    The noise is drawn from `seed` and the image's own pixels, so the same image always gets the same
    noise (the feature cache stays valid) and different images get different noise."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    rng = np.random.default_rng([seed, zlib.crc32(pixels.astype(np.uint8).tobytes()), pixels.shape[0],
                                 pixels.shape[1]])
    noisy = pixels + rng.normal(0.0, float(sigma), pixels.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


FUNCTIONS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "jpeg": jpeg, "webp": webp, "resize": resize, "crop": center_crop, "blur": blur,
    "social": social, "median": median, "rotate": rotate, "grey": grey, "noise": noise}


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
        problem = _check_new_kind(kind, strength)
        if problem:
            raise UserError(f"--perturb: {problem}")
        out.append((kind, strength))
    return list(dict.fromkeys(out))


def _check_new_kind(kind: str, strength: float) -> str | None:
    """What is wrong with a strength of the kinds added for the reference protocol (None when fine)."""
    if kind == "social" and not (16 <= strength and strength == int(strength)):
        return f"social takes the longest side in whole pixels, at least 16 (not {strength:g})"
    if kind == "median" and not (3 <= strength <= 15 and strength == int(strength) and int(strength) % 2):
        return f"median takes an odd window size within 3..15 (not {strength:g})"
    if kind == "rotate" and not (0 < abs(strength) <= 45):
        return f"rotate takes degrees within -45..45, not 0 (not {strength:g})"
    if kind == "grey" and not 0 < strength <= 1:
        return f"grey takes the share of colour removed within 0..1 (not {strength:g})"
    if kind == "noise" and not 0 < strength <= 255:
        return f"noise takes a sigma within 0..255, above 0 (not {strength:g})"
    return None


def label(kind: str, strength: float) -> str:
    return f"{kind}-{strength:g}"
