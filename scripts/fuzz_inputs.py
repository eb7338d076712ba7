"""A seeded mutation fuzzer for the bytes resynth reads from strangers (a research tool, not run in CI).

Seeds are valid files of every accepted format, with the metadata front-ends and cameras write (A1111
`parameters`, a ComfyUI graph, EXIF with an orientation, XMP, a C2PA-like JUMBF box, a signed C2PA PNG).
Mutations are byte-level (flips, truncation at structural boundaries, splices) and structural (chunk
lengths, CRCs, duplicated or moved chunks, text bombs, deep or huge JSON, declared sizes, EXIF IFD loops,
JUMBF boxes and CBOR). Each case runs in a worker process with an address-space limit and a per-case time
limit, through what the product does with a query's bytes:
- prov: engine.provenance.read_provenance as Query.read calls it (and with the watermark check, 1 in 8);
- image: engine.images.read_image of the bytes (the Python API and the service's decode);
- cli: check_header of a file, then read_image of the path (what `resynth attribute FILE` does);
- http: the service's header step (_sizes, _charge) before the decode;
and with --http, a sample through the real app (FastAPI TestClient, tiny zoo store) for the answer itself.

    .venv/bin/python scripts/fuzz_inputs.py --cases 3000 --seed 1 [--http 200] [--out /tmp/fuzz]

A defect: an exception that is no UserError, an 'internal error' note, a hang, a blow-up of memory, a dead
worker, outcomes that differ between the paths for the same bytes, a C2PA 'valid' of a mutated file.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import select
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
A1111 = ("portrait of an old man with a beard, oil painting\nNegative prompt: blurry, lowres\n"
         "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, "
         "Size: 64x64, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")
COMFY = {"3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "positive": ["6", 0],
                                                    "negative": ["7", 0], "model": ["4", 0],
                                                    "latent_image": ["5", 0]}},
         "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
         "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
         "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in snow", "clip": ["4", 1]}},
         "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}}}
XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       '<rdf:Description Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/'
       'trainedAlgorithmicMedia"/></rdf:RDF></x:xmpmeta>')
C2PA_UUID = bytes.fromhex("6332706100110010800000aa00389b71")
PNG_SIG = b"\x89PNG\r\n\x1a\n"
SERVICE_BYTES = 20 << 20  # engine.service.config.Limits().max_image_bytes


# --- seeds ---------------------------------------------------------------------------------------------

def picture(size=(64, 64), seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 60 * np.sin(x / 7.0), 128 + 60 * np.cos(y / 9.0), 128 + 40 * np.sin((x + y) / 5.0)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def exif_block(orientation=6, comment=A1111):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "Canon"
    exif[0x0110] = "EOS R5"
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + comment.encode("utf-16-be")
    return exif.tobytes()


def chunk(ctype: bytes, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">I", len(body) if length is None else length) + ctype + body + \
        struct.pack(">I", zlib.crc32(ctype + body))


def box(tbox: bytes, payload: bytes, lbox: int | None = None) -> bytes:
    return struct.pack(">I", 8 + len(payload) if lbox is None else lbox) + tbox + payload


def jumd(uuid: bytes, label: str) -> bytes:
    return box(b"jumd", uuid + b"\x03" + label.encode() + b"\x00")


def jumbf_store(cbor: bytes = b"\xa1\x63abc\x01", depth: int = 0) -> bytes:
    """A C2PA-shaped manifest store: store > manifest > claim (a cbor box); `depth` extra nested superboxes."""
    claim = box(b"jumb", jumd(bytes.fromhex("6332636c00110010800000aa00389b71"), "c2pa.claim") + box(b"cbor", cbor))
    inner = claim
    for i in range(depth):
        inner = box(b"jumb", jumd(C2PA_UUID, f"n{i}") + inner)
    manifest = box(b"jumb", jumd(bytes.fromhex("63326d6100110010800000aa00389b71"), "urn:uuid:fuzz") + inner)
    return box(b"jumb", jumd(C2PA_UUID, "c2pa") + manifest)


def app11(jumbf: bytes) -> bytes:
    body = b"JP" + struct.pack(">HI", 1, 1) + jumbf
    return b"\xff\xeb" + struct.pack(">H", min(len(body) + 2, 0xFFFF)) + body[:0xFFFD]


def deep_cbor(n: int) -> bytes:
    return b"\x81" * n + b"\x00"


def seeds() -> dict[str, bytes]:
    from PIL import Image, PngImagePlugin

    out: dict[str, bytes] = {}

    def save(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111)
    info.add_itxt("prompt", json.dumps(COMFY))
    info.add_text("workflow", json.dumps({"nodes": [], "links": []}), zip=True)
    info.add_itxt("XML:com.adobe.xmp", XMP, zip=True)
    out["png8_meta"] = save(picture(), "PNG", pnginfo=info, exif=exif_block())
    import numpy as np
    out["png16"] = save(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)), "PNG")
    pal = picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out["png_palette_trns"] = save(pal, "PNG", transparency=0)
    out["png_rgba"] = save(picture().convert("RGBA"), "PNG")
    out["png_c2pa_like"] = out["png16"][:33] + chunk(b"caBX", jumbf_store()) + out["png16"][33:]
    base = save(picture(), "JPEG", quality=90, exif=exif_block())
    xmp_seg = b"http://ns.adobe.com/xap/1.0/\x00" + XMP.encode()
    out["jpeg_exif_xmp_jumbf"] = (base[:2] + b"\xff\xe1" + struct.pack(">H", len(xmp_seg) + 2) + xmp_seg
                                  + app11(jumbf_store()) + base[2:])
    out["jpeg_progressive"] = save(picture(), "JPEG", quality=80, progressive=True, exif=exif_block(8))
    out["jpeg_cmyk"] = save(picture().convert("CMYK"), "JPEG", quality=80)
    out["jpeg_gray"] = save(picture().convert("L"), "JPEG", quality=50, comment=b"Steps: 5, Sampler: x, Seed: 1")
    out["webp_lossy"] = save(picture(), "WEBP", quality=70, exif=exif_block(3), xmp=XMP.encode())
    out["webp_lossless"] = save(picture(), "WEBP", lossless=True)
    frames = [picture(seed=i) for i in range(3)]
    out["webp_anim"] = save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50)
    out["gif_anim"] = save(frames[0].convert("P"), "GIF", save_all=True,
                           append_images=[f.convert("P") for f in frames[1:]], duration=50, loop=0)
    out["tiff_multi"] = save(frames[0], "TIFF", save_all=True, append_images=frames[1:], compression="tiff_lzw")
    out["tiff16"] = save(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)), "TIFF")
    out["bmp"] = save(picture(), "BMP")
    out["bmp_pal"] = save(pal, "BMP")
    out["png_256"] = save(picture((288, 256)), "PNG", pnginfo=info)  # big enough for the watermark check
    out["jpeg_256"] = save(picture((256, 320)), "JPEG", quality=85, progressive=True, exif=exif_block(6))
    for fmt in ("PPM", "TGA", "ICO", "PCX"):
        out[fmt.lower()] = save(picture((32, 32)), fmt)
    signed = signed_png()
    if signed:
        out["png_c2pa_signed"] = signed
    return out


def signed_png() -> bytes | None:
    try:
        import c2pa

        sys.path.insert(0, str(ROOT))
        from tests.test_provenance import _test_ca
    except Exception:  # noqa: BLE001
        return None
    folder = Path(tempfile.mkdtemp(prefix="fuzz-ca-"))
    chain, key, anchors = _test_ca(folder)
    os.environ["FUZZ_ANCHORS"] = str(anchors)
    manifest = {"claim_generator_info": [{"name": "fuzz", "version": "1"}], "title": "x.png",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [{
                    "action": "c2pa.created",
                    "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"}]}}]}
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", chain, key, None))
    buf = io.BytesIO()
    src = io.BytesIO()
    picture((80, 80)).save(src, "PNG")
    src.seek(0)
    with c2pa.Builder(manifest) as builder:
        builder.sign(signer, "image/png", src, buf)
    return buf.getvalue()


# --- structure ---------------------------------------------------------------------------------------

def png_chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, body length, type) of each chunk up to the end or a broken length."""
    out, pos = [], 8
    while pos + 8 <= len(data) and len(out) < 5000:
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        out.append((pos, length, ctype))
        pos += 12 + length
    return out


def jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    out, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and len(out) < 500:
        marker = data[pos + 1]
        if marker in (0xD9,):
            break
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        out.append((pos, marker))
        if marker == 0xDA:
            break
        pos += 2 + length
    return out


def riff_chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 12
    while pos + 8 <= len(data) and len(out) < 500:
        fourcc, size = struct.unpack("<4sI", data[pos:pos + 8])
        out.append((pos, size, fourcc))
        pos += 8 + size + (size & 1)
    return out


def boundaries(data: bytes) -> list[int]:
    if data.startswith(PNG_SIG):
        b = [p for p, n, _ in png_chunks(data) for p in (p, p + 4, p + 8, p + 8 + n, p + 12 + n)]
    elif data.startswith(b"\xff\xd8"):
        b = [p for p, _ in jpeg_segments(data) for p in (p, p + 2, p + 4)]
    elif data.startswith(b"RIFF"):
        b = [p for p, n, _ in riff_chunks(data) for p in (p, p + 8, p + 8 + n)]
    else:
        b = [0, 2, 4, 6, 8, 10, 12, 14, 16, 26, 54]
    return sorted({x for x in b if 0 <= x <= len(data)})


# --- hostile payloads -----------------------------------------------------------------------------------

def hostile_exif(rng: random.Random) -> bytes:
    e = rng.choice("<>")
    head = (b"II*\x00" if e == "<" else b"MM\x00*")
    kind = rng.randrange(8)
    if kind == 0:  # IFD0 whose next-IFD pointer is itself
        entry = struct.pack(e + "HHI4s", 0x0112, 3, 1, struct.pack(e + "HH", 6, 0))
        return head + struct.pack(e + "IH", 8, 1) + entry + struct.pack(e + "I", 8)
    if kind == 1:  # the Exif IFD pointer points to IFD0 (a loop)
        return head + struct.pack(e + "IH", 8, 2) + struct.pack(e + "HHII", 0x8769, 4, 1, 8) + \
            struct.pack(e + "HHII", 0x8825, 4, 1, 8) + struct.pack(e + "I", 0)
    if kind == 2:  # offsets out of range
        return head + struct.pack(e + "IH", 8, 3) + struct.pack(e + "HHII", 0x010F, 2, 100, 0xFFFFFFF0) + \
            struct.pack(e + "HHII", 0x8769, 4, 1, 0x7FFFFFFF) + struct.pack(e + "HHII", 0x0112, 3, 0x40000000, 8) + \
            struct.pack(e + "I", 0xFFFFFFFF)
    if kind == 3:  # IFD0 offset past the block
        return head + struct.pack(e + "I", rng.choice([0, 1, 7, 0xFFFFFFFF, 0x80000000, 9]))
    if kind == 4:  # count of entries huge
        return head + struct.pack(e + "IH", 8, 0xFFFF) + b"\x00" * 100
    if kind == 5:  # UserComment of odd charsets, NULs and invalid UTF-8/16
        comment = rng.choice([b"UNICODE\x00\xff", b"UNICODE\x00" + b"\x00\xd8" * 50, b"JIS\x00\x00\x00\x00\x00\x81",
                              b"ASCII\x00\x00\x00\xff\xfe\x00Steps: 1", b"\x00" * 8, b""])
        ifd1 = struct.pack(e + "H", 1) + struct.pack(e + "HHII", 0x9286, 7, len(comment), 26) + b"\x00" * 4
        return head + struct.pack(e + "IH", 8, 1) + struct.pack(e + "HHII", 0x8769, 4, 1, 26 + 18 - 18) + \
            struct.pack(e + "I", 0) + ifd1 + comment
    if kind == 6:  # orientation of odd types
        typ, val = rng.choice([(5, struct.pack(e + "I", 26)), (10, struct.pack(e + "I", 26)),
                               (12, struct.pack(e + "I", 26)), (2, b"6\x00\x00\x00"),
                               (3, struct.pack(e + "HH", 0xFFFF, 0)), (7, b"\x06\x00\x00\x00")])
        return head + struct.pack(e + "IH", 8, 1) + struct.pack(e + "HHI4s", 0x0112, typ, 1, val) + \
            struct.pack(e + "I", 0) + struct.pack(e + "II", rng.choice([0, 1, 0xFFFFFFFF]), rng.choice([0, 1]))
    # a tag listing a million values
    n = 1 << 20
    return head + struct.pack(e + "IH", 8, 1) + struct.pack(e + "HHII", 0x0111, 4, n, 26) + struct.pack(e + "I", 0) + \
        b"\x00" * min(4 * n, 1 << 20)


