"""The GPU-throughput paths, checked on the CPU: batching across descriptions changes no image,
CPU embeddings are bit-identical to open_clip's reference path, the device-side preprocessing
matches open_clip's PIL preprocessing, and scripts/bench_gpu.py runs and prints its ratios."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.embed import DeviceTransform, Embedder, EmbedderSpec
from engine.generate import DiffusersGenerator, GenerationParams

ROOT = Path(__file__).resolve().parent.parent


def _images(seed: int = 0) -> list[Image.Image]:
    """Smooth and noisy RGB images of several shapes, and the modes PIL resizes differently."""
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((160, 120), Image.BICUBIC)
    noise = Image.fromarray(rng.integers(0, 256, (90, 50, 3), dtype=np.uint8))
    square = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (70, 80, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8), "L")
    return [smooth, noise, square, rgba, grey, Image.new("RGB", (8, 8), "red")]


@pytest.mark.parametrize("name", ["tiny-sd-euler-a", "tiny-sdxl-dpm"])
def test_generate_many_is_identical_to_one_image_at_a_time_on_cpu(models, name):
    params = GenerationParams(steps=2, negative_prompt="blurry")
    generator = DiffusersGenerator(name, models["pipelines"][name], params, device="cpu")
    assert generator.default_batch_size() == 1  # CPU: grouping never changes a pixel
    jobs = [("a portrait of an old man", 7), ("a child in a blue hat", 8), ("a portrait of an old man", 9)]
    many = generator.generate_many(jobs)
    assert generator.calls == len(jobs) and len(many) == len(jobs)
    for (prompt, seed), image in zip(jobs, many):
        alone = generator.generate(prompt, [seed])[0]
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(alone))
    assert not np.array_equal(np.asarray(many[0]), np.asarray(many[2]))  # the seed matters
    # An explicit larger batch (what CUDA uses) draws the same noise: equal up to BLAS rounding.
    batched = generator.generate_many(jobs, batch_size=2)
    assert max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() for a, b in zip(batched, many)) <= 1
    assert generator.generate_many([]) == []


def test_default_batch_size_on_cuda_follows_free_memory_and_image_size(monkeypatch):
    free = {"bytes": 79 << 30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))

    def batch(size):
        return DiffusersGenerator("x", Path("."), GenerationParams(size=size), device="cuda").default_batch_size()

    assert batch(512) == 12 and batch(None) == 12  # no pipeline loaded: 512 px assumed
    assert batch(1024) == 3 and batch(256) == 48 and batch(64) == 64
    free["bytes"] = 20 << 30
    assert batch(512) == 3
    free["bytes"] = 1 << 30
    assert batch(1024) == 1


def test_cpu_embeddings_are_bit_identical_to_the_open_clip_reference(models):
    import open_clip

    for layer in (None, 2):
        embedder = Embedder(EmbedderSpec("tiny-clip", str(models["clip_checkpoint"]), str(models["clip_config"]),
                                         layer=layer), device="cpu")
        assert not embedder.cuda and embedder.autocast_dtype is None
        model, _, preprocess = open_clip.create_model_and_transforms(
            "tiny-clip", pretrained=str(models["clip_checkpoint"]))
        images = _images()
        with torch.inference_mode():
            batch = torch.stack([preprocess(im) for im in images])
            if layer is None:
                features = model.eval().encode_image(batch)
            else:
                features = model.eval().visual.forward_intermediates(
                    batch, indices=[layer - 1], stop_early=True, intermediates_only=True,
                    output_extra_tokens=True)["image_intermediates_prefix"][0][:, 0]
            reference = torch.nn.functional.normalize(features, dim=-1).numpy()
        got = embedder.embed(images)
        assert got.dtype == np.float32 and np.array_equal(got, reference)


def test_device_transform_matches_open_clip_pil_preprocess():
    import open_clip

    for side in (336, 64):
        preprocess = open_clip.image_transform(side, is_train=False)
        transform = DeviceTransform.from_preprocess(preprocess)
        assert transform is not None and transform.interpolation == "bicubic" and transform.crop == (side, side)
        images = [im for im in _images(1) if im.mode == "RGB"]
        images.append(Image.fromarray(np.random.default_rng(2).integers(0, 256, (512, 512, 3), dtype=np.uint8)))
        reference = torch.stack([preprocess(im) for im in images])
        pixels = [torch.from_numpy(np.asarray(im).copy())[None] for im in images]
        got = transform(pixels)
        levels = ((got - reference) * torch.tensor(transform.std).view(1, 3, 1, 1) * 255).abs()
        assert got.shape == reference.shape and got.dtype == torch.float32
        assert levels.max() <= 2.01 and levels.mean() < 0.01  # PIL rounds fixed-point weights: a level a pass
    assert DeviceTransform.from_preprocess(open_clip.image_transform(224, is_train=True)) is None


def test_device_and_pooled_paths_agree_with_the_exact_path(models):
    """The CUDA paths' code, run on the CPU in float32: the device transform agrees to rounding,
    the thread-pooled PIL preprocess exactly."""
    embedder = Embedder(EmbedderSpec("tiny-clip", str(models["clip_checkpoint"]), str(models["clip_config"])),
                        device="cpu", batch_size=4)
    images = _images(3)
    exact = embedder.embed(images)
    embedder.device_transform = DeviceTransform.from_preprocess(embedder.preprocess)
    with torch.inference_mode():
        device = embedder._embed_device(images)
        pooled = embedder._embed_pooled(images)
    assert np.array_equal(pooled, exact)
    assert device.shape == exact.shape and np.min(np.sum(device * exact, axis=1)) > 0.999
    assert np.array_equal(device[3:5], exact[3:5])  # RGBA and L go through PIL's own preprocess
    embedder._pool.shutdown()


def test_bench_gpu_tiny_quick_prints_ratios():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--size", "tiny", "--quick",
                           "--threads", "1", "--device", "cpu", "--json"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    gen, emb = result["generation"], result["embedding"]
    assert {"project", "raw_b3", "raw_b6", "raw_b12"} <= set(gen["rows"]) and gen["ratio_project_over_raw"] > 0
    assert {"project", "old_fp32_pil_serial"} <= set(emb["rows"]) and emb["ratio_project_over_raw"] > 0
    assert emb["min_cosine_project_vs_old"] > 0.9999  # on the CPU the project's path is the exact one
    from scripts.bench_gpu import print_table  # noqa: PLC0415  (the table form prints the same ratios)

    print_table(result)
