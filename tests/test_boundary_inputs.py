"""Inputs a user's machine produces, at the boundary: odd EXIF blocks, long thin images, query files in
another encoding, folders where files belong, a CLIP checkpoint of another architecture. Each is decoded
or refused in one line, on the CLI and over HTTP, never with a traceback or an HTTP 500."""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from engine.images import MAX_ASPECT, check_header, read_image
from tests.helpers import run_cli

ORIENTATION = 0x0112


def _tiff(entries: list[tuple[int, int, int, bytes]], tail: bytes = b"") -> bytes:
    """A big-endian EXIF (TIFF) block with the given (tag, type, count, 4-byte value or offset) entries."""
    out = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", len(entries))
    for tag, kind, count, value in entries:
        out += struct.pack(">HHI", tag, kind, count) + value
    return out + b"\x00\x00\x00\x00" + tail


def _jpeg(exif: bytes, size=(40, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "JPEG", exif=b"Exif\x00\x00" + exif)
    return buffer.getvalue()


SHORT_6 = (ORIENTATION, 3, 1, struct.pack(">HH", 6, 0))
EXIF_CASES = {
    # the reported case: a valid orientation beside a tag of the wrong type; Pillow's exif_transpose
    # re-serialises the block and fails with struct.error
    "wrong-type-tag": (_tiff([(0x0100, 2, 4, b"abc\x00"), SHORT_6]), (20, 40)),
    "orientation-as-text": (_tiff([(ORIENTATION, 2, 2, b"6\x00\x00\x00")]), (40, 20)),
    "orientation-out-of-range": (_tiff([(ORIENTATION, 3, 1, struct.pack(">HH", 60000, 0))]), (40, 20)),
    "orientation-negative": (_tiff([(ORIENTATION, 8, 1, struct.pack(">hh", -6, 0))]), (40, 20)),
    "orientation-as-rational": (_tiff([(ORIENTATION, 5, 1, struct.pack(">I", 26))], struct.pack(">II", 6, 1)),
                                (20, 40)),
    "orientation-x-over-zero": (_tiff([(ORIENTATION, 5, 1, struct.pack(">I", 26))], struct.pack(">II", 6, 0)),
                                (40, 20)),
    "truncated-block": (b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 40) + b"\x01\x12\x00\x03", (40, 20)),
    "offset-past-the-end": (b"MM\x00\x2a" + struct.pack(">I", 99999), (40, 20)),
    "not-tiff": (b"XX\x00\x2a\x00\x00", (40, 20)),
}


@pytest.mark.filterwarnings("ignore:.*(EXIF|entries).*:UserWarning")
@pytest.mark.parametrize("name", sorted(EXIF_CASES))
def test_a_damaged_exif_block_is_ignored_and_a_valid_orientation_applied(name):
    exif, size = EXIF_CASES[name]
    data = _jpeg(exif)
    image, _ = read_image(data, label=name)
    assert image.size == size and image.mode == "RGB"


@pytest.mark.parametrize("value", range(1, 9))
def test_orientation_matches_what_a_viewer_shows(value):
    """Same pixels as Pillow's exif_transpose wherever that works: stored vectors keep their meaning."""
    exif = Image.Exif()
    exif[ORIENTATION] = value
    buffer = io.BytesIO()
    source = Image.new("RGB", (30, 17))
    source.putdata([(x * 8 % 256, y * 15 % 256, (x * y) % 256) for y in range(17) for x in range(30)])
    source.save(buffer, "PNG", exif=exif.tobytes())
    ours, _ = read_image(buffer.getvalue())
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        theirs = ImageOps.exif_transpose(opened).convert("RGB")
    assert ours.size == theirs.size and ours.tobytes() == theirs.tobytes()