def hostile_text(rng: random.Random) -> tuple[bytes, bytes]:
    """(chunk type, body) of a text chunk with a hostile payload."""
    key = rng.choice([b"parameters", b"prompt", b"workflow", b"invokeai_metadata", b"sd-metadata", b"Comment",
                      b"XML:com.adobe.xmp", b"k\xffey", b"a" * 80, b"", b"x\x00y"])
    kind = rng.randrange(14)
    if kind == 0:
        text = b"[" * rng.choice([1000, 100_000, 1_000_000])
    elif kind == 1:
        text = json.dumps({str(i): {"class_type": "KSampler", "inputs": {"positive": [str(i + 1), 0], "steps": 1,
                                                                          "latent_image": [str(i + 1), 0]}}
                           for i in range(rng.choice([4000, 6000, 20000]))}).encode()
    elif kind == 2:  # a chain of 5000 conditioning nodes
        text = json.dumps({"0": {"class_type": "KSampler", "inputs": {"positive": ["1", 0], "steps": 2,
                                                                       "latent_image": ["1", 0]}},
                           **{str(i): {"class_type": "C", "inputs": {"a": [str(i + 1), 0], "text": "t" * 100}}
                              for i in range(1, 5000)}}).encode()
    elif kind == 3:
        text = b"\xff\xfe\x00\xc3\x28 Steps: 3, Sampler: Euler, Seed: 1\x00\x00"
    elif kind == 4:
        text = ("x\n" * 200_000 + "Steps: 1, Sampler: a, Seed: 2").encode()
    elif kind == 5:
        text = ("p\nSteps: " + "9" * 5000 + ", Sampler: " + '"' * 40000 + ", Seed: 1e400").encode()
    elif kind == 6:
        text = json.dumps({"prompt": "x" * (3 << 20), "steps": float("inf")}).encode().replace(b"Infinity", b"1e999")
    elif kind == 7:
        text = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    elif kind == 8:  # XMP with many DigitalSourceType names
        text = (("<a:DigitalSourceType>" * 10000) + "</x>").encode()
    elif kind == 9:
        text = A1111.replace("Steps: 28", "Steps: 28\x00hidden").encode()
    elif kind == 10:
        text = json.dumps({"positive_prompt": ["not", "a", "string"], "seed": "1" * 30, "cfg_scale": [1, 2],
                           "width": -1, "model": {"name": {"x": 1}}}).encode()
    elif kind == 11:
        text = json.dumps({"model_weights": 1, "image": {"prompt": [{"prompt": 1}, "x", {"prompt": "ok"}],
                                                        "seed": 2 ** 70}}).encode()
    elif kind == 12:
        text = json.dumps({"1": {"class_type": "KSampler", "inputs": {"positive": [["1", 0], 0], "guider": ["1", 0],
                                                                       "model": [None, 0], "steps": [1, 2, 3],
                                                                       "latent_image": {"a": 1}}}}).encode()
    else:
        text = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    form = rng.randrange(4)
    if form == 0:
        return b"tEXt", key + b"\x00" + text
    if form == 1:
        return b"zTXt", key + b"\x00\x00" + zlib.compress(text, 9)
    if form == 2:
        return b"iTXt", key + b"\x00\x01\x00en\x00\x00" + zlib.compress(text, 9)
    return b"iTXt", key + b"\x00\x00\x00\x00\x00" + text


