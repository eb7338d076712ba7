"""Invisible watermarks that open pipelines embed by default, via invisible-watermark (optional).

- SDXL (diffusers' StableDiffusionXLWatermarker, from Stability's reference code): a fixed
  48-bit message, dwtDct, embedded in BGR pixel order.
- SD 1.x reference scripts: the bytes "StableDiffusionV1", dwtDct.

Resizing, cropping, rotation and heavy recompression erase these marks: "not found" is not
evidence that an image was not generated.
"""
from __future__ import annotations

import importlib.util
import io

# diffusers/pipelines/stable_diffusion_xl/watermark.py: WATERMARK_MESSAGE, most significant bit first
SDXL_MESSAGE = 0b101100111110110010010000011110111011000110011110
SDXL_BITS = [int(b) for b in bin(SDXL_MESSAGE)[2:]]
SD1_BYTES = b"StableDiffusionV1"
SD1_BITS = [(byte >> (7 - i)) & 1 for byte in SD1_BYTES for i in range(8)]
MIN_AGREEMENT = 0.9  # share of bits that must match (random pixels match about half)
MAX_PIXELS = 40_000_000
NOTE = ("resizing, cropping, rotation and recompression erase these watermarks: "
        "not found is not evidence of a real image")
KNOWN = (("sdxl", SDXL_BITS), ("sd1", SD1_BITS))

_decoder_class = None


def _embed_max_dct():
    """invisible-watermark's dwtDct codec class. Its package __init__ imports torch (for the
    RivaGAN codec we do not use), so the dwtDct module is loaded on its own when possible."""
    global _decoder_class
    if _decoder_class is None:
        spec = importlib.util.find_spec("imwatermark")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("imwatermark")
        path = next(iter(spec.submodule_search_locations)) + "/maxDct.py"
        mod_spec = importlib.util.spec_from_file_location("_resynth_imwatermark_maxdct", path)
        if mod_spec is None or mod_spec.loader is None:
            from imwatermark.maxDct import EmbedMaxDct  # the ordinary way, torch and all
            _decoder_class = EmbedMaxDct
        else:
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
            _decoder_class = module.EmbedMaxDct
    return _decoder_class


def check(data: bytes) -> tuple[dict | None, dict]:
    """(the watermark found or None, the check's state). Never raises."""
    try:
        import numpy as np
        codec = _embed_max_dct()
    except Exception as e:
        return None, {"state": "unavailable",
                      "reason": f"not available: pip install invisible-watermark opencv-python-headless "
                                f"({type(e).__name__}: {str(e)[:200]})", "note": NOTE}
    try:
        from PIL import Image

        from engine.errors import UserError
        from engine.images import FORMATS, check_structure

        try:  # what attribution refuses before Pillow sees it (a PNG's 19,000 colour profiles cost 38 s there)
            check_structure(data)
        except UserError as refused:  # "cannot decode image image: more than 4 PNG colour profiles ..."
            return None, {"state": "skipped", "reason": str(refused).partition(": ")[2], "note": NOTE}
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:  # only these: ICO's decodes inside open
            w, h = im.size
            if w * h > MAX_PIXELS:
                return None, {"state": "skipped", "reason": f"image of {w}x{h} is too large to check", "note": NOTE}
            if w * h < 256 * 256:
                return None, {"state": "skipped", "reason": "image smaller than 256x256 carries no such watermark",
                              "note": NOTE}
            bgr = np.ascontiguousarray(np.asarray(im.convert("RGB"))[:, :, ::-1])
    except Exception as e:  # undecodable pixels: the other evidence still stands
        return None, {"state": "skipped", "reason": f"pixels not decodable: {type(e).__name__}", "note": NOTE}
    try:
        found, best = None, 0.0
        for name, expected in KNOWN:
            bits = [int(b) for b in codec(watermarks=[], wmLen=len(expected)).decode(bgr)]
            matched = sum(a == b for a, b in zip(bits, expected))
            agreement = matched / len(expected)
            if agreement >= MIN_AGREEMENT and agreement > best:
                best = agreement
                found = {"name": name, "method": "dwtDct", "bits": len(expected), "matched": matched,
                         "agreement": round(agreement, 4), "note": NOTE}
        return found, {"state": "checked", "note": NOTE}
    except Exception as e:
        return None, {"state": "skipped", "reason": f"decoder failed: {type(e).__name__}: {str(e)[:200]}", "note": NOTE}
