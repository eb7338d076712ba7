"""A labelled set: originals (true source known) and the resyntheses that serve as references.

Built from a manifest (the `resynth ingest` format) or from what a store already holds; calibration
(engine.fitting) fits on one and the evaluation protocol measures on one. Checks here turn a set that
cannot be scored into one `UserError` line instead of a silent nan.
"""
from __future__ import annotations

from collections import defaultdict
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from engine.errors import UserError, plural
from engine.manifest import ManifestRow, check_digest, read_manifest
from index.keys import sha256_file

if TYPE_CHECKING:
    from PIL import Image

    from engine.embed import Embedder
    from index.store import Store

BATCH = 32  # images embedded together
FEW_ORIGINALS = 5  # fewer labelled originals of a source than this: its acceptance test rests on few values


@dataclass
class EvalSet:
    """Integer-coded originals and resyntheses; `sources` are the candidates (sources with resyntheses)."""

    sources: list[str]
    orig_source: np.ndarray  # index into sources
    orig_desc: np.ndarray  # index into descriptions
    orig_hash: list[str]
    orig_path: list[str]
    res_source: np.ndarray
    res_desc: np.ndarray
    res_seed: np.ndarray  # -1 when unknown
    res_original: np.ndarray  # index of the original it resynthesizes, -1 when only its description is known
    res_hash: list[str]
    res_path: list[str]
    descriptions: list[str]
    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # identity -> (orig, res)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> the originals left out for it

    @property
    def n_originals(self) -> int:
        return len(self.orig_hash)

    def originals_per_source(self) -> dict[str, int]:
        """Per candidate source, how many of its originals are used (0 for a source with resyntheses only)."""
        counts = np.bincount(np.asarray(self.orig_source, np.int64), minlength=len(self.sources))
        return {name: int(n) for name, n in zip(self.sources, counts)}

    def usage(self) -> dict:
        """What the set uses and what it left out, and why: the same figures in text and JSON. `sources` are
        the candidates (sources with resyntheses), `sources_with_originals` those the originals come from;
        `few_originals` names the sources with fewer than FEW_ORIGINALS, on which a threshold rests weakly."""
        per_source = self.originals_per_source()
        return {"originals": self.n_originals, "sources": len(self.sources),
                "sources_with_originals": sum(1 for n in per_source.values() if n),
                "originals_per_source": per_source,
                "few_originals": {name: n for name, n in per_source.items() if 0 < n < FEW_ORIGINALS},
                "skipped": sum(len(v) for v in self.skipped.values()),
                "skipped_by_reason": {reason: len(names) for reason, names in self.skipped.items()},
                "skipped_examples": {reason: names[:3] for reason, names in self.skipped.items()}}

    def usage_text(self) -> str:
        """One line: how many originals of how many sources, and how many were skipped for which reason."""
        used = self.usage()
        text = f"used {plural(used['originals'], 'original')} of {plural(used['sources_with_originals'], 'source')}"
        if used["sources_with_originals"] < used["sources"]:
            none = [name for name, n in used["originals_per_source"].items() if not n]
            text += f" (of {plural(used['sources'], 'candidate source')}; none of {', '.join(none)})"
        if not used["skipped"]:
            return text + "; none skipped"
        reasons = "; ".join(f"{len(names)} because {reason} (e.g. {', '.join(names[:3])})"
                            for reason, names in self.skipped.items())
        return f"{text}; skipped {used['skipped']}: {reasons}"

    def references(self) -> list[list[np.ndarray]]:
        """For every original, per source, the indices of its candidate resyntheses, in the engine's order.

        Exactly the engine's rule (engine.attribute.Plan): the resyntheses of the original's description,
        unknown seeds first, then by seed, then in dataset order; never one with the query's own bytes.
        """
        by_desc: dict[int, list[int]] = defaultdict(list)
        for j in range(len(self.res_hash)):
            by_desc[int(self.res_desc[j])].append(j)
        for pool in by_desc.values():
            pool.sort(key=lambda j: (int(self.res_seed[j]), j))
        out = []
        for i in range(self.n_originals):
            pool = [j for j in by_desc.get(int(self.orig_desc[i]), []) if self.res_hash[j] != self.orig_hash[i]]
            per_source = [np.array([j for j in pool if self.res_source[j] == c], np.int64)
                          for c in range(len(self.sources))]
            out.append(per_source)
        return out

    def max_per_source(self) -> int:
        """Largest K that at least one (original, source) pair offers."""
        return max((len(r) for refs in self.references() for r in refs), default=0)