def test_avif_is_read_as_the_same_picture_and_its_size_checked_before_decoding(tmp_path):
    """AVIF (what image sites and browsers save more and more) is read, upright, as the picture it holds; its
    declared size is refused from the header, and a damaged one is a one-line refusal like any other format."""
    from engine.errors import TooLargeError, UserError
    from engine.images import decode

    source = Image.new("RGB", (48, 32))
    source.putdata([(x * 5 % 256, y * 8 % 256, 128) for y in range(32) for x in range(48)])
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # a camera's rotation: the picture is read standing up
    buffer = io.BytesIO()
    source.save(buffer, "AVIF", quality=95, exif=exif.tobytes())
    ours, digest = read_image(buffer.getvalue(), label="q.avif")
    upright = source.transpose(Image.Transpose.ROTATE_270)
    assert ours.mode == "RGB" and ours.size == upright.size == (32, 48) and len(digest) == 64
    error = sum(abs(a - b) for a, b in zip(ours.tobytes(), upright.tobytes())) / len(ours.tobytes())
    assert error < 8, error  # lossy, but the same picture (an unrelated one differs by about 60)
    big = io.BytesIO()
    Image.new("RGB", (1000, 1000), (9, 9, 9)).save(big, "AVIF")  # 1 MP in a few hundred bytes
    with pytest.raises(TooLargeError, match="1000x1000 pixels, the limit is 999999 for an AVIF"):
        decode(big.getvalue(), "big.avif", max_pixels=3 * 1000 * 1000 - 1)  # a third for an AVIF
    with pytest.raises(UserError) as damaged:
        read_image(buffer.getvalue()[: len(buffer.getvalue()) // 2], label="cut.avif")
    assert "\n" not in str(damaged.value) and "cut.avif" in str(damaged.value)
    # Pillow parses an AVIF's EXIF while opening it: an oversized block is refused from the item tables first
    # (one tag of 300,000 values: a 6 MB one cost 0.39 s and 48 MB inside Image.open), and a damaged one's
    # warnings stay off the command line's stderr
    def with_exif(tiff: bytes) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (64, 64), (5, 6, 7)).save(out, "AVIF", exif=b"Exif\x00\x00" + tiff)
        return out.getvalue()

    values = 600_000  # written under another tag (Pillow drops a long orientation when saving), then renamed
    tag = struct.pack(">HHI", 0x0113, 3, values)
    bomb = with_exif(b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + tag + struct.pack(">II", 26, 0) + b"\x00\x01" * values)
    bomb = bomb.replace(tag, struct.pack(">HHI", ORIENTATION, 3, values))
    with pytest.raises(TooLargeError, match=r"its EXIF block is \d+ bytes, more than 1048576") as refused:
        read_image(bomb, label="bomb.avif")
    assert refused.value.code == "metadata_too_large"
    damaged_exif = tmp_path / "warn.avif"
    damaged_exif.write_bytes(with_exif(b"MM\x00\x2a" + struct.pack(">IHHHII", 8, 1, 0x010F, 2, 100, 1000) + b"\0" * 4))
    import warnings

    with warnings.catch_warnings(record=True) as seen:  # what a terminal would show under the one-line error
        warnings.simplefilter("always")
        assert run_cli("attribute", damaged_exif, "--prompt", "x", "--store", tmp_path / "no-store") == 2
    assert not [w for w in seen if w.filename and "PIL" in w.filename], [str(w.message) for w in seen]


def test_an_avif_item_table_of_empty_extents_is_refused_at_once(tmp_path):
    """An `iloc` whose offset and length fields are 0 bytes wide: each extent reads nothing, and 300 items
    claiming 65535 extents each (2 KB) took 10 s of CPU in the Exif size check, 10000 items (60 KB) minutes,
    before any limit (every upload and every CLI query goes through it)."""
    import time

    def box(kind: bytes, body: bytes, version: int | None = None) -> bytes:
        body = body if version is None else bytes([version, 0, 0, 0]) + body
        return struct.pack(">I", 8 + len(body)) + kind + body

    exif_item = box(b"iinf", struct.pack(">H", 1) + box(b"infe", struct.pack(">HH", 1, 0) + b"Exif\x00", 2), 0)
    items = 300
    table = box(b"iloc", b"\x00\x00" + struct.pack(">H", items) + struct.pack(">HHH", 1, 0, 0xFFFF) * items, 0)
    small = box(b"iloc", b"\x00\x00" + struct.pack(">H", 1) + struct.pack(">HHH", 1, 0, 9000), 0)
    for name, tables in (("extents.avif", table), ("tables.avif", small * 2000)):  # the same from many tables
        path = tmp_path / name
        path.write_bytes(box(b"ftyp", b"avif\x00\x00\x00\x00avifmif1") + box(b"meta", exif_item + tables, 0))
        for read in (read_image, check_header):
            started = time.process_time()
            with pytest.raises(Exception) as refused:
                read(path)
            assert time.process_time() - started < 3, (name, time.process_time() - started)
            assert getattr(refused.value, "code", None) == "undecodable_image" and "\n" not in str(refused.value)


def _split_extents(avif: bytes, item: int, pieces: int) -> bytes:
    """`avif` (as Pillow writes it: iloc version 0 or 1, 4-byte offsets and lengths) with `item`'s one extent
    cut into `pieces` extents: the same bytes, as an encoder writing in chunks stores them."""
    meta = avif.index(b"meta") - 4
    meta_end = meta + struct.unpack(">I", avif[meta:meta + 4])[0]
    iloc = avif.index(b"iloc", meta) - 4
    body = avif[iloc + 8:iloc + struct.unpack(">I", avif[iloc:iloc + 4])[0]]
    version, base_size = body[0], body[5] >> 4
    assert version in (0, 1) and body[4] == 0x44 and (version == 0 or body[5] & 15 == 0), body[:6]
    position, count = 8, struct.unpack(">H", body[6:8])[0]
    entries = []
    for _ in range(count):
        head = 4 + 2 * version + base_size  # id, construction method (v1), data reference, base offset
        extents = struct.unpack(">H", body[position + head:position + head + 2])[0]
        end = position + head + 2 + 8 * extents
        entries.append((body[position:position + head], list(struct.iter_unpack(">II", body[position + head + 2:end]))))
        position = end
    grown = 8 * (pieces - 1)
    out = body[:8]
    for head, extents in entries:
        if struct.unpack(">H", head[:2])[0] == item:
            (offset, length), = extents
            step = -(-length // pieces)
            extents = [(offset + at, min(step, length - at)) for at in range(0, length, step)]
            assert len(extents) == pieces
        out += head + struct.pack(">H", len(extents)) + b"".join(
            struct.pack(">II", offset + grown * (offset >= meta_end), length) for offset, length in extents)
    new_iloc = struct.pack(">I", 8 + len(out)) + b"iloc" + out
    old_iloc_end = iloc + 8 + len(body)
    new_meta = avif[meta + 4:iloc] + new_iloc + avif[old_iloc_end:meta_end]
    return avif[:meta] + struct.pack(">I", 4 + len(new_meta)) + new_meta + avif[meta_end:]


@pytest.mark.filterwarnings("ignore:.*entries.*:UserWarning")  # Pillow's, about the long tag
def test_an_avif_exif_item_in_many_extents_is_refused_not_left_unchecked():
    """An Exif item stored in more extents than the table walk's budget (10,000) answered 'tables unreadable',
    and the EXIF size limit was skipped: libavif reads such a file, and Pillow parsed its 1.2 MB Exif block."""
    from engine.avif import MAX_BOXES

    values = 600_000
    tag = struct.pack(">HHI", 0x0113, 3, values)  # renamed to the orientation after saving, as above
    tiff = b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + tag + struct.pack(">II", 26, 0) + b"\x00\x01" * values
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (5, 6, 7)).save(out, "AVIF", exif=b"Exif\x00\x00" + tiff)
    bomb = out.getvalue().replace(tag, struct.pack(">HHI", ORIENTATION, 3, values))
    for pieces in (2, MAX_BOXES + 1):
        split = _split_extents(bomb, 2, pieces)  # item 2: libavif's Exif item, after the colour one
        with Image.open(io.BytesIO(split)) as opened:  # a valid file: its Exif is read whole
            assert len(opened.info["exif"]) > 1_200_000
        with pytest.raises(Exception) as refused:
            read_image(split, label="q.avif")
        assert "\n" not in str(refused.value) and "q.avif" in str(refused.value)
        if pieces == 2:
            assert getattr(refused.value, "code", None) == "metadata_too_large", refused.value
        else:
            assert getattr(refused.value, "code", None) == "undecodable_image", refused.value
            assert f"more than {MAX_BOXES} item extents" in str(refused.value)


def test_a_png_of_many_colour_profiles_is_refused_from_its_structure(tmp_path):
    """Pillow inflates every iCCP chunk (up to 1 MB each, outside its text limits) and keeps the last: 2000 of
    1 KB each, a 2 MB file, cost 3.9 s of CPU per read, 19000 in an upload of 20 MB more than 30 s."""
    import time
    import zlib

    profile = zlib.compress(b"\0" * ((1 << 20) - 16), 9)
    body = b"icc\x00\x00" + profile
    chunk = struct.pack(">I", len(body)) + b"iCCP" + body + struct.pack(">I", zlib.crc32(b"iCCP" + body))
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, "PNG")
    plain = buffer.getvalue()
    at = plain.index(b"IDAT") - 4
    path = tmp_path / "profiles.png"
    path.write_bytes(plain[:at] + chunk * 2000 + plain[at:])
    for read in (read_image, check_header):
        started = time.process_time()
        with pytest.raises(Exception, match="more than 4 PNG colour profiles") as refused:
            read(path)
        assert time.process_time() - started < 1.5, time.process_time() - started
        assert getattr(refused.value, "code", None) == "undecodable_image" and "\n" not in str(refused.value)
    assert read_image(plain[:at] + chunk + plain[at:])[0].getpixel((0, 0)) == (1, 2, 3)  # one is read


