"""Importer for the folder layout of the reference paper's public resynthesis dataset.

Layout (Kaggle "resynthesis-dataset"): originals at `images/<generator>/<NNNNN><suffix>`, the
resynthesis of each original by every generator at `images/<generator>/images/<resynth>/<NNNNN><suffix>`;
suffixes differ per generator (`.png`, `.jpg`, `-0.png`, `-chrome-0.png`), so files are matched by
their leading number. The result is an ordinary manifest (engine/manifest.py) that `resynth ingest`
reads; unknown generators become replay sources.

Why every resynthesis row carries its *original's* description: the Attributor finds a replay
source's references by description text, so a query described like its original must meet the
resyntheses made from it. The alternative description the dataset actually generated from is kept
in an extra `alt_description` column (provenance; ingest ignores it). Without a descriptions file the
description is the placeholder `id:<NNNNN>`, shared by every generator's image of that person.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from engine.errors import TooLargeError, UserError
from engine.images import check_header, read_image
from engine.paths import check_output_file, not_a_file, shown
from engine.sources import check_name
from index.keys import UNPRINTABLE, normalise_description, sha256_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".avif"}
ID_PATTERN = re.compile(r"^(\d+)")
ID_COLUMNS = ("id", "image", "file", "filename", "name", "person")
TEXT_COLUMNS = ("description", "prompt", "text", "caption")
# A descriptions file is read whole; the paper's dataset describes about 1,000 people in well under 1 MB.
MAX_DESCRIPTIONS = 256 << 20
MANIFEST_COLUMNS = ("image", "source", "description", "role", "seed", "original", "id", "alt_description")


@dataclass
class Found:
    """One image of the tree: its generator, person id and, for a resynthesis, the original's generator."""

    path: Path
    generator: str
    number: int
    of: str | None = None  # generator of the original this resynthesizes; None for an original


@dataclass
class ImportReport:
    root: str
    manifest: str
    generators: list[str]
    originals: int = 0
    resyntheses: int = 0
    linked: int = 0  # resyntheses whose original is in the tree
    missing_resyntheses: int = 0  # (original, resynthesis generator) pairs with no file
    missing_examples: list[str] = field(default_factory=list)
    orphans: int = 0  # resyntheses of an original that is not in the tree (kept, unlinked)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files
    descriptions: str = "placeholder"  # "file" or "placeholder"
    placeholder_ids: int = 0  # ids that fell back to `id:<NNNNN>` although a file was given
    conflicting_ids: list[str] = field(default_factory=list)  # ids the descriptions file describes differently twice
    ingest: dict | None = None

    def warnings(self) -> list[str]:
        out = []
        if not self.resyntheses:
            out.append("no resyntheses found (expected images/<generator>/images/<resynthesis generator>/<NNNNN>.png): "
                       "is ROOT the dataset folder?")
        if self.missing_resyntheses:
            out.append(f"{self.missing_resyntheses} (original, generator) pairs have no resynthesis, "
                       f"e.g. {', '.join(self.missing_examples[:3])}")
        if self.orphans:
            out.append(f"{self.orphans} resyntheses have no original in the tree (imported without a link)")
        if self.skipped:
            out.append("skipped files: " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())))
        if self.descriptions == "placeholder":
            out.append("no --descriptions: descriptions are placeholders id:<NNNNN> "
                       "(attribute with --prompt id:<NNNNN>, or let the store find an ingested original's)")
        elif self.placeholder_ids:
            out.append(f"{self.placeholder_ids} ids are not in the descriptions file: placeholder id:<NNNNN> used")
        if self.conflicting_ids:
            out.append(f"{len(self.conflicting_ids)} ids have two different descriptions in the descriptions files "
                       f"(the last is used), e.g. {', '.join(self.conflicting_ids[:3])}")
        return out


def placeholder(number: int) -> str:
    return f"id:{number:05d}"


def image_number(path: Path) -> int | None:
    """The person id a dataset file name starts with, or None for a file that is not a dataset image."""
    if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    match = ID_PATTERN.match(path.stem)
    return int(match.group(1)) if match else None


