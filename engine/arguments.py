"""The library's arguments checked where they enter (`engine.open`, `engine.init`, the Workspace's methods).

A value of the wrong type used to travel until something deep inside tripped on it: an AttributeError in
the plan cache for a dict of options, a TypeError from unicodedata for a prompt given as bytes, a source
stored with `steps=True` or `guidance=nan` that failed only at its first generation. Each is refused here,
at the call, with one line naming the argument: an `ArgumentTypeError` (a UserError and a TypeError) for a
wrong type, a UserError for a value out of its bounds.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable, TypeVar, cast

from engine.errors import ArgumentTypeError, UnsupportedError, UserError
from engine.options import Options
from engine.paths import expand_path, not_a_file, shown

# A recipe's numbers, whatever the kind that declares them: beyond these no generator runs (10,000 steps is
# ComfyUI's own limit; 16384 px is past any pipeline's memory; guidance beyond 100 is noise). Every other
# integer parameter stays within 32 bits and every number is finite: `--guidance nan` or `--timeout inf`
# was stored, and failed (or hung) only when the source first generated.
RECIPE_BOUNDS = {"steps": (1, 10_000), "size": (8, 16_384), "guidance": (0.0, 100.0)}
INT_LIMIT = 2**31 - 1
MAX_READ = 64 << 20  # bytes read from a file object given as an image: engine.images.MAX_BYTES, and one more
F = TypeVar("F", bound=Callable[..., Any])


def keywords(func: F) -> F:
    """`func`, refusing an unknown keyword argument in one line that names the nearest accepted one. Python's
    own TypeError names none: `engine.open(store, writeable=False)`; `ws.attribute(image, per_source=1)` (an
    option: it belongs in `options=engine.Options(...)`, which the message says)."""
    accepted = inspect.signature(func).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return func  # takes any keyword: its own checks name what it refuses
    names = [name for name, p in accepted.items() if name != "self" and p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    called = func.__qualname__ if "." in func.__qualname__ else f"{func.__module__}.{func.__qualname__}"

    signature = inspect.signature(func)

    @functools.wraps(func)
    def checked(*args: Any, **kwargs: Any) -> Any:
        for name in kwargs:
            if name not in accepted:
                raise unknown_keyword(called, name, names)
        try:
            signature.bind(*args, **kwargs)  # a required argument left out, or one too many
        except TypeError as exc:
            raise ArgumentTypeError(f"{called}(): {exc}") from None
        return func(*args, **kwargs)

    return cast(F, checked)


def unknown_keyword(called: str, name: str, names: list[str]) -> ArgumentTypeError:
    from dataclasses import fields

    if "options" in names and name in {f.name for f in fields(Options)}:
        hint = f": it is an option; pass options=engine.Options({name}=...)"
    else:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
    return ArgumentTypeError(f"{called}() takes no argument {name[:40]!r}{hint} (its arguments: {', '.join(names)})")


def _type(value: Any) -> str:
    return type(value).__name__


def required_path(value: Any, what: str) -> Path:
    """A path argument that must be given: str, bytes or os.PathLike, `~` and `$VAR` expanded."""
    if value is None or (isinstance(value, (str, bytes)) and not value):
        raise ArgumentTypeError(f"{what} is required: give a path") if value is None else \
            UserError(f"{what} is empty: give a path", code="bad_path")
    return not_special(expand_path(value, what), what)


def not_special(path: Path, what: str) -> Path:
    """`path` unless it names a FIFO, a device, a socket or a link loop. The model readers open what they
    are given: a FIFO as a checkpoint or a config waited forever for a writer (after the error line, when
    a worker thread had opened it), /dev/zero as a LoRA file was hashed forever."""
    why = not_a_file(path)
    if why is None or why in ("not found", "a folder") or why.startswith("a symbolic link to a missing"):
        return path
    raise UserError(f"{what}: {shown(path)} is {why}, not a file or folder", code="not_a_file")


def optional_path(value: Any, what: str) -> Path | None:
    """A path argument that may be left out (None); "" is refused rather than read as the current folder."""
    return None if value is None else required_path(value, what)


def flag(value: Any, what: str) -> bool:
    """A yes/no argument: `writable="no"` is truthy, and opened a store for writing."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{what} must be True or False, not {_type(value)} {value!r:.40}")
    return value


