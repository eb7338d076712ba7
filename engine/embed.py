"""CLIP image embedder: an open_clip model from a local checkpoint, final or intermediate layer."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from engine.errors import UserError, first_line
from index.keys import sha256_file


@dataclass(frozen=True)
class EmbedderSpec:
    """How a user holds CLIP weights: architecture name (or config JSON) + checkpoint file.

    `layer` None means the final projected embedding; an integer L means the class token of
    transformer block L (1-based), and "middle" the middle block (resolved when the model loads),
    which published work on this task (block 12 of 24) and our measurements found stronger.
    """

    arch: str
    checkpoint: str
    config: str | None = None
    layer: int | str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "EmbedderSpec":
        return cls(data["arch"], data["checkpoint"], data.get("config"), data.get("layer"))


MIDDLE = "middle"


def parse_layer(text: str | int | None) -> int | str | None:
    """--clip-layer: "middle", "final" (None) or a block number."""
    if text is None or isinstance(text, int):
        return text
    text = str(text).strip().lower()
    if text in ("final", "last"):
        return None
    if text in (MIDDLE, "mid"):
        return MIDDLE
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--clip-layer must be middle, final or a block number, not {text!r}") from None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def checkpoint_hash(path: Path, known: dict | None = None) -> str:
    """sha256 of the checkpoint, reusing `known` (hash, size, mtime) when the file is unchanged."""
    stat = path.stat()
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return known["sha256"]
    return sha256_file(path)


class Embedder:
    """Batched, L2-normalised float32 image features; `identity` names model, weights and layer."""

    def __init__(self, spec: EmbedderSpec, device: str | None = None, known_hash: dict | None = None,
                 batch_size: int = 32):
        import open_clip

        self.spec = spec
        self.device = device or default_device()
        self.batch_size = batch_size
        checkpoint = Path(spec.checkpoint)
        if not checkpoint.is_file():
            raise UserError(f"CLIP checkpoint not found: {checkpoint}")
        arch = spec.arch
        if spec.config:
            config = Path(spec.config)
            if not config.is_file():
                raise UserError(f"CLIP model config not found: {config}")
            try:
                open_clip.add_model_config(config)
            except Exception as exc:  # open_clip raises bare exceptions for bad JSON
                raise UserError(f"malformed CLIP model config {config}: {first_line(exc)}") from None
            arch = config.stem
        if arch not in open_clip.list_models():
            raise UserError(f"unknown CLIP architecture {arch!r} (pass --clip-config for a custom one)")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=str(checkpoint), device=self.device, require_pretrained=True)
        except Exception as exc:
            raise UserError(f"cannot load CLIP checkpoint {checkpoint} as {arch}: {_load_reason(exc)}") from exc
        self.model = model.eval()
        self.preprocess = preprocess
        blocks = len(self.model.visual.transformer.resblocks) if hasattr(self.model.visual, "transformer") else None
        if spec.layer == MIDDLE:
            if not blocks:
                raise UserError(f"{arch} has no transformer blocks: use --clip-layer final")
            spec = self.spec = replace(spec, layer=max(1, blocks // 2))
        if spec.layer is not None and (blocks is None or not 1 <= spec.layer <= blocks):
            raise UserError(f"--clip-layer {spec.layer} is out of range for {arch} ({blocks or 0} blocks)")
        stat = checkpoint.stat()
        self.checkpoint_sha256 = checkpoint_hash(checkpoint, known_hash)
        self.hash_record = {"sha256": self.checkpoint_sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        layer = "final" if spec.layer is None else f"block{spec.layer}"
        self.identity = f"{arch}@{self.checkpoint_sha256[:16]}/{layer}"
        self.dim = int(self.embed([Image.new("RGB", (8, 8))]).shape[1])
        self.images_embedded = 0  # counted so tests can prove a cache hit embeds no resynthesis

    def describe(self) -> dict:
        """What the store records about this embedder."""
        return {**asdict(self.spec), "identity": self.identity, "checkpoint_hash": self.hash_record}

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._embed(images)

    def _embed(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start:start + self.batch_size]]).to(self.device)
            if self.spec.layer is None:
                features = self.model.encode_image(batch)
            else:
                result = self.model.visual.forward_intermediates(
                    batch, indices=[self.spec.layer - 1], stop_early=True, intermediates_only=True,
                    output_extra_tokens=True)
                features = result["image_intermediates_prefix"][0][:, 0]
            features = torch.nn.functional.normalize(features.float(), dim=-1)
            out.append(features.cpu().numpy().astype(np.float32))
        self.images_embedded = getattr(self, "images_embedded", 0) + len(images)
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _load_reason(exc: BaseException) -> str:
    """A checkpoint error in one line, without PyTorch's advice to disable safe loading."""
    text = first_line(exc)
    if "weights_only" in str(exc) or "unpickl" in text.lower():
        return "not a readable checkpoint (expected a PyTorch state dict or safetensors file)"
    return text
