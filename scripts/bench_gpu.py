"""Generation and embedding throughput of the project's paths against the raw libraries, on one device.

(a) Generation: `DiffusersGenerator.generate_many` with its default batch size against the same
    diffusers pipeline called directly at batch sizes 3, 6 and 12 (the best of them is "raw").
(b) Embedding, end to end (PIL images in, vectors out): `Embedder.embed` against the raw open_clip
    model under bf16 autocast on ready, preprocessed tensors on the device (an upper bound), and
    against the old path (float32, open_clip's PIL preprocess one image at a time).
Ratios are project / raw throughput (1.0: the project loses nothing to the library it wraps).

Sizes:
  --size tiny (default): the zoo's tiny random pipeline and CLIP (engine/zoo.py); CPU, seconds.
  --size real: SD-1.5-sized UNet / VAE / text encoder built from configs with random weights
      (512 px, 30 steps, fp16 on CUDA) and open_clip ViT-L-14-336 with random weights. No download.

    python scripts/bench_gpu.py [--size tiny|real] [--quick] [--json] [--device cuda]

Timings synchronise the device before reading the clock and follow a warm-up at every batch shape.
Random weights in fp16 can overflow to NaN images; that changes no timing (warnings are silenced).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from engine import zoo  # noqa: E402
from engine.embed import Embedder  # noqa: E402
from engine.generate import DiffusersGenerator, GenerationParams  # noqa: E402

RAW_BATCHES = (3, 6, 12)
SD15_MERGES = 49408 - 512 - 2  # CLIP's full BPE: 512 byte symbols + merges + 2 special tokens


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that random weights are random


# ----- models -----------------------------------------------------------------------------------
def tiny_generator(folder: Path, device: str, steps: int) -> DiffusersGenerator:
    """The zoo's first tiny pipeline, written as a folder and loaded the way a user's pipeline is."""
    zoo.write_clip_tokenizer(folder / "tokenizer")
    spec = zoo.DEFAULT_GENERATORS[0]
    zoo.build_pipeline(spec, folder / "tokenizer").save_pretrained(folder / spec.name)
    return DiffusersGenerator(spec.name, folder / spec.name, GenerationParams(steps=steps), device=device)


def real_generator(folder: Path, device: str, steps: int) -> DiffusersGenerator:
    """Stable Diffusion 1.5 sizes (UNet 860M, VAE 84M, CLIP ViT-L text encoder 123M), random weights,
    512 px; fp16 on CUDA as `load_pipeline` would load it. Handed to a DiffusersGenerator in memory
    (writing ~2 GB to disk and reading it back would only time the disk)."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    zoo.write_clip_tokenizer(folder / "tokenizer", merges=SD15_MERGES)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1))
    scheduler = diffusers.DDIMScheduler.from_config({
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
        "clip_sample": False, "set_alpha_to_one": False})
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device, dtype)
    generator = DiffusersGenerator("sd15-size-random", folder, GenerationParams(steps=steps, size=512), device=device)
    generator._pipe = pipe
    return generator


def clip_model(size: str, folder: Path):
    import open_clip

    if size == "tiny":
        config, checkpoint = zoo.write_clip_checkpoint(folder / "clip")
        arch = config.stem
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(checkpoint))
    else:
        arch = "ViT-L-14-336"
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    return arch, model, preprocess


# ----- (a) generation ---------------------------------------------------------------------------
def bench_generation(generator: DiffusersGenerator, count: int, device: str) -> dict:
    pipe = generator.load()
    params = generator.params
    jobs = [(zoo.DESCRIPTIONS[i % len(zoo.DESCRIPTIONS)], 1000 + i) for i in range(count)]
    default = generator.default_batch_size()

    def raw(batch_jobs, steps=params.steps):
        kwargs = {"height": params.size, "width": params.size} if params.size else {}
        with torch.inference_mode():
            pipe(prompt=[p for p, _ in batch_jobs], num_inference_steps=steps, guidance_scale=params.guidance,
                 generator=[torch.Generator("cpu").manual_seed(s) for _, s in batch_jobs], output_type="pil",
                 **kwargs)

    for size in sorted({*RAW_BATCHES, default}):  # warm-up at every batch shape (kernel choice, allocator)
        raw(jobs[:min(size, count)], steps=2)
    rows = {}
    seconds = timed(lambda: generator.generate_many(jobs), device)
    rows["project"] = {"batch": default, "images": count, "seconds": seconds}
    for size in RAW_BATCHES:
        def run_raw(size=size):
            for start in range(0, count, size):
                raw(jobs[start:start + size])
        rows[f"raw_b{size}"] = {"batch": size, "images": count, "seconds": timed(run_raw, device)}
    for row in rows.values():
        row["images_per_s"] = row["images"] / row["seconds"]
        row["s_per_image"] = row["seconds"] / row["images"]
    best = max((k for k in rows if k.startswith("raw_")), key=lambda k: rows[k]["images_per_s"])
    return {"rows": rows, "raw_best": best, "steps": params.steps, "size": params.size or _side(pipe),
            "ratio_project_over_raw": rows["project"]["images_per_s"] / rows[best]["images_per_s"]}


def _side(pipe) -> int:
    from engine.generate import _default_side

    return _default_side(pipe) or 0