def device(value: Any) -> str | None:
    if value is None:
        return None
    from engine.flags import DEVICE  # here, not at import: `import engine` (and the console's start) stays lean

    if not isinstance(value, str) or not DEVICE.match(value.strip()):
        raise UserError(f"device must be cpu, cuda, cuda:N or mps, not {value!r:.40}", code="bad_device")
    return value.strip()


def text(value: Any, what: str) -> str | None:
    """An optional text argument (a prompt, an instruction, a name)."""
    if value is not None and not isinstance(value, str):
        raise ArgumentTypeError(f"{what} must be a str, not {_type(value)}")
    return unicode(value, what) if value is not None else None


def unicode(value: str, what: str) -> str:
    """`value` unless it holds lone surrogates: what Python makes of command-line bytes that are not UTF-8
    (a prompt typed in a Latin-1 terminal). No database stores them: the store's key hash and the SQL
    driver raised UnicodeEncodeError, a traceback, after the models had loaded."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:  # an ASCII locale without UTF-8 mode (PYTHONUTF8=0, LC_ALL=C) kept UTF-8 bytes as surrogates
            return os.fsencode(value).decode("utf-8")
        except UnicodeError:
            raise UserError(f"{what} is not valid UTF-8 text ({shown(value)[:80]}): set the terminal or file "
                            "encoding to UTF-8", code="not_utf8") from None
    return value


def texts(values: Any, what: str) -> list[str]:
    """A list of texts: a lone str (a common slip for [str]) and non-text items are refused."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) or isinstance(values, Mapping):
        raise ArgumentTypeError(f"{what} must be a list of str, not {_type(values)}")
    out = list(values)
    for i, value in enumerate(out):
        if not isinstance(value, str):
            raise ArgumentTypeError(f"{what}[{i}] must be a str, not {_type(value)}")
        out[i] = unicode(value, f"{what}[{i}]")
    return out


def options(value: Any) -> Options | None:
    if value is None or isinstance(value, Options):
        return value
    hint = " (e.g. engine.Options(**that_dict))" if isinstance(value, Mapping) else ""
    raise ArgumentTypeError(f"options must be an engine.Options{hint}, not {_type(value)}")


def image_items(images: Any) -> list:
    """What `attribute` reads: one image (a path, bytes, a binary file object, a PIL image, a Query) or a
    list of them; an iterator is read into a list. A path is `~`/`$VAR`-expanded, as every path of the
    library is. A memoryview or a file object is read as bytes: both were iterated as a list (of ints, of
    a PNG's "lines") and failed as many nonsense images."""
    from PIL import Image

    from engine.attribute import Query

    single = (str, bytes, bytearray, memoryview, os.PathLike, Image.Image, Query)
    if isinstance(images, single) or _is_file(images):
        items = [images]
    elif isinstance(images, Iterable) and not isinstance(images, Mapping) and (
            not hasattr(images, "__array__") or _column_of_paths(images)):
        items = list(images)
    else:
        raise ArgumentTypeError(f"images must be a path, bytes, a PIL image or a list of them{_array_hint(images)}, "
                                f"not {_type(images)}")
    for i, item in enumerate(items):
        what = f"images[{i}]"
        if isinstance(item, str) and not item.strip():  # expanded, "" named the current folder
            raise UserError(f"{what} is an empty path: give an image file", code="bad_path")
        if isinstance(item, (str, os.PathLike)):
            items[i] = expand_path(item, what)
        elif isinstance(item, bytes) and len(item) < 4096 and b"\0" not in item and os.path.isfile(item):
            raise ArgumentTypeError(f"{what} is bytes naming a file ({shown(item)}): bytes are read as an "
                                    "image's contents; give the path as a str or a Path")
        elif isinstance(item, memoryview):
            items[i] = item.tobytes()
        elif _is_file(item):
            items[i] = _read_file_object(item, what)
        elif isinstance(item, Image.Image):
            _convertible(item, what)
        elif not isinstance(item, single):
            raise ArgumentTypeError(f"{what} must be a path, bytes or a PIL image{_array_hint(item)}, not "
                                    f"{_type(item)}")
    return items


def _column_of_paths(value: Any) -> bool:
    """A 1-D array of text or objects (numpy, a pandas column of paths): a list, where an array of numbers is
    pixels (refused: their layout is the caller's to say)."""
    return getattr(value, "ndim", None) == 1 and getattr(getattr(value, "dtype", None), "kind", "") in ("O", "U", "S")


