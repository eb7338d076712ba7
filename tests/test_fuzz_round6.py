"""Defects found by the sixth fuzzing round (scripts/fuzz_inputs.py: seeded mutations of valid PNG, JPEG, WebP,
GIF, TIFF, BMP files with A1111/ComfyUI text, EXIF, XMP and C2PA JUMBF, run through the provenance reader, the
Python reader, the CLI's header check and the service's). Each input is the minimised case, built here."""
from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from engine.errors import UserError
from engine.images import check_header, read_image
from engine.provenance import read_provenance
from engine.provenance import watermark

A1111 = ("a lighthouse at dusk\nNegative prompt: blurry\n"
         "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 64x64, Model: v1-5")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 140, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def _refusal(source, check_first: bool) -> tuple[str, str]:
    """(code, message without the label) of the reader's refusal; with check_first, the CLI's order."""
    try:
        if check_first:
            check_header(source)
        read_image(source, "q")
    except UserError as exc:
        return exc.code, str(exc).split(": ", 1)[1]
    raise AssertionError("not refused")


def _same_refusal_everywhere(data: bytes, tmp_path) -> tuple[str, str]:
    path = tmp_path / "q"
    path.write_bytes(data)
    from_bytes = _refusal(data, check_first=False)
    assert _refusal(path, check_first=True) == from_bytes  # `resynth attribute FILE` checks the header first
    return from_bytes


def _ico_holding(png: bytes) -> bytes:
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def test_an_icon_is_refused_without_its_plugin_decoding_it(tmp_path):
    """Pillow's ICO plugin decodes its image inside Image.open: a 420 KB icon holding a PNG of 12000 x 12000
    cost 590 MB before it was refused, and the CLI's file read of a huge IDAT length raised MemoryError.
    Only the accepted formats' plugins are tried now. Here the PNG inside says 12000 x 12000 and holds
    no pixels at all: decoding it would fail, so a refusal naming ICO proves it was never decoded."""
    png = _png()
    inner = png[:16] + _chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0))[8:-4]
    inner = png[:8] + _chunk(b"IHDR", inner[16:]) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")
    code, message = _same_refusal_everywhere(_ico_holding(inner), tmp_path)
    assert code == "unsupported_image" and message.startswith("ICO images are not accepted"), message
    assert watermark.check(_ico_holding(inner))[1]["reason"] == "pixels not decodable: UnidentifiedImageError"
    # nor an API source's answer, nor a published dataset's file (their readers had no format list)
    from engine.api_answers import _decode
    from engine.errors import SourceError
    from engine.published import UNREADABLE, _unusable

    with pytest.raises(SourceError, match="answer image cannot be decoded"):
        _decode(_ico_holding(inner), "api")
    (tmp_path / "icon.png").write_bytes(_ico_holding(inner))
    assert _unusable(tmp_path / "icon.png", decode=False) == _unusable(tmp_path / "icon.png", decode=True) == UNREADABLE
    tga = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tga, "TGA")  # its first bytes are also a cursor's (CUR): named by Pillow's reading
    assert _same_refusal_everywhere(tga.getvalue(), tmp_path)[1].startswith("TGA images are not accepted")


def test_the_cli_refuses_each_file_with_the_python_readers_words(tmp_path):
    """An empty file was 'not a PNG ... image' from the CLI's header check but 'the image is empty' from the
    library; a JPEG of 150 scans or a TIFF tag of 70000 values was refused for its size by the CLI (which
    did not walk the structure) and for its structure by the library and the service."""
    assert _same_refusal_everywhere(b"", tmp_path) == ("empty_image", "the image is empty")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64)).save(jpeg, "JPEG", progressive=True)
    data = jpeg.getvalue()
    scan = data[data.find(b"\xff\xda"):-2]
    sof = data.find(b"\xff\xc2") + 5  # declared height and width: 9000 x 9000, over the pixel limit
    many_scans = data[:sof] + struct.pack(">HH", 9000, 9000) + data[sof + 4:-2] + scan * 150 + data[-2:]
    code, message = _same_refusal_everywhere(many_scans, tmp_path)
    assert code == "undecodable_image" and "JPEG scans" in message, message
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    raw = bytearray(tiff.getvalue())
    ifd = struct.unpack("<I", raw[4:8])[0]
    for i in range(struct.unpack("<H", raw[ifd:ifd + 2])[0]):
        at = ifd + 2 + 12 * i
        tag = struct.unpack("<H", raw[at:at + 2])[0]
        if tag == 256:  # a width of 1 beside the 8 rows: the header alone says "thin"
            raw[at + 8:at + 12] = struct.pack("<I", 1000)
        if tag == 258:  # BitsPerSample listing 70000 values
            raw[at + 4:at + 8] = struct.pack("<I", 70000)
    code, message = _same_refusal_everywhere(bytes(raw), tmp_path)
    assert code == "undecodable_image" and "values in TIFF tag 258" in message, message


