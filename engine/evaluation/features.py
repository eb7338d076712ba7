"""CLIP features for an evaluation, each image embedded once per feature variant and cached on disk.

The cache is one .npz per (embedder identity, query perturbation), keyed by file sha256: an
identity names architecture, checkpoint hash and layer, so vectors of different layers never mix,
and re-running an evaluation (or adding a perturbation) embeds only what is new.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import cast


from engine.embed import Embedder, EmbedderSpec, parse_layer
from engine.errors import UserError

from engine.labelled import BATCH, FeatureCache, embed_paths  # noqa: F401  (the method's; re-exported)


def block_count(embedder: Embedder) -> int:
    visual = embedder.model.visual
    return len(visual.transformer.resblocks) if hasattr(visual, "transformer") else 0


def layer_embedders(base: Embedder, layers: list[str]) -> dict[str, Embedder]:
    """One embedder per requested layer ("final", "N" = block N, "mid" = the middle block).

    Reuses `base` for its own layer and its checkpoint hash for the others (no second sha256).
    """
    blocks = block_count(base)
    accepted = ("base (or store), final, mid or a block number"
                + (f" from 1 to {blocks}" if blocks else " (this CLIP has none)"))
    out: dict[str, Embedder] = {}
    for name in layers:
        name = name.strip().lower()
        if name in ("", "store", "base"):
            layer = base.spec.layer
        elif name == "final":
            layer = None
        elif name == "mid":
            if not blocks:
                raise UserError(f"--layers mid: this CLIP architecture has no transformer blocks: expected {accepted}")
            layer = max(1, blocks // 2)
        else:
            try:
                layer = int(name)
            except ValueError:
                raise UserError(f"--layers: expected {accepted}, not {name!r}") from None
            if not 1 <= layer <= blocks:  # checked here: the embedder would name --clip-layer, after loading
                raise UserError(f"--layers {layer} is out of range: expected {accepted}")
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
    # exactly one of model and config is given (checked above)
    return EmbedderSpec(arch=model or Path(cast(str, config)).stem, checkpoint=str(Path(checkpoint).resolve()),
                        config=str(Path(config).resolve()) if config else None, layer=parse_layer(layer))
