"""Single-file checkpoints of the SDXL and Flux layouts generate what their folder forms generate.

The models are tiny and random, built here from configs as diffusers' own fast tests build them (fixed
seeds, offline): an SDXL pipeline whose two text encoders differ in width (diffusers tells SDXL's encoders
apart by width, as real SDXL's 768 and 1280 are), and a Flux pipeline (CLIP + T5 with local tokenizers,
a two-double-block, two-single-block transformer). Their files are written by `export_single_file`: the
SDXL one in the original SGM layout, the Flux one as users hold flux1-dev.safetensors (the transformer
alone, in Black Forest Labs' layout). Generation is 2 steps at 32 px on the CPU, compared pixel for pixel.
"""
from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import sources, zoo
from engine.errors import UserError
from engine.generate import DiffusersGenerator, GenerationParams
from engine.sources.flux_file import bfl_to_diffusers, diffusers_to_bfl
from engine.sources.single_file import export_single_file
from tests.helpers import run_cli

PROMPT = "portrait of an old man with a beard"
SEEDS = [3, 4]
RECIPE = {"steps": 2, "size": 32}


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def config_only(folder: Path, target: Path, keep: tuple[str, ...] = ()) -> Path:
    """A copy of a pipeline folder without weights, but for the components named in `keep`."""
    shutil.copytree(folder, target, ignore=lambda d, names: [] if Path(d).name in keep else
                    [n for n in names if n.endswith((".safetensors", ".bin"))])
    return target


def _clip_config(vocab: int, hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, projection_dim=projection, max_position_embeddings=77,
                          bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)


def write_tiny_sdxl(root: Path) -> Path:
    """An SDXL folder whose text encoders are 32 and 64 wide (UNet cross-attention 96, pooled projection 48)."""
    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    zoo.write_clip_tokenizer(root / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    torch.manual_seed(11)
    first = CLIPTextModel(_clip_config(len(tokenizer), 32, 32))
    second = CLIPTextModelWithProjection(_clip_config(len(tokenizer), 64, 48))
    vae = diffusers.AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  norm_num_groups=2, sample_size=32)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 48, cross_attention_dim=32 + 64,
        norm_num_groups=1)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1)
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=first, text_encoder_2=second, tokenizer=tokenizer,
                                               tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(root / "sdxl")
    return root / "sdxl"