def _thin_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_long_thin_images_are_refused_from_the_header(tmp_path):
    data = _thin_png(60000, 1)
    assert len(data) < 10_000  # a few KB on the wire; CLIP preprocessing would make it 60000*S x S
    with pytest.raises(Exception) as refused:
        read_image(data, label="thin.png")
    assert getattr(refused.value, "code", None) == "extreme_aspect_ratio" and getattr(refused.value, "status", 0) == 413
    assert f"the limit is {MAX_ASPECT}:1" in str(refused.value) and "\n" not in str(refused.value)
    path = tmp_path / "thin.png"
    path.write_bytes(data)
    with pytest.raises(Exception, match="side ratio of 60000:1"):
        check_header(path)  # before any model loads
    for width, height in ((MAX_ASPECT * 16, 16), (16, MAX_ASPECT * 16)):  # at the limit: accepted
        assert read_image(_thin_png(width, height))[0].size == (width, height)


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped():
    """Pillow converts 16-bit greyscale to RGB by clipping each value to 255: a 16-bit PNG of a dark-to-light
    ramp was read, and attributed, as an almost white image. Read as its high byte (as 16-bit colour is)."""
    import numpy as np

    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0 .. 65520
    expected = (ramp >> 8).astype(np.uint8)
    files = {}
    for fmt, mode in (("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B")):
        buffer = io.BytesIO()
        Image.frombytes(mode, (64, 64), ramp.astype(">u2" if mode.endswith("B") else "<u2").tobytes()).save(buffer, fmt)
        files[fmt, mode] = buffer.getvalue()
    for (fmt, mode), data in files.items():
        with Image.open(io.BytesIO(data)) as opened:
            assert opened.mode == mode  # what this test is about
        image, _ = read_image(data)
        pixels = np.asarray(image)
        assert image.mode == "RGB" and (pixels == expected[:, :, None]).all(), (fmt, mode, pixels.mean())
        from_pil, _ = read_image(Image.open(io.BytesIO(data)))  # the Python entry point's decoded image
        assert (np.asarray(from_pil) == pixels).all()


