"""The one image reader for CLI, service and ingest: size checked before reading, pixels before
decoding, formats allow-listed, EXIF orientation applied (as a viewer shows it), RGB out.

One file therefore gives one vector whichever way it arrives.
"""
from __future__ import annotations

import hashlib
import io
import numbers
import os
import stat
import struct
from importlib.util import find_spec
from pathlib import Path
from typing import IO, Union

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from engine.errors import TooLargeError, UnsupportedError, UserError
from engine.paths import as_text, not_a_file, shown

# Decompression-bomb guard: far above any generator's output (e.g. 4096 x 4096 = 16.8 MP).
MAX_PIXELS = 64_000_000
MAX_BYTES = 64 << 20
# Formats Pillow reads that generators and browsers actually produce; anything else (PSD, EPS through
# Ghostscript, ICO, ...) is refused, and only these plugins are tried on a file (open_accepted). AVIF: what
# image sites and browsers save more and more (libavif parses on opening and decodes on load, as the others);
# Pillow has it from 11.2, and naming a format Pillow lacks fails every open (a KeyError before GIF, BMP, TIFF).
FORMATS = ("PNG", "JPEG", "WEBP", *(("AVIF",) if find_spec("PIL.AvifImagePlugin") else ()), "GIF", "BMP", "TIFF")
# What Pillow's JPEG reader names a camera JPEG with a Multi-Picture index (many phones write one): the
# first picture is the JPEG itself, and it is what is read.
ALIASES = {"MPO": "JPEG"}
# Decompressed PNG text (tEXt/zTXt/iTXt) Pillow keeps for one image while opening it, this module's
# every reader (and the service's header check) alike. Pillow's default, 64 MB, let a 70 KB file with
# 62 zTXt bombs of 1 MB each cost 62 MB at every open (measured: 16 requests of 4 such images at once
# took the server from 0.9 to 2.2 GB). No generator writes more than a few hundred KB of text; beyond
# this the image is refused (413), from its header, before any pixel. Provenance reads the text itself.
MAX_PNG_TEXT = 4 << 20
PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, MAX_PNG_TEXT)
# Blocks of a file's container that Pillow walks one by one in Python at every open, before (and, for
# PNG, after) the pixel data: PNG chunks, JPEG markers and fill bytes before the first scan, GIF blocks
# before the first frame, TIFF tags of a directory. Encoders write tens (PNG: one IDAT chunk per 8-64 KB
# of pixels); a 17 MB file of empty chunks or markers cost 5-6 s of CPU per open, twice per request
# (measured). Refused beyond.
MAX_BLOCKS = 20_000
# Colour profiles of a PNG: Pillow inflates every iCCP chunk (up to 1 MB each, outside MAX_PNG_TEXT) and keeps
# the last; 2000 of 1 KB each (a 2 MB file) cost 3.9 s of CPU (measured). The format allows one.
MAX_PNG_PROFILES = 4
# Scans of a JPEG: libjpeg decodes each over the whole image, so a 110 KB progressive JPEG of 16 MP with
# its last scan repeated 500 times took 6 s (measured); 20 MB of repeats would take hours. Encoders
# write 1 (baseline) or about 10 (progressive). Per request, pixels x scans is then at most 64 MP x 100
# (about 5 s of CPU).
MAX_SCANS = 100
# Values of one TIFF tag (strip and tile offsets among them): a 64 MP image in strips of one row has
# 8000, in 256-pixel tiles 1000; 65536 cost Pillow 0.3 s.
MAX_TIFF_VALUES = 65536
# An EXIF block read for the orientation: a JPEG's holds at most 64 KB; a PNG eXIf or WebP EXIF chunk of
# 11 MB whose orientation tag listed 3 million values cost 0.4 s and 72 MB to unpack (measured).
MAX_EXIF = 1 << 20
AVIF_SHARE = 3  # an AVIF may have max_pixels // AVIF_SHARE pixels (see _check_pixels)
# Longest side over shortest side. CLIP preprocessing scales the *short* side to the model's input
# side (224 to 336 px) and keeps the ratio, so a few-KB PNG of 60000 x 1 pixels, inside every pixel
# limit, would become 60000*S x S pixels before the centre crop (measured: +1.1 GB of server memory
# for one request). Far beyond any generator's output (21:9 is 2.3) and ordinary panoramas (<= 10).
MAX_ASPECT = 20
# EXIF orientation -> the transpose a viewer applies (as PIL.ImageOps.exif_transpose maps it)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}

