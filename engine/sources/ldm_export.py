"""Writing a diffusers folder as one single-file checkpoint, as users hold them (engine.sources.single_file).

SD 1.x and SDXL folders become one file in the original (LDM / SGM) key layout (UNet, VAE, text encoders);
a Flux folder's transformer is written alone in Black Forest Labs' layout (engine.sources.flux_file). Every
part is converted back with diffusers' own single-file converters and compared before anything is written,
so a file written here loads as the folder it came from: the tests and demos make their single files here.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from engine.errors import UserError

# ----- writing a diffusers folder as one file in the original (LDM / SGM) key layout -----------------
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_RESNET).get(head, head) + "." + tail


def unet_to_ldm(state: dict, config: dict) -> dict:
    """A diffusers UNet2DConditionModel state dict in the original layout (without the model prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAPPING

    mapping: Any = MAPPING
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise UserError("cannot export a UNet with per-block layer counts to a single file")
    direct = dict(mapping["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        direct.update(mapping["unet"]["addition_embed_type"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        direct.update(mapping["unet"]["class_embed_type"])
    with_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in state.items():
        if key in direct:
            out[direct[key]] = value
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i = 1 + int(m.group(1)) * (lpb + 1) + int(m.group(3))
            out[f"input_blocks.{i}.0.{_resnet(m.group(4))}" if m.group(2) == "resnets"
                else f"input_blocks.{i}.1.{m.group(4)}"] = value
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
            out[f"input_blocks.{(int(m.group(1)) + 1) * (lpb + 1)}.0.op.{m.group(2)}"] = value
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"middle_block.{2 * int(m.group(1))}.{_resnet(m.group(2))}"] = value
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            out[f"middle_block.1.{m.group(1)}"] = value
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i = int(m.group(1)) * (lpb + 1) + int(m.group(3))
            out[f"output_blocks.{i}.0.{_resnet(m.group(4))}" if m.group(2) == "resnets"
                else f"output_blocks.{i}.1.{m.group(4)}"] = value
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
            block = int(m.group(1))
            i = block * (lpb + 1) + lpb
            out[f"output_blocks.{i}.{2 if block in with_attention else 1}.conv.{m.group(2)}"] = value
        else:
            raise UserError(f"cannot export UNet weight {key!r} to the single-file layout")
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    """A diffusers AutoencoderKL state dict in the original layout (without the first_stage_model prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as MAPPING

    mapping: Any = MAPPING
    direct = dict(mapping["vae"])
    ups = len(config["up_block_types"])
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        if key in direct:
            out[direct[key]] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            rest = m.group(3).replace("conv_shortcut", "nin_shortcut")
            out[f"encoder.down.{m.group(1)}.block.{m.group(2)}.{rest}"] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            out[f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"] = value
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            block = ups - 1 - int(m.group(1))
            out[f"decoder.up.{block}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"] = value
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            out[f"decoder.up.{ups - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            rest = m.group(3).replace("conv_shortcut", "nin_shortcut")
            out[f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{rest}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\."
                               r"(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key):
            if m.group(2) != "group_norm" and m.group(3) == "weight":
                value = value[:, :, None, None]  # 1x1 convolutions in the original layout
            out[f"{m.group(1)}.mid.attn_1.{attention[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise UserError(f"cannot export VAE weight {key!r} to the single-file layout")
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """A transformers CLIPTextModel state dict under an original-layout prefix (text_model.* keys)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()
            if not k.endswith("position_ids")}


def open_clip_to_ldm(state: dict, prefix: str) -> dict:
    """A transformers CLIPTextModelWithProjection state dict in open_clip's layout (SDXL's second encoder)."""
    import torch

    state = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
             for k, v in state.items() if not k.endswith("position_ids")}
    out = {}
    names = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    layers = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}
    for key, value in state.items():
        if key in names:
            out[prefix + names[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", key):
            if m.group(2) == "q":
                base = f"text_model.encoder.layers.{m.group(1)}.self_attn"
                parts = [state[f"{base}.{p}_proj.{m.group(3)}"] for p in "qkv"]
                out[f"{prefix}transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(3)}"] = torch.cat(parts)
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2|"
                               r"self_attn\.out_proj)\.(weight|bias)", key):
            out[f"{prefix}transformer.resblocks.{m.group(1)}.{layers[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise UserError(f"cannot export text encoder weight {key!r} to open_clip's layout")
    return out


def _same(original: dict, back: dict) -> bool:
    """Whether converted-back tensors equal the originals (text encoders compared without "text_model.")."""
    import torch

    def plain(state: dict) -> dict:
        return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}

    original, back = plain(original), plain(back)
    return set(back) == set(original) and all(torch.equal(back[k].reshape(original[k].shape), original[k])
                                              for k in original)


def export_single_file(folder, target) -> Path:
    """Write a diffusers SD 1.x (StableDiffusionPipeline) or SDXL folder as one original-layout .safetensors,
    or a Flux folder's transformer alone in BFL's layout (engine.sources.flux_file).

    Each converted part is converted back with diffusers' own single-file converters and compared before
    anything is written, so a file this writes loads as the folder it came from."""
    import diffusers
    import torch
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from safetensors.torch import save_file

    from engine.generate import check_pipeline_folder

    folder, target = Path(folder), Path(target)
    if check_pipeline_folder(folder) == "FluxPipeline":
        from engine.sources.flux_file import export_flux_transformer

        return export_flux_transformer(folder, target)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    parts: Any = pipe  # components are attributes set at run time
    unet, vae, text = parts.unet.state_dict(), parts.vae.state_dict(), parts.text_encoder.state_dict()
    tensors = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet, dict(parts.unet.config)).items()}
    tensors.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae, dict(parts.vae.config)).items()})
    checks = [("UNet", unet, convert_ldm_unet_checkpoint(tensors, dict(parts.unet.config))),
              ("VAE", vae, convert_ldm_vae_checkpoint(tensors, dict(parts.vae.config)))]
    if isinstance(pipe, diffusers.StableDiffusionXLPipeline):
        widths = parts.text_encoder.config.hidden_size, parts.text_encoder_2.config.hidden_size
        if widths[0] == widths[1]:
            raise UserError(f"exporting {folder}: its two text encoders are equally wide ({widths[0]}), and diffusers "
                            "tells SDXL's encoders apart by width, so the file would not load as this folder")
        tensors.update(clip_to_ldm(text, "conditioner.embedders.0.transformer."))
        second = parts.text_encoder_2.state_dict()
        tensors.update(open_clip_to_ldm(second, "conditioner.embedders.1.model."))
        checks += [("text encoder", text, convert_ldm_clip_checkpoint(tensors)),
                   ("second text encoder", second, convert_open_clip_checkpoint(
                       parts.text_encoder_2, tensors, prefix="conditioner.embedders.1.model."))]
    elif isinstance(pipe, diffusers.StableDiffusionPipeline):
        tensors.update(clip_to_ldm(text, "cond_stage_model.transformer."))
        checks.append(("text encoder", text, convert_ldm_clip_checkpoint(tensors)))
    else:
        raise UserError(f"exporting a {type(pipe).__name__} to a single file is not supported "
                        "(SD 1.x, SDXL and Flux are)")
    for name, original, back in checks:
        if not _same(original, back):
            raise UserError(f"exporting {folder}: the {name} does not convert back to itself "
                            f"({sorted(set(original) ^ set(back))[:3]})")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    os.replace(partial, target)
    return target