def test_32_bit_and_float_greyscale_are_read_by_their_range_not_clipped():
    """A PIL image of mode I (numpy's int32, older Pillow's 16-bit PNG) or F was clipped to 255 by
    convert('RGB'): a 0-65535 ramp read as almost white. 16-bit values are read by their high byte, 0-1
    floats as fractions of 255, 0-255 values as they are; any other range is refused in one line."""
    import numpy as np

    ramp = np.arange(64 * 64).reshape(64, 64)
    high = ((ramp * 16) >> 8).astype(np.uint8)
    cases = [(Image.fromarray((ramp * 16).astype(np.int32)), high),  # 16-bit values in mode I
             (Image.fromarray((ramp % 256).astype(np.int32)), (ramp % 256).astype(np.uint8)),  # 8-bit in I
             (Image.fromarray((ramp / 4095).astype(np.float32)), np.round(ramp / 4095 * 255).astype(np.uint8)),
             (Image.fromarray((ramp * 16).astype(np.float32)), high)]
    for image, expected in cases:
        pixels = np.asarray(read_image(image)[0])
        assert (pixels == expected[:, :, None]).all(), (image.mode, pixels.mean(), expected.mean())
    buffer = io.BytesIO()
    cases[0][0].save(buffer, "TIFF")  # a 32-bit integer TIFF, read the same way from its file
    assert (np.asarray(read_image(buffer.getvalue())[0]) == high[:, :, None]).all()
    for wild in (ramp * 65536, ramp - 1):
        with pytest.raises(Exception) as refused:
            read_image(Image.fromarray(wild.astype(np.int32)), label="q")
        assert getattr(refused.value, "code", None) == "undecodable_image", refused.value
        assert "q: its pixel values run from" in str(refused.value) and "\n" not in str(refused.value)