NO_RESYNTHESES = "their description has no resyntheses"  # the reason an original is skipped
NO_SOURCE_RESYNTHESES = "their source has no resyntheses"
LISTED_TWICE = "the manifest lists them twice"
STORED_TWICE = "the store holds their bytes twice"
TWO_SOURCES = "the store holds their bytes as originals of two sources: one label is wrong"



def unique_rows(rows: list[ManifestRow]) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """(rows without repeats, the originals dropped as repeats). A row repeated would count its original twice
    in every measurement (or its resynthesis twice among the references); read_manifest already refused an
    original listed under two sources."""
    seen: set[tuple] = set()
    kept, repeated = [], []
    for row in rows:
        key = (row.image, row.role)
        if key not in seen:
            seen.add(key)
            kept.append(row)
        elif row.role == "original":
            repeated.append(row)
    return kept, repeated


def from_rows(rows: list[ManifestRow], where: str, strict: bool = False, keep_lonely: bool = False) -> EvalSet:
    """Validate and code manifest rows; file hashes identify images (and their cached features).

    An original whose description has no resyntheses cannot be scored: it is skipped and counted in
    `EvalSet.skipped` (a manifest such as the demo's keeps such originals as queries for generation on
    demand), or, with `strict`, refused; with `keep_lonely` it is kept (the store may have its resyntheses:
    `against_store`). Repeated rows are used once (originals counted in `skipped`)."""
    rows, repeated = unique_rows(rows)
    _check_sizes(rows, where)
    originals = [r for r in rows if r.role == "original"]
    resyntheses = [r for r in rows if r.role == "resynthesis"]
    if not originals:
        raise UserError(f"{where}: no original rows: evaluation needs labelled originals to attribute")
    if not resyntheses:
        raise UserError(f"{where}: no resynthesis rows: evaluation needs resyntheses as references")
    sources = sorted({r.source for r in resyntheses})
    stray = sorted({r.source for r in originals} - set(sources))
    if stray:
        raise UserError(f"{where}: original source(s) {', '.join(stray)} have no resyntheses, so no method "
                        f"could predict them (sources with resyntheses: {', '.join(sources)})")
    have_desc = {r.description for r in resyntheses}
    lonely = [] if keep_lonely else [r for r in originals if r.description not in have_desc]
    folder = Path(where).resolve().parent  # examples are named as the manifest names them
    if lonely and strict:
        row = lonely[0]
        raise UserError(f"{where}:{row.line}: original {shown(row.image, folder)} has no resyntheses of its description"
                        f"{f' ({len(lonely)} originals have none)' if len(lonely) > 1 else ''}; without "
                        f"--strict such originals are skipped")
    originals = [r for r in originals if keep_lonely or r.description in have_desc]
    if not originals:
        raise UserError(f"{where}: no original has resyntheses of its description ({plural(len(lonely), 'original')}, "
                        f"none scorable): add resyntheses of their descriptions")
    descriptions = sorted({r.description for r in rows})
    desc_index = {d: i for i, d in enumerate(descriptions)}
    source_index = {s: i for i, s in enumerate(sources)}
    orig_hash = [_digest(r, where) for r in originals]
    originals, orig_hash, copies = _one_label_per_image(originals, orig_hash, where, folder)
    repeated += copies
    orig_by_path = {r.image: i for i, r in enumerate(originals)}
    linked = np.array([orig_by_path.get(r.original, -1) if r.original is not None else -1 for r in resyntheses])
    return EvalSet(
        sources=sources,
        orig_source=np.array([source_index[r.source] for r in originals]),
        orig_desc=np.array([desc_index[r.description] for r in originals]),
        orig_hash=orig_hash, orig_path=[str(r.image) for r in originals],
        res_source=np.array([source_index[r.source] for r in resyntheses]),
        res_desc=np.array([desc_index[r.description] for r in resyntheses]),
        res_seed=np.array([r.seed if r.seed is not None else -1 for r in resyntheses]),
        res_original=linked, res_hash=[_digest(r, where) for r in resyntheses],
        res_path=[str(r.image) for r in resyntheses], descriptions=descriptions,
        skipped={reason: [shown(r.image, folder) for r in left] for reason, left in
                 ((NO_RESYNTHESES, lonely), (LISTED_TWICE, repeated)) if left})


def _digest(row: ManifestRow, where: str) -> str:
    """The file's sha256, checked against the one the manifest records (if it does)."""
    digest = sha256_file(row.image)
    check_digest(where, row, digest)
    return digest


