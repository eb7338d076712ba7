"""`resynth triage DIR --out OUT`: attribute every image under a folder, resumably, into a CSV, a JSONL
of the full answers and a self-contained HTML case report.

- Every file under DIR, recursively, in a stable order; files whose name is not an image's are skipped
  and counted. An image that cannot be read is an error row, not a failed run.
- OUT/results.jsonl gets one line per image as it is answered (flushed and fsynced per batch): an
  interrupted run keeps what it answered. Each line carries the run's key (options, prompt, embedder,
  sources with their recipes, calibration): a rerun with the same key skips every image whose path and
  sha256 already have an answer, and answers another path with the same bytes from the stored answer
  (its row names that path: `duplicate_of`); neither costs a generation. Error rows are tried again.
- Queries go to `Workspace.attribute` in batches (`--batch`, default 16): one description's
  resyntheses are shared by the images that have it. Only one batch of images is decoded at a time.
- OUT/results.csv and OUT/report.html are rewritten atomically from results.jsonl at the end: the
  last row of this run's key per path, in the folder's order.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from engine.errors import UserError, kind_of, message_of, writing
from engine.options import Options

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".webp", ".avif", ".gif", ".bmp", ".tif", ".tiff"})
BATCH = 16
BATCH_PIXELS = 128_000_000  # a batch is also cut at this many pixels: 16 images near the 64 MP limit took ~5 GB
CSV_COLUMNS = ("path", "sha256", "verdict", "predicted", "score", "margin", "description", "description_from",
               "error")


@dataclass
class Summary:
    folder: str
    out: str
    images: int = 0
    non_images: int = 0
    answered: int = 0  # attributed in this run
    resumed: int = 0  # answered by an earlier run with the same key: skipped
    duplicates: int = 0  # same bytes as another answered path: answer copied
    errors: int = 0
    generated: int = 0
    cached: int = 0
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def line(self) -> str:
        from engine.errors import plural

        return (f"triaged {plural(self.images, 'image')} under {self.folder}: {self.answered} answered, "
                f"{self.resumed} already answered, {plural(self.duplicates, 'duplicate')}, "
                f"{plural(self.errors, 'error')}; {plural(self.non_images, 'other file')} skipped; resyntheses: "
                f"{self.cached} cached, {self.generated} generated; report: {self.files.get('report')}")


def walk(folder: Path, skip: Path | None = None) -> tuple[list[Path], int]:
    """Image files under `folder` (sorted, recursive, symlinked folders not followed), and how many other
    files were skipped. `skip`: a folder left out (the output folder, when it lies inside)."""
    images, others = [], 0
    skip_resolved = skip.resolve() if skip is not None else None
    for root, dirs, files in os.walk(folder, onerror=None):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if skip_resolved is None or (here / d).resolve() != skip_resolved)
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                images.append(here / name)
            else:
                others += 1
    return images, others


def run_key(ws, options: Options, prompt: str | None) -> str:
    """What an answer depends on, hashed: a rerun reuses answers only under the same key."""
    plan = ws.plan(options)
    if options.sources:  # as stored: a name typed in another Unicode form (NFD from a macOS paste) is that source
        options = options.with_changes(sources=tuple(sorted(s.name for s in plan.sources)))
    parts = {"options": options.to_dict(), "prompt": prompt, "embedder": plan.embedder,
             "sources": [[s.name, s.fingerprint, plan.params_hash.get(s.id)] for s in plan.sources],
             "calibration": ws.store.config.get("calibration")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Results:
    """OUT/results.jsonl: read once (answers of this key by path and by sha256), then appended."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.done: dict[str, str] = {}  # path -> sha256 answered under this key
        self.by_hash: dict[str, int] = {}  # sha256 -> offset of a line holding its answer
        with writing(path):
            self.handle = open(path, "ab")
        self._lock()
        try:
            for offset, row in self.rows():
                if row.get("run") == key and "result" in row:
                    self.done[row["path"]] = row["sha256"]
                    self.by_hash.setdefault(row["sha256"], offset)
            with writing(path):
                if self.handle.tell() and not self._ends_with_newline():  # a line torn by a crash: start afresh
                    self.handle.write(b"\n")
        except BaseException:
            self.handle.close()
            raise

    def _lock(self) -> None:
        """One triage per OUT at a time (held until close): two at once both answered every image and wrote
        each answer twice into results.jsonl."""
        import fcntl

        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise UserError(f"another `resynth triage` is writing {self.path.parent} now: let it finish (this one "
                            "would then resume from its answers), or give another --out",
                            code="triage_running") from None
        except OSError:  # a file system without locks: unguarded, as before
            pass

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as reader:
            reader.seek(-1, os.SEEK_END)
            return reader.read(1) == b"\n"

    def rows(self) -> Iterator[tuple[int, dict]]:
        """(offset, row) of every well-formed line (a torn or foreign line is passed over)."""
        with open(self.path, "rb") as reader:
            offset = 0
            for raw in reader:
                try:
                    row = json.loads(raw)
                except ValueError:
                    row = None
                if isinstance(row, dict) and isinstance(row.get("path"), str) and isinstance(row.get("sha256"), str):
                    yield offset, row
                offset += len(raw)

    def copy_of(self, sha256: str, rel: str) -> dict | None:
        """A row for `rel` holding the stored answer to the same bytes, saying which path it was answered for;
        None when these bytes have no answer yet. Nothing was described or generated for it: 0 cached, 0
        generated (copied counts read as work done twice when a reader sums them)."""
        offset = self.by_hash.get(sha256)
        if offset is None:
            return None
        with open(self.path, "rb") as reader:
            reader.seek(offset)
            row = json.loads(reader.readline())
        return {"path": rel, "sha256": sha256, "duplicate_of": row.get("duplicate_of") or row["path"],
                "result": {**row["result"], "query": rel, "cached": 0, "generated": 0}}

    def append(self, rows: list[dict]) -> None:
        with writing(self.path):
            self._append(rows)

    def _append(self, rows: list[dict]) -> None:
        offset = self.handle.tell()
        for row in rows:
            line = (json.dumps({"run": self.key, **row}, default=str) + "\n").encode()
            if "result" in row:
                self.done[row["path"]] = row["sha256"]
                self.by_hash.setdefault(row["sha256"], offset)
            self.handle.write(line)
            offset += len(line)
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def latest(self) -> list[dict]:
        """This key's last row per path, in the order the paths were first written."""
        offsets: dict[str, int] = {}
        for offset, row in self.rows():
            if row.get("run") == self.key:
                offsets[row["path"]] = offset
        out = []
        with open(self.path, "rb") as reader:
            for offset in sorted(offsets.values()):
                reader.seek(offset)
                out.append(json.loads(reader.readline()))
        return out

    def close(self) -> None:
        with writing(self.path):
            self.handle.close()