# ----- (b) embedding ----------------------------------------------------------------------------
def bench_embedding(arch, model, preprocess, count: int, side: int, device: str, batch_size: int) -> dict:
    rng = np.random.default_rng(0)
    # Smooth random images (noise upscaled): closer to generated images than white noise.
    images = [Image.fromarray(rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)).resize(
        (side, side), Image.BICUBIC) for _ in range(count)]
    embedder = Embedder.from_model(model, preprocess, arch=arch, layer=None, device=device, batch_size=batch_size)
    cuda = torch.device(device).type == "cuda"
    raw_dtype = torch.bfloat16 if cuda else torch.float32
    ready = [torch.stack([preprocess(im) for im in images[s:s + batch_size]]).to(device)
             for s in range(0, count, batch_size)]

    def raw():
        with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=raw_dtype, enabled=cuda):
            out = [torch.nn.functional.normalize(embedder.model.encode_image(b).float(), dim=-1) for b in ready]
        return torch.cat(out)

    def old():
        with torch.inference_mode():
            return embedder._embed_exact(images)

    warm = images[:batch_size]
    for fn in (lambda: embedder.embed(warm), raw, lambda: embedder._embed_exact(warm)):
        with torch.inference_mode():
            timed(fn, device)  # warm-up
    project_vectors = {}
    rows = {"project": {"seconds": timed(lambda: project_vectors.setdefault("v", embedder.embed(images)), device)},
            "raw_bf16_ready_tensors" if cuda else "raw_fp32_ready_tensors": {"seconds": timed(raw, device)}}
    old_vectors = {}
    rows["old_fp32_pil_serial"] = {"seconds": timed(lambda: old_vectors.setdefault("v", old()), device)}
    for row in rows.values():
        row["images"] = count
        row["images_per_s"] = count / row["seconds"]
    raw_key = next(k for k in rows if k.startswith("raw_"))
    a, b = project_vectors["v"], old_vectors["v"]
    path = "exact (CPU)" if not cuda else ("device transform" if embedder.device_transform else "thread pool")
    return {"rows": rows, "arch": arch, "batch": batch_size, "image_side": side, "project_path": path,
            "autocast": str(embedder.autocast_dtype).replace("torch.", "") if cuda else "none (fp32)",
            "ratio_project_over_raw": rows["project"]["images_per_s"] / rows[raw_key]["images_per_s"],
            "speedup_project_over_old": rows["project"]["images_per_s"] / rows["old_fp32_pil_serial"]["images_per_s"],
            "min_cosine_project_vs_old": float(np.min(np.sum(a * b, axis=1)))}


# ----- main -------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--quick", action="store_true", help="fewer images (CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gen-images", type=int, help="images per generation run (a multiple of 12)")
    parser.add_argument("--embed-images", type=int, help="images per embedding run")
    parser.add_argument("--embed-batch", type=int, default=32, help="Embedder batch size (the project's default)")
    parser.add_argument("--steps", type=int, help="inference steps (default: 30 real, 2 tiny)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (a busy shared CPU runs faster on 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    real = args.size == "real"
    steps = args.steps or (30 if real else 2)
    gen_images = args.gen_images or ((12 if args.quick else 24) if real else (6 if args.quick else 24))
    embed_images = args.embed_images or ((128 if args.quick else 512) if real else (32 if args.quick else 256))
    result = {"device": device_name(args.device), "torch": torch.__version__, "size": args.size}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        started = time.perf_counter()
        build = real_generator if real else tiny_generator
        generator = build(Path(tmp), args.device, steps)
        generator.load()
        result["build_seconds_generator"] = time.perf_counter() - started
        result["generation"] = bench_generation(generator, gen_images, args.device)
        progress("generation", result["generation"])
        generator.unload()
        del generator
        started = time.perf_counter()
        arch, model, preprocess = clip_model(args.size, Path(tmp))
        result["build_seconds_clip"] = time.perf_counter() - started
        result["embedding"] = bench_embedding(arch, model, preprocess, embed_images, 512 if real else 128,
                                              args.device, args.embed_batch)
        progress("embedding", result["embedding"])
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


def progress(phase: str, data: dict) -> None:
    """Each phase's figures on stderr as soon as it ends (a later failure keeps them)."""
    print(f"[{phase}] {json.dumps(data)}", file=sys.stderr, flush=True)


def print_table(result: dict) -> None:
    gen, emb = result["generation"], result["embedding"]
    print(f"device: {result['device']}  torch {result['torch']}  size: {result['size']}")
    print(f"(a) generation, {gen['size']} px, {gen['steps']} steps, same pipeline:")
    for name, row in gen["rows"].items():
        mark = "  <- best raw" if name == gen["raw_best"] else ""
        print(f"    {name:<24} batch {row['batch']:>3}  {row['images_per_s']:8.2f} images/s  "
              f"{row['s_per_image']:7.3f} s/image{mark}")
    print(f"    ratio project/raw (throughput): {gen['ratio_project_over_raw']:.3f}")
    print(f"(b) embedding {emb['arch']}, {emb['image_side']} px PIL images in, vectors out, batch {emb['batch']} "
          f"(project: {emb['project_path']}, autocast {emb['autocast']}):")
    for name, row in emb["rows"].items():
        print(f"    {name:<24} {row['images_per_s']:9.1f} images/s")
    print(f"    ratio project/raw (throughput): {emb['ratio_project_over_raw']:.3f}   "
          f"project/old: {emb['speedup_project_over_old']:.2f}x   "
          f"min cosine project vs old: {emb['min_cosine_project_vs_old']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
