"""Importing a dataset of originals and resyntheses into a store, resumably and idempotently."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from engine.embed import Embedder
from engine.generate import GenerationParams
from engine.images import read_image
from engine.manifest import ManifestRow, read_manifest
from engine.workspace import add_replay_source
from index.keys import cache_key, canonical_json, normalise_description, sha256_text
from index.store import NewImage, Store

BATCH = 32  # rows embedded and committed together: a crash loses at most one batch, rerun resumes


@dataclass
class IngestReport:
    rows: int = 0
    added: int = 0
    skipped: int = 0  # already in the store (same key): re-running a manifest is a no-op
    new_sources: list[str] | None = None


def row_key(row: ManifestRow, source, file_hash: str, embedder: str) -> str:
    """Originals key on their bytes; resyntheses of pipeline sources on their recipe (the cache key)."""
    description_hash = sha256_text(normalise_description(row.description))
    if row.role == "original":
        return sha256_text(canonical_json(["original", file_hash, source.name, description_hash, embedder]))
    if source.kind == "replay" or row.seed is None:
        # No reproducible recipe: the image itself is the identity. It never stands in for a seed.
        return cache_key(description_hash, source.fingerprint, row.seed if row.seed is not None else -1, "",
                         embedder, file_hash)
    return cache_key(description_hash, source.fingerprint, row.seed, _params_hash(row, source), embedder)


def _params_hash(row: ManifestRow, source) -> str | None:
    if row.role == "original" or source.kind == "replay" or row.seed is None:
        return None
    return GenerationParams.from_json(source.params_json).hash()


def ingest(store: Store, embedder: Embedder, manifest: Path, progress: bool = True) -> IngestReport:
    rows = read_manifest(manifest)
    known = {s.name for s in store.sources()}
    new_sources = sorted({r.source for r in rows} - known)
    for name in new_sources:
        add_replay_source(store, name)
    sources = {s.name: s for s in store.sources()}
    report = IngestReport(rows=len(rows), new_sources=new_sources)
    # Originals first, so that resyntheses can be linked to them.
    ordered = sorted(rows, key=lambda r: (r.role != "original", r.line))
    original_ids: dict[Path, int] = {}
    bar = tqdm(total=len(ordered), desc="ingesting", unit="image", disable=not progress)
    for start in range(0, len(ordered), BATCH):
        batch = ordered[start:start + BATCH]
        pending, images = [], []
        for row in batch:
            image, file_hash = read_image(row.image)
            source = sources[row.source]
            key = row_key(row, source, file_hash, embedder.identity)
            existing = store.image_id_for_key(key)
            if existing is not None:
                report.skipped += 1
                if row.role == "original":
                    original_ids[row.image] = existing
                continue
            pending.append((row, source, key, file_hash))
            images.append(image)
        if pending:
            vectors = embedder.embed(images)
            new_rows = [NewImage(key=key, role=row.role, source_id=source.id,
                                 description_id=store.description_id(row.description), file_hash=file_hash,
                                 path=str(row.image), vector=vector, seed=row.seed,
                                 params_hash=_params_hash(row, source),
                                 original_id=original_ids.get(row.original) if row.original else None)
                        for (row, source, key, file_hash), vector in zip(pending, vectors)]
            ids = store.add_images(new_rows)
            for (row, *_), image_id in zip(pending, ids):
                if row.role == "original":
                    original_ids[row.image] = image_id
            report.added += len(pending)
            store.save_index()
        bar.update(len(batch))
    bar.close()
    return report