ImageInput = Union[str, Path, bytes, bytearray, Image.Image]


def read_image(source: ImageInput, label: str | None = None, max_bytes: int = MAX_BYTES,
               max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, str]:
    """RGB image and a sha256 identifying it: of the file's bytes, or of the pixels of a PIL image."""
    if isinstance(source, Image.Image):
        image = as_rgb(source, label or "image")
        _check_pixels(image.width, image.height, max_pixels, label or "image")
        digest = hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()
        return image, digest
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        label = label or "image"
    else:
        path = source if isinstance(source, Path) else Path(as_text(source, "an image"))  # bytes: the contents
        label = label or shown(path)
        data = _read_file(path, max_bytes)
    if not data:
        raise UserError(f"{label}: the image is empty", code="empty_image")
    if len(data) > max_bytes:
        raise TooLargeError(f"{label}: {len(data)} bytes, the limit is {max_bytes}", code="image_too_large")
    return decode(data, label, max_pixels), hashlib.sha256(data).hexdigest()


def _read_file(path: Path, max_bytes: int) -> bytes:
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:  # checked before reading a byte
            raise TooLargeError(f"{shown(path)}: {size} bytes, the limit is {max_bytes}", code="image_too_large")
        try:
            return handle.read(max_bytes + 1)  # a file that grows while read stops one byte past the limit
        except OSError as exc:
            raise UserError(f"cannot read image {shown(path)}: {exc.strerror or type(exc).__name__}") from None


def open_regular(path: Path, what: str = "image") -> IO[bytes]:
    """`path` opened for reading only if it is a regular file (links followed): a folder, a FIFO nobody
    writes to (open would wait forever), /dev/zero (endless), a socket or a device is refused in one line
    naming what it is. Checked before opening (opening some devices acts on them) and again on the open
    descriptor, which O_NONBLOCK keeps from blocking on a FIFO swapped in between."""
    why = not_a_file(path)
    if why is None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            why = not_a_file(path) or "not found"
        except OSError as exc:
            raise UserError(f"cannot read {what} {shown(path)}: {exc.strerror or type(exc).__name__}") from None
        else:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return os.fdopen(fd, "rb")
            os.close(fd)
            why = "not a regular file"
    if why == "not found":
        raise UserError(f"{what} not found: {shown(path)}", code="not_found")
    if why == "a folder":
        raise UserError(f"{shown(path)} is a folder, not an {what} file: give the {what} files in it (e.g. "
                        f"{shown(path)}/*.png)", code="is_a_directory")
    raise UserError(f"{shown(path)} is {why}, not an {what} file", code="not_a_file")


def _check_pixels(width: int, height: int, max_pixels: int, label: str, kind: str | None = None) -> None:
    """Pixel count and geometry, from the header: what decoding and preprocessing will allocate. An AVIF may
    have a third of the pixels: libavif's planes and buffers take up to 16.3 B a pixel while it decodes (with
    alpha and a rotation; measured), where the service's memory bound counts 8 for every format."""
    limit = max_pixels // AVIF_SHARE if kind == "AVIF" else max_pixels
    if width * height > limit:
        raise TooLargeError(f"{label}: {width}x{height} pixels, the limit is {limit}"
                            + (" for an AVIF" if limit != max_pixels else ""), code="image_too_large")
    check_aspect(width, height, label)