def bomb(rng: random.Random) -> tuple[bytes, bytes]:
    payload = zlib.compress(b"A" * rng.choice([3 << 20, 64 << 20, 200 << 20]), 9)
    key = rng.choice([b"parameters", b"prompt", b"Comment", b"XML:com.adobe.xmp"])
    if rng.random() < 0.5:
        return b"zTXt", key + b"\x00\x00" + payload
    return b"iTXt", key + b"\x00\x01\x00\x00\x00" + payload


def hostile_jumbf(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:
        return jumbf_store(deep_cbor(rng.choice([100, 10_000, 60_000])))
    if kind == 1:
        return jumbf_store(depth=rng.choice([50, 500, 2000]))
    if kind == 2:  # the store's LBox past the end
        s = jumbf_store()
        return struct.pack(">I", len(s) + rng.choice([1, 1000, 1 << 30])) + s[4:]
    if kind == 3:  # LBox zero ("to the end") or one (XLBox follows, huge)
        s = jumbf_store()
        return (struct.pack(">I", 0) + s[4:]) if rng.random() < 0.5 else \
            struct.pack(">I", 1) + s[4:8] + struct.pack(">Q", rng.choice([2 ** 63, 2 ** 64 - 1, 16, 0])) + s[8:]
    if kind == 4:  # an inner box with a length smaller than its header
        s = bytearray(jumbf_store())
        at = s.find(b"jumd", 8) - 4
        s[at:at + 4] = struct.pack(">I", rng.choice([0, 1, 2, 7, 0xFFFFFFFF]))
        return bytes(s)
    if kind == 5:  # CBOR with huge declared lengths and tags
        return jumbf_store(rng.choice([b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff", b"\x9b" + b"\xff" * 8,
                                       b"\xd9\xd9\xf7" * 1000 + b"\x00", b"\xbf" * 5000,
                                       b"\xfb\x7f\xf8" + b"\x00" * 6]))
    return jumbf_store(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))


# --- mutators -----------------------------------------------------------------------------------------

def m_flip(rng, data, _):
    data = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 8, 32])):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def m_bytes(rng, data, _):
    data = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        i = rng.randrange(len(data))
        data[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    return bytes(data)


def m_truncate(rng, data, _):
    b = boundaries(data)
    at = rng.choice(b) + rng.choice([0, 0, -1, 1, -4, 4]) if b and rng.random() < 0.8 else rng.randrange(len(data))
    return data[:max(0, at)]


def m_png_length(rng, data, _):
    chunks = png_chunks(data)
    if not chunks:
        return m_flip(rng, data, _)
    pos, n, _t = rng.choice(chunks)
    value = rng.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, n + 1, max(n - 1, 0), n + 100, 1 << 24])
    return data[:pos] + struct.pack(">I", value) + data[pos + 4:]


def m_png_crc(rng, data, _):
    chunks = png_chunks(data)
    if not chunks:
        return m_flip(rng, data, _)
    texts = [c for c in chunks if c[2] in (b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"caBX")]
    pos, n, _t = rng.choice(texts if texts and rng.random() < 0.7 else chunks)
    at = pos + 8 + n
    if rng.random() < 0.5:  # the body changed, the CRC kept (a corrupted chunk)
        j = pos + 8 + rng.randrange(max(n, 1))
        return data[:j] + bytes([data[j] ^ 0x20]) + data[j + 1:] if n else data
    return data[:at] + struct.pack(">I", rng.randrange(1 << 32)) + data[at + 4:]


def m_png_shuffle(rng, data, _):
    chunks = [(p, n, t) for p, n, t in png_chunks(data) if p + 12 + n <= len(data)]
    if len(chunks) < 2:
        return m_flip(rng, data, _)
    parts = [data[p:p + 12 + n] for p, n, t in chunks]
    tail = data[chunks[-1][0] + 12 + chunks[-1][1]:]
    op = rng.randrange(4)
    if op == 0:
        i = rng.randrange(len(parts))
        parts.insert(rng.randrange(len(parts) + 1), parts[i])
    elif op == 1:
        i, j = rng.randrange(len(parts)), rng.randrange(len(parts))
        parts[i], parts[j] = parts[j], parts[i]
    elif op == 2:  # text chunks moved after the image data
        texts = [x for x in parts if x[4:8] in (b"tEXt", b"zTXt", b"iTXt", b"eXIf")]
        parts = [x for x in parts if x not in texts]
        parts[-1:-1] = texts
    else:
        i = rng.randrange(len(parts))
        parts = parts[:i] + parts[i:i + 1] * rng.choice([2, 50, 300]) + parts[i + 1:]
    return data[:8] + b"".join(parts) + tail


