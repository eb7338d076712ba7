"""Reading dataset manifests (CSV with a header, or JSONL): validated up front, errors name the line."""
from __future__ import annotations

import csv
import json
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from engine.errors import UserError
from engine.paths import not_a_file, shown
from index.keys import UNPRINTABLE, normalise_description

SHA256 = re.compile("[0-9a-f]{64}")
ROLES = ("original", "resynthesis", "real")
REAL = "real"  # a camera image, made by no generator: a reference for the "real" verdict (resynth calibrate)
REQUIRED = ("image", "source", "description", "role")
ALIASES = {"path": "image", "prompt": "description", "generator": "source"}
READ = (*REQUIRED, "seed", "original", "sha256")  # the columns a row is read from (others are the user's own)
# Every row is parsed and its file checked before anything is used (about 45 us and 0.9 KB a row): a manifest
# from elsewhere naming 10^7 files would take minutes and gigabytes before its first error. Far above the
# reference paper's dataset (about 11,000 images); a larger set is ingested as several manifests.
MAX_ROWS = 1_000_000
# Characters of one line (and of one CSV field): a row names a file, a source and a description, a few
# hundred characters; a description is cut far below this when stored.
MAX_LINE = 1 << 20


@dataclass
class ManifestRow:
    line: int
    image: Path  # resolved against the manifest's folder
    source: str
    description: str
    role: str
    seed: int | None = None
    original: Path | None = None  # for a resynthesis: the original image it resynthesizes, if known
    sha256: str | None = None  # the file's digest as the manifest records it (optional column): checked on use


def read_manifest(path: Path, allow_outside: bool = True, real: bool = False) -> list[ManifestRow]:
    """Every row parsed and checked. Unless `allow_outside`, image paths must resolve (links followed)
    inside the manifest's folder: a manifest from elsewhere cannot make resynth read /etc/passwd.
    Rows of role "real" (camera images; their source column may be empty) are checked too, but returned
    only with `real` (`real_rows`): they are no source's images, so ingest and the labelled sets skip them."""
    path = Path(path)
    why = not_a_file(path)
    if why == "not found":
        raise UserError(f"manifest not found: {shown(path)}", code="not_found")
    if why is not None:  # a FIFO would block, /dev/zero never end: both are refused before a byte is read
        raise UserError(f"{shown(path)} is {why}, not a manifest file (.csv or .jsonl)",
                        code="is_a_directory" if why == "a folder" else "not_a_file")
    raw = _read_jsonl(path) if path.suffix.lower() in {".jsonl", ".ndjson"} else _read_csv(path)
    if not raw:
        raise UserError(f"{path}: manifest has no rows")
    base = path.parent
    rows = [_parse(path, line, record, base) for line, record in raw]
    if not allow_outside:
        root = base.resolve()
        for row in rows:
            for target in (row.image, row.original):
                if target is not None and not target.is_relative_to(root):
                    raise UserError(f"{path}:{row.line}: {target} is outside the manifest's folder {root} "
                                    "(pass --allow-outside to accept it)")
    labels: dict[Path, ManifestRow] = {}
    for row in rows:  # one image, two true sources: every measurement on it would be wrong one way or the other
        first = labels.setdefault(row.image, row) if row.role == "original" else row
        if first.source != row.source:
            raise UserError(f"{path}:{row.line}: original {row.image} is listed as {row.source!r} here and as "
                            f"{first.source!r} on line {first.line}")
    originals = {r.image for r in rows if r.role == "original"}
    for row in rows:
        if row.original is not None and row.original not in originals and not_a_file(row.original) is not None:
            raise UserError(f"{path}:{row.line}: original {shown(row.original)} is neither in the manifest nor on "
                            "disk (as a file)")
    return rows if real else [r for r in rows if r.role != REAL]


def real_rows(path: Path, allow_outside: bool = True) -> list[ManifestRow]:
    """The manifest's rows of role "real" (camera images), checked like every row, their recorded sha256 too
    (calibrate and evaluate fit the "real" rule on them); [] when it has none."""
    from index.keys import sha256_file

    rows = [r for r in read_manifest(path, allow_outside, real=True) if r.role == REAL]
    for row in rows:
        if row.sha256 is not None:
            check_digest(path, row, sha256_file(row.image))
    return rows