def check_aspect(width: int, height: int, label: str) -> None:
    """Refuse a long thin image: preprocessing would scale its short side up, and its long side with it."""
    if width <= 0 or height <= 0:
        raise UserError(f"cannot decode image {label}: {width}x{height} pixels", code="undecodable_image")
    if max(width, height) > MAX_ASPECT * min(width, height):
        ratio = max(width, height) / min(width, height)
        raise TooLargeError(f"{label}: {width}x{height} pixels, a side ratio of {ratio:.0f}:1; the limit is "
                            f"{MAX_ASPECT}:1 (crop it to the part to attribute)", code="extreme_aspect_ratio")


def orientation(opened: Image.Image) -> Image.Transpose | None:
    """The transpose the image's EXIF orientation asks for; None when there is none, or when the EXIF
    block or the tag is malformed (a viewer ignores it too, and so do we, rather than refuse the image)."""
    raw = opened.info.get("exif")
    if isinstance(raw, bytes) and len(raw) > MAX_EXIF:  # not parsed: Pillow would unpack every value of it
        return None
    try:
        value = opened.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - any damage in the metadata: the pixels are still the image
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # IFDRational is a Real, not a float
        return None
    try:
        whole = int(float(value))
    except (ValueError, OverflowError, ZeroDivisionError):  # nan, inf, x/0
        return None
    return _ORIENTATION.get(whole) if whole == value else None


def upright(opened: Image.Image) -> Image.Image:
    """The image as a viewer shows it (EXIF orientation applied), without rewriting its metadata: unlike
    ImageOps.exif_transpose, which re-serialises the EXIF block and fails on a tag of the wrong type."""
    method = orientation(opened)
    return opened.transpose(method) if method is not None else opened


def as_rgb(image: Image.Image, label: str = "image") -> Image.Image:
    """RGB as a viewer shows it. Pillow converts 16-bit greyscale (PNG, TIFF) by clipping each value to 255
    rather than scaling it: a 16-bit PNG of a 0-65535 ramp became an almost white image, attributed as one."""
    if image.mode.startswith("I;16"):  # the high byte, as Pillow reads a 16-bit colour PNG; 3 bytes a pixel at most
        import numpy

        values = numpy.array(image)  # in the file's byte order
        values >>= 8
        image = Image.fromarray(values.astype(numpy.uint8))
        del values
    elif image.mode in ("I", "F") and image.width and image.height:
        image = _eight_bits(image, label)
    return image.convert("RGB")


def _eight_bits(image: Image.Image, label: str) -> Image.Image:
    """32-bit integer or float greyscale (numpy's arrays, older Pillow's 16-bit PNG, 32-bit TIFF) by the
    range its values take, since the mode does not say it: 0-1 floats are fractions of 255, values up to
    255 are 8-bit ones, up to 65535 16-bit ones (their high byte). Clipping read them as white."""
    import numpy

    values = numpy.asarray(image)
    low, high = values.min(), values.max()
    if not 0 <= low <= high <= 65535:  # a NaN fails too
        raise UserError(f"cannot decode image {label}: its pixel values run from {low:g} to {high:g}, not "
                        "within 8 or 16 bits: save it as an 8- or 16-bit image", code="undecodable_image")
    if image.mode == "F" and high <= 1:
        values = numpy.rint(values * 255)
    elif high > 255:
        values = values // 256
    return Image.fromarray(values.astype(numpy.uint8))


def accepted(opened: Image.Image) -> bool:
    """Whether Pillow's reading of a file is one of the accepted formats."""
    return ALIASES.get(opened.format or "", opened.format) in FORMATS