def test_preprocessing_memory_stays_within_the_bound_at_the_ratio_limit():
    """What CLIP preprocessing allocates for the thinnest accepted image, at the largest input side the
    bound assumes, measured in a fresh process, against Limits.upscale_bytes()."""
    import subprocess
    import sys

    from engine.service.config import Limits

    limits = Limits()
    side = limits.preprocess_side
    script = f"""
import resource
from open_clip.transform import image_transform
from PIL import Image
transform = image_transform({side}, is_train=False)
transform(Image.new("RGB", (64, 64)))  # warm: lazy imports, first tensors
image = Image.new("RGB", ({MAX_ASPECT} * ({side} - 1), {side} - 1), (10, 20, 30))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
transform(image)  # scaled up to about {MAX_ASPECT} * {side} x {side} pixels before the centre crop
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               timeout=300).stdout.split()[-1])
    assert grown <= limits.upscale_bytes(), (grown, limits.upscale_bytes())


@pytest.mark.filterwarnings("ignore:.*(EXIF|entries).*:UserWarning")
def test_query_files_and_folders(store_dir, originals, tmp_path, capsys):
    image, prompt = originals[0]["image"], originals[0]["prompt"]
    s = ("--store", store_dir)

    def fails(*argv, match):
        capsys.readouterr()
        assert run_cli(*argv, *s) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1 and match in err, err

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps({"image": str(image), "prompt": "x"}).encode() + b"\n"
                       + b'{"image": "a.png", "prompt": "caf\xe9"}\n')
    fails("attribute", "--queries", latin1, match=f"{latin1}:2: not UTF-8 text (byte 0xe9")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"image": str(image)}) + "\n{not json\n")
    fails("attribute", "--queries", broken, match=f"{broken}:2:")
    fails("attribute", "--queries", tmp_path, match="is a folder")
    fails("attribute", tmp_path, "--prompt", prompt, match=f"{tmp_path} is a folder, not an image file")
    thin = tmp_path / "thin.png"
    thin.write_bytes(_thin_png(60000, 1))
    fails("attribute", thin, "--prompt", prompt, match="the limit is 20:1")
    bad_exif = tmp_path / "exif.jpg"
    bad_exif.write_bytes(_jpeg(EXIF_CASES["wrong-type-tag"][0]))
    assert run_cli("attribute", bad_exif, "--prompt", prompt, "--per-source", 1, "--json", "--quiet", *s) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["predicted"]


@pytest.mark.filterwarnings("ignore:.*(EXIF|entries).*:UserWarning")  # Pillow's own, about the damaged block
def test_bad_exif_and_thin_images_over_http(store_dir, originals):
    from fastapi.testclient import TestClient

    from engine.service.app import create_app
    from engine.service.config import Limits
    from engine.service.core import Service

    prompt = originals[0]["prompt"]
    with TestClient(create_app(Service.open(store_dir, Limits()))) as client:
        def post(data: bytes, name: str):
            return client.post("/v1/attribute", files={"image": (name, data, "image/jpeg")},
                               data={"prompt": prompt, "per_source": "1"})

        for case in ("wrong-type-tag", "truncated-block", "orientation-as-text"):
            answer = post(_jpeg(EXIF_CASES[case][0]), f"{case}.jpg")
            assert answer.status_code == 200, (case, answer.text)
        refused = post(_thin_png(60000, 1), "thin.png")
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "extreme_aspect_ratio"

        # a prompt of bytes that are not UTF-8: starlette read it as Latin-1 and the mojibake was attributed;
        # refused with the CLI's code (engine.arguments.unicode)
        latin1 = client.post("/v1/attribute", files={"image": ("a.jpg", _jpeg(b""), "image/jpeg")},
                             data={"prompt": "caf\u00e9".encode("latin-1"), "per_source": "1"})
        assert latin1.status_code == 400 and latin1.json()["error"]["code"] == "not_utf8", latin1.text
        assert "'prompt' is not valid UTF-8 (byte 0xe9 at offset 3)" in latin1.json()["error"]["message"]
        assert post(_jpeg(b""), "caf\u00e9.jpg").json()["results"][0]["query"] == "caf\u00e9.jpg"  # UTF-8: read

        # an image sent as a text field (curl -F 'image=<q.png': no filename): its bytes are not UTF-8, nor
        # under the text fields' size limit, yet the user's mistake is the part's kind
        big = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 400  # a 100 KB file's worth
        assert len(big) > Limits().max_field_bytes
        for body in (_jpeg(b""), big, b"hello"):
            as_text = client.post("/v1/attribute", files={"image": (None, body)}, data={"prompt": prompt})
            assert as_text.status_code == 400 and as_text.json()["error"]["code"] == "bad_request", as_text.text
            assert as_text.json()["error"]["message"] == "`image` must be a file part, not a text field"


def test_a_checkpoint_of_another_architecture_says_so_in_one_line(models, tmp_path, capsys):
    assert run_cli("init", "--store", tmp_path / "s", "--clip-model", "ViT-B-32",
                   "--clip-checkpoint", models["clip_checkpoint"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "does not match the architecture ViT-B-32" in err and "--clip-config" in err, err
    not_a_checkpoint = tmp_path / "x.bin"
    not_a_checkpoint.write_bytes(b"hello")
    assert run_cli("init", "--store", tmp_path / "t", "--clip-model", "ViT-B-32",
                   "--clip-checkpoint", not_a_checkpoint) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert run_cli("init", "--store", tmp_path / "u", "--clip-config", models["clip_config"],
                   "--clip-checkpoint", Path(models["clip_checkpoint"]).parent) == 2
    assert "is a folder" in capsys.readouterr().err
