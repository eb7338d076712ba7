"""Importing a dataset of originals and resyntheses into a store, resumably and idempotently."""
from __future__ import annotations

import shlex
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from engine.errors import UserError
from engine.generate import source_params_hash
from engine.images import read_image
from engine.manifest import ManifestRow, check_digest, read_manifest
from engine.paths import shown
from engine.sources import check_name
from index.keys import image_key, normalise_description, sha256_file, sha256_text
from index.store import NewImage, Store

BATCH = 32  # rows embedded and committed together: a crash loses at most one batch, rerun resumes


@dataclass
class IngestReport:
    rows: int = 0
    added: int = 0
    skipped: int = 0  # already in the store (same key): re-running a manifest is a no-op
    new_sources: list[str] | None = None
    warnings: list[str] = field(default_factory=list)


def row_key(row: ManifestRow, source, file_hash: str, embedder: str) -> str:
    """Originals key on their bytes; resyntheses of pipeline sources on their recipe (the cache key)."""
    return image_key(row.role, _description_hash(row), source.fingerprint, source.name, row.seed,
                     _params_hash(row, source), file_hash, embedder)


def _description_hash(row: ManifestRow) -> str:
    return sha256_text(normalise_description(row.description))


def _repeated_originals(manifest: Path, store: Store, copies: dict[str, list[ManifestRow]],
                        described: set[str]) -> list[ManifestRow]:
    """An original is one image with one source and one description. Its bytes stored before as another
    source's original are refused (one of the labels is wrong); given again with another description, in
    this manifest or stored before, one description is kept (the stored one, else the first that this
    manifest's resyntheses have, else the first: the image stays scorable) and the other rows are returned,
    to be skipped: two copies would be two queries, and a perfect reference for each other wherever
    originals serve as references."""
    stored = store.originals_by_file(list(copies))
    repeated = []
    for file_hash, rows in copies.items():
        kept = next((row for row in rows if _description_hash(row) in described), rows[0])
        source, description = stored.get(file_hash, (kept.source, _description_hash(kept)))
        if source != rows[0].source:
            raise UserError(f"{manifest}:{rows[0].line}: original {shown(rows[0].image)} is stored already as an "
                            f"original of {source!r}, but is listed as {rows[0].source!r}: an image has one true "
                            f"source; remove this row, or, if the stored label is the wrong one, remove {source!r} "
                            f"(`resynth source remove {shlex.quote(source)}`) and ingest its manifest again without "
                            "the image")
        repeated += [row for row in rows if _description_hash(row) != description]
    return sorted(repeated, key=lambda row: row.line)


def _repeats_said(repeated: list[ManifestRow]) -> list[str]:
    if not repeated:
        return []
    first = repeated[0]
    return [f"{len(repeated)} original{'s' if len(repeated) > 1 else ''} repeat the bytes of another original with "
            f"another description (first at line {first.line}, {shown(first.image)}): skipped, one description "
            "kept (the stored one, else the first that resyntheses have); an image has one description"]


def _params_hash(row: ManifestRow, source) -> str | None:
    """Only a seeded resynthesis of a pipeline source has a generation recipe."""
    return None if row.role == "original" or row.seed is None else source_params_hash(source)


def ingest(workspace, manifest: Path, progress: bool = True, allow_outside: bool = False,
           decoded: bool = False) -> IngestReport:
    """Import a manifest through a Workspace (its store and embedder).

    The whole manifest is validated first (rows, paths, source names, every image's header, then every
    image decoded in full), so a manifest that fails changes nothing, not even a new source; then rows
    are embedded and committed in batches (resumable). `decoded`: the caller decoded every image just now
    (import-published's scan), so the full decode is not done twice; an image changed since fails its batch.
    """
    from engine.images import check_header

    store = workspace.store
    rows = read_manifest(manifest, allow_outside=allow_outside)
    known = {s.name for s in store.sources()}
    new_sources = _check_sources(manifest, rows, known)
    for row in tqdm(rows, desc="checking", unit="image", disable=not progress or len(rows) < 1000, leave=False):
        try:
            check_header(row.image)
        except UserError as exc:
            raise UserError(f"{manifest}:{row.line}: {exc}") from None
    # A valid header does not make a whole image (a cut body decodes to an error): decoded here, before
    # any write, at the cost of a second decode when its batch is embedded (holding them all would not fit).
    copies: dict[str, list[ManifestRow]] = {}  # an original's sha256 -> its rows, first row first
    for row in tqdm(rows, desc="decoding", unit="image", disable=not progress or len(rows) < 1000, leave=False):
        if decoded and row.role != "original" and row.sha256 is None:
            continue
        try:
            file_hash = _file_hash(row.image) if decoded else read_image(row.image)[1]
        except UserError as exc:
            raise UserError(f"{manifest}:{row.line}: {exc}") from None
        check_digest(manifest, row, file_hash)
        if row.role != "original":
            continue
        first = copies.setdefault(file_hash, [row])[0]
        if first.source != row.source:  # a copy under another generator's folder: one of the labels is wrong
            raise UserError(f"{manifest}:{row.line}: original {shown(row.image)} has the same bytes as "
                            f"{shown(first.image)} (line {first.line}), an original of {first.source!r}, but is "
                            f"listed as {row.source!r}: an image has one true source; remove the wrong row")
        if first is not row:
            copies[file_hash].append(row)
    described = {_description_hash(row) for row in rows if row.role == "resynthesis"}
    repeated = _repeated_originals(manifest, store, copies, described)
    skip = {id(row) for row in repeated}
    rows = [row for row in rows if id(row) not in skip]
    embedder = workspace.embedder  # models load only once the manifest is known to be good
    for name in new_sources:
        workspace.add_replay_source(name)
    sources = {s.name: s for s in store.sources()}
    report = IngestReport(rows=len(rows) + len(repeated), skipped=len(repeated), new_sources=new_sources,
                          warnings=_repeats_said(repeated) + _unseeded(rows, sources))
    ids_by_key: dict[str, int | None] = {}  # this run's keys; None while a row is pending in the batch
    original_keys: dict[Path, str] = {}
    bar = tqdm(total=len(rows), desc="ingesting", unit="image", disable=not progress)
    # Originals first, in batches of their own, so that resyntheses can be linked to them.
    for role in ("original", "resynthesis"):
        of_role = [r for r in rows if r.role == role]
        for start in range(0, len(of_role), BATCH):
            batch = of_role[start:start + BATCH]
            _ingest_batch(manifest, store, embedder, batch, sources, ids_by_key, original_keys, report)
            bar.update(len(batch))
    bar.close()
    return report