def images_folder(root: Path) -> Path:
    """ROOT may be the dataset folder (holding `images/`) or that `images/` folder itself."""
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root}")
    return root / "images" if (root / "images").is_dir() else root


UNREADABLE = "unreadable images"
OVER_LIMITS = "images over the size limits (bytes, pixels or side ratio)"


def _unusable(path: Path, decode: bool) -> str | None:
    """Why ingest would refuse this file (a reason of `skipped`), or None. The header check is ingest's own
    (engine.images.check_header: format, bytes, pixels, side ratio, container blocks), so a bomb is skipped
    here, not met as a traceback (Pillow's DecompressionBombError is no OSError) or as a refused ingest;
    with `decode` (`--ingest`) the pixels are decoded too, so a truncated body is skipped as well."""
    try:
        if decode:
            read_image(path)
        else:
            check_header(path)
    except TooLargeError:
        return OVER_LIMITS
    except UserError:  # not an image, empty, damaged
        return UNREADABLE
    return None


BROKEN_LINK = "links to no file or folder (dangling, a loop, or a device)"
NOT_UTF8 = "names that are not UTF-8"
UNPRINTABLE_NAME = "folder names with control, bidi or invisible characters"
BAD_NAME = "folder names that cannot name a source (a backslash, over 200 characters)"


def _entries(folder: Path, skipped: Counter, dirs: bool) -> list[Path]:
    """The folders (or files) in `folder`, sorted. Links are followed wherever they lead: the user named this
    dataset, and a Hugging Face cache snapshot, git-annex or DVC checkout stores every image as a link into a
    store beside it. A link to nothing (dangling, a loop) or to neither a file nor a folder (a device, a fifo)
    is skipped, and so is a name that is not UTF-8 (it could not be written to the manifest); both are counted
    in `skipped`."""
    try:
        listed = sorted(folder.iterdir())
    except OSError as exc:
        skipped[f"unreadable folders ({exc.strerror or type(exc).__name__})"] += 1
        return []
    out = []
    for entry in listed:
        if entry.is_symlink() and not (entry.is_file() or entry.is_dir()):  # is_file/is_dir follow the link
            skipped[BROKEN_LINK] += 1
            continue
        if not (entry.is_dir() and not entry.name.startswith(".") if dirs else entry.is_file()):
            continue  # (a hidden file is counted below, as no dataset image)
        try:
            entry.name.encode("utf-8")
        except UnicodeEncodeError:
            skipped[NOT_UTF8] += 1
            continue
        if dirs and UNPRINTABLE.search(entry.name):  # it would name a source (printed on terminals and pages)
            skipped[UNPRINTABLE_NAME] += 1
            continue
        if dirs and _bad_source_name(entry.name):  # ingest would refuse the whole manifest for it
            skipped[BAD_NAME] += 1
            continue
        out.append(entry)
    return out


def _bad_source_name(name: str) -> bool:
    try:
        check_name(name)
    except UserError:
        return True
    return False


def _check_twins(base: Path, candidates: list[tuple[Path, str, str | None]]) -> None:
    """Refuse generator folders whose names differ only by case or Unicode form (`Alpha` and `alpha`, or
    `café` composed and decomposed, as an archive made on macOS holds): they would become sources that read
    as one name in every answer, each with part of the generator's images. Which one is right is the user's
    call, so nothing is guessed."""
    spellings: dict[str, set[str]] = {}
    for _, generator, of in candidates:
        for name in (generator, of):
            if name is not None:
                spellings.setdefault(unicodedata.normalize("NFC", name).casefold(), set()).add(name)
    twins = next((sorted(names) for names in spellings.values() if len(names) > 1), None)
    if twins:
        raise UserError(f"{shown(base)}: generator folders {' and '.join(repr(n) for n in twins)} differ only by "
                        "case or Unicode form: they would be sources that read as one; rename or remove one")


SHARED_ORIGINAL = "originals whose bytes another generator's original has (no true source)"