def _pixels(data: bytes) -> int:
    """Width x height from the header (nothing decoded); 0 for a file the decode will refuse anyway."""
    from engine.images import open_accepted

    try:
        with open_accepted(io.BytesIO(data), "image") as opened:
            return int(opened.width) * int(opened.height)
    except Exception:  # noqa: BLE001 - any failure is the decode's to report, with its own words
        return 0


def _read(path: Path) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, sha256, None) or (None, sha256 or None, error)."""
    from engine.images import MAX_BYTES

    try:
        if path.stat().st_size > MAX_BYTES:
            return None, None, f"{path.name}: {path.stat().st_size} bytes, the limit is {MAX_BYTES}"
        data = path.read_bytes()
    except OSError as exc:
        return None, None, f"cannot read {path.name}: {exc.strerror or type(exc).__name__}"
    return data, hashlib.sha256(data).hexdigest(), None


def _error_row(rel: str, sha256: str | None, exc: BaseException | str) -> dict:
    if isinstance(exc, BaseException):
        kind = kind_of(exc)
        return {"path": rel, "sha256": sha256 or "", "error": message_of(exc),
                "kind": getattr(exc, "code", None) or (kind.code if kind else "error")}
    return {"path": rel, "sha256": sha256 or "", "error": exc, "kind": "unreadable"}


def run(ws, folder: str | os.PathLike, out: str | os.PathLike, prompt: str | None = None,
        options: Options | None = None, batch: int = BATCH, progress: bool = True,
        command: str | None = None) -> Summary:
    """Triage `folder` into `out` (see the module's docstring); returns what was done."""
    from tqdm import tqdm

    from engine import casereport
    from engine.describe import clean_prompt

    folder, out = Path(folder), Path(out)
    if not folder.exists():
        raise UserError(f"folder not found: {folder}", code="not_found")
    if not folder.is_dir():
        raise UserError(f"{folder} is a file: give the folder of images to triage", code="not_a_directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder (it is created if missing)", code="not_a_directory")
    if batch < 1:
        raise UserError("--batch must be at least 1")
    options = options or Options()
    prompt = clean_prompt(prompt)
    key = run_key(ws, options, prompt)  # an unknown source fails here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    images, others = walk(folder, skip=out)
    summary = Summary(str(folder), str(out), images=len(images), non_images=others)
    results = Results(out / "results.jsonl", key)
    pending: list[tuple[str, str, bytes]] = []
    pixels = [0]  # of the pending images, by their headers

    # the bar counts images answered, not read: a batch is read in a blink, then attributed for minutes
    bar = tqdm(total=len(images), desc="triage", unit="image", disable=not progress, file=sys.stderr)

    def flush() -> None:
        if pending:
            rows = _attribute(ws, pending, prompt, options, summary)
            results.append(rows)
            bar.update(len(pending))
            pending.clear()
            pixels[0] = 0

    try:
        for path in images:
            rel = path.relative_to(folder).as_posix()
            data, sha256, problem = _read(path)
            if problem is not None or data is None or sha256 is None:
                summary.errors += 1
                results.append([_error_row(rel, sha256, problem or "unreadable")])
                bar.update()
                continue
            if results.done.get(rel) == sha256:
                summary.resumed += 1
                bar.update()
                continue
            if any(s == sha256 for _, s, _ in pending):  # the same bytes twice in one batch: answered once
                flush()
            copy = results.copy_of(sha256, rel)
            if copy is not None:
                summary.duplicates += 1
                results.append([copy])
                bar.update()
                continue
            pending.append((rel, sha256, data))
            pixels[0] += _pixels(data)
            if len(pending) >= batch or pixels[0] >= BATCH_PIXELS:
                flush()
        flush()
        order = {path.relative_to(folder).as_posix(): i for i, path in enumerate(images)}
        # the folder's order (errors were written at once, answers a batch later); a path gone since last, at the end
        final = sorted(results.latest(), key=lambda row: order.get(row["path"], len(order)))
        bar.close()
        # under the lock still: a run started meanwhile wrote its newer CSV and report, then this one's replaced them
        summary.files["jsonl"] = str(out / "results.jsonl")
        summary.files["csv"] = str(write_csv(out / "results.csv", final))
        head = casereport.header(ws, command, options)
        entries = _entries(folder, final, set(order))
        index = [{"label": row["path"], "result": row.get("result"), "error": row.get("error")} for row in final]
        summary.files["report"] = str(casereport.write(out / "report.html", head, entries, ws.store,
                                                       title=f"resynth triage of {folder}", index=index))
    finally:
        bar.close()
        results.close()
    return summary


def _attribute(ws, pending: list[tuple[str, str, bytes]], prompt: str | None, options: Options,
               summary: Summary) -> list[dict]:
    """One batch: decoded, attributed together; a batch that fails is retried image by image, so one
    bad image is one error row."""
    from engine.attribute import Query

    queries, rows = [], []
    for rel, sha256, data in pending:
        try:
            queries.append((rel, sha256, Query.read(data, prompt, rel)))
        except Exception as exc:  # noqa: BLE001 - judged below: a user's error is a row, a bug is raised
            if kind_of(exc) is None:
                raise
            summary.errors += 1
            rows.append(_error_row(rel, sha256, exc))
    if not queries:
        return rows
    # counted per request, not per answer: an answer's counts are its description's, shared by every image of the
    # batch with that description (a folder under one --prompt summed to the batch size times what was generated)
    made = _tallied(ws)
    try:
        report = ws.attribute([q for _, _, q in queries], options=options)
        answers = list(zip(queries, report.results))
        summary.cached += report.cached
        summary.generated += report.generated
    except Exception as exc:  # noqa: BLE001
        if kind_of(exc) is None:
            raise
        # what the failed batch generated before it failed (another description's, say): made and paid for in this
        # run, and found cached by the retries below, which counted 0 generated for it
        summary.generated += _tallied(ws) - made
        if len(queries) == 1:
            summary.errors += 1
            return rows + [_error_row(queries[0][0], queries[0][1], exc)]
        answers = []
        for rel, sha256, query in queries:  # one at a time: which image fails, and why
            made = _tallied(ws)
            try:
                single = ws.attribute([query], options=options)
                answers.append(((rel, sha256, query), single.results[0]))
                summary.cached += single.cached
                summary.generated += single.generated
            except Exception as inner:  # noqa: BLE001
                if kind_of(inner) is None:
                    raise
                summary.generated += _tallied(ws) - made
                summary.errors += 1
                rows.append(_error_row(rel, sha256, inner))
    for (rel, sha256, _), result in answers:
        summary.answered += 1
        rows.append({"path": rel, "sha256": sha256, "result": result.to_dict()})
    return rows


def _tallied(ws) -> int:
    """Resyntheses the workspace has generated so far (a request that fails returns no counts of its own)."""
    stats = getattr(ws, "stats_counters", None)
    return int(getattr(stats, "generated", 0))


def csv_row(row: dict) -> dict:
    result = row.get("result") or {}
    scores = result.get("scores") or []
    best = scores[0].get("score") if scores and isinstance(scores[0], dict) else None
    return {"path": row.get("path"), "sha256": row.get("sha256"),
            "verdict": result.get("verdict", "error" if "error" in row else ""),
            "predicted": result.get("predicted") or "", "score": "" if best is None else f"{best:.6f}",
            "margin": "" if result.get("margin") is None else f"{result['margin']:.6f}",
            "description": result.get("description", ""), "description_from": result.get("description_from", ""),
            "error": row.get("error", "")}


def write_csv(path: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in csv_row(row).items()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        try:
            # a file name that is not UTF-8 (kept by Python as surrogates) is written as \udcNN, as the report
            # shows it
            with open(tmp, "w", encoding="utf-8", errors="backslashreplace", newline="") as handle:
                handle.write(buffer.getvalue())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _cell(value) -> str:
    """A CSV cell a spreadsheet will not run: a text starting with = + - @ is prefixed with a quote."""
    text = "" if value is None else str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _is_number(text):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _entries(folder: Path, rows: list[dict], present: set[str]) -> Iterator[dict]:
    """Report entries; a path answered by an earlier run and no longer under the folder says so (its answer
    stays: results.jsonl keeps it, and a report that dropped it would lose what was found)."""
    from engine.casereport import thumbnail

    for row in rows:
        gone = row["path"] not in present
        yield {"label": row["path"], "sha256": row.get("sha256"),
               "thumb": None if gone else thumbnail(folder / row["path"]), "result": row.get("result"),
               "error": row.get("error"), "duplicate_of": row.get("duplicate_of"), "gone": gone}


# ----- the command ---------------------------------------------------------------------------------------
def register(sub, common) -> None:
    """Add `triage` to the `resynth` parser (engine.cli's subparsers; `common`: the global options)."""
    from engine.options import add_arguments
    from engine.paths import path_argument

    p = sub.add_parser(
        "triage", parents=[common], help="attribute every image under a folder: CSV, JSONL and an HTML report",
        description="Attribute every image under DIR (recursively) and write OUT/results.jsonl (the full answers, "
                    "appended as they come), OUT/results.csv (a row per image) and OUT/report.html (one "
                    "self-contained file with each query, its evidence and the store's identity). Resumable: a "
                    "rerun with the same options skips what is answered and generates nothing for it.")
    p.add_argument("folder", metavar="DIR", type=path_argument,
                   help="folder of images, searched recursively (files not named as images are skipped and counted)")
    p.add_argument("--out", metavar="OUT", required=True, type=path_argument, help="output folder (created)")
    p.add_argument("--prompt", help="one description for every image (default, per image: a prompt embedded in "
                                    "the file, then the description stored for an identical image, then the store's "
                                    "captioner)")
    p.add_argument("--batch", type=int, default=BATCH, metavar="N",
                   help=f"images attributed together (default {BATCH}; a batch also ends at {BATCH_PIXELS:,} pixels)")
    p.add_argument("--captioner", metavar="DIR", type=path_argument,
                   help="captioner folder for this run (overrides the store's)")
    add_arguments(p)
    p.set_defaults(run=cmd_triage)


def command_of(args) -> str:
    """The command that reproduces this run: absolute paths, and every option that was given."""
    from engine.casereport import command_line, option_words
    from engine.workspace import store_path

    words = ["resynth", "triage", Path(args.folder).resolve(), "--out", Path(args.out).resolve(),
             "--store", store_path(args.store).resolve()]
    if args.prompt:
        words += ["--prompt", args.prompt]
    if getattr(args, "captioner", None):
        words += ["--captioner", Path(args.captioner).resolve()]
    if args.batch != BATCH:
        words += ["--batch", args.batch]
    return command_line(words + option_words(args))


def cmd_triage(args) -> None:
    import engine
    from engine.options import from_args

    options = from_args(args)
    folder = Path(args.folder)
    if not folder.exists():  # before the store and its models are opened
        raise UserError(f"folder not found: {folder}", code="not_found")
    with engine.open(args.store, progress=not args.quiet, device=args.device, captioner=args.captioner) as ws:
        summary = run(ws, folder, args.out, args.prompt, options, args.batch, progress=not args.quiet,
                      command=command_of(args))
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.line())
