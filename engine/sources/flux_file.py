"""Flux single files as users hold them: the transformer alone in Black Forest Labs' original key layout.

`flux1-dev.safetensors` and its fine-tunes hold only the denoiser (`double_blocks.N.img_attn.qkv`,
`single_blocks.N.linear1`, `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`, `final_layer`; ComfyUI
saves add a `model.diffusion_model.` prefix). The rest of the pipeline (text encoders, tokenizers, VAE,
scheduler) and the transformer's config come from a local diffusers Flux folder (`--config DIR`), so nothing
is ever fetched.

The key mapping is diffusers' own (`convert_flux_transformer_checkpoint_to_diffusers`). That converter
assumes FLUX.1's widths (inner 3072, MLP 12288) where it splits a single block's fused `linear1`; a file of
other widths (the tests' tiny ones) is padded to those widths for that one split and cut back after, which
moves values and computes nothing, so every width goes through the same code. `export_flux_transformer`
writes the inverse layout and checks it converts back to the same tensors before writing.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from engine.errors import UserError, first_line

PREFIX = "model.diffusion_model."  # ComfyUI's saves; BFL's own files have no prefix
MARK = "double_blocks.0.img_attn.norm.key_norm.scale"  # the key diffusers itself detects Flux by
# diffusers' converter splits single blocks' linear1 at FLUX.1's widths
_DIFFUSERS_INNER, _DIFFUSERS_MLP = 3072, 12288


def is_flux(keys) -> bool:
    return any(k in (MARK, PREFIX + MARK) for k in keys)


def _strip(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def check_flux_file(name: str, header: dict, folder: Path) -> None:
    """Refuse, in one line, a Flux file that is not the transformer of `folder`'s config (read from headers only)."""
    shapes = {_strip(k): v.get("shape") for k, v in header.items() if k != "__metadata__"}
    scaled = next((k for k in shapes if k.endswith(("scale_weight", "scale_input")) or k == "scaled_fp8"), None)
    if scaled is not None:
        raise UserError(f"{name} is a scaled-fp8 file ({scaled}): its weights are only right multiplied by its "
                        "scale factors, which diffusers does not apply: use the file's bf16 or fp8 (unscaled) form")
    other = sorted(k for k in shapes if not re.match(
        r"(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in|final_layer)\.", k))
    if other:
        raise UserError(f"{name} holds more than a Flux transformer ({other[0]} ...): only the transformer-alone "
                        "layout (as flux1-dev.safetensors) is loaded; the other parts come from --config")
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{folder}: no readable transformer/config.json (a Flux config folder needs the "
                        "transformer's config)") from None
    try:  # numbers a downloaded config may hold as anything
        inner = int(config.get("num_attention_heads", 24)) * int(config.get("attention_head_dim", 128))
        wanted = {"double blocks": int(config.get("num_layers", 19)),
                  "single blocks": int(config.get("num_single_layers", 38)), "width": inner,
                  "guidance embedding": bool(config.get("guidance_embeds", False))}
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{folder}: transformer/config.json holds a non-number where Flux's sizes go") from None
    found = {
        "double blocks": len({k.split(".")[1] for k in shapes if k.startswith("double_blocks.")}),
        "single blocks": len({k.split(".")[1] for k in shapes if k.startswith("single_blocks.")}),
        "width": (shapes.get("img_in.weight") or [0])[0],
        "guidance embedding": "guidance_in.in_layer.weight" in shapes,
    }
    wrong = [f"{what} {found[what]} (the config says {wanted[what]})" for what in wanted if found[what] != wanted[what]]
    if wrong:
        hint = "" if found["guidance embedding"] == wanted["guidance embedding"] else \
            " (a dev-like file with a schnell-like config, or the reverse)"
        raise UserError(f"{name} is not a transformer of {folder}'s layout: " + ", ".join(wrong) + hint)
    _check_tensors(name, shapes, config)


def _check_tensors(name: str, shapes: dict, config: dict) -> None:
    """Every tensor the transformer of `config` needs, at its shape, and nothing else: the file's header goes
    through the same conversion as its weights will, on the meta device (shapes only, nothing read). A tensor
    missing inside a block, a scaled-fp8 file's `scale_weight` factors or a block of other widths otherwise
    passed the counts above and failed at every generation."""
    import diffusers
    import torch

    from engine.sources.lora import _quiet

    try:
        tensors = {k: torch.empty([int(n) for n in shape], device="meta") for k, shape in shapes.items()}
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"{name}: a tensor of its header has no valid shape") from None
    try:
        converted = bfl_to_diffusers(tensors)
    except UserError as exc:
        raise UserError(f"{name}: {exc}") from None
    try:
        with _quiet(), torch.device("meta"):
            model = diffusers.FluxTransformer2DModel.from_config(config)
    except Exception as exc:
        raise UserError(f"{name}: its config folder's transformer/config.json does not build: {first_line(exc)}") \
            from None
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{k} missing" for k in sorted(set(wanted) - set(converted))]
    problems += [f"{k} not in the model" for k in sorted(set(converted) - set(wanted))]
    problems += [f"{k} {tuple(converted[k].shape)} where the config makes {wanted[k]}"
                 for k in sorted(set(wanted) & set(converted)) if tuple(converted[k].shape) != wanted[k]]
    if problems:
        raise UserError(f"{name} does not fit the Flux transformer of its --config folder: {len(problems)} tensors "
                        f"differ (e.g. {'; '.join(problems[:3])})")