def _insert_png(data, body_chunk: bytes, rng) -> bytes:
    chunks = png_chunks(data)
    at = 33 if rng.random() < 0.7 or len(chunks) < 2 else chunks[-1][0]
    return data[:at] + body_chunk + data[at:]


def m_png_text(rng, data, kind):
    if not data.startswith(PNG_SIG):
        return m_insert_meta(rng, data, kind)
    ctype, body = hostile_text(rng) if rng.random() < 0.75 else bomb(rng)
    return _insert_png(data, chunk(ctype, body), rng)


def m_dims(rng, data, _):
    w, h = rng.choice([(65535, 65535), (65536, 65536), (0, 0), (0, 64), (2 ** 31 - 1, 2 ** 31 - 1),
                       (2 ** 32 - 1, 1), (64, 1), (1, 60000), (8000, 8000), (9000, 7200), (40, 1)])
    if data.startswith(PNG_SIG):
        ihdr = bytearray(data[16:29])
        ihdr[0:8] = struct.pack(">II", w & 0xFFFFFFFF, h & 0xFFFFFFFF)
        if rng.random() < 0.3:
            ihdr[8] = rng.choice([1, 2, 4, 8, 16, 3, 0, 32])
            ihdr[9] = rng.choice([0, 2, 3, 4, 6, 7])
        return data[:8] + chunk(b"IHDR", bytes(ihdr)) + data[33:]
    if data.startswith(b"\xff\xd8"):
        for pos, marker in jpeg_segments(data):
            if marker in (0xC0, 0xC1, 0xC2):
                return data[:pos + 5] + struct.pack(">HH", h & 0xFFFF, w & 0xFFFF) + data[pos + 9:]
    if data[:3] == b"GIF":
        out = bytearray(data)
        out[6:10] = struct.pack("<HH", w & 0xFFFF, h & 0xFFFF)
        at = out.find(b"\x2c", 13)
        if at > 0 and rng.random() < 0.5:
            out[at + 5:at + 9] = struct.pack("<HH", w & 0xFFFF, h & 0xFFFF)
        return bytes(out)
    if data[:2] == b"BM":
        sign = rng.choice([1, -1])
        return data[:18] + struct.pack("<ii", min(w, 2 ** 31 - 1), sign * min(h, 2 ** 31 - 1)) + data[26:]
    if data.startswith(b"RIFF"):
        for pos, _size, fourcc in riff_chunks(data):
            if fourcc == b"VP8X":
                return data[:pos + 12] + struct.pack("<I", (w - 1) & 0xFFFFFF)[:3] + \
                    struct.pack("<I", (h - 1) & 0xFFFFFF)[:3] + data[pos + 18:]
            if fourcc == b"VP8L":
                bits = ((w - 1) & 0x3FFF) | (((h - 1) & 0x3FFF) << 14)
                rest = struct.unpack("<I", data[pos + 9:pos + 13])[0] & ~0xFFFFFFF
                return data[:pos + 9] + struct.pack("<I", bits | rest) + data[pos + 13:]
            if fourcc == b"VP8 ":
                return data[:pos + 14] + struct.pack("<HH", w & 0x3FFF, h & 0x3FFF) + data[pos + 18:]
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        e = "<" if data[:2] == b"II" else ">"
        off = struct.unpack(e + "I", data[4:8])[0]
        n = struct.unpack(e + "H", data[off:off + 2])[0]
        out = bytearray(data)
        for i in range(n):
            at = off + 2 + 12 * i
            tag, typ = struct.unpack(e + "HH", data[at:at + 4])
            if tag in (256, 257):
                val = w if tag == 256 else h
                out[at + 2:at + 12] = struct.pack(e + "HII", 4, 1, val & 0xFFFFFFFF)
        return bytes(out)
    return m_flip(rng, data, _)


def m_insert_meta(rng, data, _):
    """Hostile EXIF, XMP, text or JUMBF in the container's own place for it."""
    what = rng.choice(["exif", "jumbf", "text"])
    payload = hostile_exif(rng) if what == "exif" else hostile_jumbf(rng) if what == "jumbf" else \
        hostile_text(rng)[1].partition(b"\x00")[2]
    if data.startswith(PNG_SIG):
        ctype = {"exif": b"eXIf", "jumbf": b"caBX", "text": b"tEXt"}[what]
        return _insert_png(data, chunk(ctype, payload if what != "text" else b"Comment\x00" + payload), rng)
    if data.startswith(b"\xff\xd8"):
        if what == "jumbf":
            seg = app11(payload)
            if rng.random() < 0.3:  # the same JUMBF split over many APP11 packets
                seg = b"".join(app11(payload[i:i + 1000]) for i in range(0, len(payload), 1000))
        else:
            body = (b"Exif\x00\x00" + payload) if what == "exif" else (b"http://ns.adobe.com/xap/1.0/\x00" + payload)
            seg = b"\xff\xe1" + struct.pack(">H", min(len(body) + 2, 0xFFFF)) + body[:0xFFFD]
        return data[:2] + seg + data[2:]
    if data.startswith(b"RIFF"):
        fourcc = {"exif": b"EXIF", "jumbf": b"C2PA", "text": b"XMP "}[what]
        extra = fourcc + struct.pack("<I", len(payload)) + payload + b"\x00" * (len(payload) & 1)
        out = data + extra
        return out[:4] + struct.pack("<I", len(out) - 8) + out[8:]
    return data + payload