def _one_label_per_image(originals: list[ManifestRow], hashes: list[str], where: str,
                         folder: Path) -> tuple[list[ManifestRow], list[str], list[ManifestRow]]:
    """(originals, their hashes, the copies left out). The same bytes under two paths are one image: under
    two sources one label is wrong whichever is kept (refused, naming both rows); under one source the
    copy would count that image twice in every measurement (used once, counted as listed twice)."""
    first: dict[str, ManifestRow] = {}
    kept, kept_hashes, copies = [], [], []
    for row, digest in zip(originals, hashes):
        earlier = first.setdefault(digest, row)
        if earlier is row:
            kept.append(row)
            kept_hashes.append(digest)
        elif earlier.source != row.source:
            raise UserError(f"{where}:{row.line}: original {shown(row.image, folder)} has the same bytes as "
                            f"{shown(earlier.image, folder)} (line {earlier.line}), an original of {earlier.source!r}, "
                            f"but is listed as {row.source!r}: an image has one true source; remove the wrong row")
        else:
            copies.append(row)
    return kept, kept_hashes, copies


def _check_sizes(rows: list[ManifestRow], where: str) -> None:
    """Every file is hashed before it is decoded: one over the image reader's limit is refused first, by its
    size, so a manifest naming a huge file is not read whole only to be refused."""
    from engine.images import MAX_BYTES

    for row in rows:
        try:
            size = row.image.stat().st_size
        except OSError as exc:
            raise UserError(f"{where}:{row.line}: cannot read {row.image}: {exc.strerror or type(exc).__name__}") \
                from None
        if size > MAX_BYTES:
            raise UserError(f"{where}:{row.line}: {row.image}: {size} bytes, the limit is {MAX_BYTES}")


def few_originals_text(usage: dict) -> str:
    """A warning naming the sources with fewer than FEW_ORIGINALS labelled originals, from `EvalSet.usage()`
    ("" when none has, or for a usage recorded before it counted them)."""
    few = usage.get("few_originals") or {}
    if not few:
        return ""
    named = ", ".join(f"{name} ({n})" for name, n in few.items())
    return (f"warning: fewer than {FEW_ORIGINALS} labelled originals of {named}: the acceptance thresholds are "
            f"measured on few of their images, so they may accept or reject queries of those sources wrongly; "
            f"give each source more labelled originals")


def shown(path, folder: Path | None) -> str:
    """A file's path as a person finds it: relative to `folder` when inside it, else as given. A bare
    name is ambiguous when every source's folder holds a 008.png."""
    if folder is not None:
        try:
            return Path(path).relative_to(folder).as_posix()
        except ValueError:
            pass
    return str(path)


def common_folder(paths: list[str]) -> Path | None:
    """The deepest folder holding every one of `paths` (absolute ones), or None."""
    absolute = [Path(p).parent for p in paths if Path(p).is_absolute()]
    if not absolute or len(absolute) < len(paths):
        return None
    try:
        return Path(os.path.commonpath(absolute))
    except ValueError:  # different drives
        return None


def from_manifest(path: Path, strict: bool = False, keep_lonely: bool = False) -> EvalSet:
    return from_rows(read_manifest(Path(path)), str(path), strict, keep_lonely)


def _generating(store: "Store") -> set[str]:
    """Names of the store's sources that generate (their resyntheses count only with a seed)."""
    from engine import sources

    out = set()
    for source in store.sources():
        try:
            if sources.kind_of(source).generates:
                out.add(source.name)
        except UserError:  # a kind this resynth does not know: counted as it is stored
            continue
    return out