def _array_hint(value: Any) -> str:
    if not hasattr(value, "__array__"):
        return ""
    return " (an array or tensor: pass PIL.Image.fromarray(it) of its uint8 HxWx3 pixels, which says how to read them)"


def _is_file(value: Any) -> bool:
    """A file object (open(..., "rb"), io.BytesIO, a zip member): has `read`; a PIL image has none, and a Query's
    `read` is its constructor (a list of Queries was read as file objects: Query.read(67108865))."""
    from engine.attribute import Query

    return callable(getattr(value, "read", None)) and not isinstance(value, (str, bytes, os.PathLike, Query))


def _read_file_object(handle: Any, what: str) -> bytes:
    """A file object's bytes from its current position, one byte past the limit at most (the image reader
    then refuses it as too large), read until its end: an unbuffered pipe or socket answers a read with what
    has arrived so far. Text mode is refused: decoding a PNG as text fails, or worse, succeeds."""
    import inspect
    import io

    binary = ArgumentTypeError(f"{what} is a file object in text mode: open it in binary mode (open(path, \"rb\"))")
    if isinstance(handle, io.TextIOBase):
        raise binary
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_READ:
        try:
            data = handle.read(MAX_READ + 1 - size)
        except (OSError, ValueError) as exc:  # a closed file: ValueError
            raise UserError(f"{what}: cannot read the file object: {exc}", code="unreadable_image") from None
        if inspect.iscoroutine(data):  # an async file (Starlette's UploadFile): its read must be awaited
            data.close()
            raise ArgumentTypeError(f"{what} is an async file object: pass `await file.read()` (or its .file)")
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if data is None:  # a non-blocking stream with nothing yet: what has arrived is all there is
            break
        if not isinstance(data, bytes):
            raise binary
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


@functools.lru_cache(maxsize=64)
def _mode_converts(mode: str) -> bool:
    from PIL import Image

    try:
        Image.new(mode, (1, 1)).convert("RGB")
    except (ValueError, OSError):
        return False
    return True


def _convertible(image: Any, what: str) -> None:
    """A PIL image whose mode Pillow cannot turn into RGB ("La": premultiplied grey and alpha) is refused here
    in one line; it was a ValueError from inside Pillow, after the other images of the call were read."""
    if not _mode_converts(image.mode):
        raise UnsupportedError(f"{what}: a PIL image in mode {image.mode}, which Pillow cannot convert to RGB: "
                               "convert it first (e.g. image.convert(\"RGBA\"))", code="unsupported_image_mode")


def loaded(image: Any, what: str) -> Any:
    """A PIL image given to `attribute`, its pixels decoded here (its size checked first, from the header): an
    image opened lazily whose file was since closed (`with Image.open(p) as im:`, then `im` used after the
    block), or a truncated one, failed inside Pillow with a bare AssertionError, ValueError or OSError."""
    from engine.errors import TooLargeError, first_line
    from engine.images import MAX_PIXELS

    if image.width * image.height > MAX_PIXELS:  # before decoding what the reader would refuse anyway
        raise TooLargeError(f"{what}: {image.width}x{image.height} pixels, the limit is {MAX_PIXELS}",
                            code="image_too_large")
    try:
        image.load()
    except (OSError, ValueError, AssertionError, SyntaxError, EOFError) as exc:
        raise UserError(f"{what}: cannot read the PIL image ({first_line(exc)}): decode it while its file is open "
                        "(image.load() or image.copy() inside `with Image.open(...)`), or give the path",
                        code="undecodable_image") from None
    return image


def pil_images(images: Any, what: str = "images") -> list:
    """The decoded images `Workspace.embed` takes: a list of PIL images, each convertible to RGB."""
    from PIL import Image

    if isinstance(images, (str, bytes, os.PathLike, Image.Image, Mapping)) or not isinstance(images, Iterable):
        raise ArgumentTypeError(f"{what} must be a list of PIL images, not {_type(images)}")
    out = list(images)
    for i, image in enumerate(out):
        if not isinstance(image, Image.Image):
            hint = " (a file: read it with engine.images.read_image(path)[0])" if isinstance(
                image, (str, bytes, os.PathLike)) else _array_hint(image)
            raise ArgumentTypeError(f"{what}[{i}] must be a PIL image{hint}, not {_type(image)}")
        _convertible(image, f"{what}[{i}]")
    return out


