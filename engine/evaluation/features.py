"""CLIP features for an evaluation, each image embedded once per feature variant and cached on disk.

The cache is one .npz per (embedder identity, query perturbation), keyed by file sha256: an
identity names architecture, checkpoint hash and layer, so vectors of different layers never mix,
and re-running an evaluation (or adding a perturbation) embeds only what is new.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from engine.embed import Embedder, EmbedderSpec, parse_layer
from engine.errors import UserError
from engine.images import read_image

BATCH = 32


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


def embed_paths(embedder: Embedder, paths: list[str], hashes: list[str], cache: FeatureCache,
                transform: Callable[[Image.Image], Image.Image] | None = None, label: str = "embedding",
                progress: bool = True) -> np.ndarray:
    """Vectors for `paths` in order; only images whose hash the cache lacks are read and embedded."""
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


def block_count(embedder: Embedder) -> int:
    visual = embedder.model.visual
    return len(visual.transformer.resblocks) if hasattr(visual, "transformer") else 0


def layer_embedders(base: Embedder, layers: list[str]) -> dict[str, Embedder]:
    """One embedder per requested layer ("final", "N" = block N, "mid" = the middle block).

    Reuses `base` for its own layer and its checkpoint hash for the others (no second sha256).
    """
    blocks = block_count(base)
    out: dict[str, Embedder] = {}
    for name in layers:
        name = name.strip().lower()
        if name in ("", "store", "base"):
            layer = base.spec.layer
        elif name == "final":
            layer = None
        elif name == "mid":
            if not blocks:
                raise UserError("this CLIP architecture has no transformer blocks to take a middle layer from")
            layer = max(1, blocks // 2)
        else:
            try:
                layer = int(name)
            except ValueError:
                raise UserError(f"--layers: expected final, mid or a block number, not {name!r}") from None
        label = "final" if layer is None else f"block{layer}"
        if label in out:
            continue
        if layer == base.spec.layer:
            out[label] = base
        else:
            out[label] = Embedder(replace(base.spec, layer=layer), device=base.device, known_hash=base.hash_record)
    return out


def spec_from_args(model: str | None, config: str | None, checkpoint: str | None,
                   layer: int | str | None) -> EmbedderSpec | None:
    """An explicit --clip-model/--clip-config/--clip-checkpoint, as `resynth init` takes it."""
    if not (model or config or checkpoint):
        return None
    if not checkpoint:
        raise UserError("--clip-checkpoint is required with --clip-model or --clip-config")
    if bool(model) == bool(config):
        raise UserError("give exactly one of --clip-model ARCH or --clip-config JSON")
    return EmbedderSpec(arch=model or Path(config).stem, checkpoint=str(Path(checkpoint).resolve()),
                        config=str(Path(config).resolve()) if config else None, layer=parse_layer(layer))
