"""Tiny, randomly initialised but real models, written as ordinary model folders.

The demo and the tests use these so everything runs offline in seconds. They are
built from configs with the libraries' own classes (as diffusers' and transformers'
fast tests do) and saved with `save_pretrained` / `torch.save`, so they load through
exactly the code path a user's real checkpoints take.
"""
from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# How many BPE merges of open_clip's shipped vocabulary the tiny tokenizers keep:
# enough to tokenize English words into a few pieces, small enough for tiny embeddings.
TINY_BPE_MERGES = 2000

# Portrait descriptions shared by the demo and the synthetic evaluation sets.
DESCRIPTIONS = [
    "head and shoulders portrait of an old man with a grey beard",
    "portrait photo of a young woman with red hair, studio light",
    "a smiling child wearing a blue hat, outdoors",
    "close-up portrait of a man with glasses in a dark room",
    "portrait of a woman with short black hair, soft light",
    "an elderly woman smiling, looking at the camera",
    "a young man with long hair in a park",
    "painting of a woman wearing a green scarf",
    "a bald man with a moustache, black and white photo",
    "portrait of a teenager with freckles and curly hair",
    "a woman in a red dress against a white wall",
    "an old fisherman with a weathered face",
]


@dataclass(frozen=True)
class TinyGenerator:
    """Recipe for one tiny text-to-image "source"; each field changes its fingerprint."""

    name: str
    pipeline: str  # "sd" (StableDiffusionPipeline) or "sdxl" (StableDiffusionXLPipeline)
    weight_seed: int
    scheduler: str
    unet_channels: tuple[int, int] = (32, 64)
    vae_channels: tuple[int, int] = (32, 64)


DEFAULT_GENERATORS: tuple[TinyGenerator, ...] = (
    TinyGenerator("tiny-sd-ddim", "sd", 1, "DDIMScheduler"),
    # The same weights as tiny-sd-ddim with another sampler: the hard case (one model, two services).
    TinyGenerator("tiny-sd-euler", "sd", 1, "EulerDiscreteScheduler"),
    TinyGenerator("tiny-sd-euler-a", "sd", 2, "EulerAncestralDiscreteScheduler", (16, 32), (16, 32)),
    TinyGenerator("tiny-sdxl-euler", "sdxl", 3, "EulerDiscreteScheduler", (8, 16)),
    TinyGenerator("tiny-sdxl-dpm", "sdxl", 4, "DPMSolverMultistepScheduler", (8, 16), (16, 32)),
)

TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


def write_clip_tokenizer(folder: Path, merges: int = TINY_BPE_MERGES) -> None:
    """Write a CLIPTokenizer folder (vocab.json + merges.txt) from open_clip's shipped BPE file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : merges + 1]
    pairs = [tuple(line.split()) for line in lines]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(p) for p in pairs]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))


def _text_encoder_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, projection_dim=32, max_position_embeddings=77,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )


def build_pipeline(spec: TinyGenerator, tokenizer_dir: Path):
    """Instantiate one tiny diffusers pipeline from configs, weights seeded by `spec.weight_seed`."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_config = _text_encoder_config(len(tokenizer))
    scheduler = getattr(diffusers, spec.scheduler).from_config({
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
        "clip_sample": False, "set_alpha_to_one": False})
    torch.manual_seed(spec.weight_seed)
    vae = AutoencoderKL(
        block_out_channels=list(spec.vae_channels), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=2, sample_size=64,
    )
    torch.manual_seed(spec.weight_seed + 1000)
    if spec.pipeline == "sd":
        unet = UNet2DConditionModel(
            block_out_channels=spec.unet_channels, layers_per_block=1, sample_size=32, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=2,
            attention_head_dim=4,
        )
        text_encoder = CLIPTextModel(text_config)
        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if spec.pipeline == "sdxl":
        unet = UNet2DConditionModel(
            block_out_channels=spec.unet_channels, layers_per_block=1, sample_size=32, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=1,
        )
        return diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
        )
    raise ValueError(f"unknown tiny pipeline kind {spec.pipeline!r}")


def write_clip_checkpoint(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny open_clip model config JSON and its checkpoint; return (config, checkpoint)."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "tiny-clip.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=1))
    open_clip.add_model_config(config_path)
    torch.manual_seed(seed)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that random init is random; restored below
    try:
        model = open_clip.create_model("tiny-clip", pretrained=None)
    finally:
        root.setLevel(level)
    checkpoint = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), checkpoint)
    return config_path, checkpoint


CAPTION_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "a an the portrait photo of man woman child old young smiling with red blue green hat glasses "
    "beard hair long short in park studio light dark painting face looking at camera").split()


def write_captioner(folder: Path, kind: str = "blip", seed: int = 0) -> Path:
    """Write a tiny image-captioning folder (model + processor): kind "blip", "git" or "vision-encoder-decoder"."""
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tf.BertTokenizer(vocab={w: i for i, w in enumerate(CAPTION_WORDS)}, bos_token="[CLS]",
                                 sep_token="[SEP]")
    text: dict[str, Any] = {
        "vocab_size": len(CAPTION_WORDS), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
        "num_attention_heads": 4, "bos_token_id": 2, "sep_token_id": 3, "pad_token_id": 0, "eos_token_id": 3}
    vision: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    torch.manual_seed(seed)
    model: Any
    processor: Any
    if kind == "blip":
        model = tf.BlipForConditionalGeneration(tf.BlipConfig(
            vision_config=vision, text_config={**text, "encoder_hidden_size": 32}, projection_dim=32))
        processor = tf.BlipProcessor(image_processor=tf.BlipImageProcessor(size={"height": 32, "width": 32}),
                                     tokenizer=tokenizer)
    elif kind == "git":
        model = tf.GitForCausalLM(tf.GitConfig(vision_config=vision, **text))
        processor = tf.GitProcessor(
            image_processor=tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
            tokenizer=tokenizer)
    elif kind == "vision-encoder-decoder":
        config = tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
            tf.ViTConfig(**vision), tf.BertConfig(**text, is_decoder=True, add_cross_attention=True))
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 0, 3
        model = tf.VisionEncoderDecoderModel(config)
        processor = tf.ViTImageProcessor(size={"height": 32, "width": 32})
        tokenizer.save_pretrained(folder)
    else:
        raise ValueError(f"unknown captioner kind {kind!r}")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_zoo(root: Path, generators: tuple[TinyGenerator, ...] = DEFAULT_GENERATORS) -> dict:
    """Write every tiny model under `root`; return their paths as the user would pass them."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    tokenizer_dir = root / "tokenizer"
    write_clip_tokenizer(tokenizer_dir)
    pipelines = {}
    for spec in generators:
        folder = root / "pipelines" / spec.name
        build_pipeline(spec, tokenizer_dir).save_pretrained(folder)
        pipelines[spec.name] = folder
    clip_config, clip_checkpoint = write_clip_checkpoint(root / "clip")
    captioner = write_captioner(root / "captioner")
    return {"pipelines": pipelines, "clip_config": clip_config, "clip_checkpoint": clip_checkpoint,
            "captioner": captioner}