# ----- checking a file in the original layout against its --config folder, from its header -------------
def check_ldm_parts(name: str, header: dict, folder: Path) -> None:
    """Refuse, from the header alone, an SD 1.x / SDXL file that lacks a part of the pipeline or whose UNet or VAE
    tensors do not all convert onto the --config folder's models (names and shapes, on the meta device).

    diffusers' `from_single_file` fails on such a file only when it loads it ("weights for this component appear
    to be missing" for a checkpoint saved without its VAE, "cannot copy out of meta tensor" for a UNet missing a
    tensor): the source was enrolled and failed at every generation. Meant to be called by
    `single_file.check_layout` beside `check_widths`."""
    import json

    import diffusers
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from engine.sources.lora import _quiet

    shapes = {k: list(v.get("shape") or []) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    _check_prediction(name, shapes, folder)
    parts = {"UNet": "model.diffusion_model.", "VAE": "first_stage_model."}
    if not any(k.startswith("conditioner.") for k in shapes):
        parts["text encoder"] = "cond_stage_model."
    else:  # SGM: the encoders the folder has, in order (a refiner has the second alone)
        index = json.loads((folder / "model_index.json").read_text())
        encoders = [c for c in ("text_encoder", "text_encoder_2") if (index.get(c) or [None])[0] is not None]
        parts |= {("second " if i else "") + "text encoder": f"conditioner.embedders.{i}."
                  for i in range(len(encoders))}
    absent = [part for part, prefix in parts.items() if not any(k.startswith(prefix) for k in shapes)]
    if absent:
        raise UserError(f"{name} holds no {' and no '.join(absent)} ({parts[absent[0]]}* tensors): a checkpoint saved "
                        "without a part of the pipeline cannot be loaded as a whole single file")
    try:
        tensors = {k: torch.empty([int(n) for n in shape], device="meta") for k, shape in shapes.items()}
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f"{name}: a tensor of its header has no valid shape") from None
    for part, component, cls, convert in (("UNet", "unet", diffusers.UNet2DConditionModel, convert_ldm_unet_checkpoint),
                                          ("VAE", "vae", diffusers.AutoencoderKL, convert_ldm_vae_checkpoint)):
        try:
            config = json.loads((folder / component / "config.json").read_text())
            with _quiet(), torch.device("meta"):
                wanted = {k: tuple(v.shape) for k, v in cls.from_config(config).state_dict().items()}
                converted = convert(dict(tensors), config)
        except (OSError, ValueError, KeyError, IndexError, RuntimeError, TypeError) as exc:
            raise UserError(f"{name}: its {part} does not convert onto {folder.name}'s: {exc!r}"[:300]) from None
        problems = [f"{k} missing" for k in sorted(set(wanted) - set(converted))]
        problems += [f"{k} {tuple(converted[k].shape)} where the config makes {wanted[k]}"
                     for k in sorted(set(wanted) & set(converted)) if tuple(converted[k].shape) != wanted[k]]
        if problems:
            raise UserError(f"{name} does not fit {folder.name}: {len(problems)} {part} tensors differ (e.g. "
                            f"{'; '.join(problems[:3])})")


def _check_prediction(name: str, shapes: dict, folder: Path) -> None:
    """A v-prediction checkpoint (NoobAI-XL V-Pred and its merges mark it with an empty `v_pred` tensor, zero
    terminal SNR with `ztsnr`) generates noise-like images, without any error, on a scheduler of the folder's that
    predicts epsilon: diffusers takes the scheduler from --config and never reads these marks."""
    import json

    if "v_pred" not in shapes and "ztsnr" not in shapes:
        return
    try:
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        scheduler = {}
    wrong = []
    if "v_pred" in shapes and scheduler.get("prediction_type") != "v_prediction":
        wrong.append(f'"prediction_type": "v_prediction" (it has {scheduler.get("prediction_type")!r})')
    if "ztsnr" in shapes and not scheduler.get("rescale_betas_zero_snr"):
        wrong.append('"rescale_betas_zero_snr": true')
    if wrong:
        marks = " and ".join(m for m in ("v_pred", "ztsnr") if m in shapes)
        raise UserError(f"{name} is a v-prediction checkpoint (its {marks} mark), which makes noise on {folder.name}'s "
                        f"scheduler: use a --config folder whose scheduler/scheduler_config.json has "
                        f"{' and '.join(wrong)}")