def write_t5_tokenizer(folder: Path):
    """A T5 (unigram) tokenizer with a few dozen pieces: letters, and whole words of the test prompts."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ",.-'"]
    pieces += [("\u2581" + c, -4.0) for c in string.ascii_lowercase]
    pieces += [("\u2581" + w, -1.0) for w in "a an of with portrait man woman old young hair beard photo".split()]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_tiny_flux(root: Path) -> Path:
    """A FLUX.1-dev-like folder (guidance embedding): transformer 2 double + 2 single blocks, 2 heads of 16."""
    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    zoo.write_clip_tokenizer(root / "clip-tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(root / "clip-tokenizer")
    t5_tokenizer = write_t5_tokenizer(root / "t5-tokenizer")
    torch.manual_seed(21)
    clip = CLIPTextModel(_clip_config(len(tokenizer), 32, 32))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=24, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=3, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    vae = diffusers.AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                                  layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                                  use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                           tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                           transformer=transformer).save_pretrained(root / "flux")
    return root / "flux"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("layouts")
    sdxl, flux = write_tiny_sdxl(root), write_tiny_flux(root)
    return {"root": root, "sdxl": sdxl, "flux": flux,
            "sdxl-file": export_single_file(sdxl, root / "sdxl.safetensors"),
            "sdxl-config": config_only(sdxl, root / "sdxl-config"),
            "flux-file": export_single_file(flux, root / "flux1-tiny.safetensors"),
            # what a user downloads beside flux1-dev.safetensors: all but the transformer's weights
            "flux-config": config_only(flux, root / "flux-config", keep=("text_encoder", "text_encoder_2", "vae"))}


def folder_pixels(folder: Path) -> np.ndarray:
    return pixels(DiffusersGenerator("folder", folder, GenerationParams(**RECIPE)).generate(PROMPT, SEEDS))


@pytest.mark.parametrize("layout", ["sdxl", "flux"])
def test_single_file_generates_what_its_folder_does(models, made, layout, tmp_path):
    file, config = made[f"{layout}-file"], made[f"{layout}-config"]
    denoiser = config / ("unet" if layout == "sdxl" else "transformer")
    assert not list(denoiser.glob("*.safetensors"))  # the denoiser's weights can only come from the file
    with engine.init(tmp_path / "store", clip_config=models["clip_config"],
                     clip_checkpoint=models["clip_checkpoint"]) as ws:
        info = ws.add_source("one-file", kind="single-file", path=file, config=config, **RECIPE)
        single = pixels(ws.generator("one-file").generate(PROMPT, SEEDS))
        with pytest.raises(UserError, match="already uses this checkpoint"):
            ws.add_source("again", kind="single-file", path=file, config=config, **RECIPE)
        assert ws.add_source("other", kind="single-file", path=file, config=config, steps=3,
                             size=32)["fingerprint"] != info["fingerprint"]
    assert np.array_equal(single, folder_pixels(made[layout]))  # same weights, same seeds: the same pixels
    assert single.std() > 1  # not a blank image that any two models would share


def test_flux_file_is_bfl_layout_and_converts_back_through_diffusers(made):
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    tensors = load_file(str(made["flux-file"]))
    for key in ("double_blocks.1.img_attn.qkv.weight", "double_blocks.0.txt_attn.norm.key_norm.scale",
                "single_blocks.1.linear1.weight", "single_blocks.0.linear2.bias", "img_in.weight", "txt_in.bias",
                "time_in.in_layer.weight", "vector_in.out_layer.bias", "guidance_in.in_layer.weight",
                "final_layer.adaLN_modulation.1.weight"):
        assert key in tensors
    assert tensors["single_blocks.0.linear1.weight"].shape == (3 * 32 + 4 * 32, 32)  # q, k, v and the MLP, fused
    state = FluxTransformer2DModel.from_pretrained(made["flux"], subfolder="transformer").state_dict()
    prefixed = {"model.diffusion_model." + k: v for k, v in tensors.items()}  # as ComfyUI saves it
    for layout in (tensors, prefixed):
        back = bfl_to_diffusers(layout)
        assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert set(diffusers_to_bfl(state)) == set(tensors)
    with pytest.raises(UserError, match="not a complete Flux transformer"):
        bfl_to_diffusers({k: v for k, v in tensors.items() if k != "final_layer.linear.bias"})
    with pytest.raises(UserError, match="unexpected tensors"):  # e.g. a scaled-fp8 file's per-tensor scales
        bfl_to_diffusers({**tensors, "double_blocks.0.img_attn.qkv.scale_weight": torch.ones(1)})


def _flux_config_with(made, tmp_path, **changes) -> Path:
    folder = config_only(made["flux-config"], tmp_path / "changed", keep=("text_encoder", "text_encoder_2", "vae"))
    path = folder / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


def test_layout_mismatches_are_refused_in_one_line(models, made, tmp_path):
    import torch

    kind = sources.get("single-file")
    sd_config = config_only(models["pipelines"]["tiny-sd-ddim"], tmp_path / "sd-config")
    cases = [
        (made["flux-file"], sd_config, "is in the Flux layout but .* holds a StableDiffusionPipeline"),
        (made["sdxl-file"], made["flux-config"], "is in the SDXL layout but .* holds a FluxPipeline"),
        (made["sdxl-file"], sd_config, "is in the SDXL layout but .* holds a StableDiffusionPipeline"),
        (export_single_file(models["pipelines"]["tiny-sd-ddim"], tmp_path / "sd.safetensors"), made["sdxl-config"],
         "is in the SD 1.x layout but .* holds a StableDiffusionXLPipeline"),
        (made["flux-file"], _flux_config_with(made, tmp_path, guidance_embeds=False),
         "guidance embedding True .* schnell"),
        (made["flux-file"], _flux_config_with(made, tmp_path / "b", num_single_layers=3), "single blocks 2"),
    ]
    from safetensors.torch import load_file, save_file

    whole = tmp_path / "all-in-one.safetensors"  # transformer and VAE in one file: not the layout handled
    vae = load_file(str(next((made["flux"] / "vae").glob("*.safetensors"))))
    save_file({**load_file(str(made["flux-file"])), **{"vae." + k: v for k, v in vae.items()}}, str(whole))
    cases.append((whole, made["flux-config"], "holds more than a Flux transformer"))
    # each passed the block counts at source add and failed at every generation
    tensors = load_file(str(made["flux-file"]))
    inner = next(k for k in tensors if k.startswith("double_blocks.1.") and k.endswith(".bias"))
    for label, changed, message in (
            ("missing", {k: v for k, v in tensors.items() if k != inner}, f"tensor '{inner}' missing"),
            ("wider", {**tensors, inner: torch.ones(tensors[inner].shape[0] + 1)}, r"1 tensors differ .* where the "
             r"config makes"),
            ("scaled", {**tensors, "scaled_fp8": torch.ones(0), "double_blocks.0.img_attn.qkv.scale_weight":
                        torch.ones(())}, "is a scaled-fp8 file")):
        save_file(changed, str(tmp_path / f"{label}.safetensors"))
        cases.append((tmp_path / f"{label}.safetensors", made["flux-config"], message))
    for file, config, message in cases:
        with pytest.raises(UserError, match=message) as caught:
            kind.prepare("x", file, config=config, **RECIPE)
        assert "\n" not in str(caught.value)


def test_sdxl_export_refuses_equally_wide_text_encoders(models, tmp_path):
    """The zoo's SDXL folders have two 32-wide encoders: a file of them would load the first into both."""
    with pytest.raises(UserError, match="equally wide"):
        export_single_file(models["pipelines"]["tiny-sdxl-euler"], tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_cli_enrols_a_flux_file_with_its_config(models, made, tmp_path, capsys):
    store = tmp_path / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"]) == 0
    assert run_cli("source", "add", "my-flux", made["flux-file"], "--config", made["flux-config"], "--steps", 2,
                   "--guidance", 3.5, "--store", store) == 0
    assert run_cli("source", "add", "wrong", made["flux-file"], "--config", made["sdxl-config"],
                   "--store", store) == 2
    assert "is in the Flux layout but" in capsys.readouterr().err
    with engine.open(store) as ws:
        rows = {r["name"]: r for r in ws.list_sources()}
    assert rows["my-flux"]["kind"] == "single-file" and rows["my-flux"]["params"]["guidance"] == 3.5


def test_flux1_dev_widths_convert_through_diffusers_unpadded(tmp_path):
    """At FLUX.1-dev's real config (19 + 38 blocks, width 3072; shapes only, on the meta device) the exported
    names and shapes are what diffusers' converter takes as is, and what the header check accepts."""
    import torch
    from diffusers import FluxTransformer2DModel

    from engine.sources.flux_file import check_flux_file

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    state = model.state_dict()
    bfl = diffusers_to_bfl(state)
    assert bfl["single_blocks.37.linear1.weight"].shape == (3 * 3072 + 12288, 3072)
    assert bfl["double_blocks.18.img_attn.qkv.weight"].shape == (3 * 3072, 3072)
    back = bfl_to_diffusers(bfl)
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(dict(model.config)))
    header = {k: {"dtype": "BF16", "shape": list(v.shape)} for k, v in bfl.items()}
    check_flux_file("flux1-dev.safetensors", header, tmp_path)
    schnell = {k: v for k, v in header.items() if not k.startswith("guidance_in.")}
    with pytest.raises(UserError, match="guidance embedding False"):
        check_flux_file("flux1-schnell.safetensors", schnell, tmp_path)