def m_jpeg(rng, data, kind):
    if not data.startswith(b"\xff\xd8"):
        return m_flip(rng, data, kind)
    segs = jpeg_segments(data)
    op = rng.randrange(5)
    if op == 0 and segs:  # a segment length of 0, 1, or past the end
        pos, _m = rng.choice(segs)
        return data[:pos + 2] + struct.pack(">H", rng.choice([0, 1, 2, 0xFFFF])) + data[pos + 4:]
    if op == 1:  # fill bytes and restart markers before the first segment
        return data[:2] + b"\xff" * rng.choice([10, 5000]) + b"\xff\xd0" * 50 + data[2:]
    if op == 2 and segs:  # a segment duplicated (two SOF, two DHT)
        i = rng.randrange(len(segs))
        pos = segs[i][0]
        end = segs[i + 1][0] if i + 1 < len(segs) else pos + 4
        return data[:pos] + data[pos:end] * rng.choice([2, 30]) + data[pos:]
    if op == 3:  # EOI early, or none
        return data[:rng.randrange(2, len(data))] + b"\xff\xd9" if rng.random() < 0.5 else data.rstrip(b"\xff\xd9")
    sos = data.find(b"\xff\xda")
    if sos > 0:  # the first scan repeated (a progressive scan loop)
        eoi = data.rfind(b"\xff\xd9")
        return data[:eoi] + data[sos:eoi] * rng.choice([2, 20, 150]) + data[eoi:]
    return data


def m_splice(rng, data, _, pool=()):
    other = rng.choice(pool) if pool else data
    i = rng.randrange(len(data))
    j = rng.randrange(len(other))
    return data[:i] + other[j:j + rng.randint(1, 2000)] + data[i + rng.randint(0, 200):]


def m_gif_tiff(rng, data, kind):
    if data[:3] == b"GIF":
        op = rng.randrange(3)
        if op == 0:  # many extension blocks before the first frame
            ext = b"\x21\xfe" + (b"\x05hello" * rng.choice([10, 30000])) + b"\x00"
            return data[:13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)] + ext + \
                data[13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0):]
        at = data.find(b"\x2c", 13)
        if op == 1 and at > 0:  # LZW minimum code size out of range
            return data[:at + 10] + bytes([rng.choice([0, 12, 13, 255])]) + data[at + 11:]
        return data[:-1] + data[data.find(b"\x21\xf9"):-1] * rng.choice([2, 500]) + b"\x3b"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        e = "<" if data[:2] == b"II" else ">"
        off = struct.unpack(e + "I", data[4:8])[0]
        n = struct.unpack(e + "H", data[off:off + 2])[0]
        nxt = off + 2 + 12 * n
        op = rng.randrange(3)
        if op == 0:  # the first directory's next-IFD points to itself (a page loop)
            return data[:nxt] + struct.pack(e + "I", off) + data[nxt + 4:]
        out = bytearray(data)
        i = rng.randrange(n)
        at = off + 2 + 12 * i
        if op == 1:  # a tag's count huge, its offset out of range
            out[at + 4:at + 12] = struct.pack(e + "II", rng.choice([0xFFFFFFFF, 60000, 1 << 20]),
                                                rng.choice([0xFFFFFFF0, len(data) - 2, 0]))
        else:  # a tag's type changed
            out[at + 2:at + 4] = struct.pack(e + "H", rng.choice([0, 5, 10, 12, 13, 16, 17, 18, 99]))
        return bytes(out)
    return m_flip(rng, data, kind)


MUTATORS = [m_flip, m_bytes, m_truncate, m_png_length, m_png_crc, m_png_shuffle, m_png_text, m_dims,
            m_insert_meta, m_jpeg, m_splice, m_gif_tiff]
WEIGHTS = [3, 2, 3, 2, 2, 2, 3, 2, 3, 2, 1, 2]


def make_cases(n: int, seed: int, pool: dict[str, bytes], stack: int = 3):
    rng = random.Random(seed)
    names = sorted(pool)
    values = [pool[k] for k in names]
    for name in names:  # the seeds themselves first
        yield f"seed:{name}", name, pool[name]
    for i in range(n):
        name = rng.choice(names)
        data = pool[name]
        ops = []
        for _ in range(rng.choice([1, 1, 1, 2, 3]) if stack <= 3 else rng.randint(1, stack)):
            m = rng.choices(MUTATORS, WEIGHTS)[0]
            try:
                data = m_splice(rng, data, name, values) if m is m_splice else m(rng, data, name)
            except (IndexError, struct.error, ValueError):  # a mutator that does not fit this file
                data = m_flip(rng, data, name) if data else data
            ops.append(m.__name__[2:])
            if not data:
                break
        yield f"{i}:{name}:{'+'.join(ops)}", name, data


# --- the worker -------------------------------------------------------------------------------------------

