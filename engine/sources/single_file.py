"""A single-file checkpoint (the A1111 / ComfyUI / model-sharing-site layout), stored as kind "single-file".

`source add NAME FILE.safetensors --config DIR` enrols one `.safetensors` checkpoint, loaded offline as the
layout of DIR, a local diffusers folder (nothing is ever fetched: `local_files_only=True`). The file's layout
is read from its tensor names and must match DIR's pipeline class (refused in one line otherwise):
- SD 1.x / SDXL: the whole pipeline in the original (LDM / SGM) layout, loaded with diffusers'
  `from_single_file`; DIR gives the configs and tokenizers (its weights are not needed).
- Flux: the transformer alone in Black Forest Labs' layout (as `flux1-dev.safetensors`; engine/sources/flux_file.py);
  DIR is a diffusers Flux folder giving the text encoders, tokenizers, VAE, scheduler and the transformer's config.
The fingerprint is the file's full SHA-256 (hashed once per process for an unchanged file), the config
folder's fingerprint and the generation recipe.

`export_single_file` writes a diffusers SD 1.x / SDXL folder as such a file (and a Flux folder's transformer
in BFL's layout); the tests make their single files with it. It converts each part back with diffusers'
own converters and compares before writing. SD 1.x, SDXL and Flux files generate pixel-identical images to
their folders on the CPU (tests/test_sources_local.py, tests/test_single_file_layouts.py). diffusers tells
SDXL's two text encoders apart by their width, so an SDXL folder whose encoders are equally wide (unlike any
real SDXL) cannot round-trip and is refused by the exporter.
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


def safetensors_header(path: Path) -> dict:
    """A safetensors file's header (tensor name -> dtype, shape, offsets), read without its tensors."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(length))


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, read from its header only."""
    return [k for k in safetensors_header(path) if k != "__metadata__"]


# layout of a single file -> the diffusers pipeline class its --config folder must be
LAYOUTS = {"SD 1.x": "StableDiffusionPipeline", "SDXL": "StableDiffusionXLPipeline", "Flux": "FluxPipeline"}


def file_layout(keys) -> str | None:
    """Which original layout a checkpoint's tensor names are in: "SD 1.x", "SDXL", "Flux", or None."""
    from engine.sources.flux_file import is_flux

    if is_flux(keys):
        return "Flux"
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        return None
    return "SDXL" if any(k.startswith("conditioner.embedders.") for k in keys) else "SD 1.x"


def check_layout(file: Path, folder: Path, class_name: str) -> str:
    """The file's layout, refused in one line unless it is what `folder` (a `class_name` folder) describes."""
    header = safetensors_header(file)
    layout = file_layout([k for k in header if k != "__metadata__"])
    if layout is None:
        raise UserError(f"{file.name} is not a single-file checkpoint in the original layout (no "
                        "model.diffusion_model.* nor Flux double_blocks.* tensors); a diffusers folder is added "
                        "without --config")
    if LAYOUTS[layout] != class_name:
        raise UserError(f"{file.name} is a {layout} checkpoint but {folder} holds a {class_name}: --config must be "
                        f"a diffusers folder of the same layout (a {LAYOUTS[layout]})")
    if layout == "Flux":
        from engine.sources.flux_file import check_flux_file

        check_flux_file(file.name, header, folder)
    return layout


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
    summary = ("a single-file checkpoint (.safetensors: a whole SD 1.x or SDXL pipeline, or a Flux transformer in "
               "BFL's layout) loaded offline as the layout of a local diffusers folder (--config)")
    examples = ("resynth source add my-merge ~/models/merge.safetensors --config ~/models/sd15-configs --steps 30",
                "resynth source add my-flux ~/models/flux1-dev.safetensors --config ~/models/FLUX.1-dev --steps 28 "
                "--guidance 3.5")
    params = (
        Param("path", str, None, "single-file checkpoint (.safetensors): a whole SD 1.x or SDXL pipeline in the "
                                 "original layout, or a Flux transformer in BFL's layout (as flux1-dev.safetensors)",
              positional=True, required=True, metavar="FILE"),
        Param("config", str, None, "diffusers folder of the same layout, what the file is loaded as, offline: for "
                                   "SD 1.x / SDXL its configs and tokenizers (weights not needed); for Flux its text "
                                   "encoders, tokenizers, VAE, scheduler and transformer config",
              required=True, metavar="DIR"),
    ) + RECIPE_PARAMS

    def prepare(self, name: str, path, config=None, steps: int = 30, guidance: float = 7.0,
                size: int | None = None, scheduler: str | None = None, negative_prompt: str | None = None) -> Recipe:
        from engine.generate import fingerprint_folder

        if not config:
            raise UserError("a single-file checkpoint needs --config DIR: a diffusers folder of the same layout "
                            "(SD 1.x, SDXL or Flux), used for its configs so that nothing is fetched")
        file = check_safetensors(path, "checkpoint file")
        folder, class_name = check_config_folder(config)
        check_layout(file, folder, class_name)
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
    layout = check_layout(file, folder, class_name)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    # float32 is the default: passing it only makes diffusers warn about casting. float16 on CUDA, as a
    # pipeline folder is loaded (engine.generate.load_pipeline), so both forms of one model agree there too.
    dtype = {"torch_dtype": torch.float16} if str(device).startswith("cuda") else {}
    try:
        if layout == "Flux":
            from engine.sources.flux_file import load_flux_pipeline

            pipe = load_flux_pipeline(file, folder, dtype)
        else:
            pipe = getattr(diffusers, class_name).from_single_file(str(file), config=str(folder),
                                                                    local_files_only=True, **dtype)
    except UserError:
        raise
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