def test_gpu_dtype_is_bfloat16_for_the_families_that_overflow_float16(monkeypatch):
    """Flux (and SD3, ...) make black or NaN images in float16: on a GPU with bfloat16 they run in it, folder
    or single file alike; the UNet families keep float16; the CPU stays float32 (None)."""
    import torch

    from engine.generate import pipeline_dtype

    assert pipeline_dtype("FluxPipeline", "cpu") is None and pipeline_dtype("FluxPipeline", None) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pipeline_dtype("FluxPipeline", "cuda") is torch.bfloat16
    assert pipeline_dtype("StableDiffusion3Pipeline", "cuda:1") is torch.bfloat16
    assert pipeline_dtype("StableDiffusionXLPipeline", "cuda") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pipeline_dtype("FluxPipeline", "cuda") is torch.float16


def test_flux_loras_are_checked_against_the_transformer(models, made, tmp_path):
    """Flux LoRAs in diffusers' names and in kohya's (fused qkv, split by diffusers' converter) are enrolled on
    a Flux folder; an SD LoRA, or one with blocks the transformer lacks, loaded as nothing or in part: refused."""
    import torch
    from safetensors.torch import save_file

    from engine.sources.lora import Lora
    from engine.sources.single_file import safetensors_header

    header = safetensors_header(next((made["flux"] / "transformer").glob("*.safetensors")))
    named = {}
    for key, entry in header.items():
        if key.endswith((".attn.to_q.weight", ".attn.to_k.weight", ".attn.to_v.weight")):
            out, inp = entry["shape"]
            named[f"transformer.{key[:-len('.weight')]}.lora_A.weight"] = torch.randn(4, inp)
            named[f"transformer.{key[:-len('.weight')]}.lora_B.weight"] = torch.randn(out, 4)
    kohya = {f"lora_unet_double_blocks_{b}_{stream}_attn_qkv.{part}": tensor for b in range(2)
             for stream in ("img", "txt") for part, tensor in (("lora_down.weight", torch.randn(4, 32)),
                                                               ("lora_up.weight", torch.randn(96, 4)),
                                                               ("alpha", torch.tensor(4.0)))}
    extra = {f"lora_unet_double_blocks_5_img_attn_qkv.{part}": tensor for part, tensor in (
        ("lora_down.weight", torch.randn(4, 32)), ("lora_up.weight", torch.randn(96, 4)), ("alpha", torch.tensor(4.0)))}
    sd = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 64),
          "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(64, 4)}
    for name, tensors, refusal in (("named", named, None), ("kohya", kohya, None),
                                   ("extra", kohya | extra, r"match no layer of flux \(e\.g\. transformer\."
                                                            r"transformer_blocks\.5\."),
                                   ("sd", sd, r"2 of 2 LoRA tensors match no layer of flux")):
        file = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(file))
        if refusal is None:
            Lora().prepare(name, made["flux"], lora=str(file), steps=2)
        else:
            with pytest.raises(UserError, match=refusal):
                Lora().prepare(name, made["flux"], lora=str(file), steps=2)