def _without_shared_originals(found: list[Found], skipped: Counter) -> list[Found]:
    """The originals whose exact bytes are also another generator's original are left out (all of them): the
    black image a safety filter returns, or a copy or a deduplicating store's shared blob, has no true
    source, and ingest refuses one image under two sources. Their resyntheses stay, unlinked."""
    generators: dict[str, set[str]] = {}
    digests: dict[int, str | None] = {}  # an original's index -> its sha256 (None: unreadable since its check)
    for i, f in enumerate(found):
        if f.of is None:
            try:
                digest: str | None = sha256_file(f.path)
            except OSError:
                digest = None
            digests[i] = digest
            if digest is not None:
                generators.setdefault(digest, set()).add(f.generator)
    out = []
    for i, f in enumerate(found):
        if i not in digests:  # a resynthesis
            out.append(f)
        elif (digest := digests[i]) is None:
            skipped[UNREADABLE] += 1
        elif len(generators[digest]) > 1:
            skipped[SHARED_ORIGINAL] += 1
        else:
            out.append(f)
    return out


def scan(root: Path, skipped: Counter, progress: bool = False, decode: bool = False) -> list[Found]:
    """Every dataset image under ROOT; strays are counted in `skipped` by reason, never fatal. With `decode`
    every image is decoded in full (what ingest will do), so one that would fail it is skipped instead."""
    base = images_folder(root)
    candidates: list[tuple[Path, str, str | None]] = []
    for gen_dir in _entries(base, skipped, dirs=True):
        candidates += [(f, gen_dir.name, None) for f in _entries(gen_dir, skipped, dirs=False)]
        nested = gen_dir / "images"
        if nested.is_dir():
            for res_dir in _entries(nested, skipped, dirs=True):
                candidates += [(f, res_dir.name, gen_dir.name) for f in _entries(res_dir, skipped, dirs=False)]
    _check_twins(base, candidates)
    found: list[Found] = []
    seen: set[tuple[str, str | None, int]] = set()
    for path, generator, of in tqdm(candidates, desc="scanning", unit="file", disable=not progress, leave=False):
        number = image_number(path)
        if number is None:
            skipped["not dataset images"] += 1
        elif (generator, of, number) in seen:
            skipped["duplicate ids (first file kept)"] += 1
        elif why := _unusable(path, decode):
            skipped[why] += 1
        else:
            seen.add((generator, of, number))
            found.append(Found(path, generator, number, of))
    found = _without_shared_originals(found, skipped)
    if not found:
        strays = "; skipped " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) if skipped else ""
        raise UserError(f"no dataset images under {base} (expected images/<generator>/<NNNNN>.png and "
                        f"images/<generator>/images/<resynthesis generator>/<NNNNN>.png){strays}")
    return found


def read_descriptions(path: Path, conflicts: set[int] | None = None) -> dict[int, str]:
    """id -> description from CSV/TSV (id and description/prompt columns, or the first two) or JSON/JSONL.
    Ids given two different descriptions (`00001` and `1`, or a repeated row) keep the last and are added to
    `conflicts`: the import reports them, since one image may carry a description it was not made from."""
    path = Path(path)
    why = not_a_file(path)
    if why == "not found":
        raise UserError(f"descriptions file not found: {path}")
    if why is not None:  # a FIFO, a device: read_text would wait or never end
        raise UserError(f"{shown(path)} is {why}, not a descriptions file")
    if path.stat().st_size > MAX_DESCRIPTIONS:  # read whole: a 2 GB dump would be held in memory, then refused
        raise UserError(f"{shown(path)}: {path.stat().st_size} bytes, more than a descriptions file's "
                        f"{MAX_DESCRIPTIONS >> 20} MB")
    try:
        pairs = _json_pairs(path) if path.suffix.lower() in {".json", ".jsonl", ".ndjson"} else _csv_pairs(path)
    except (UnicodeDecodeError, ValueError, csv.Error, RecursionError) as exc:
        why = (str(exc) or type(exc).__name__).splitlines()[0]
        raise UserError(f"{path}: not a readable descriptions file ({why})") from None
    out: dict[int, str] = {}
    for key, text in pairs:
        match = ID_PATTERN.match(Path(str(key).strip()).stem)
        text = normalise_description(str(text or ""))
        if match and text:
            number = int(match.group(1))
            if conflicts is not None and out.get(number, text) != text:
                conflicts.add(number)
            out[number] = text
    if not out:
        raise UserError(f"{path}: no `id -> description` entries found (ids must start with digits)")
    return out