def open_accepted(handle: IO[bytes], label: str) -> Image.Image:
    """Pillow's reading of an accepted format, no other plugin tried first: ICO's decodes the whole image
    while opening it, before any pixel limit is checked (a 420 KB icon holding a PNG of 12000 x 12000
    cost 590 MB and 0.75 s before it was refused as ICO; measured). A file of another format is named
    in the refusal: by its signature for the plugins that decode on opening, else by Pillow's reading."""
    start = handle.tell()
    try:
        opened = Image.open(handle, formats=FORMATS)
    except UnidentifiedImageError:
        handle.seek(start)
        name = _other_format(handle)
        if name is None:
            raise
    else:
        if accepted(opened):
            return opened
        name = opened.format or "unknown"
        opened.close()
    raise UnsupportedError(f"{label}: {name} images are not accepted (accepted: {', '.join(FORMATS)})",
                           code="unsupported_image") from None


# Plugins that decode pixels inside Image.open (Pillow 13): never opened, only recognised by signature.
DECODE_ON_OPEN = ("ICO",)


def _other_format(handle: IO[bytes]) -> str | None:
    start = handle.tell()
    prefix = handle.read(16)
    for name in DECODE_ON_OPEN:
        accept = Image.OPEN.get(name, (None, None))[1]
        if accept is not None and accept(prefix):
            return name
    others = [name for name in Image.ID if name not in FORMATS and name not in DECODE_ON_OPEN]
    handle.seek(start)
    try:
        with Image.open(handle, formats=others) as opened:
            return opened.format
    except Exception:  # noqa: BLE001 - not an image Pillow reads at all: the caller's refusal stands
        return None


def _text_bomb(exc: BaseException) -> bool:
    """Pillow's refusal of a PNG whose text chunks decompress past its limits (MAX_TEXT_CHUNK/_MEMORY)."""
    return isinstance(exc, ValueError) and "MAX_TEXT" in str(exc)


def _too_much_text(label: str) -> TooLargeError:
    return TooLargeError(f"{label}: its PNG text metadata decompresses to more than {MAX_PNG_TEXT} bytes (or "
                         f"{PngImagePlugin.MAX_TEXT_CHUNK} in one chunk); save the image without it",
                         code="metadata_too_large")


