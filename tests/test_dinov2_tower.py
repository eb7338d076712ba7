"""scripts/dinov2_openclip.py: a DINOv2 image tower (transformers' weights and names) becomes an open_clip
model the engine loads like any CLIP, with the very features transformers computes (class token after a
block, and the final embedding). Checked on a tiny random DINOv2, so it needs no download."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.embed import Embedder, EmbedderSpec

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("dinov2_openclip", ROOT / "scripts" / "dinov2_openclip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_dinov2_tower_gives_transformers_features_through_the_engine(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(3)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=28, layerscale_value=0.5)
    reference = Dinov2Model(config).eval()
    hf = {k: v.numpy() for k, v in reference.state_dict().items()}
    config_path, checkpoint = _script().write_model(hf, tmp_path / "model", "tiny-dinov2", heads=2, image_size=28)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(3)]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = torch.stack([torch.from_numpy(np.asarray(im, np.float32)) for im in images]).permute(0, 3, 1, 2) / 255
    with torch.inference_mode():
        out = reference(pixel_values=(pixels - mean) / std, output_hidden_states=True)
    expected = {1: out.hidden_states[1][:, 0], None: out.pooler_output}
    for layer, want in expected.items():
        spec = EmbedderSpec("tiny-dinov2", str(checkpoint), str(config_path), layer)
        got = Embedder(spec, device="cpu").embed(images)
        want = torch.nn.functional.normalize(want, dim=-1).numpy()
        assert (got * want).sum(1).min() > 0.99999, layer
