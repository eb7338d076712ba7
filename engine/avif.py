"""The size of an AVIF's (ISOBMFF's) Exif item, read from its item tables before Pillow opens the file.

Pillow's AVIF reader parses the Exif item inside `Image.open` (to combine its orientation with the file's
rotation box), before engine.images can leave an oversized block unparsed as it does for JPEG and PNG: a 6 MB
AVIF whose Exif holds one tag of 3 million values cost 0.39 s and 48 MB there. So the item's size is read first,
from the `meta` box: `iinf` says which items are Exif, `iloc` where their bytes are and how many. Boxes are
walked, never loaded, and a malformed table answers None (the decoder then reports the file); tables past
this module's limits raise Refused, since libavif reads them and skipping them skipped the Exif check.
"""
from __future__ import annotations

import io
import struct
from typing import IO

MAX_META = 4 << 20  # a meta box larger than this is not read (its tables are a few hundred bytes)
MAX_BOXES = 10_000


class Refused(Exception):
    """Item tables larger than any encoder writes; the message says which, for a one-line refusal."""


def exif_size(handle: IO[bytes]) -> int | None:
    """Total bytes of the Exif items of the ISOBMFF file at `handle` (from where it is); None when it has none
    or its tables cannot be read; Refused past the limits. An extent of length 0 (to the end of the file)
    counts what is left."""
    start = handle.tell()
    end = handle.seek(0, io.SEEK_END)
    handle.seek(start)
    try:
        meta = _find_meta(handle, start, end)
        if meta is None:
            return None
        exif_ids = _exif_items(meta)
        if not exif_ids:
            return None
        return sum(length or max(0, end - start - offset) for item, offset, length in _locations(meta)
                   if item in exif_ids)
    except (struct.error, ValueError, IndexError):
        return None


def _find_meta(handle: IO[bytes], start: int, end: int) -> bytes | None:
    position = start
    for _ in range(MAX_BOXES):
        handle.seek(position)
        size, kind, header = _header(handle.read(16), position, end)
        if size < header:
            return None
        if kind == b"meta":
            if size > MAX_META:
                raise Refused(f"a meta box of {size} bytes (the limit is {MAX_META}; its tables take a few hundred)")
            handle.seek(position + header + 4)  # a full box: version and flags first
            return handle.read(size - header - 4)
        position += size
        if position >= end:
            return None
    raise Refused(f"more than {MAX_BOXES} boxes before its meta box (no encoder writes that many)")


def _header(data: bytes, position: int, end: int) -> tuple[int, bytes, int]:
    size, kind = struct.unpack(">I4s", data[:8])
    if size == 1:
        return struct.unpack(">Q", data[8:16])[0], kind, 16
    if size == 0:
        return end - position, kind, 8
    return size, kind, 8


def _children(body: bytes, start: int = 0):
    position = start
    for count in range(MAX_BOXES + 1):
        if position + 8 > len(body):
            return
        if count == MAX_BOXES:
            raise Refused(f"more than {MAX_BOXES} boxes in one box (no encoder writes that many)")
        size, kind, header = _header(body[position:position + 16], position, len(body))
        if size < header:
            return
        yield kind, body[position + header:position + size]
        position += size


def _exif_items(meta: bytes) -> set[int]:
    found: set[int] = set()
    for kind, body in _children(meta):
        if kind != b"iinf":
            continue
        version = body[0]
        first = 6 if version == 0 else 8  # version/flags, then a 2- or 4-byte entry count
        for entry_kind, entry in _children(body, first):
            if entry_kind != b"infe" or entry[0] < 2:
                continue
            if entry[0] == 2:
                item, = struct.unpack(">H", entry[4:6])
                item_type = entry[8:12]
            else:
                item, = struct.unpack(">I", entry[4:8])
                item_type = entry[10:14]
            if item_type == b"Exif":
                found.add(item)
    return found


def _locations(meta: bytes) -> list[tuple[int, int, int]]:
    """(item id, first extent's offset, total length) of every item `iloc` lists."""
    out: list[tuple[int, int, int]] = []
    extents = MAX_BOXES  # of all items of all tables: with fields of 0 bytes an extent reads nothing, and a
    # 60 KB table of 10000 items claiming 65535 extents each took minutes to walk (measured: 3 s per 100)
    for kind, body in _children(meta):
        if kind != b"iloc":
            continue
        version = body[0]
        reader = _Reader(body, 4)
        sizes = reader.take(1)
        offset_size, length_size = sizes >> 4, sizes & 15
        more = reader.take(1)
        base_size, index_size = more >> 4, (more & 15 if version in (1, 2) else 0)
        count = reader.take(2 if version < 2 else 4)
        if count > MAX_BOXES:
            raise Refused(f"more than {MAX_BOXES} items (no encoder writes that many)")
        for _ in range(count):
            item = reader.take(2 if version < 2 else 4)
            if version in (1, 2):
                reader.take(2)  # construction method
            reader.take(2)  # data reference index
            base = reader.take(base_size)
            first, total = None, 0
            extent_count = reader.take(2)
            extents -= extent_count
            if extents < 0:
                raise Refused(f"more than {MAX_BOXES} item extents (no encoder writes that many)")
            for _ in range(extent_count):
                reader.take(index_size)
                offset, length = reader.take(offset_size), reader.take(length_size)
                first = base + offset if first is None else first
                total += length
            out.append((item, first or 0, total))
    return out


class _Reader:
    def __init__(self, data: bytes, position: int) -> None:
        self.data, self.position = data, position

    def take(self, size: int) -> int:
        if size not in (0, 1, 2, 4, 8):
            raise ValueError(f"field of {size} bytes")
        if self.position + size > len(self.data):
            raise IndexError("past the box")
        value = int.from_bytes(self.data[self.position:self.position + size], "big") if size else 0
        self.position += size
        return value