def against_store(evalset: EvalSet, originals: np.ndarray, store: "Store",
                  strict: bool = False) -> tuple[EvalSet, tuple[np.ndarray, np.ndarray]] | None:
    """A manifest's originals (`evalset`, their vectors `originals`) scored against the store's
    resyntheses, the pool `attribute` compares with (in combined and dataset modes every stored
    resynthesis shapes the scores, not only the manifest's). Originals whose description the store has no
    resyntheses of are skipped (`NO_RESYNTHESES`). None when the store holds none of the descriptions:
    the caller then keeps the manifest's own resyntheses."""
    unseeded = _generating(store)
    rows = [r for r in store.labelled_vectors()
            if r.role == "resynthesis" and not (r.seed is None and r.source in unseeded)]
    stored_desc = {d: store.find_description_id(d) for d in evalset.descriptions}
    described = {r.description_id for r in rows}
    keep = [i for i in range(evalset.n_originals)
            if stored_desc[evalset.descriptions[int(evalset.orig_desc[i])]] in described]
    if not keep or not rows:
        return None
    sources = sorted({r.source for r in rows} | set(evalset.sources))
    source_index = {s: i for i, s in enumerate(sources)}
    desc_ids = sorted({r.description_id for r in rows})
    desc_index = {d: i for i, d in enumerate(desc_ids)}
    kept = set(keep)
    if strict and len(keep) < evalset.n_originals:
        first = next(i for i in range(evalset.n_originals) if i not in kept)
        raise UserError(f"original {evalset.orig_path[first]} has no resyntheses of its description in store "
                        f"{store.root} ({evalset.n_originals - len(keep)} originals have none); without --strict such "
                        "originals are skipped")
    kept_desc = [stored_desc[evalset.descriptions[int(evalset.orig_desc[i])]] for i in keep]
    lonely = [evalset.orig_path[i] for i in range(evalset.n_originals) if i not in kept]
    skipped = dict(evalset.skipped)
    if lonely:
        folder = common_folder(lonely)
        skipped[NO_RESYNTHESES] = skipped.get(NO_RESYNTHESES, []) + [shown(p, folder) for p in lonely]
    hybrid = EvalSet(
        sources=sources,
        orig_source=np.array([source_index[evalset.sources[int(evalset.orig_source[i])]] for i in keep]),
        orig_desc=np.array([desc_index[d] for d in kept_desc if d is not None]),  # none is None: kept
        orig_hash=[evalset.orig_hash[i] for i in keep], orig_path=[evalset.orig_path[i] for i in keep],
        res_source=np.array([source_index[r.source] for r in rows]),
        res_desc=np.array([desc_index[r.description_id] for r in rows]),
        res_seed=np.array([r.seed if r.seed is not None else -1 for r in rows]),
        res_original=np.full(len(rows), -1), res_hash=[r.file_hash for r in rows], res_path=[r.path for r in rows],
        descriptions=[str(d) for d in desc_ids], skipped=skipped)
    return hybrid, (originals[keep], np.stack([r.vector for r in rows]))


def from_store(store: "Store", strict: bool = False) -> EvalSet:
    """The store's own originals and resyntheses with their stored vectors: no embedding at all.

    Originals that cannot be scored (their source or their description has no stored resyntheses) are
    skipped and counted in `EvalSet.skipped`, or, with `strict`, refused."""
    rows = store.labelled_vectors()
    originals = [r for r in rows if r.role == "original"]
    # a pipeline source's resynthesis without a seed (ingested so) is never compared by attribute
    # (engine.attribute.Plan.select keeps its current recipe's seeds only): nor is it here
    unseeded = _generating(store)
    resyntheses = [r for r in rows if r.role == "resynthesis" and not (r.seed is None and r.source in unseeded)]
    where = f"store {store.root}"
    if not originals:
        raise UserError(f"{where} holds no originals: ingest a manifest with labelled originals, or give one "
                        "(`resynth calibrate MANIFEST`)")
    if not resyntheses:
        raise UserError(f"{where} holds no resyntheses")
    sources = sorted({r.source for r in resyntheses})
    skipped: dict[str, list[str]] = {}
    folder = common_folder([r.path for r in originals])  # examples named from there: unambiguous, short
    # an enrolled-nowhere source cannot be scored closed-set; its originals are left out
    described = {r.description_id for r in resyntheses}
    # before the stray filter: a copy under a source without resyntheses is a conflicting label all the same
    originals = _one_copy_each(originals, described, skipped, folder)
    stray = [r for r in originals if r.source not in sources]
    if stray:
        skipped[NO_SOURCE_RESYNTHESES] = [shown(r.path, folder) for r in stray]
    originals = [r for r in originals if r.source in sources]
    source_index = {s: i for i, s in enumerate(sources)}
    desc_ids = sorted({r.description_id for r in rows})
    desc_index = {d: i for i, d in enumerate(desc_ids)}
    lonely = [r for r in originals if r.description_id not in described]
    if lonely:
        skipped[NO_RESYNTHESES] = [shown(r.path, folder) for r in lonely]
    if skipped and strict:
        reason, names = next(iter(skipped.items()))
        total = sum(map(len, skipped.values()))
        raise UserError(f"{where}: {plural(total, 'stored original')} cannot be scored, e.g. {names[0]}: {reason}; "
                        f"without --strict they are skipped")
    originals = [r for r in originals if r.description_id in described]
    orig_index = {r.id: i for i, r in enumerate(originals)}
    if not originals:
        raise UserError(f"{where}: no stored original has resyntheses of its description")
    evalset = EvalSet(
        sources=sources,
        orig_source=np.array([source_index[r.source] for r in originals]),
        orig_desc=np.array([desc_index[r.description_id] for r in originals]),
        orig_hash=[r.file_hash for r in originals], orig_path=[r.path for r in originals],
        res_source=np.array([source_index[r.source] for r in resyntheses]),
        res_desc=np.array([desc_index[r.description_id] for r in resyntheses]),
        res_seed=np.array([r.seed if r.seed is not None else -1 for r in resyntheses]),
        res_original=np.array([-1 if r.original_id is None else orig_index.get(r.original_id, -1)
                               for r in resyntheses]),
        res_hash=[r.file_hash for r in resyntheses], res_path=[r.path for r in resyntheses],
        descriptions=[str(d) for d in desc_ids], skipped=skipped)
    evalset.vectors[store.embedder_identity] = (np.stack([r.vector for r in originals]),
                                                np.stack([r.vector for r in resyntheses]))
    return evalset


