"""A single-file checkpoint (the A1111 / ComfyUI / model-sharing-site layout), stored as kind "single-file".

`source add NAME FILE.safetensors --config DIR` enrols one `.safetensors` checkpoint, loaded offline as the
layout of DIR, a local diffusers folder (nothing is ever fetched: `local_files_only=True`). The file's layout
is read from its tensor names and must match DIR's pipeline class (refused in one line otherwise):
- SD 1.x / SDXL: the whole pipeline in the original (LDM / SGM) layout, loaded with diffusers'
  `from_single_file`; DIR gives the configs and tokenizers (its weights are not needed).
- Flux: the transformer alone in Black Forest Labs' layout (as `flux1-dev.safetensors`; engine/sources/flux_file.py);
  DIR is a diffusers Flux folder giving the text encoders, tokenizers, VAE, scheduler and the transformer's config.
The fingerprint is the file's full SHA-256 (hashed once per unchanged file: index/filehash.py), the config
folder's fingerprint and the generation recipe.

`export_single_file` (engine/sources/ldm_export.py) writes a diffusers SD 1.x / SDXL folder as such a file
(and a Flux folder's transformer in BFL's layout), checked against diffusers' own converters. Files of all
three layouts generate pixel-identical images to their folders on the CPU (tests/test_sources_local.py,
tests/test_single_file_layouts.py). diffusers tells SDXL's two text encoders apart by their width, so an SDXL
folder whose encoders are equally wide (unlike any real SDXL) cannot round-trip: the exporter refuses it.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from engine.errors import SourceError, UserError, first_line
from index.filehash import file_sha256  # noqa: F401  (lora imports it from here)
from engine.generate import DiffusersGenerator, pipeline_dtype
from engine.sources import Param, Recipe, SourceKind, fingerprint
from engine.sources.pipeline import RECIPE_PARAMS, generation_params, stored_recipe  # noqa: F401  (lora imports them here)
from engine.sources.ldm_export import export_single_file  # noqa: F401  (imported from here by callers)


def check_safetensors(path, what: str) -> Path:
    """An existing, structurally sound .safetensors file (pickled checkpoints are refused: loading one runs code)."""
    from engine.sources.model_files import check_weight_file

    given = Path(path).expanduser()
    path = given.resolve()
    if path.is_dir():  # it said "not found" of a folder that is there
        raise UserError(f"{what} {path} is a folder, not a .safetensors file (a diffusers folder is its own source: "
                        "resynth source add NAME DIR, without --config)")
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    if given.suffix != ".safetensors" and given.suffix.lower() == ".safetensors":  # it was told to convert it
        raise UserError(f"{what} {given.name}: rename it to end in .safetensors, in lower case (the loaders read "
                        "any other name as a pickle)")
    if given.suffix != ".safetensors":  # the name as given: a Hugging Face cache links it to a blob named by hash
        raise UserError(f"{what} must be a .safetensors file, not {given.name} (pickled .ckpt/.pt files can run code "
                        "when loaded: convert them to safetensors first)")
    check_weight_file(path)
    return path


def safetensors_header(path: Path) -> dict:
    """A safetensors file's header (tensor name -> dtype, shape, offsets), read without its tensors. Bounded
    as the safetensors library bounds it: a length of petabytes would otherwise be allocated before reading."""
    from engine.sources.model_files import MAX_SAFETENSORS_HEADER

    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            if not 0 < length <= MAX_SAFETENSORS_HEADER:
                raise ValueError(length)
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError):  # RecursionError: [[[[... nested a million deep
            header = None
    if not isinstance(header, dict):
        raise UserError(f"corrupt weight file {path}: not a safetensors header")
    return header


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, read from its header only."""
    return [k for k in safetensors_header(path) if k != "__metadata__"]


LORA_MARKS = ("lora_up", "lora_down", "lora_A", "lora_B", "lora.up", "lora.down")  # kohya, peft, diffusers


def is_lora(keys) -> bool:
    """Whether tensor names are a LoRA adapter's (low-rank up/down or A/B pairs), not a whole model's."""
    return any(mark in key for key in keys for mark in LORA_MARKS)


def lora_hint(path) -> str | None:
    """For a .safetensors file that holds a LoRA, one sentence saying how it is enrolled; else None (also
    for a file whose header cannot be read: its own check says why)."""
    try:
        keys = safetensors_keys(Path(path))
    except (OSError, UserError):  # unreadable, or not a safetensors header
        return None
    if not is_lora(keys):
        return None
    return (f"{Path(path).name} is a LoRA (its tensors are low-rank adapters: lora_up/lora_down or lora_A/lora_B), "
            f"not a whole model: add its base model's diffusers folder with --lora {path}, e.g. `resynth source "
            f"add NAME BASE_DIR --lora {path}:0.8`")


# layout of a single file -> the diffusers pipeline class its --config folder must be
LAYOUTS = {"SD 1.x": "StableDiffusionPipeline", "SDXL": "StableDiffusionXLPipeline", "Flux": "FluxPipeline"}


def file_layout(keys) -> str | None:
    """Which original layout a checkpoint's tensor names are in: "SD 1.x", "SDXL", "Flux", or None."""
    from engine.sources.flux_file import is_flux

    if is_flux(keys):
        return "Flux"
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        return None
    if any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys):
        raise UserError("an SD3 (MMDiT) single file cannot be enrolled: add its diffusers folder instead "
                        "(resynth source add NAME DIR)")
    return "SDXL" if any(k.startswith("conditioner.embedders.") for k in keys) else "SD 1.x"


