"""Reading metadata out of PNG, JPEG and WebP containers, byte by byte, with bounded sizes.

Parsed here rather than through Pillow so that a hostile file (a zTXt bomb, a chunk that claims
4 GiB, an EXIF offset pointing outside the block) can only ever produce a note, never an
exception or an unbounded allocation. Nothing here decodes pixels.
"""
from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field

MAX_CHUNK = 8 << 20  # a single metadata chunk/segment larger than this is not read
MAX_TEXT = 2 << 20  # a text value (after decompression) is cut here
MAX_TEXT_TOTAL = 16 << 20  # all text values of one file together
MAX_ITEMS = 256  # chunks with text, IFD entries, ...
MAX_CHUNKS = 65536  # PNG chunks of any kind walked (encoders write one IDAT per 8-64 KB of pixels)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
XMP_JPEG = b"http://ns.adobe.com/xap/1.0/\x00"
_FILL = re.compile(rb"\xff+")


@dataclass
class Container:
    """What one file carries besides its pixels; texts keep the first value of each key."""
    format: str | None = None
    texts: dict[str, str] = field(default_factory=dict)
    exif: bytes | None = None
    xmp: str | None = None
    notes: list[str] = field(default_factory=list)
    _text_bytes: int = 0

    def add_text(self, key: str, value: str, where: str) -> None:
        if len(self.texts) >= MAX_ITEMS:
            self.notes.append(f"{where}: more than {MAX_ITEMS} text fields; the rest are not read")
            return
        if key in self.texts:
            self.notes.append(f"{where}: duplicate text field {key!r}; the first is used")
            return
        if self._text_bytes + len(value) > MAX_TEXT_TOTAL:
            self.notes.append(f"{where}: text field {key!r} not read: the file's text exceeds {MAX_TEXT_TOTAL} bytes")
            return
        self._text_bytes += len(value)
        self.texts[key] = value


def sniff(data: bytes) -> str | None:
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[4:8] == b"ftyp":
        return "isobmff"  # AVIF / HEIC: not read here (C2PA still is)
    return None


def read_container(data: bytes) -> Container:
    fmt = sniff(data)
    box = Container(format=fmt)
    if fmt == "png":
        _read_png(data, box)
    elif fmt == "jpeg":
        _read_jpeg(data, box)
    elif fmt == "webp":
        _read_webp(data, box)
    elif fmt == "tiff":
        box.exif = data[:MAX_CHUNK]
    else:
        box.notes.append(f"format {fmt or 'unknown'}: embedded metadata is not read for it")
    return box


# --- text decoding -------------------------------------------------------------------------

def decode_text(raw: bytes, where: str, notes: list[str], utf8_first: bool = True) -> str:
    """UTF-8 when it is valid (many tools write UTF-8 even where Latin-1 is the rule), else Latin-1."""
    if len(raw) > MAX_TEXT:
        notes.append(f"{where}: text cut to {MAX_TEXT} bytes")
        raw = raw[:MAX_TEXT]
    if utf8_first:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        notes.append(f"{where}: invalid UTF-8, undecodable bytes replaced")
        return raw.decode("utf-8", errors="replace")


def inflate(raw: bytes, where: str, notes: list[str], limit: int = MAX_TEXT) -> bytes | None:
    """zlib with an output cap: a decompression bomb yields a note, not gigabytes."""
    try:
        d = zlib.decompressobj()
        out = d.decompress(raw, limit)
        if d.unconsumed_tail:
            notes.append(f"{where}: compressed text expands past {limit} bytes; cut")
        return out
    except zlib.error as e:
        notes.append(f"{where}: compressed text is corrupt ({e}); not read")
        return None


# --- PNG -----------------------------------------------------------------------------------

def _read_png(data: bytes, box: Container) -> None:
    pos, n = 8, 0
    for _ in range(MAX_CHUNKS):
        if pos + 8 > len(data):
            break
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body_start, body_end = pos + 8, pos + 8 + length
        name = ctype.decode("latin-1")
        crc_at, pos = body_end, body_end + 4
        if ctype == b"IEND":
            return
        if ctype not in (b"tEXt", b"zTXt", b"iTXt", b"eXIf"):
            continue
        n += 1
        if n > MAX_ITEMS:
            box.notes.append(f"png: more than {MAX_ITEMS} metadata chunks; the rest are not read")
            return
        if body_end > len(data):
            box.notes.append(f"png: {name} chunk runs past the end of the file; not read")
            return
        if length > MAX_CHUNK:
            box.notes.append(f"png: {name} chunk of {length} bytes is too large; not read")
            continue
        body = data[body_start:body_end]
        if data[crc_at:crc_at + 4] != struct.pack(">I", zlib.crc32(body, zlib.crc32(ctype))):
            # a damaged chunk: its text (a prompt that becomes the query's description) may be damaged too
            box.notes.append(f"png: {name} chunk fails its CRC (damaged); not read")
            continue
        if ctype == b"eXIf":
            if box.exif is None:
                box.exif = body
            continue
        _png_text(ctype, body, box)
    else:
        box.notes.append(f"png: more than {MAX_CHUNKS} chunks; the rest are not read")
        return
    box.notes.append("png: no IEND chunk (truncated file?)")