def outcome(fn):
    """('ok', value) / ('refused', code, message) / ('EXC', type, last frames)."""
    from engine.errors import UserError

    t = time.perf_counter()
    try:
        value = fn()
        res = ["ok", value]
    except UserError as e:
        res = ["refused", e.code, str(e)[:300]]
    except BaseException as e:  # noqa: BLE001
        tb = traceback.format_exc().strip().splitlines()
        res = ["EXC", type(e).__name__, str(e)[:200], tb[-6:]]
    res.append(round(time.perf_counter() - t, 4))
    return res


def worker() -> None:
    limit = int(os.environ.get("FUZZ_AS", str(2 << 30)))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.path.insert(0, str(ROOT))
    from engine.attribute import provenance_of
    from engine.images import check_header, read_image
    from engine.provenance import read_provenance
    from engine.service.app import _charge, _sizes
    from engine.service.config import Limits

    anchors = os.environ.get("FUZZ_ANCHORS") or None
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-w-"))
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    limits = Limits()
    out.write(b"ready\n")
    out.flush()
    while True:
        head = inp.read(8)
        if len(head) < 8:
            return
        n, flags = struct.unpack(">II", head)
        data = inp.read(n)
        r: dict = {}

        def prov(watermark: bool, data: bytes = data):
            p = read_provenance(data, trust_anchors=anchors, watermark=watermark)
            d = p.to_dict()
            assert json.loads(json.dumps(d)) == d, "not JSON"
            return {"c2pa": d["c2pa"]["state"], "meta": d["metadata"] and {k: d["metadata"][k] for k in (
                "tool", "source", "prompt", "seed")}, "dst": d["digital_source_type"], "exif": d["exif"],
                "wm": d["watermark_check"]["state"], "internal": [x for x in d["notes"] if "internal error" in x],
                "notes": len(d["notes"])}

        r["prov"] = outcome(lambda: prov(bool(flags & 1)))  # noqa: B023 - called at once
        r["provq"] = outcome(lambda: provenance_of(data).to_dict()["c2pa"]["state"])  # noqa: B023

        def image(data: bytes = data):
            img, digest = read_image(data, "image")
            return [img.size, img.mode]

        r["image"] = outcome(image)
        path = tmp / "query.img"
        path.write_bytes(data)

        def cli(path: Path = path):
            check_header(path)
            img, _ = read_image(path, "image")
            return [img.size, img.mode]

        r["cli"] = outcome(cli)

        def http(data: bytes = data):
            sizes = _sizes([io.BytesIO(data)])
            _charge(sizes, ["image"], limits)
            img, _ = read_image(data, "image", max_bytes=limits.max_image_bytes, max_pixels=limits.max_pixels)
            return [img.size, img.mode]

        r["http"] = outcome(http)
        r["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        line = json.dumps(r, default=str).encode() + b"\n"
        out.write(line)
        out.flush()


class Worker:
    def __init__(self, env):
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self):
        self.proc = subprocess.Popen(["nice", "-n", "10", sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # its imports done: their time is no case's
        return self.proc

    def run(self, data: bytes, flags: int, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc and self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write(struct.pack(">II", len(data), flags) + data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"dead": self.proc.wait()}
        deadline = time.monotonic() + timeout
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            self.kill()
            return {"hang": timeout}
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            self.proc = None
            return {"dead": rc}
        return json.loads(line)

    def kill(self):
        if self.proc is not None:
            self.proc.kill()  # only our own worker, by its handle
            self.proc.wait()
            self.proc = None


def only_manifest_crc(data: bytes, seed: bytes) -> bool:
    """Whether `data` is `seed` with only the CRC of its C2PA chunk changed: C2PA's hash leaves out the
    manifest's whole chunk, and the signed bytes are the seed's own, so 'valid' is the right answer."""
    if len(data) != len(seed):
        return False
    crcs = {p + 8 + n + k for p, n, t in png_chunks(seed) if t == b"caBX" for k in range(4)}
    return all(i in crcs for i in range(len(data)) if data[i] != seed[i])


def problems(name: str, kind: str, data: bytes, r: dict, pool: dict[str, bytes]) -> list[str]:
    out = []
    if "hang" in r:
        return [f"hang > {r['hang']} s"]
    if "dead" in r:
        return [f"worker died rc={r['dead']}"]
    for target in ("prov", "provq", "image", "cli", "http"):
        res = r[target]
        if res[0] == "EXC":
            out.append(f"{target}: {res[1]}: {res[2]} @ {res[3][-2:] if len(res) > 4 else ''}")
        if res[-1] > 2.0:
            out.append(f"{target}: slow {res[-1]} s")
    p = r["prov"]
    if p[0] == "ok":
        if p[1]["internal"]:
            out.append(f"prov internal: {p[1]['internal']}")
        if p[1]["c2pa"] == "valid" and not only_manifest_crc(data, pool.get(kind, b"")):
            out.append("c2pa valid on mutated bytes")
    if r["prov"][0] == "ok" and r["provq"][0] == "ok" and r["prov"][1]["c2pa"] != r["provq"][1]:
        pass  # anchors differ between the two calls: not compared
    codes = {t: (r[t][0], r[t][1] if r[t][0] != "ok" else tuple(map(str, r[t][1]))) for t in ("image", "cli", "http")}
    if codes["http"] == ("refused", "image_too_large") and len(data) > SERVICE_BYTES:
        codes.pop("http")  # the service's own, lower, limit on a file's bytes
    if len(set(codes.values())) > 1:
        out.append(f"paths differ: {codes}")
    if r.get("rss", 0) > 1500:
        out.append(f"rss {r['rss']} MB")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--out", default="/tmp/fuzz")
    ap.add_argument("--stack", type=int, default=3, help="at most this many mutations per case")
    ap.add_argument("--watermark-every", type=int, default=8, help="the provenance read checks watermarks 1 in N")
    ap.add_argument("--http", type=int, default=0, help="cases through the real app instead (in process)")
    args = ap.parse_args()
    if args.worker:
        worker()
        return
    if args.http:
        http_round(args.http, args.seed, Path(args.out))
        return
    sys.path.insert(0, str(ROOT))
    pool = seeds()
    out = Path(args.out)
    (out / "defects").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    w = Worker(env)
    counts: dict[str, int] = {}
    found: dict[str, int] = {}
    log = open(out / "log.jsonl", "w")
    t0 = time.time()
    for i, (case, kind, data) in enumerate(make_cases(args.cases, args.seed, pool, args.stack)):
        flags = 1 if i % args.watermark_every == 0 else 0
        r = w.run(data, flags, args.timeout)
        if "hang" in r or "dead" in r:  # retried alone, fresh worker, before it counts
            r = w.run(data, flags, args.timeout)
        issues = problems(case, kind, data, r, pool)
        for t in ("prov", "image", "cli", "http"):
            if t in r:
                counts[f"{t}:{r[t][0]}"] = counts.get(f"{t}:{r[t][0]}", 0) + 1
        counts["cases"] = counts.get("cases", 0) + 1
        if issues:
            sig = issues[0][:120]
            found[sig] = found.get(sig, 0) + 1
            if found[sig] <= 3:
                (out / "defects" / f"{i}.bin").write_bytes(data)
            log.write(json.dumps({"i": i, "case": case, "issues": issues}) + "\n")
            log.flush()
        if i % 250 == 0:
            print(f"{i} cases, {time.time() - t0:.0f} s, {len(found)} signatures", flush=True)
    w.kill()
    print(json.dumps({"counts": counts, "signatures": found, "seconds": round(time.time() - t0)}, indent=1))



# --- through the real service -----------------------------------------------------------------------------

def http_round(n: int, seed: int, out: Path) -> None:
    """`n` cases (every seed, then mutated ones) posted to /v1/attribute of the real app on a tiny store: the
    status and error code must be the Python reader's, the answer's provenance read_provenance's."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fastapi.testclient import TestClient

    from engine import zoo
    from engine.cli import main as cli
    from engine.errors import UserError
    from engine.images import read_image
    from engine.provenance import read_provenance
    from engine.service.app import create_app
    from engine.service.config import Limits
    from engine.service.core import Service

    home = Path("/tmp/fuzz-http-store")
    store = home / "store"
    if not (home / "ready").exists():
        models = zoo.write_zoo(home / "zoo")
        assert cli(["init", "--store", str(store), "--clip-config", str(models["clip_config"]),
                    "--clip-checkpoint", str(models["clip_checkpoint"])]) == 0
        name, folder = next(iter(models["pipelines"].items()))
        assert cli(["source", "add", name, str(folder), "--store", str(store), "--steps", "1"]) == 0
        (home / "ready").write_text("1")
    pool = seeds()
    limits = Limits()
    found: dict[str, int] = {}
    counts: dict[str, int] = {}
    t0 = time.time()
    with TestClient(create_app(Service.open(store, limits)), raise_server_exceptions=False) as client:
        for i, (case, _kind, data) in enumerate(make_cases(n, seed, pool)):
            t = time.perf_counter()
            answer = client.post("/v1/attribute", files={"image": ("q.bin", data, "application/octet-stream")},
                                 data={"prompt": "a red fox in snow", "per_source": "1"})
            took = time.perf_counter() - t
            try:
                read_image(data, "q.bin", max_bytes=limits.max_image_bytes, max_pixels=limits.max_pixels)
                want: tuple = (200, None)
            except UserError as e:
                want = (e.status, e.code)
            body = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
            got = (answer.status_code, (body.get("error") or {}).get("code") if answer.status_code != 200 else None)
            issues = []
            if got != want:
                issues.append(f"http {got} != python {want}")
            if answer.status_code == 200:
                mine = read_provenance(data, watermark=False).to_dict()
                theirs = body["results"][0].get("provenance")
                if theirs != mine:
                    keys = [k for k in mine if mine.get(k) != (theirs or {}).get(k)]
                    issues.append(f"provenance differs in {keys}")
            if took > 5:
                issues.append(f"slow {took:.1f} s")
            counts[str(got[0])] = counts.get(str(got[0]), 0) + 1
            for issue in issues:
                sig = issue[:120]
                found[sig] = found.get(sig, 0) + 1
                if found[sig] <= 3:
                    (out / "defects").mkdir(parents=True, exist_ok=True)
                    (out / "defects" / f"http-{i}.bin").write_bytes(data)
                print(i, case, issue, flush=True)
    print(json.dumps({"http_cases": sum(counts.values()), "statuses": counts, "signatures": found,
                      "seconds": round(time.time() - t0)}, indent=1))


if __name__ == "__main__":
    main()