def _one_copy_each(originals: list, described: set[int], skipped: dict[str, list[str]], folder: Path | None) -> list:
    """An image is one original: a store ingested before ingest refused repeats may hold its bytes twice (two
    descriptions: counted twice) or under two sources (scored against a wrong label). The first copy whose
    description has resyntheses is kept (else the image was lost: its scorable copy left out as a repeat, the
    kept one as unscorable); an image under two sources is left out altogether (which label is true is unknown)."""
    by_bytes: dict[str, list] = {}
    for r in sorted(originals, key=lambda r: r.description_id not in described):  # stable: stored order kept
        by_bytes.setdefault(r.file_hash, []).append(r)
    twice = [r for copies in by_bytes.values() if len({c.source for c in copies}) == 1 for r in copies[1:]]
    conflicted = [r for copies in by_bytes.values() if len({c.source for c in copies}) > 1 for r in copies]
    for reason, left in ((TWO_SOURCES, conflicted), (STORED_TWICE, twice)):
        if left:
            skipped[reason] = [shown(r.path, folder) for r in left]
    dropped = {id(r) for r in twice + conflicted}
    return [r for r in originals if id(r) not in dropped]


class FeatureCache:
    """Vectors by file hash for one embedder identity and one perturbation, stored as an .npz."""

    def __init__(self, folder: Path | None, identity: str, variant: str = "clean"):
        self.path = None
        if folder is not None:
            tag = re.sub(r"[^A-Za-z0-9.-]+", "_", identity)[:60]
            digest = hashlib.sha256(f"{identity}|{variant}".encode()).hexdigest()[:12]
            self.path = Path(folder) / f"{tag}-{variant}-{digest}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path is not None and self.path.is_file():
            with np.load(self.path) as data:
                self.vectors = dict(zip(data["hashes"].tolist(), data["vectors"]))
        self._dirty = False

    def save(self) -> None:
        if self.path is None or not self._dirty or not self.vectors:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.stem + ".tmp.npz")
        np.savez(tmp, hashes=np.array(list(self.vectors)), vectors=np.stack(list(self.vectors.values())))
        tmp.replace(self.path)
        self._dirty = False

    def add(self, hashes: list[str], vectors: np.ndarray) -> None:
        self.vectors.update(zip(hashes, vectors))
        self._dirty = True


def embed_paths(embedder: "Embedder", paths: list[str], hashes: list[str], cache: FeatureCache,
                transform: "Callable[[Image.Image], Image.Image] | None" = None, label: str = "embedding",
                progress: bool = True) -> np.ndarray:
    """Vectors for `paths` in order; only images whose hash the cache lacks are read and embedded."""
    from tqdm import tqdm

    from engine.images import read_image

    todo = list(dict.fromkeys(h for h in hashes if h not in cache.vectors))
    first_path = {h: p for p, h in zip(paths, hashes)}
    bar = tqdm(total=len(todo), desc=label, unit="image", disable=not progress or not todo, leave=False)
    for start in range(0, len(todo), BATCH):
        batch = todo[start:start + BATCH]
        images = [read_image(Path(first_path[h]))[0] for h in batch]
        if transform is not None:
            images = [transform(im) for im in images]
        cache.add(batch, embedder.embed(images))
        cache.save()  # an interrupted run keeps what it embedded
        bar.update(len(batch))
    bar.close()
    if not hashes:
        return np.zeros((0, embedder.dim), np.float32)
    return np.stack([cache.vectors[h] for h in hashes]).astype(np.float32)