def _png_text(ctype: bytes, body: bytes, box: Container) -> None:
    name = ctype.decode()
    key_raw, sep, rest = body.partition(b"\x00")
    if not sep or not 1 <= len(key_raw) <= 79:
        box.notes.append(f"png: {name} chunk without a valid keyword; not read")
        return
    key = key_raw.decode("latin-1")
    where = f"png:{name} {key!r}"
    room = min(MAX_TEXT, MAX_TEXT_TOTAL - box._text_bytes)  # what inflating may still produce in this file
    if room <= 0 and ctype != b"tEXt":  # without this, 256 small bombs cost 256 x MAX_TEXT of inflating
        box.notes.append(f"{where}: not read: the file's text exceeds {MAX_TEXT_TOTAL} bytes")
        return
    if ctype == b"tEXt":
        text = decode_text(rest, where, box.notes)
    elif ctype == b"zTXt":
        if rest[:1] != b"\x00":
            box.notes.append(f"{where}: unknown compression method; not read")
            return
        raw = inflate(rest[1:], where, box.notes, room)
        if raw is None:
            return
        text = decode_text(raw, where, box.notes)
    else:  # iTXt: flag, method, language\0, translated keyword\0, UTF-8 text
        if len(rest) < 2:
            box.notes.append(f"{where}: truncated; not read")
            return
        flag, method = rest[0], rest[1]
        parts = rest[2:].split(b"\x00", 2)
        if len(parts) != 3:
            box.notes.append(f"{where}: malformed; not read")
            return
        raw = parts[2]
        if flag == 1:
            if method != 0:
                box.notes.append(f"{where}: unknown compression method; not read")
                return
            raw = inflate(raw, where, box.notes, room)
            if raw is None:
                return
        text = decode_text(raw, where, box.notes, utf8_first=False)
    if key == "XML:com.adobe.xmp":
        if box.xmp is None:
            box.xmp = text
        return
    box.add_text(key, text, "png")


# --- JPEG ----------------------------------------------------------------------------------

def _read_jpeg(data: bytes, box: Container) -> None:
    pos, n = 2, 0
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            box.notes.append("jpeg: segment structure broken before the image data; the rest is not read")
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes: a run skipped in one step (one by one, 20 MB of them took 11 s)
            run = _FILL.match(data, pos)
            pos = (run.end() if run else pos + 2) - 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan: metadata comes before
            return
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        body = data[pos + 4:pos + 2 + length]
        pos += 2 + length
        n += 1
        if n > MAX_ITEMS or length < 2:
            box.notes.append("jpeg: malformed or too many segments; the rest is not read")
            return
        if marker == 0xE1 and body.startswith(b"Exif\x00\x00") and box.exif is None:
            box.exif = body[6:]
        elif marker == 0xE1 and body.startswith(XMP_JPEG) and box.xmp is None:
            box.xmp = decode_text(body[len(XMP_JPEG):], "jpeg:xmp", box.notes, utf8_first=False)
        elif marker == 0xFE:
            box.add_text("comment", decode_text(body, "jpeg:comment", box.notes), "jpeg")


# --- WebP ----------------------------------------------------------------------------------

def _read_webp(data: bytes, box: Container) -> None:
    pos, n = 12, 0
    while pos + 8 <= len(data):
        fourcc, size = struct.unpack("<4sI", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + size]
        pos += 8 + size + (size & 1)
        n += 1
        if n > MAX_ITEMS:
            box.notes.append("webp: too many chunks; the rest is not read")
            return
        if size > MAX_CHUNK and fourcc in (b"EXIF", b"XMP "):
            box.notes.append(f"webp: {fourcc.decode().strip()} chunk of {size} bytes is too large; not read")
            continue
        if fourcc == b"EXIF" and box.exif is None:
            box.exif = body[6:] if body.startswith(b"Exif\x00\x00") else body
        elif fourcc == b"XMP " and box.xmp is None:
            box.xmp = decode_text(body, "webp:xmp", box.notes, utf8_first=False)


# --- EXIF (TIFF structure) -----------------------------------------------------------------