def test_a_png_text_chunk_failing_its_crc_is_not_read():
    """A damaged `parameters` chunk after the image data: Pillow reads the image, and the damaged prompt became
    the query's description. A chunk with the right CRC is read as before."""
    base = _png()
    good = _chunk(b"tEXt", b"parameters\x00" + A1111.encode())
    damaged = good[:20] + bytes([good[20] ^ 0x20]) + good[21:]  # 'a lighthouse' -> 'a Lighthouse', CRC kept
    place = len(base) - 12  # before IEND, after IDAT
    read_image(base[:place] + damaged + base[place:])  # the pixels are fine
    p = read_provenance(base[:place] + damaged + base[place:], c2pa=False, watermark=False)
    assert p.metadata is None and p.description() == (None, None)
    assert p.notes == ("png: tEXt chunk fails its CRC (damaged); not read",)
    ok = read_provenance(base[:place] + good + base[place:], c2pa=False, watermark=False)
    assert ok.metadata is not None and ok.metadata.prompt == "a lighthouse at dusk" and not ok.notes


@pytest.mark.parametrize("scans", [101, 400])
def test_the_watermark_check_skips_a_jpeg_of_too_many_scans(scans):
    jpeg = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 200, 30)).save(jpeg, "JPEG", progressive=True)
    data = jpeg.getvalue()
    scan = data[data.find(b"\xff\xda"):-2]
    found, state = watermark.check(data[:-2] + scan * scans + data[-2:])
    if state["state"] == "unavailable":
        pytest.skip(state["reason"])
    assert found is None and state["state"] == "skipped" and "scans" in state["reason"]


def test_a_source_type_from_a_manifest_that_failed_validation_says_so(tmp_path):
    """A signed PNG with one pixel byte changed: C2PA says invalid (its data hash), yet its action's term was
    the file's digital_source_type with source "c2pa", beside no word that the manifest had failed."""
    c2pa = pytest.importorskip("c2pa")
    pytest.importorskip("cryptography")
    from tests.test_provenance import _test_ca

    chain, key, _ = _test_ca(tmp_path)
    manifest = {"claim_generator_info": [{"name": "fuzz", "version": "1"}], "assertions": [
        {"label": "c2pa.actions", "data": {"actions": [{"action": "c2pa.created", "digitalSourceType":
                                                        "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"}]}}]}
    signed = io.BytesIO()
    with c2pa.Builder(manifest) as builder:
        builder.sign(c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", chain, key, None)), "image/png",
                     io.BytesIO(_png((16, 16))), signed)
    data = bytearray(signed.getvalue())
    data[data.find(b"IDAT") + 10] ^= 1
    p = read_provenance(bytes(data), watermark=False)
    assert p.c2pa["state"] == "invalid" and p.digital_source_type["source"] == "c2pa"
    assert "digital_source_type: read from a C2PA manifest that failed validation" in " ".join(p.notes)
    assert not [n for n in read_provenance(signed.getvalue(), watermark=False).notes if "digital_source" in n]


def test_read_provenance_of_a_path_reads_only_a_regular_file(tmp_path):
    """A FIFO nobody writes to made read_provenance(path) wait forever in open(); /dev/zero cost 256 MB of
    zeros. Both are an OSError now, the documented exception for a path that cannot be read."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path, "/dev/zero"):
        with pytest.raises(OSError):
            read_provenance(path, c2pa=False, watermark=False)
    from engine.attribute import provenance_of

    assert provenance_of(str(fifo)).notes == ("file not readable for provenance: OSError",)
