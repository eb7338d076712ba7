"""Flux LoRAs: `source add` accepts what diffusers applies whole and refuses what it would apply in part.

Each row is a LoRA file in one of the formats diffusers' Flux loader converts (peft names, kohya `lora_unet_`
and `lora_te_`, ComfyUI `diffusion_model.`, the "mixture" `lora_transformer_` names) with, beside a core that
loads, the extra tensors real exports carry. The same file is then loaded by diffusers itself into a tiny Flux
pipeline (a one-double-block, one-single-block transformer and a one-layer CLIP, nothing else): the extra
landed when the adapter it made has more tensors than the core's alone. diffusers dropped every refused extra
here (its converter filters them, most with only an INFO line, or its loader skips them), so a source of such a
file would have been a part of the adapter its images are attributed to.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import UserError

ATTN = "transformer.transformer_blocks.0.attn."
CLIP = "text_model.encoder.layers.0."


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    """A FluxPipeline folder of a transformer (inner width 32, MLP 128) and a CLIP text encoder (width 32, MLP 37)."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=32))
    pipe = diffusers.FluxPipeline(scheduler=None, vae=None, text_encoder=clip, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=transformer)
    folder = tmp_path_factory.mktemp("lora-flux") / "flux"
    pipe.save_pretrained(folder)
    return folder, pipe


def _factors(module: str, out: int, inp: int, kohya: bool, alpha: float | None = None, rank: int = 4) -> dict:
    import torch

    down, up = ("lora_down", "lora_up") if kohya else ("lora_A", "lora_B")
    tensors = {f"{module}.{down}.weight": torch.randn(rank, inp), f"{module}.{up}.weight": torch.randn(out, rank)}
    if alpha is not None:
        tensors[f"{module}.alpha"] = torch.tensor(alpha)
    return tensors


def _cores() -> dict[str, dict]:
    kohya = _factors("lora_unet_double_blocks_0_img_attn_qkv", 96, 32, True, 2.0)  # split into to_q/k/v
    kohya |= _factors("lora_unet_double_blocks_0_img_attn_proj", 32, 32, True, 2.0)
    kohya |= _factors("lora_unet_single_blocks_0_linear2", 32, 160, True)
    peft = {}
    for layer in ("to_q", "to_k", "add_q_proj", "to_out.0"):
        peft |= _factors(ATTN + layer, 32, 32, False)
    mixture = _factors("lora_transformer_transformer_blocks_0_attn_to_q", 32, 32, True, 4.0)
    return {"kohya": kohya, "peft": peft, "mixture": mixture}


def _rows() -> list[tuple[str, str, dict, str | None]]:
    """(label, core, extra tensors, refusal): a refusal of None means the extra lands whole."""
    import torch

    t5 = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"
    return [
        ("kohya", "kohya", {}, None),
        ("kohya + CLIP (lora_te_)", "kohya", _factors("lora_te_text_model_encoder_layers_0_mlp_fc1", 37, 32, True, 2.0),
         None),
        ("kohya + zero diff_b", "kohya", {"lora_unet_double_blocks_0_img_attn_proj.diff_b": torch.zeros(32)}, None),
        ("kohya + diff_b", "kohya", {"lora_unet_double_blocks_0_img_attn_proj.diff_b": torch.randn(32)},
         r"drops 1 of 9 tensors .*lora_unet_double_blocks_0_img_attn_proj\.diff_b"),
        ("ComfyUI + norm diff", "kohya", {"diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff":
                                          torch.randn(16)}, r"drops 1 of 9 tensors .*query_norm\.scale\.diff"),
        ("kohya + T5", "kohya", {f"{t5}.lora_down.weight": torch.randn(4, 24), f"{t5}.lora_up.weight":
                                 torch.randn(24, 4)}, r"drops 2 of 10 tensors .*t5xxl"),
        # an untrained module (lora_up all zeros, lora_down random, as kohya initialises it) changes nothing
        ("kohya + zero-product T5", "kohya", {f"{t5}.lora_down.weight": torch.randn(4, 24), f"{t5}.alpha":
                                              torch.tensor(4.0), f"{t5}.lora_up.weight": torch.zeros(24, 4)}, None),
        ("kohya + lora_te2_", "kohya", _factors("lora_te2_encoder_block_0_layer_0_SelfAttention_q", 24, 24, True, 1.0),
         r"drops 3 of 11 tensors"),
        ("kohya + position embedding", "kohya",
         _factors("lora_te1_text_model_embeddings_position_embedding", 32, 77, True), r"position_embedding"),
        ("kohya + final layer", "kohya", _factors("lora_unet_final_layer_linear", 4, 32, True),
         r"2 of 12 LoRA tensors match no layer .*proj_out\.lora_A.*named for no part"),
        # diffusers' converter names the tensors it cannot place after its first line: the refusal names them too
        ("kohya + unknown name", "kohya", _factors("lora_unet_foo_bar", 32, 32, True),
         r"Incompatible keys detected: lora_unet_foo_bar\.lora_down\.weight"),
        ("kohya + block 5", "kohya", _factors("lora_unet_double_blocks_5_img_attn_proj", 32, 32, True),
         r"match no layer of flux \(e\.g\. transformer\.transformer_blocks\.5\..*another base model"),
        ("peft", "peft", {}, None),
        ("peft + CLIP + alpha", "peft", _factors("text_encoder." + CLIP + "self_attn.q_proj", 32, 32, False, 2.0),
         None),
        ("peft + lora_B biases", "peft", {ATTN + f"{layer}.lora_B.bias": torch.randn(32)
                                          for layer in ("to_q", "to_k", "add_q_proj", "to_out.0")}, None),
        # peft has no lora_A bias (diffusers leaves it out); a lora_B bias is one per output feature
        ("peft + lora_A biases", "peft", {ATTN + f"{layer}.lora_A.bias": torch.randn(4)
                                          for layer in ("to_q", "to_k", "add_q_proj", "to_out.0")},
         r"4 of 12 LoRA tensors are biases of a factor other than lora_B"),
        ("peft + misshaped lora_B biases", "peft", {ATTN + f"{layer}.lora_B.bias": torch.randn(7)
                                                    for layer in ("to_q", "to_k", "add_q_proj", "to_out.0")},
         r"4 of 12 LoRA tensors do not fit .*lora_B\.bias \[7\] on a \[32, 32\] layer"),
        # diffusers gives every layer a lora_B bias when one has it: the others stay on the meta device
        ("peft + one lora_B bias", "peft", {ATTN + "to_q.lora_B.bias": torch.randn(32)},
         r"3 adapted layers have no lora_B bias .*every generation fails"),
        # diffusers' text-encoder loader reads peft names only beside attention ones, and kohya's Flux converter
        # names CLIP attention so that it reads none: it raises on both, as resynth's check does
        ("peft + CLIP MLP alone", "peft", _factors("text_encoder." + CLIP + "mlp.fc1", 37, 32, False),
         r"diffusers cannot read this LoRA's tensor names for flux \(text_encoder\)"),
        ("kohya + CLIP attention", "kohya", _factors("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32,
                                                     True), r"cannot read this LoRA's tensor names .*text_encoder"),
        ("peft + kohya CLIP", "peft", _factors("lora_te_text_model_encoder_layers_0_mlp_fc1", 37, 32, True),
         r"drops 2 of 10 tensors .*lora_te_text_model"),
        ("peft + T5", "peft", _factors("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q", 24, 24, False),
         r"diffusers loads no LoRA into its text_encoder_2"),
        ("peft + diff_b", "peft", {ATTN + "to_q.diff_b": torch.randn(32)}, r"diffusers ignores its tensor .*diff_b"),
        ("mixture", "mixture", {}, None),
        ("mixture + kohya", "mixture", _factors("lora_unet_double_blocks_0_img_attn_proj", 32, 32, True),
         r"drops 2 of 5 tensors .*lora_unet_double_blocks_0_img_attn_proj"),
    ]