def _lines(path: Path, handle: TextIO) -> Iterator[str]:
    """The file's lines, each read at most MAX_LINE characters at a time: a file of one 2 GB line (a
    sparse file, a dump with no newline) is refused at its first MAX_LINE characters instead of being
    read whole into memory (it took 4.3 GB and 7 s, then said "not valid JSON")."""
    number = 0
    while line := handle.readline(MAX_LINE + 1):
        number += 1
        if len(line) > MAX_LINE:
            raise UserError(f"{shown(path)}:{number}: a line longer than {MAX_LINE} characters: not a manifest "
                            "(one row per line)", code="line_too_long")
        yield line


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # tolerate a BOM (Excel)
            csv.field_size_limit(MAX_LINE)
            reader = csv.DictReader(_lines(path, handle))
            if reader.fieldnames is None:
                return []
            _check_columns(path, reader.fieldnames)
            rows = []
            for i, row in enumerate(reader):
                _count(path, i)
                # the physical line (where the row ends): a blank line, skipped by the reader, or a quoted
                # field over two lines made every later row's error name the line above it as i + 2 did
                rows.append((reader.line_num, row))
            return rows
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable CSV manifest ({exc})") from None


def _count(path: Path, rows: int) -> None:
    if rows >= MAX_ROWS:
        raise UserError(f"{path}: more than {MAX_ROWS} rows: split it into several manifests")


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows: list[tuple[int, dict]] = []
    with open(path, encoding="utf-8-sig") as handle:  # line by line: a huge file fails at MAX_ROWS, not in memory
        try:
            for number, text in enumerate(_lines(path, handle), start=1):
                if text.strip():
                    _count(path, len(rows))
                    rows.append((number, _record(path, number, text)))
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a UTF-8 JSONL manifest") from None
    return rows


class _Object(dict):
    """A JSON object that remembers every key as written: json.loads keeps only the last of a repeated one."""

    given: list[str]


def _object(pairs: list[tuple[str, object]]) -> _Object:
    record = _Object(pairs)
    record.given = [key for key, _ in pairs]
    return record


def _record(path: Path, number: int, text: str) -> dict:
    try:
        record = json.loads(text, object_pairs_hook=_object)
    except (ValueError, RecursionError):  # RecursionError: a line of 100,000 nested brackets
        raise UserError(f"{path}:{number}: not valid JSON") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}:{number}: each line must be a JSON object")
    _check_columns(path, record.given if isinstance(record, _Object) else list(record), number)
    return record


def _canonical(name: str) -> str:
    name = name.strip().lower()
    return ALIASES.get(name, name)


def _check_columns(path: Path, names: Sequence[str], line: int | None = None) -> None:
    """Required columns present, and none that is read given twice under one name: the reader keeps only the last
    of a repeated key or header, so a row silently named another file, source or description than the one a
    reader of the manifest sees first. Columns resynth does not read may repeat (`notes,Notes`); one given in
    two spellings (`image` and its alias `path`, `Image`) is compared row by row (_parse)."""
    where = f"{path}:{line}" if line else str(path)
    first: dict[str, str] = {}
    for name in (n for n in names if n and n.strip()):
        column = _canonical(name)
        if first.get(column) == name and column in READ:
            raise UserError(f"{where}: column {column!r} is given twice: keep one")
        first.setdefault(column, name)
    present = set(first)
    missing = [c for c in REQUIRED if c not in present]
    if missing:
        raise UserError(f"{where}: manifest is missing column(s) {', '.join(missing)} "
                        f"(needs {', '.join(REQUIRED)}; optional seed, original, sha256)")