def bfl_to_diffusers(tensors: dict) -> dict:
    """A BFL-layout Flux transformer state dict in diffusers' layout, through diffusers' own converter."""
    import torch
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    tensors = {_strip(k): v for k, v in tensors.items()}
    singles = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("single_blocks.")})
    try:
        inner, mlp = _DIFFUSERS_INNER, _DIFFUSERS_MLP
        if singles:
            inner = int(tensors[f"single_blocks.{singles[0]}.linear2.weight"].shape[0])
            mlp = int(tensors[f"single_blocks.{singles[0]}.linear1.weight"].shape[0]) - 3 * inner
        if inner > _DIFFUSERS_INNER or mlp > _DIFFUSERS_MLP:
            raise UserError(f"a Flux transformer wider than FLUX.1 ({inner}, MLP {mlp}) cannot be converted")
        padded = (inner, mlp) != (_DIFFUSERS_INNER, _DIFFUSERS_MLP)
        for i in singles if padded else ():
            for part in ("weight", "bias"):
                chunks = torch.split(tensors[f"single_blocks.{i}.linear1.{part}"], [inner] * 3 + [mlp])
                tensors[f"single_blocks.{i}.linear1.{part}"] = torch.cat([
                    torch.cat([c, c.new_zeros((width - c.shape[0], *c.shape[1:]))])
                    for c, width in zip(chunks, (_DIFFUSERS_INNER,) * 3 + (_DIFFUSERS_MLP,))])
        out = convert_flux_transformer_checkpoint_to_diffusers(tensors)
    except (KeyError, IndexError, RuntimeError, ValueError) as exc:
        why = f"tensor {exc} missing" if isinstance(exc, KeyError) else first_line(exc)
        raise UserError(f"not a complete Flux transformer in BFL's layout: {why}") from None
    if tensors:
        raise UserError(f"unexpected tensors in a Flux transformer file: {sorted(tensors)[:3]}")
    if padded:
        for i in singles:
            for part in ("to_q", "to_k", "to_v"):
                for kind in ("weight", "bias"):
                    key = f"single_transformer_blocks.{i}.attn.{part}.{kind}"
                    out[key] = out[key][:inner].contiguous()
            for kind in ("weight", "bias"):
                key = f"single_transformer_blocks.{i}.proj_mlp.{kind}"
                out[key] = out[key][:mlp].contiguous()
    return out


def _swap_halves(value):
    import torch

    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first])


_DIRECT = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2",
           "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_FUSED = {  # fused BFL tensor: the diffusers parts, in order
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}


def diffusers_to_bfl(state: dict) -> dict:
    """A diffusers FluxTransformer2DModel state dict in BFL's original layout (the inverse of diffusers' converter)."""
    import torch

    out: dict[str, Any] = {}
    fused: dict[str, dict] = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        if module in _DIRECT:
            out[f"{_DIRECT[module]}.{kind}"] = value
        elif module == "norm_out.linear":  # diffusers: (scale, shift); BFL: (shift, scale)
            out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(value)
        elif m := re.fullmatch(r"(single_)?transformer_blocks\.(\d+)\.(.+)", module):
            single, block, part = bool(m.group(1)), m.group(2), m.group(3)
            head = f"{'single' if single else 'double'}_blocks.{block}"
            table = _SINGLE if single else _DOUBLE
            if part in table:
                scale = part.startswith("attn.norm_")  # RMSNorm weights are "scale" in BFL's layout
                out[f"{head}.{table[part]}.{'scale' if scale else kind}"] = value
                continue
            target = next((name for name, parts in _FUSED.items()
                           if part in parts and (name == "linear1") == single), None)
            if target is None:
                raise UserError(f"cannot export Flux transformer weight {key!r} to BFL's layout")
            fused.setdefault(f"{head}.{target}.{kind}", {})[part] = value
        else:
            raise UserError(f"cannot export Flux transformer weight {key!r} to BFL's layout")
    for key, parts in fused.items():
        order = _FUSED[key.split(".")[2] if key.startswith("single") else ".".join(key.split(".")[2:4])]
        out[key] = torch.cat([parts[p] for p in order])
    return out


def export_flux_transformer(folder: Path, target: Path) -> Path:
    """Write a diffusers Flux folder's transformer as one BFL-layout .safetensors (as flux1-dev.safetensors is),
    after checking that diffusers' converter turns it back into exactly the same tensors."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    state = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True,
                                                   torch_dtype=torch.float32).state_dict()
    tensors = diffusers_to_bfl(state)
    back = bfl_to_diffusers(dict(tensors))
    if set(back) != set(state) or any(not torch.equal(back[k], state[k]) for k in state):
        raise UserError(f"exporting {folder}: the Flux transformer does not convert back to itself "
                        f"({sorted(set(state) ^ set(back))[:3]})")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    os.replace(partial, target)
    return target


def load_flux_pipeline(file: Path, folder: Path, dtype: dict):
    """The FluxPipeline of `folder` with its transformer from `file` (BFL layout), offline."""
    import diffusers
    from safetensors.torch import load_file

    transformer = diffusers.FluxTransformer2DModel.from_single_file(
        bfl_to_diffusers(load_file(str(file))), config=str(folder), subfolder="transformer",
        local_files_only=True, **dtype)
    return diffusers.FluxPipeline.from_pretrained(folder, transformer=transformer, local_files_only=True, **dtype)