def _json_pairs(path: Path) -> list[tuple]:
    text = path.read_text(encoding="utf-8-sig")  # a BOM (Excel, Notepad) was "not a readable descriptions file"
    records = json.loads(text) if path.suffix.lower() == ".json" else [
        json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(records, dict):
        return list(records.items())
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("expected an object {id: description} or a list of objects")
    return [(_pick(r, ID_COLUMNS), _pick(r, TEXT_COLUMNS)) for r in records]


def _pick(record: dict, names: tuple[str, ...]):
    lowered = {str(k).strip().lower(): v for k, v in record.items()}
    return next((lowered[n] for n in names if n in lowered), None)


def _csv_pairs(path: Path) -> list[tuple]:
    with open(path, newline="", encoding="utf-8-sig") as handle:  # a BOM made a headerless file's first id a header
        rows = [r for r in csv.reader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",") if r]
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    if ID_PATTERN.match(header[0]):  # no header: id, description
        return [(r[0], r[1] if len(r) > 1 else "") for r in rows]
    key = next((header.index(n) for n in ID_COLUMNS if n in header), 0)
    value = next((header.index(n) for n in TEXT_COLUMNS if n in header), 1 if len(header) > 1 else None)
    if value is None:
        raise ValueError("needs an id column and a description column")
    return [(r[key], r[value] if len(r) > value else "") for r in rows[1:]]


def build_rows(found: list[Found], out_dir: Path, descriptions: dict[int, str] | None,
               alternatives: dict[int, str] | None, report: ImportReport) -> list[dict]:
    """Manifest rows: originals first, each resynthesis linked to its original and sharing its description."""
    def describe(number: int) -> str:
        if descriptions is None:
            return placeholder(number)
        if number not in descriptions:
            report.placeholder_ids += 1
        return descriptions.get(number, placeholder(number))

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()

    originals = {(f.generator, f.number): f for f in found if f.of is None}
    resyntheses = [f for f in found if f.of is not None]
    text = {n: describe(n) for n in sorted({f.number for f in found})}
    rows = [{"image": rel(f.path), "source": f.generator, "description": text[f.number], "role": "original",
             "id": f"{f.number:05d}"} for f in originals.values()]
    for f in resyntheses:
        original = originals.get((f.of or "", f.number))  # resyntheses have an `of`
        report.linked += original is not None
        report.orphans += original is None
        rows.append({"image": rel(f.path), "source": f.generator, "description": text[f.number],
                     "role": "resynthesis", "original": rel(original.path) if original else "",
                     "id": f"{f.number:05d}", "alt_description": (alternatives or {}).get(f.number, "")})
    resynth_generators = sorted({f.generator for f in resyntheses})
    have = {(f.of, f.number, f.generator) for f in resyntheses}
    for (generator, number) in sorted(originals):
        for other in resynth_generators:
            if (generator, number, other) not in have:
                report.missing_resyntheses += 1
                if len(report.missing_examples) < 10:
                    report.missing_examples.append(f"{generator}/{number:05d} by {other}")
    report.originals, report.resyntheses = len(originals), len(resyntheses)
    return rows