def check_layout(file: Path, folder: Path, class_name: str) -> str:
    """The file's layout, refused in one line unless it is what `folder` (a `class_name` folder) describes."""
    header = safetensors_header(file)
    layout = file_layout([k for k in header if k != "__metadata__"])
    if layout is None and is_lora(header):
        raise UserError(lora_hint(file) or f"{file.name} is a LoRA")
    if layout is None:
        raise UserError(f"{file.name} is not a single-file checkpoint in the original layout (no "
                        "model.diffusion_model.* nor Flux double_blocks.* tensors); a diffusers folder is added "
                        "without --config")
    if LAYOUTS[layout] != class_name:
        raise UserError(f"{file.name} is in the {layout} layout but {folder} holds a {class_name}: --config must be "
                        f"a diffusers folder of the same layout (a {LAYOUTS[layout]})")
    if layout == "Flux":
        from engine.sources.flux_file import check_flux_file

        check_flux_file(file.name, header, folder)
    else:
        from engine.sources.ldm_export import check_ldm_parts

        check_widths(file.name, header, folder)
        check_ldm_parts(file.name, header, folder)  # a part missing or of another shape: refused before enrolling
    return layout


# (tensor in the original layout, its axis, the config folder's component, config field): the widths a file must
# share with its --config folder (an SD 2.x file has 1024-wide text features where SD 1.x has 768)
_WIDTHS = (
    ("model.diffusion_model.input_blocks.0.0.weight", 0, "unet", "block_out_channels"),
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", 1, "text_encoder", "hidden_size"),
    ("cond_stage_model.model.token_embedding.weight", 1, "text_encoder", "hidden_size"),
    ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", 1, "text_encoder",
     "hidden_size"),
    ("conditioner.embedders.1.model.token_embedding.weight", 1, "text_encoder_2", "hidden_size"),
)


def check_widths(name: str, header: dict, folder: Path) -> None:
    """Refuse, before anything loads, a file whose UNet or text encoder widths differ from the --config
    folder's (an SD 2.x file with an SD 1.x folder): diffusers would fail only at the first generation."""
    for tensor, axis, component, field in _WIDTHS:
        shape = (header.get(tensor) or {}).get("shape")
        try:
            value = json.loads((folder / component / "config.json").read_text()).get(field)
        except (OSError, ValueError):
            continue
        wanted = value[0] if isinstance(value, list) and value else value
        if shape and len(shape) > axis and isinstance(wanted, int) and shape[axis] != wanted:
            raise UserError(f"{name} does not fit {folder.name}: its {component} is {shape[axis]} wide where the "
                            f"folder's is {wanted} (a checkpoint of another model family, such as SD 2.x against "
                            "SD 1.x?): --config must be a diffusers folder of the file's own model")


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
        from engine.generate import FINGERPRINT_FORMS, fingerprint_folder

        if not config:
            raise UserError("a single-file checkpoint needs --config DIR: a diffusers folder of the same layout "
                            "(SD 1.x, SDXL or Flux), used for its configs so that nothing is fetched")
        file = check_safetensors(path, "checkpoint file")
        folder, class_name = check_config_folder(config)
        check_layout(file, folder, class_name)
        recipe = generation_params(steps, guidance, size, scheduler, negative_prompt)
        *older, now = [fingerprint(self.name, file_sha256(file), fingerprint_folder(folder, linked, whole),
                                   asdict(recipe)) for linked, whole in FINGERPRINT_FORMS]
        return Recipe(path=str(file), params={"config": str(folder), **asdict(recipe)}, fingerprint=now,
                      older=tuple(older),
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
                                   device, fingerprint=source.fingerprint,
                                   recheck=lambda *how: self.current_fingerprint(source, *how))

    def current_fingerprint(self, source, linked: bool = True, whole: bool = True) -> str:
        from engine.generate import fingerprint_folder

        params = json.loads(source.params_json)
        recipe = {k: v for k, v in params.items() if k != "config"}
        return fingerprint(self.name, file_sha256(Path(source.path)),
                           fingerprint_folder(Path(params["config"]), linked, whole), recipe)


class SingleFileGenerator(DiffusersGenerator):
    """A DiffusersGenerator whose pipeline comes from one checkpoint file and a config folder."""

    def __init__(self, name: str, file: Path, config: Path, params, device: str | None = None,
                 fingerprint: str | None = None, recheck=None):
        super().__init__(name, config, params, device, fingerprint=fingerprint, recheck=recheck)
        self.file = Path(file)
        self.watched = (self.file,)

    def load(self):
        if self._pipe is None:
            self.check_unchanged()
            try:
                self._pipe = load_single_file(self.file, self.folder, self.params, self.device)
            except UserError as exc:
                raise SourceError(self.name, str(exc)) from exc
        return self._pipe


def load_single_file(file: Path, config: Path, params, device: str):
    """Load a checkpoint file as the pipeline class of `config`, offline; one-line errors if not."""
    import diffusers
    import transformers

    file = check_safetensors(file, "checkpoint file")
    folder, class_name = check_config_folder(config)
    layout = check_layout(file, folder, class_name)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    # float32 is the default: passing it only makes diffusers warn about casting. On CUDA the dtype a pipeline
    # folder of the same class gets (engine.generate.pipeline_dtype), so both forms of one model agree there too.
    chosen = pipeline_dtype(class_name, device)
    dtype = {"torch_dtype": chosen} if chosen is not None else {}
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