def _unseeded(rows: list[ManifestRow], sources: dict) -> list[str]:
    """A resynthesis of a generating source without a seed is stored, but attribute never compares it (it
    compares that source's current recipe's seeds: engine.attribute.Plan), nor does calibration: said, not
    left for the user to find in the scores (a published dataset's folder named like a registered pipeline)."""
    from engine.sources import kind_of

    counts: dict[str, int] = {}
    for row in rows:
        if row.role == "resynthesis" and row.seed is None:
            try:
                generates = kind_of(sources[row.source]).generates
            except UserError:  # a kind this resynth does not know
                continue
            if generates:
                counts[row.source] = counts.get(row.source, 0) + 1
    return [f"{n} resyntheses of {name!r} have no seed: stored, but never compared ({name!r} generates, and "
            "attribute compares its recipe's seeded resyntheses only; give the seed they were made with, or "
            "ingest them under a new name, a replay source)" for name, n in sorted(counts.items())]


def _file_hash(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise UserError(f"cannot read image {shown(path)}: {exc.strerror or type(exc).__name__}") from None


def _check_sources(manifest: Path, rows: list[ManifestRow], known: set[str]) -> list[str]:
    """The sources this manifest adds, each a valid name (the error names its first row). A name that only
    Unicode form separates from a stored one is that source (rows are renamed to the stored spelling); one
    that only case separates from another is refused: the two would read as one source in every answer."""
    forms = {unicodedata.normalize("NFC", name): name for name in known}
    for row in rows:
        if row.source not in known:  # the manifest's names are NFC already; a stored NFC name is itself
            row.source = forms.get(row.source, row.source)
    first_row: dict[str, ManifestRow] = {}
    for row in rows:
        first_row.setdefault(row.source, row)
    folded = {name.casefold(): name for name in known}
    for name, row in first_row.items():
        if name in known:
            continue
        try:
            check_name(name)
        except UserError as exc:
            raise UserError(f"{manifest}:{row.line}: {exc}") from None
        twin = folded.setdefault(name.casefold(), name)
        if twin != name:
            other = (f"the store's source {twin!r}" if twin in known
                     else f"source {twin!r} (line {first_row[twin].line})")
            raise UserError(f"{manifest}:{row.line}: source {name!r} differs from {other} only by case: they would "
                            "read as one source; use one spelling")
    return sorted(set(first_row) - known)


def _ingest_batch(manifest, store, embedder, batch, sources, ids_by_key, original_keys, report) -> None:
    pending, images = [], []
    for row in batch:
        image, file_hash = read_image(row.image)
        check_digest(manifest, row, file_hash)  # replaced since it was checked: what is stored is what was read
        source = sources[row.source]
        key = row_key(row, source, file_hash, embedder.identity)
        if row.role == "original":
            original_keys[row.image] = key
        if key not in ids_by_key:
            ids_by_key[key] = store.image_id_for_key(key)
            if ids_by_key[key] is None:
                pending.append((row, source, key, file_hash))
                images.append(image)
                continue
        report.skipped += 1  # stored before, or a duplicate row of this manifest
    if not pending:
        return
    vectors = embedder.embed(images)
    new_rows = [NewImage(key=key, role=row.role, source_id=source.id,
                         description_id=store.description_id(row.description), file_hash=file_hash,
                         path=str(row.image), vector=vector, seed=row.seed, params_hash=_params_hash(row, source),
                         original_id=_original_id(store, row, ids_by_key, original_keys))
                for (row, source, key, file_hash), vector in zip(pending, vectors)]
    added = store.add_images(new_rows)  # the image ids, and how many rows were new
    inserted = added.inserted  # another process may have stored some of them meanwhile
    for (_, _, key, _), image_id in zip(pending, added):
        ids_by_key[key] = image_id
    report.added += inserted
    report.skipped += len(pending) - inserted
    store.save_index()


def _original_id(store: Store, row: ManifestRow, ids_by_key: dict, original_keys: dict) -> int | None:
    """The stored original a resynthesis was made from: listed in this manifest, or stored before."""
    if row.original is None:
        return None
    if row.original in original_keys:
        return ids_by_key.get(original_keys[row.original])
    if row.original.is_file():
        return store.original_id_for_file(sha256_file(row.original))
    return None
