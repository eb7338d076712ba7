"""A diffusers text-to-image pipeline folder (SD 1.x, SDXL, PixArt, Flux ...), stored as kind "diffusers"."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from engine.errors import UserError
from engine.sources import Param, Recipe, SourceKind, fingerprint

# The recipe parameters every local pipeline kind takes (this kind's, after its folder; single-file and LoRA too).
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
    try:  # numbers cast once here, so guidance 7 (Python, JSON) and 7.0 (the CLI) are one recipe, one fingerprint
        steps, guidance, size = int(steps), float(guidance), None if size is None else int(size)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"steps, guidance and size must be numbers (got {steps!r}, {guidance!r}, {size!r})") from None
    if steps < 1 or (size is not None and (size < 8 or size % 8)):
        raise UserError("--steps must be >= 1 and --size a multiple of 8")
    if not math.isfinite(guidance):
        raise UserError(f"--guidance must be a finite number (got {guidance})")
    return GenerationParams(steps=steps, guidance=guidance, size=size, scheduler=scheduler,
                            negative_prompt=negative_prompt)


def stored_recipe(params_json: str):
    """The GenerationParams part of a stored params dict that holds more fields."""
    from engine.generate import GenerationParams

    stored = json.loads(params_json)
    return GenerationParams(**{k: stored[k] for k in _RECIPE_FIELDS if k in stored})


class Pipeline(SourceKind):
    name = "diffusers"
    summary = ("a diffusers pipeline folder (anything DiffusionPipeline.from_pretrained loads: SD 1.x, SDXL, "
               "PixArt, Flux ...), checked without loading its weights")
    examples = ("resynth source add sdxl ~/models/stable-diffusion-xl-base-1.0 --steps 30",)
    params = (
        Param("path", str, None, "diffusers pipeline folder", positional=True, required=True, metavar="DIR"),
    ) + RECIPE_PARAMS

    def prepare(self, name: str, path, steps: int = 30, guidance: float = 7.0, size: int | None = None,
                scheduler: str | None = None, negative_prompt: str | None = None) -> Recipe:
        """Checked without loading its weights (real ones can exceed RAM in float32)."""
        from engine.generate import FINGERPRINT_FORMS, check_pipeline_folder, fingerprint_folder

        folder = Path(path).resolve()
        if folder.is_file() and folder.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
            from engine.sources.model_files import check_weight_file
            from engine.sources.single_file import lora_hint

            if folder.suffix != ".safetensors":  # single-file sources refuse it too: say so now, not one step on
                raise UserError(f"{path} is a pickled checkpoint: loading one can run code shipped in it, so only "
                                ".safetensors files are read (convert it, then add it as a single-file source with "
                                "--config DIR)")
            check_weight_file(folder)  # a corrupt or hostile header, refused in one line before it is parsed again
            hint = lora_hint(folder)
            if hint:
                raise UserError(hint)
            raise UserError(f"{path} is a single checkpoint file: add it as a single-file source with --config DIR "
                            "(a diffusers folder of the same architecture, for its configs; nothing is downloaded)")
        class_name = check_pipeline_folder(folder)
        check_weights_present(folder)
        params = generation_params(steps, guidance, size, scheduler, negative_prompt)
        multiple = size_multiple(folder, class_name)
        if params.size and params.size % multiple:
            raise UserError(f"--size {params.size} is not a multiple of {multiple}: a {class_name} refuses any other "
                            f"side at every generation (try {max(multiple, params.size // multiple * multiple)})")
        if params.negative_prompt and not takes_negative_prompt(class_name):
            raise UserError(f"a {class_name} takes no negative prompt: --negative-prompt would be ignored at every "
                            "generation (leave it out)")
        *older, now = [recipe_fingerprint(self.name, fingerprint_folder(folder, linked, whole), params)
                       for linked, whole in FINGERPRINT_FORMS]
        return Recipe(path=str(folder), params=asdict(params), fingerprint=now, older=tuple(older),
                      twin="already uses this pipeline folder with the same parameters",
                      warning=snapped_size(class_name, params.size))

    def params_hash(self, source) -> str:
        from engine.generate import GenerationParams

        return GenerationParams.from_json(source.params_json).hash()

    def load(self, source, device: str | None):
        from engine.generate import DiffusersGenerator, GenerationParams

        return DiffusersGenerator(source.name, Path(source.path), GenerationParams.from_json(source.params_json),
                                  device, fingerprint=source.fingerprint,
                                  recheck=lambda *how: self.current_fingerprint(source, *how))

    def current_fingerprint(self, source, linked: bool = True, whole: bool = True) -> str:
        from engine.generate import fingerprint_folder

        return fingerprint(self.name, fingerprint_folder(Path(source.path), linked, whole),
                           json.loads(source.params_json))


def size_multiple(folder: Path, class_name: str) -> int:
    """The multiple of pixels a side must be for the pipelines that refuse others rather than snap them (8 for the
    rest, which `generation_params` checks): SD3 and AuraFlow need their VAE's factor times their patch size (16 for
    every released one), CogView4 and Lumina 2 need 16 whatever their configs say. Read from configs, loads nothing."""
    if class_name.startswith(("CogView4", "Lumina2")):
        return 16
    if not class_name.startswith(("StableDiffusion3", "AuraFlow")):
        return 8

    def config(component: str) -> dict:
        try:
            found = json.loads((folder / component / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    levels = config("vae").get("block_out_channels")
    factor = 2 ** (len(levels) - 1) if isinstance(levels, list) and levels else 8
    patch = config("transformer").get("patch_size", 2) if class_name.startswith("StableDiffusion3") else 2
    return factor * patch if isinstance(patch, int) and patch > 0 else 8 * 2


def takes_negative_prompt(class_name: str) -> bool:
    """Whether a diffusers pipeline class's __call__ takes a negative prompt (LCM's does not)."""
    import inspect

    import diffusers

    return "negative_prompt" in inspect.signature(getattr(diffusers, class_name).__call__).parameters


def snapped_size(class_name: str, size: int | None) -> str | None:
    """A warning when a pipeline will generate another size than --size: HunyuanDiT replaces a shape it was not
    trained on by the nearest of its own (and does not resize back, as PixArt and Sana do)."""
    if not size or not class_name.startswith("HunyuanDiT"):
        return None
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import SUPPORTED_SHAPE

    if (size, size) in SUPPORTED_SHAPE:
        return None
    squares = sorted({side for side, other in SUPPORTED_SHAPE if side == other})
    return (f"a {class_name} generates only its own shapes (squares of {' or '.join(map(str, squares))}): --size "
            f"{size} is made at the nearest of them, and the stored images have that size")


# components that hold weights, so a folder of their configs alone cannot generate
# (and those of combined pipelines: Kandinsky's prior_prior, prior_text_encoder and movq, Stable Cascade's decoder and
# vqgan; a prior_tokenizer holds none)
WEIGHTED = ("unet", "transformer", "vae", "text_encoder", "prior", "decoder", "movq", "vqgan")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def check_weights_present(folder: Path) -> None:
    """Refuse a folder whose weighted components (model_index.json names them) hold no weight file: a config-only
    folder (a single-file source's --config, say) would otherwise be added and fail only at its first generation.
    Globs, loads nothing; check_pipeline_folder has read model_index.json and checked the component folders."""
    import json

    index = json.loads((folder / "model_index.json").read_text())
    empty = [name for name, value in index.items()
             if name.removeprefix("prior_").startswith(WEIGHTED) and isinstance(value, list) and value and value[0]
             and not any(found.is_file() for pattern in WEIGHT_PATTERNS for found in (folder / name).glob(pattern))]
    if empty:
        raise UserError(f"{folder}: no weight files (*.safetensors, *.bin) in {', '.join(empty)}: the folder holds "
                        "configs only (download the weights, or add a checkpoint file as a single-file source with "
                        "--config DIR)")


def recipe_fingerprint(kind: str, model_hash: str | None, params) -> str:
    """A pipeline source's fingerprint: its folder's content and its generation parameters."""
    return fingerprint(kind, model_hash, asdict(params))