_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_STRING_TAGS = {0x010E: "image_description", 0x010F: "make", 0x0110: "model", 0x0131: "software"}
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def parse_exif(tiff: bytes, notes: list[str]) -> dict[str, str]:
    """IFD0's description/make/model/software and the Exif IFD's UserComment, as strings.

    A tag with the wrong type or an out-of-range offset is left out with a note.
    """
    out: dict[str, str] = {}
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        notes.append("exif: no TIFF header; not read")
        return out
    end = "<" if tiff[:2] == b"II" else ">"
    (ifd0,) = struct.unpack(end + "I", tiff[4:8])
    entries = _ifd(tiff, end, ifd0, notes)
    for tag, typ, raw in entries:
        if tag in _STRING_TAGS:
            if typ != 2:
                notes.append(f"exif: {_STRING_TAGS[tag]} has type {typ}, not ASCII; ignored")
                continue
            out[_STRING_TAGS[tag]] = raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace").strip()
        elif tag == _EXIF_IFD:
            if typ not in (4, 13) or len(raw) < 4:
                notes.append(f"exif: Exif IFD pointer has type {typ}; ignored")
                continue
            (sub,) = struct.unpack(end + "I", raw[:4])
            for stag, styp, sraw in _ifd(tiff, end, sub, notes):
                if stag == _USER_COMMENT:
                    if styp not in (7, 1, 2):
                        notes.append(f"exif: UserComment has type {styp}; ignored")
                        continue
                    text = user_comment(sraw)
                    if text:
                        out["user_comment"] = text
    return out


def _ifd(tiff: bytes, end: str, offset: int, notes: list[str]) -> list[tuple[int, int, bytes]]:
    if offset < 8 or offset + 2 > len(tiff):
        notes.append("exif: IFD offset outside the block; not read")
        return []
    (count,) = struct.unpack(end + "H", tiff[offset:offset + 2])
    if count > MAX_ITEMS:
        notes.append(f"exif: IFD claims {count} entries; only {MAX_ITEMS} read")
        count = MAX_ITEMS
    out = []
    for i in range(count):
        at = offset + 2 + 12 * i
        if at + 12 > len(tiff):
            notes.append("exif: IFD runs past the block")
            break
        tag, typ, n, value = struct.unpack(end + "HHI4s", tiff[at:at + 12])
        if typ not in _TYPE_SIZE:
            continue
        size = _TYPE_SIZE[typ] * n
        if size <= 4:
            raw = value[:size]
        else:
            (ptr,) = struct.unpack(end + "I", value)
            if size > MAX_TEXT or ptr + size > len(tiff):
                notes.append(f"exif: tag 0x{tag:04x} points outside the block or is too large; ignored")
                continue
            raw = tiff[ptr:ptr + size]
        out.append((tag, typ, raw))
    return out


def user_comment(raw: bytes) -> str:
    """EXIF UserComment: an 8-byte charset prefix ("UNICODE\\0" UTF-16 in either byte order,
    "ASCII", "JIS", or undefined zeros) then the text; tolerant of writers that skip the prefix."""
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\x00":
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            text = body.decode("utf-16", errors="replace")
        else:  # no BOM: ASCII-heavy text has its zero bytes first in big-endian order
            zeros_even = body[0::2].count(0)
            zeros_odd = body[1::2].count(0)
            text = body[:len(body) & ~1].decode("utf-16-be" if zeros_even > zeros_odd else "utf-16-le",
                                                 errors="replace")
    elif prefix == b"JIS\x00\x00\x00\x00\x00":
        text = body.decode("shift_jis", errors="replace")
    elif prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        text = body.decode("utf-8", errors="replace")
    else:
        text = raw.decode("utf-8", errors="replace")
    return text.rstrip("\x00").strip()


# --- XMP -----------------------------------------------------------------------------------

# Matched with patterns, not an XML parser: XMP from hostile files is not fed to expat at all.
# Each pattern is anchored at an occurrence of the literal name, so a long hostile XMP packet
# costs one linear scan (an unanchored `[\w]+:Name` pattern would be quadratic).
_DST_NAME = ":DigitalSourceType"
_DST_ATTR = re.compile(r"""\s*=\s*["']([^"'<>]{1,500})["']""")
_DST_ELEM = re.compile(r"""\b([^<>]{0,1000})>([^<]{0,500})<""")
_RESOURCE = re.compile(r"""rdf:resource\s*=\s*["']([^"'<>]{1,500})["']""")


def xmp_digital_source_type(xmp: str) -> str | None:
    """The IPTC DigitalSourceType URI (or bare term) as written, from attribute or element form."""
    at = xmp.find(_DST_NAME)
    for _ in range(20):
        if at < 0:
            return None
        end = at + len(_DST_NAME)
        if m := _DST_ATTR.match(xmp, end, end + 600):
            return m.group(1).strip()
        tag_open = xmp.rfind("<", max(0, at - 60), at)
        if tag_open >= 0 and xmp[tag_open + 1:tag_open + 2] != "/" and (m := _DST_ELEM.match(xmp, end, end + 1600)):
            res = _RESOURCE.search(m.group(1))
            value = (res.group(1) if res else m.group(2)).strip()
            if value:
                return value
        at = xmp.find(_DST_NAME, end)
    return None


def source_type_term(uri: str) -> str | None:
    """The IPTC term: the last path part of the URI (or the bare term as written)."""
    parts = [p for p in uri.strip().split("/") if p]
    return parts[-1][:100] if parts else None