def test_ldm_files_missing_a_part_are_told_from_their_header(models, made, tmp_path, capsys):
    """A checkpoint saved without its VAE (or text encoder), or with a UNet tensor missing or of another shape,
    passed `source add` and failed at every generation inside from_single_file. `check_ldm_parts` tells each
    from the header (for single_file.check_layout to call beside check_widths); whole files pass."""
    import torch
    from safetensors.torch import load_file, save_file

    from engine.sources.ldm_export import check_ldm_parts
    from engine.sources.single_file import safetensors_header

    sd = export_single_file(models["pipelines"]["tiny-sd-ddim"], tmp_path / "sd.safetensors")
    check_ldm_parts("sd", safetensors_header(sd), models["pipelines"]["tiny-sd-ddim"])
    check_ldm_parts("sdxl", safetensors_header(made["sdxl-file"]), made["sdxl-config"])
    tensors = load_file(str(made["sdxl-file"]))
    unet_bias = next(k for k in tensors if k.startswith("model.diffusion_model.output_blocks.") and k.endswith("bias"))
    for label, changed, message in (
            ("no-vae", {k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")},
             r"holds no VAE \(first_stage_model\.\* tensors\)"),
            ("no-clip-g", {k: v for k, v in tensors.items() if not k.startswith("conditioner.embedders.1.")},
             "holds no second text encoder"),
            ("cut-unet", {k: v for k, v in tensors.items() if k != unet_bias}, "1 UNet tensors differ .* missing"),
            ("inpaint", {**tensors, "model.diffusion_model.input_blocks.0.0.weight": torch.ones(8, 9, 3, 3)},
             r"1 UNet tensors differ \(e\.g\. conv_in\.weight \(8, 9, 3, 3\) where the config makes \(8, 4, 3, 3\)")):
        save_file(changed, str(tmp_path / f"{label}.safetensors"))
        with pytest.raises(UserError, match=message) as caught:
            check_ldm_parts(label, safetensors_header(tmp_path / f"{label}.safetensors"), made["sdxl-config"])
        assert "\n" not in str(caught.value)
    store = tmp_path / "store"  # and `source add` refuses it before anything is enrolled
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--quiet") == 0
    capsys.readouterr()
    assert run_cli("source", "add", "no-vae", tmp_path / "no-vae.safetensors", "--config", made["sdxl-config"],
                   "--store", store) == 2
    assert "holds no VAE" in capsys.readouterr().err
    with engine.open(store) as ws:
        assert ws.list_sources() == []
    # a v-prediction file (NoobAI-XL V-Pred's marks) made noise on an epsilon scheduler without a word
    save_file({**tensors, "v_pred": torch.ones(0), "ztsnr": torch.ones(0)}, str(tmp_path / "vpred.safetensors"))
    header = safetensors_header(tmp_path / "vpred.safetensors")
    with pytest.raises(UserError, match=r"v-prediction checkpoint \(its v_pred and ztsnr mark\).*\"prediction_type\": "
                                        r"\"v_prediction\" \(it has 'epsilon'\) and \"rescale_betas_zero_snr\": true"):
        check_ldm_parts("vpred", header, made["sdxl-config"])
    vconfig = config_only(made["sdxl-config"], tmp_path / "v-config")
    scheduler = vconfig / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction",
                                     "rescale_betas_zero_snr": True}))
    check_ldm_parts("vpred", header, vconfig)