def _parse(path: Path, line: int, record: dict, base: Path) -> ManifestRow:
    where = f"{path}:{line}"
    spelt: dict[str, tuple[str, Any]] = {}
    for key, raw in record.items():
        if not key or not key.strip():
            continue
        column, value = _canonical(key), raw.strip() if isinstance(raw, str) else raw
        if column in spelt and column in READ and spelt[column][1] != value:
            raise UserError(f"{where}: column {column!r} is given twice (as {spelt[column][0]!r} and {key!r}) with "
                            f"different values: keep one")
        spelt.setdefault(column, (key, value))
    fields = {column: value for column, (_, value) in spelt.items()}
    role = str(fields.get("role") or "").lower()
    if role == REAL:  # no generator made it, and no description need be known
        fields["source"] = fields.get("source") or REAL
        fields["description"] = fields.get("description") or "a photograph"
    for column in REQUIRED:
        if fields.get(column) in (None, ""):
            raise UserError(f"{where}: empty {column}")
        _check_text(fields, column, where)
    _check_text(fields, "original", where)
    if UNPRINTABLE.search(str(fields["source"])):  # it names a store's source (terminals, pages): as `source add`
        raise UserError(f"{where}: source {str(fields['source'])[:60]!r} has control, bidi or invisible characters")
    # one name, one spelling: `café` decomposed (as macOS writes folder names) is the `café` a user types
    fields["source"] = unicodedata.normalize("NFC", str(fields["source"]))
    if role not in ROLES:
        raise UserError(f"{where}: role must be original, resynthesis or real, not {fields['role']!r}")
    description = normalise_description(str(fields["description"]))
    if not description:
        raise UserError(f"{where}: empty description")
    seed = fields.get("seed")
    if seed in (None, ""):
        seed = None
    else:
        try:
            if isinstance(seed, bool):
                raise TypeError("a boolean")
            if isinstance(seed, float) and not seed.is_integer():  # int() cut a JSON 1.5 to seed 1, silently
                raise TypeError("a fraction")
            seed = int(seed)
        except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity
            raise UserError(f"{where}: seed must be an integer, not {str(seed)[:40]!r}") from None
        if not 0 <= seed < 2**63:
            raise UserError(f"{where}: seed must be between 0 and 2^63-1")
    image = _path(base, fields["image"], where)
    why = not_a_file(image)  # a name past 255 bytes made is_file() raise, a traceback
    if why == "not found":
        raise UserError(f"{where}: image not found: {shown(image)}")
    if why is not None:
        raise UserError(f"{where}: {shown(image)} is {why}, not an image file")
    original = fields.get("original")
    digest = str(fields.get("sha256") or "").lower().removeprefix("sha256:")  # "sha256:<hex>", as OCI writes it
    if digest and not SHA256.fullmatch(digest):
        raise UserError(f"{where}: sha256 must be 64 hexadecimal digits, not {digest[:70]!r}")
    return ManifestRow(line=line, image=image, source=str(fields["source"]), description=description, role=role,
                       seed=seed, original=_path(base, original, where) if original else None, sha256=digest or None)


def check_digest(manifest: Path | str, row: ManifestRow, digest: str) -> None:
    """A file whose bytes are not those the manifest records (a damaged download, a file replaced since the
    dataset was published) is refused, naming the row: its vector would stand for an image nobody published."""
    if row.sha256 is not None and row.sha256 != digest:
        raise UserError(f"{manifest}:{row.line}: {shown(row.image)} does not match the manifest's sha256 "
                        f"({row.sha256[:12]}... recorded, {digest[:12]}... on disk): a damaged or replaced file")


def _check_text(fields: dict, column: str, where: str) -> None:
    """A JSONL value that is an object or a list, or text that is not valid Unicode (a lone surrogate from a
    JSON escape, which no database stores), is refused here rather than failing mid-ingest."""
    value = fields.get(column)
    if isinstance(value, (dict, list)):
        raise UserError(f"{where}: {column} must be text, not a JSON {type(value).__name__}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"{where}: {column} is not valid Unicode (a lone surrogate): {value[:60]!r}") from None


def _path(base: Path, value, where: str) -> Path:
    text = str(value)
    if "\0" in text or len(text) > 4096:
        raise UserError(f"{where}: not a usable path: {text[:60]!r}")
    try:
        return (base / text).resolve()
    except (OSError, RuntimeError, ValueError):
        raise UserError(f"{where}: not a usable path: {text[:60]!r}") from None