def _landed(pipe, file: Path) -> int:
    """How many LoRA tensors diffusers' load_lora_weights put into the pipeline for `file` (-1: it raised, or
    left a parameter uninitialised, on the meta device, where the first generation fails)."""
    from peft.utils import get_peft_model_state_dict

    try:
        pipe.load_lora_weights(str(file), adapter_name="row")
    except (ValueError, RuntimeError):  # RuntimeError: a tensor of another shape than its layer
        if any("row" in found for found in pipe.get_list_adapters().values()):
            pipe.delete_adapters(["row"])
        return -1
    try:
        if any(param.is_meta for param in pipe.transformer.parameters()):
            return -1
        return sum(len(get_peft_model_state_dict(model, adapter_name="row")) for model in (pipe.transformer,
                   pipe.text_encoder) if "row" in getattr(model, "peft_config", {}))
    finally:
        pipe.delete_adapters(["row"])


def test_flux_lora_formats_are_enrolled_exactly_when_diffusers_applies_them_whole(tiny_flux, tmp_path):
    import torch
    from safetensors.torch import save_file

    from engine.sources.lora import _quiet, check_adapter_values
    from engine.sources.lora_keys import check_adapter_fits, lycoris_kind

    assert lycoris_kind(["lora_unet_x.lora_down.weight", "lora_unet_x.lora_mid.weight"])  # Tucker LoCon: LyCORIS
    folder, pipe = tiny_flux
    torch.manual_seed(1)
    cores = _cores()
    core_landed = {}
    with _quiet():
        for label, core, extra, refusal in _rows():
            file = tmp_path / f"{label.replace(' ', '_')}.safetensors"
            save_file(cores[core] | extra, str(file))
            if refusal is None:
                check_adapter_fits(file, check_adapter_values(file), folder)
            else:
                with pytest.raises(UserError, match=refusal) as caught:
                    check_adapter_fits(file, check_adapter_values(file), folder)
                assert "\n" not in str(caught.value), label
            landed = _landed(pipe, file)
            if not extra:
                core_landed[core] = landed
                assert landed > 0, label
            elif refusal is None and "zero" not in label:  # all zeros: dropped by diffusers, and nothing lost
                assert landed > core_landed[core], f"{label}: diffusers did not apply the extra tensors"
            else:
                assert landed in (-1, core_landed[core]), f"{label}: diffusers applied more than the core"


def test_flux_norm_tensors_are_refused(tiny_flux, tmp_path):
    """A norm_q tensor (as Flux Control LoRAs carry) is written by diffusers into the base's weights, outside
    the adapter (its scale and its unloading leave it there): every source of that base would change."""
    import torch
    from safetensors.torch import save_file

    from engine.sources.lora import _quiet, check_adapter_values
    from engine.sources.lora_keys import check_adapter_fits

    folder, pipe = tiny_flux
    core = _cores()
    norm = tmp_path / "norm.safetensors"
    save_file(core["peft"] | {ATTN + "norm_q.weight": torch.randn(16)}, str(norm))
    with pytest.raises(UserError, match=r"norm_q\.weight replaces a norm layer of flux outright"):
        check_adapter_fits(norm, check_adapter_values(norm), folder)
    weight = pipe.transformer.transformer_blocks[0].attn.norm_q.weight.detach().clone()
    with _quiet():
        pipe.load_lora_weights(str(norm), adapter_name="norm")
        pipe.delete_adapters(["norm"])
    assert not torch.equal(pipe.transformer.transformer_blocks[0].attn.norm_q.weight, weight)  # the base changed