def decode(data: bytes, label: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    check_structure(data, label)
    try:
        with open_accepted(io.BytesIO(data), label) as opened:
            _check_pixels(opened.width, opened.height, max_pixels, label, opened.format)  # header only
            return as_rgb(upright(opened), label)
    except UserError:
        raise
    except MemoryError:
        raise
    except Image.DecompressionBombError:  # Pillow's own hard stop
        raise TooLargeError(f"{label}: too many pixels (the limit is {max_pixels})", code="image_too_large") from None
    except UnidentifiedImageError:  # its own text names a BytesIO object: useless to a user
        raise UserError(f"cannot decode image {label}: not a {', '.join(FORMATS)} image",
                        code="undecodable_image") from None
    except Exception as exc:  # noqa: BLE001 - a decoder fails on the file's bytes in many ways (OSError,
        # struct.error, IndexError, ...): each is the file's fault, said in one line, never a traceback
        if _text_bomb(exc):
            raise _too_much_text(label) from None
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot decode image {label}: {reason}", code="undecodable_image") from None


def check_header(path: Path, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> None:
    """Cheap early check (no pixel decoded): the file exists, is an accepted format and within limits."""
    path = Path(path)
    if not_a_file(path) == "a folder":
        raise UserError(f"{shown(path)} is a folder, not an image file: `resynth triage {shown(path)}` attributes "
                        f"every image under it, or give the files (e.g. {shown(path)}/*.png) or a --queries file",
                        code="is_a_directory")
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise TooLargeError(f"{shown(path)}: {size} bytes, the limit is {max_bytes}", code="image_too_large")
        if size == 0:  # read_image's words: the CLI checks first, and a file gets one message either way
            raise UserError(f"{shown(path)}: the image is empty", code="empty_image")
        check_structure(handle, shown(path))  # decode's order of checks, so the CLI's first refusal is its refusal
        _check_opened_header(handle, shown(path), max_pixels)


def _check_opened_header(handle: IO[bytes], label: str, max_pixels: int) -> None:
    try:
        with open_accepted(handle, label) as opened:
            _check_pixels(opened.width, opened.height, max_pixels, label, opened.format)
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise TooLargeError(f"{label}: too many pixels (the limit is {max_pixels})", code="image_too_large") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - as in decode: the file's fault, in one line
        if _text_bomb(exc):
            raise _too_much_text(label) from None
        lines = str(exc).splitlines() or [type(exc).__name__]
        # the reader's own words (decode): a file gets one message whether the CLI checks it first or not
        reason = f"not a {', '.join(FORMATS)} image" if isinstance(exc, UnidentifiedImageError) else lines[0]
        raise UserError(f"cannot decode image {label}: {reason}", code="undecodable_image") from None


def check_structure(source: bytes | IO[bytes], label: str = "image") -> None:
    """400 for a file with more container blocks than MAX_BLOCKS, found by a walk of at most that many
    steps (headers read, bodies skipped), or a JPEG of more than MAX_SCANS scans; 413 for an AVIF whose Exif
    is over MAX_EXIF; a file object is left where it was. Other formats pass."""
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    start = handle.tell()
    try:
        head = handle.read(16)
        walk = _png_blocks if head.startswith(b"\x89PNG\r\n\x1a\n") else _jpeg_blocks if head.startswith(b"\xff\xd8") \
            else _gif_blocks if head[:6] in (b"GIF87a", b"GIF89a") \
            else _tiff_values if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+") else None
        if walk is not None:
            handle.seek(start)
            try:
                kind = walk(handle)
            except (struct.error, ValueError, OverflowError, OSError):  # malformed: the decoder reports it
                kind = None
            if kind is not None:
                raise UserError(f"cannot decode image {label}: {kind} (no encoder writes that many)",
                                code="undecodable_image")
        elif head[4:8] == b"ftyp":  # AVIF: Pillow parses its Exif inside Image.open, where MAX_EXIF cannot act
            from engine.avif import Refused, exif_size

            handle.seek(start)
            try:
                size = exif_size(handle)
            except Refused as exc:  # not skipped: libavif reads such tables, and its Exif with them
                raise UserError(f"cannot decode image {label}: {exc}", code="undecodable_image") from None
            if size is not None and size > MAX_EXIF:
                raise TooLargeError(f"{label}: its EXIF block is {size} bytes, more than {MAX_EXIF}; save the image "
                                    "without it", code="metadata_too_large")
    finally:
        handle.seek(start)


def _png_blocks(handle: IO[bytes]) -> str | None:
    handle.seek(8, io.SEEK_CUR)
    profiles = 0
    for _ in range(MAX_BLOCKS):
        header = handle.read(8)
        if len(header) < 8 or header[4:] == b"IEND":
            return None
        if header[4:] == b"iCCP":
            profiles += 1
            if profiles > MAX_PNG_PROFILES:
                return f"more than {MAX_PNG_PROFILES} PNG colour profiles (iCCP chunks)"
        handle.seek(struct.unpack(">I", header[:4])[0] + 4, io.SEEK_CUR)
    header = handle.read(8)
    return f"more than {MAX_BLOCKS} PNG chunks" if len(header) == 8 and header[4:] != b"IEND" else None


def _jpeg_blocks(handle: IO[bytes]) -> str | None:
    handle.seek(2, io.SEEK_CUR)
    for _ in range(MAX_BLOCKS):
        byte = handle.read(1)
        if byte != b"\xff":  # the end, or not a marker: Pillow stops there too
            return None
        marker = handle.read(1)
        if marker == b"\xda":  # the first scan: libjpeg's C from here, but each further scan is a pass
            return _jpeg_scans(handle)
        if marker in (b"", b"\xd9"):
            return None
        if marker == b"\xff":  # a fill byte: step one byte back and read the next marker from it
            handle.seek(-1, io.SEEK_CUR)
        elif marker not in (b"\x01", *(bytes([m]) for m in range(0xD0, 0xD8))):  # marker with a length
            size = handle.read(2)
            if len(size) < 2 or size < b"\x00\x02":  # cut short, or a length that counts backwards
                return None
            handle.seek(struct.unpack(">H", size)[0] - 2, io.SEEK_CUR)
    return f"more than {MAX_BLOCKS} JPEG markers before the image data"


def _jpeg_scans(handle: IO[bytes]) -> str | None:
    """Scans up to the first end of image, counted at C speed: in entropy-coded data a 0xFF byte is
    always followed by 0x00 or a marker, so `FF DA` is a scan there and `FF D9` the end."""
    scans, tail = 1, b""
    while block := handle.read(1 << 20):
        data = tail + block
        end = data.find(b"\xff\xd9")
        scans += data.count(b"\xff\xda", 0, len(data) if end < 0 else end)  # the 1-byte tail holds none
        if scans > MAX_SCANS:
            return f"more than {MAX_SCANS} JPEG scans, each a pass over every pixel"
        if end >= 0:
            return None
        tail = data[-1:]
    return None


_TIFF_BYTES = {1, 2, 7}  # BYTE, ASCII, UNDEFINED: Pillow keeps these as one bytes or str object


def _tiff_values(handle: IO[bytes]) -> str | None:
    """The first directory's entries (the one Pillow reads on open): a numeric array becomes a tuple of
    Python ints, and each strip or tile an entry of Pillow's tile list. A 15 MB TIFF of a 64 x 64 image
    listing 2 million strips took 11 s and 550 MB (measured)."""
    base = handle.tell()
    head = handle.read(16)
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 8-byte offsets and counts
    if len(head) < (16 if big else 8):
        return None  # cut short: Pillow says so
    offset = struct.unpack(order + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
    handle.seek(base + offset)
    raw = handle.read(8 if big else 2)
    if len(raw) < (8 if big else 2):
        return None
    entries = struct.unpack(order + ("Q" if big else "H"), raw)[0]
    if entries > MAX_BLOCKS:
        return f"more than {MAX_BLOCKS} TIFF tags in a directory"
    size, layout = (20, order + "HHQ") if big else (12, order + "HHI")
    table = handle.read(entries * size)
    for at in range(0, len(table) - size + 1, size):
        tag, kind, count = struct.unpack_from(layout, table, at)
        limit = MAX_TIFF_VALUES * (3 if tag == 320 else 1)  # ColorMap: 3 x 2**16 for a 16-bit palette
        if kind not in _TIFF_BYTES and count > limit:
            return f"more than {limit} values in TIFF tag {tag}"
    return None


def _gif_blocks(handle: IO[bytes]) -> str | None:
    header = handle.read(13)
    if len(header) < 13:
        return None
    if header[10] & 0x80:
        handle.seek(3 << ((header[10] & 7) + 1), io.SEEK_CUR)  # the global colour table
    budget = MAX_BLOCKS  # extensions and their sub-blocks together: Pillow reads each in Python
    while budget > 0:
        if handle.read(1) != b"\x21":  # an image (its frame is decoded in C), the trailer, or the end
            return None
        handle.seek(1, io.SEEK_CUR)  # the extension's label
        while budget > 0:
            budget -= 1
            size = handle.read(1)
            if not size or size == b"\x00":
                break
            handle.seek(size[0], io.SEEK_CUR)
    return f"more than {MAX_BLOCKS} GIF blocks before the first frame"


def save_png_atomic(image: Image.Image, path: Path) -> str:
    """Write a PNG via a temporary name and rename; returns the sha256 of the written bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:  # a full disk or Ctrl-C mid-write leaves no temporary file beside the images
        tmp.unlink(missing_ok=True)
    return hashlib.sha256(data).hexdigest()