def write_manifest(rows: list[dict], out: Path) -> None:
    """CSV via a temporary name and rename: an interrupted import never leaves half a manifest."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def import_published(root: Path, out: Path, descriptions: Path | None = None,
                     alt_descriptions: Path | None = None, progress: bool = False,
                     decode: bool = False) -> ImportReport:
    """Scan the dataset tree and write its manifest; returns counts and warnings (nothing is ingested).
    `decode` (for an ingest that follows) skips the images whose pixels would not decode, not only headers."""
    root, out = Path(root), Path(out)
    check_output_file(out, "--out")  # a folder or a device is refused before the scan, not renamed over after it
    for given, flag in ((descriptions, "--descriptions"), (alt_descriptions, "--alt-descriptions")):
        if given is not None and out.exists() and Path(given).exists() and os.path.samefile(out, given):
            raise UserError(f"--out {shown(out)} is the {flag} file: the manifest would replace it; write it elsewhere")
    conflicts: set[int] = set()
    texts = read_descriptions(descriptions, conflicts) if descriptions else None
    alternatives = read_descriptions(alt_descriptions, conflicts) if alt_descriptions else None
    skipped: Counter = Counter()
    found = scan(root, skipped, progress, decode)
    report = ImportReport(root=str(root), manifest=str(out), generators=sorted({f.generator for f in found}),
                          descriptions="file" if texts else "placeholder",
                          conflicting_ids=[f"{n:05d}" for n in sorted(conflicts)])
    rows = build_rows(found, out.parent, texts, alternatives, report)
    report.skipped = dict(skipped)
    write_manifest(rows, out)
    return report


def register(sub, common) -> None:
    """Add this module's subparsers to `sub`; `common` is the parent parser with --store/--json/--quiet."""
    p = sub.add_parser(
        "import-published", parents=[common], help="manifest from the paper's published resynthesis dataset",
        description="Write a manifest for a folder laid out like the reference paper's dataset "
                    "(images/<generator>/<NNNNN>.png, images/<generator>/images/<resynthesis generator>/<NNNNN>.png), "
                    "each resynthesis linked to its original and sharing its description; optionally ingest it. "
                    "Without --descriptions the description of person NNNNN is the placeholder id:NNNNN.")
    p.add_argument("root", metavar="ROOT", help="dataset folder (holding images/) or its images/ folder")
    p.add_argument("--descriptions", metavar="FILE",
                   help="CSV/TSV (id, description) or JSON ({id: description}) of the originals' descriptions")
    p.add_argument("--alt-descriptions", metavar="FILE",
                   help="same format: the alternative descriptions the resyntheses were generated from "
                        "(recorded in the manifest's alt_description column)")
    p.add_argument("--out", default="manifest.csv", help="manifest to write (default ./manifest.csv)")
    p.add_argument("--ingest", action="store_true", help="then ingest the manifest into --store")
    p.set_defaults(run=cmd_import_published)


def cmd_import_published(args) -> None:
    import engine
    from engine.ingest import ingest

    # The store is opened first so that a missing one fails before a long scan, not after it.
    opened = engine.open(args.store, progress=not args.quiet, device=args.device) if args.ingest else None
    with opened if opened is not None else contextlib.nullcontext() as ws:
        report = import_published(Path(args.root), Path(args.out),
                                  Path(args.descriptions) if args.descriptions else None,
                                  Path(args.alt_descriptions) if args.alt_descriptions else None,
                                  progress=not args.quiet, decode=args.ingest)
        for line in report.warnings():
            print(f"resynth: warning: {line}", file=sys.stderr)
        if ws is not None:  # the dataset the user named; its images were decoded by the scan
            report.ingest = asdict(ingest(ws, Path(args.out), progress=ws.progress, allow_outside=True, decoded=True))
            for line in report.ingest["warnings"]:
                print(f"resynth: warning: {line}", file=sys.stderr)
    from engine.errors import plural

    resyntheses = "resynthesis" if report.resyntheses == 1 else "resyntheses"
    text = (f"wrote {report.manifest}: {plural(report.originals, 'original')} and {report.resyntheses} {resyntheses} "
            f"({report.linked} linked to {'its' if report.linked == 1 else 'their'} original) from "
            f"{plural(len(report.generators), 'generator')}")
    if report.ingest:
        text += (f"\ningested {plural(report.ingest['added'], 'image')} ({report.ingest['skipped']} already stored or "
                 "repeated); "
                 f"new replay sources: {', '.join(report.ingest['new_sources']) or 'none'}")
    print(json.dumps({**asdict(report), "warnings": report.warnings()}, indent=2) if args.json else text)