def prompts(prompt: Any, count: int) -> Any:
    """None, one str for every image, or a list of one str (or None) per image."""
    if prompt is None or isinstance(prompt, str):
        return text(prompt, "prompt")
    if isinstance(prompt, (bytes, Mapping)) or not isinstance(prompt, Iterable):
        raise ArgumentTypeError(f"prompt must be a str, a list of str (one per image) or None, not {_type(prompt)}")
    values = list(prompt)
    for i, value in enumerate(values):
        text(value, f"prompt[{i}]")
    return values


def labels(values: Any, count: int) -> list[str] | None:
    if values is None:
        return None
    found = texts(values, "labels")
    if len(found) != count:
        raise UserError(f"{len(found)} labels for {count} images: give one per image")
    return found


def source_params(kind, params: dict[str, Any]) -> dict[str, Any]:
    """`add_source`'s keyword arguments checked against the kind's declared parameters: names, types,
    finite numbers and the recipe bounds. Values come back converted (a numpy integer to an int)."""
    declared = {p.name: p for p in kind.params}
    unknown = [name for name in params if name not in declared and not _takes(kind.prepare, name)]
    if unknown:
        raise UserError(f"{kind.name} sources take no {', '.join(map(repr, unknown))} (their parameters: "
                        f"{', '.join(declared) or 'none'})", code="bad_argument")
    out = dict(params)
    for name, value in params.items():
        if value is not None and name in declared:  # a plugin kind's undeclared keyword is its own to check
            out[name] = _param(kind, declared[name], value)
    return out


def _takes(prepare, name: str) -> bool:
    """Whether a kind's `prepare` takes keyword `name` (a plugin kind may leave its params undeclared)."""
    import inspect

    try:
        accepted = inspect.signature(prepare).parameters
    except (TypeError, ValueError):
        return True
    return name in accepted or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())


def _param(kind, param, value: Any) -> Any:
    article = "an" if kind.name[:1] in tuple("aeiou") else "a"
    what = f"{param.name}{'' if param.positional else f' ({param.cli_flag})'} of {article} {kind.name} source"
    if param.is_path and isinstance(value, (str, bytes, os.PathLike)):
        not_special(expand_path(value, what), what)
        return expand_path(value, what) if not isinstance(value, str) else value  # a str stays text
    if param.type is bool:
        return flag(value, what)
    if param.type is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ArgumentTypeError(f"{what} must be an integer, not {_type(value)} {value!r:.40}")
        value = int(value)
    elif param.type is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ArgumentTypeError(f"{what} must be a number, not {_type(value)} {value!r:.40}")
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"{what} must be a finite number, not {value}", code="bad_argument")
    elif param.type is dict:
        if not isinstance(value, Mapping):
            raise ArgumentTypeError(f"{what} must be a dict, not {_type(value)}")
        return value
    elif param.type is str:  # a file named by a Path is text too (a LoRA file, a config folder)
        items = value if param.repeatable and isinstance(value, (list, tuple)) else [value]
        for item in items:
            if not isinstance(item, (str, os.PathLike)):
                raise ArgumentTypeError(f"{what} must be a str{' or a list of str' * param.repeatable}, not "
                                        f"{_type(item)}")
            _no_special_file_named(item, what)
            if isinstance(item, str):
                unicode(item, what)
        return value
    low, high = RECIPE_BOUNDS.get(param.name, (-INT_LIMIT, INT_LIMIT) if param.type is int else (None, None))
    if low is not None and not low <= value <= high:
        raise UserError(f"{what} must be between {low} and {high}, not {value}", code="bad_argument")
    return value


def _no_special_file_named(value: str | os.PathLike, what: str) -> None:
    """A text parameter that names a file, the kinds' own syntax included (`--lora FILE:0.8`), must not
    name a FIFO or a device; a text that names nothing (a model name, a URL) passes."""
    text = os.fspath(value)
    if not isinstance(text, str) or "\0" in text or not text or len(text) > 4096:
        return
    for candidate in {text, text.rpartition(":")[0]} - {""}:
        path = expand_path(candidate)
        if os.path.lexists(path):
            not_special(path, what)
