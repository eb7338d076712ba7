"""A single-file checkpoint (the A1111 / ComfyUI / model-sharing-site layout), stored as kind "single-file".

`source add NAME FILE.safetensors --config DIR` enrols one `.safetensors` checkpoint (SD 1.x or SDXL
layout) loaded with diffusers' `from_single_file`; DIR is a diffusers folder of the matching layout (its
`model_index.json` and component configs; its weights are not needed) and is what keeps the load offline:
nothing is ever fetched (`local_files_only=True`). The fingerprint is the file's full SHA-256 (hashed
once per process for an unchanged file), the config folder's fingerprint and the generation recipe.

`export_single_file` writes a diffusers SD 1.x / SDXL folder as such a file (UNet, VAE and text encoders
in the original key layout): the tests and demos make their single-file checkpoints with it, and it
checks its UNet and VAE against diffusers' converters before writing. SD 1.x files load back pixel-identical
(tests/test_sources_local.py). SDXL files are written but not verified: diffusers tells SDXL's two text
encoders apart by their width, and the tiny zoo's two are equally wide, so its SDXL file loads the first
encoder's weights into both. Flux single files are not handled here.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.errors import SourceError, UserError, first_line
from engine.generate import DiffusersGenerator
from engine.sources import Param, Recipe, SourceKind, fingerprint

# The recipe parameters every local pipeline kind takes (the "diffusers" kind's, after its folder).
RECIPE_PARAMS = (
    Param("steps", int, 30, "inference steps (default 30)"),
    Param("guidance", float, 7.0, "guidance scale (default 7.0)"),
    Param("size", int, None, "square image side in pixels (default: the pipeline's)"),
    Param("scheduler", str, None, "diffusers scheduler class name (default: the pipeline's own)"),
    Param("negative_prompt", str, None, "negative prompt, where the pipeline takes one"),
)
_RECIPE_FIELDS = tuple(p.name for p in RECIPE_PARAMS)


def generation_params(steps: int = 30, guidance: float = 7.0, size: int | None = None,
                      scheduler: str | None = None, negative_prompt: str | None = None):
    """The validated recipe (engine.generate.GenerationParams), checked as the "diffusers" kind checks it."""
    from engine.generate import GenerationParams, check_scheduler

    check_scheduler(scheduler)
    if int(steps) < 1 or (size is not None and (int(size) < 8 or int(size) % 8)):
        raise UserError("--steps must be >= 1 and --size a multiple of 8")
    return GenerationParams(steps=int(steps), guidance=float(guidance), size=None if size is None else int(size),
                            scheduler=scheduler, negative_prompt=negative_prompt)


def stored_recipe(params_json: str):
    """The GenerationParams part of a stored params dict that holds more fields."""
    from engine.generate import GenerationParams

    stored = json.loads(params_json)
    return GenerationParams(**{k: stored[k] for k in _RECIPE_FIELDS if k in stored})


# ----- whole-file content hashes, once per process per unchanged file ----------------------------------
_HASHES: dict[tuple, str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's whole content, cached by (path, size, mtime, inode) for this process."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    with _HASH_LOCK:
        known = _HASHES.get(key)
    if known:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    with _HASH_LOCK:
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def check_safetensors(path, what: str) -> Path:
    """An existing, structurally sound .safetensors file (pickled checkpoints are refused: loading one runs code)."""
    from engine.generate import check_weight_file

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    if path.suffix != ".safetensors":
        raise UserError(f"{what} must be a .safetensors file, not {path.name} (pickled .ckpt/.pt files can run code "
                        "when loaded: convert them to safetensors first)")
    check_weight_file(path)
    return path


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, read from its header only."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    return [k for k in header if k != "__metadata__"]


def check_config_folder(config) -> tuple[Path, str]:
    """A diffusers folder whose pipeline class loads single files; returns (folder, class name)."""
    import diffusers

    from engine.generate import check_pipeline_folder

    folder = Path(config).expanduser().resolve()
    class_name = check_pipeline_folder(folder)
    if not hasattr(getattr(diffusers, class_name), "from_single_file"):
        raise UserError(f"{folder}: diffusers cannot load a {class_name} from a single file")
    return folder, class_name


class SingleFile(SourceKind):
    name = "single-file"
    summary = ("a single-file checkpoint (.safetensors, SD 1.x or SDXL layout) loaded offline with diffusers' "
               "from_single_file as the layout of a local diffusers folder (--config)")
    examples = ("resynth source add my-merge ~/models/merge.safetensors --config ~/models/sd15-configs --steps 30",)
    params = (
        Param("path", str, None, "single-file checkpoint (.safetensors, SD 1.x or SDXL layout)", positional=True,
              required=True, metavar="FILE"),
        Param("config", str, None, "diffusers folder of the matching layout (its configs; weights not needed): "
                                   "what the file is loaded as, offline", required=True, metavar="DIR"),
    ) + RECIPE_PARAMS

    def prepare(self, name: str, path, config=None, steps: int = 30, guidance: float = 7.0,
                size: int | None = None, scheduler: str | None = None, negative_prompt: str | None = None) -> Recipe:
        from engine.generate import fingerprint_folder

        if not config:
            raise UserError("a single-file checkpoint needs --config DIR: a diffusers folder of the same layout "
                            "(SD 1.x or SDXL), used for its configs so that nothing is fetched")
        file = check_safetensors(path, "checkpoint file")
        folder, _ = check_config_folder(config)
        keys = safetensors_keys(file)
        if not any(k.startswith("model.diffusion_model.") for k in keys):
            raise UserError(f"{file.name} is not a single-file checkpoint in the original layout (no "
                            "model.diffusion_model.* tensors); a diffusers folder is added without --config")
        recipe = generation_params(steps, guidance, size, scheduler, negative_prompt)
        return Recipe(path=str(file), params={"config": str(folder), **asdict(recipe)},
                      fingerprint=fingerprint(self.name, file_sha256(file), fingerprint_folder(folder), asdict(recipe)),
                      twin="already uses this checkpoint file with the same config and parameters")

    def params_hash(self, source) -> str:
        return stored_recipe(source.params_json).hash()

    def describe_recipe(self, params: dict, path: str | None) -> str:
        from engine.recipes import describe

        return describe({k: v for k, v in params.items() if k != "config"}, params.get("config")) + \
            f", config {Path(str(params.get('config'))).name}"

    def load(self, source, device: str | None):
        config = json.loads(source.params_json)["config"]
        return SingleFileGenerator(source.name, Path(source.path), Path(config), stored_recipe(source.params_json),
                                   device, fingerprint=source.fingerprint)


class SingleFileGenerator(DiffusersGenerator):
    """A DiffusersGenerator whose pipeline comes from one checkpoint file and a config folder."""

    def __init__(self, name: str, file: Path, config: Path, params, device: str | None = None,
                 fingerprint: str | None = None):
        super().__init__(name, config, params, device, fingerprint=fingerprint)
        self.file = Path(file)

    def load(self):
        if self._pipe is None:
            try:
                self._pipe = load_single_file(self.file, self.folder, self.params, self.device)
            except UserError as exc:
                raise SourceError(self.name, str(exc)) from exc
        return self._pipe


def load_single_file(file: Path, config: Path, params, device: str):
    """Load a checkpoint file as the pipeline class of `config`, offline; one-line errors if not."""
    import diffusers
    import torch
    import transformers

    file = check_safetensors(file, "checkpoint file")
    folder, class_name = check_config_folder(config)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    # float32 is the default: passing it only makes diffusers warn about casting
    dtype = {"torch_dtype": torch.float16} if str(device).startswith("cuda") else {}
    try:
        pipe = getattr(diffusers, class_name).from_single_file(str(file), config=str(folder), local_files_only=True,
                                                                **dtype)
    except Exception as exc:
        raise UserError(f"cannot load checkpoint {file} as a {class_name}: {first_line(exc)}") from exc
    if params.scheduler:
        pipe.scheduler = getattr(diffusers, params.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


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


def export_single_file(folder, target) -> Path:
    """Write a diffusers SD 1.x (StableDiffusionPipeline) or SDXL folder as one original-layout .safetensors.

    Each converted part is converted back with diffusers' own single-file converters and compared before
    anything is written, so a file this writes loads as the folder it came from."""
    import diffusers
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import save_file

    folder, target = Path(folder), Path(target)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    parts: Any = pipe  # components are attributes set at run time
    unet, vae = parts.unet.state_dict(), parts.vae.state_dict()
    tensors = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet, dict(parts.unet.config)).items()}
    tensors.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae, dict(parts.vae.config)).items()})
    if isinstance(pipe, diffusers.StableDiffusionXLPipeline):
        tensors.update(clip_to_ldm(parts.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        tensors.update(open_clip_to_ldm(parts.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    elif isinstance(pipe, diffusers.StableDiffusionPipeline):
        tensors.update(clip_to_ldm(parts.text_encoder.state_dict(), "cond_stage_model.transformer."))
    else:
        raise UserError(f"exporting a {type(pipe).__name__} to a single file is not supported (SD 1.x and SDXL are)")
    for name, original, back in (
            ("UNet", unet, convert_ldm_unet_checkpoint(tensors, dict(parts.unet.config))),
            ("VAE", vae, convert_ldm_vae_checkpoint(tensors, dict(parts.vae.config)))):
        if set(back) != set(original) or any(not torch.equal(back[k].reshape(original[k].shape), original[k])
                                             for k in original):
            raise UserError(f"exporting {folder}: the {name} does not convert back to itself "
                            f"({sorted(set(original) ^ set(back))[:3]})")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    os.replace(partial, target)
    return target
