"""Generation with a diffusers text-to-image pipeline folder (the "diffusers" source kind, engine.sources)."""
from __future__ import annotations

import inspect
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from engine.errors import SourceError, UserError, first_line
from index.filehash import file_sha256
from engine.sources.model_files import (WEIGHT_SUFFIXES, check_components, check_configs, check_tokenizers,
                                        check_weight_entries, missing_packages, model_files, unloaded_tensors)
from index.keys import canonical_json, sha256_text

# Weight files are fingerprinted by name, size and either their whole content (`whole`, what `source add` records
# since 2026-12: an edit confined to the middle of a file, a LoRA fused into it and saved over it at the same
# size, changes only this) or their first and last MiB (the cheap form: what sources added before recorded, and
# a process-local identity for shared LoRA bases).
_PROBE = 1 << 20
# The forms of fingerprint_folder a stored source may have recorded, as (linked, whole), cheapest first; the
# last is what `source add` records now (the others: before 2026-12, and before linked folders counted).
FINGERPRINT_FORMS = ((True, False), (False, False), (True, True))


@dataclass(frozen=True)
class GenerationParams:
    """Everything besides prompt and seed that changes a generated image (part of the cache key)."""

    steps: int = 30
    guidance: float = 7.0
    size: int | None = None  # square side in pixels; None keeps the pipeline's default
    scheduler: str | None = None  # a diffusers scheduler class name; None keeps the pipeline's own
    negative_prompt: str | None = None

    def hash(self) -> str:
        return sha256_text(canonical_json(asdict(self)))

    @classmethod
    def from_json(cls, text: str) -> "GenerationParams":
        return cls(**json.loads(text))


def fingerprint_folder(folder: Path, linked: bool = True, whole: bool = False) -> str:
    """A content fingerprint of a pipeline folder: configs in full, weights by name, size and content (`whole`) or
    ends (a component folder linked from elsewhere included: swapping the link's target changes the fingerprint).
    `linked=False` leaves linked folders out, as fingerprints taken before they counted did: a source added then
    is not "changed" now (DiffusersGenerator.check_unchanged)."""
    parts: list[list] = [["weights", "sha256"]] if whole else []
    for path in (p for p in model_files(folder) if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(folder).as_posix()
        if not linked and "/" in rel and (folder / rel.split("/")[0]).is_symlink():
            continue
        if path.suffix in WEIGHT_SUFFIXES:
            size = path.stat().st_size
            if whole:
                parts.append([rel, size, file_sha256(path)])
                continue
            with open(path, "rb") as handle:
                head = handle.read(_PROBE)
                handle.seek(max(0, size - _PROBE))
                tail = handle.read(_PROBE)
            parts.append([rel, size, sha256_text(head.hex() + tail.hex())])
        elif path.suffix in {".json", ".txt", ".model"}:
            parts.append([rel, _hex_sha256(path)])
    return sha256_text(canonical_json(parts))


def files_signature(folder: Path, *others: Path) -> tuple:
    """(path, size, mtime, ctime, inode) of every file under `folder` and of `others`: no write leaves it as it
    was (a write sets ctime, which no call of a user's sets back), so while it holds a verified fingerprint holds."""
    out = []
    for path in [*model_files(folder), *others]:
        info = path.stat()
        out.append((str(path), info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino))
    return tuple(out)


def _hex_sha256(path: Path) -> str:
    """sha256_text(path.read_bytes().hex()), streamed: a multi-GB "vocab.json" must not be read into memory twice."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block.hex().encode("ascii"))
    return digest.hexdigest()


# A dropped pipeline at least this large (its weights, in bytes) is collected at once on the CPU too; smaller ones
# wait for Python's own collection (a full collection costs ~0.2 s with torch loaded: 8 s of the 25 s demo).
COLLECT_AT_BYTES = 1 << 30


def pipeline_bytes(pipe) -> int:
    """What a pipeline's weights take (parameters and buffers of its torch modules)."""
    total = 0
    for component in getattr(pipe, "components", {}).values():
        for tensors in (getattr(component, "parameters", None), getattr(component, "buffers", None)):
            if callable(tensors):
                total += sum(t.numel() * t.element_size() for t in tensors())
    return total


def free_device_memory(nbytes: int | None = None) -> None:
    """Give a dropped pipeline's memory back now: its modules hold reference cycles, so they outlive the last
    reference until a collection, and CUDA's cache is emptied only of what is free by then. On the CPU only a
    pipeline of `nbytes` >= COLLECT_AT_BYTES (or of unknown size) is worth a full collection."""
    import gc

    import torch

    cuda = torch.cuda.is_available()
    if cuda or nbytes is None or nbytes >= COLLECT_AT_BYTES:
        gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def source_params_hash(source) -> str | None:
    """Hash of a stored source's generation parameters; None for kinds with nothing to generate."""
    from engine import sources

    return sources.kind_of(source).params_hash(source)


def source_fingerprint(kind: str, name: str, model_hash: str | None, params: GenerationParams | None) -> str:
    """The fingerprint `source add` stores for a kind (engine.sources prepares it; kept for callers)."""
    from engine import sources

    if not sources.get(kind).generates:
        return sources.fingerprint(kind, name)
    if sources.get(kind).costs_money:
        from engine.sources.api import api_fingerprint

        return api_fingerprint(model_hash)
    from engine.sources.pipeline import recipe_fingerprint

    return recipe_fingerprint(kind, model_hash, params)


class DiffusersGenerator:
    """Any diffusers text-to-image pipeline folder (SD 1.x, SDXL, PixArt, Flux ...), loaded lazily."""

    def __init__(self, name: str, folder: Path, params: GenerationParams, device: str | None = None,
                 fingerprint: str | None = None, recheck: Callable[..., str] | None = None):
        import torch

        self.name = name
        self.folder = Path(folder)
        self.params = params
        self.fingerprint = fingerprint
        self.recheck = recheck  # the fingerprint its files give now (SourceKind.current_fingerprint)
        self.watched: tuple[Path, ...] = ()  # files outside `folder` the fingerprint covers (a single checkpoint)
        self._verified: tuple | None = None  # files_signature when check_unchanged last passed
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._pipe = None
        self.calls = 0  # images generated, counted so tests can prove cache hits

    def check_unchanged(self) -> None:
        """Refuse to load files that changed since `source add`: a fine-tune saved over a folder would
        otherwise generate new images under the old fingerprint, mixed with the old weights' images.
        Tried cheapest first, as each generation of `source add` recorded it: weights' ends (before 2026-12),
        weights' ends without linked component folders (before those counted), whole weights (since)."""
        if self.recheck is None or self.fingerprint is None:
            return
        try:
            signature = files_signature(self.folder, *self.watched)
            if signature == self._verified:  # nothing written since it last passed (each reload asks again)
                return
            if any(self.recheck(linked, whole) == self.fingerprint
                   for linked, whole in FINGERPRINT_FORMS):
                self._verified = signature
                return
        except OSError as exc:
            raise SourceError(self.name, f"its model files are unreadable: {first_line(exc)}") from exc
        raise SourceError(self.name, "its model files changed since the source was added (weights or configs "
                                     "saved over them): add it again under a new name; its stored images "
                                     "stay those of the old files")

    def load(self):
        if self._pipe is None:
            self.check_unchanged()
            try:
                self._pipe = load_pipeline(self.folder, self.params, self.device)
            except UserError as exc:  # a registered source that no longer loads: the source's fault
                raise SourceError(self.name, str(exc)) from exc
        return self._pipe

    @property
    def loaded(self) -> bool:
        """Whether the pipeline is in memory now (the service bounds how many are)."""
        return self._pipe is not None

    def unload(self) -> None:
        """Free the pipeline's memory; it reloads on the next generation."""
        if self._pipe is not None:
            nbytes = pipeline_bytes(self._pipe)
            self._pipe = None
            free_device_memory(nbytes)

    def generate(self, prompt: str, seeds: list[int]) -> list[Image.Image]:
        """One image per seed, each from its own torch.Generator so batching never changes a result."""
        return self.generate_many([(prompt, seed) for seed in seeds])

    def generate_many(self, jobs: list[tuple[str, int]], batch_size: int | None = None,
                      budget=None) -> list[Image.Image]:
        """One image per (prompt, seed) job, in order, batched across prompts as well as seeds.

        Each image comes from its own CPU torch.Generator seeded with its seed, so which jobs share a
        batch never changes what is drawn. `batch_size` None takes `default_batch_size()`: on CPU that
        is 1, so every image is bit-identical to `generate(prompt, [seed])` whatever the grouping (CPU
        BLAS kernels round differently for another batch size: up to one pixel level); on CUDA it is as
        many as fit, where batching is where the throughput is (fp16 results then agree to rounding).
        `budget` is for API sources: local generation costs nothing.
        """
        jobs = [(str(prompt), int(seed)) for prompt, seed in jobs]
        if not jobs:
            return []
        pipe = self.load()
        size = max(1, int(batch_size or self.default_batch_size()))
        images = []
        for start in range(0, len(jobs), size):
            images += self._run_batch(pipe, jobs[start:start + size])
        return images

    def _run_batch(self, pipe, jobs: list[tuple[str, int]]) -> list[Image.Image]:
        import torch

        kwargs = call_arguments(_call_parameters(pipe), self.params, len(jobs))
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in jobs]
        try:
            with torch.inference_mode():
                images = pipe(prompt=[prompt for prompt, _ in jobs], generator=generators, **kwargs).images
        except Exception as exc:
            raise SourceError(self.name, f"failed to generate: {first_line(exc)}") from exc
        images = _finite_pil(self.name, images)
        self.calls += len(images)
        return [im.convert("RGB") for im in images]

    def default_batch_size(self) -> int:
        """Images per pipeline call: 1 on CPU (results independent of grouping, see generate_many);
        on CUDA as many as half the free device memory holds at `GPU_BYTES_PER_IMAGE_512` per 512x512
        image, capped at `GPU_MAX_BATCH_512` (scaled by pixel count; 64 at most): 12 at 512 px on an 80 GB card."""
        import torch

        if not str(self.device).startswith("cuda") or not torch.cuda.is_available():
            return 1
        side = self.params.size or _default_side(self._pipe) or 512
        scale = (side * side) / (512 * 512)
        try:
            free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        except Exception:  # a driver that cannot say: the cap alone
            free = 1 << 62
        fits = int(free * 0.5 // (GPU_BYTES_PER_IMAGE_512 * scale))
        return max(1, min(fits, round(GPU_MAX_BATCH_512 / scale), GPU_MAX_BATCH))


# Device memory budgeted per image on CUDA at 512x512 (scaled by pixels): deliberately generous (SD 1.5
# in fp16 with classifier-free guidance uses well under 1 GiB), so SDXL and transformer pipelines fit too.
GPU_BYTES_PER_IMAGE_512 = 3 << 30
# Beyond this many 512x512 images per call throughput stops improving (SD 1.5 size, 30 steps, fp16:
# 0.34 s/image at batch 3, 0.22 at 6, 0.20 at 12 on an H200; scripts/bench_gpu.py --size real).
GPU_MAX_BATCH_512 = 12
GPU_MAX_BATCH = 64  # small images: more per call only delays the first result


def _finite_pil(name: str, images) -> list[Image.Image]:
    """A pipeline's float images as PIL (diffusers' own conversion, so the pixels are those of output_type
    "pil"), refused if any value is NaN or infinite: weights or a LoRA that overflow (NaN tensors, an alpha of
    1e30) decode to NaN, which "pil" turns into black images stored and compared as if real."""
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor

    if not isinstance(images, np.ndarray):  # a pipeline that ignores output_type: already PIL
        return list(images)
    if not np.isfinite(images).all():
        raise SourceError(name, "generated NaN or infinite pixels (its weights, or a LoRA's weights or alpha, "
                                "overflow): nothing was stored; check the model files")
    return VaeImageProcessor.numpy_to_pil(images)


def _call_parameters(pipe):
    return inspect.signature(pipe.__call__).parameters


# The negative prompt a "true CFG" pipeline is run with when the recipe has none: Qwen-Image's model card uses " ",
# and such pipelines apply no guidance at all without one.
TRUE_CFG_NEGATIVE = " "


def call_arguments(accepted, params: GenerationParams, count: int) -> dict:
    """The keyword arguments a pipeline's __call__ (its signature's `accepted` parameters) gets for `count` prompts
    of a recipe; only those it takes. The recipe's guidance goes where the pipeline applies classifier-free
    guidance, else it would be silently ignored: `guidance_scale` for most; `true_cfg_scale` where `guidance_scale`
    is absent or defaults to None (read only by guidance-distilled weights: Qwen-Image), which guides only when
    given a negative prompt; `prior_guidance_scale` for Stable Cascade and Würstchen (their decoder runs unguided
    by default; `steps` are the decoder's, the prior keeps its default steps)."""
    kwargs: dict = {"num_inference_steps": params.steps, "output_type": "np"}  # floats: NaN stays visible
    negative = params.negative_prompt
    plain = accepted.get("guidance_scale")
    elsewhere = {"true_cfg_scale", "prior_guidance_scale"} & set(accepted)
    if (plain is not None and plain.default is not None) or not elsewhere:
        kwargs["guidance_scale"] = params.guidance
    elif "true_cfg_scale" in accepted:
        kwargs["true_cfg_scale"] = params.guidance
        if negative is None and params.guidance > 1:
            negative = TRUE_CFG_NEGATIVE
    else:
        kwargs["prior_guidance_scale"] = params.guidance
    if params.size:
        kwargs["height"] = kwargs["width"] = params.size
    if negative:
        kwargs["negative_prompt"] = [negative] * count
    # PixArt and DeepFloyd IF "clean" a caption by default (lower-case it, strip markup) only where beautifulsoup4 and
    # ftfy happen to be installed, and say so on stderr at every call where they are not: off everywhere, so one
    # recipe makes one image on every machine sharing a store (neither package is a dependency of resynth)
    kwargs["clean_caption"] = False
    return {k: v for k, v in kwargs.items() if k in accepted}


def _default_side(pipe) -> int | None:
    """The pipeline's own default image side in pixels, if it says (denoiser sample size x VAE factor)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    factor = getattr(pipe, "vae_scale_factor", None)
    if isinstance(sample, (list, tuple)):
        sample = max(sample)
    if isinstance(sample, int) and isinstance(factor, int):
        return sample * factor
    return None


def check_pipeline_folder(folder: Path) -> str:
    """Validate a pipeline folder without loading weights (real ones can exceed RAM in float32).

    Returns the pipeline class name; raises UserError for anything that is not text-to-image.
    """
    import diffusers

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a diffusers pipeline folder (a single .safetensors checkpoint is "
                        "added with --kind single-file --config DIR)", code="not_a_directory")
    if not folder.is_dir():
        raise UserError(f"pipeline folder not found: {folder}")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"not a diffusers pipeline folder (no model_index.json): {folder}")
    try:
        index = json.loads(index_file.read_text())
        class_name = index["_class_name"]
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: [[[... nested 100000 deep
        raise UserError(f"malformed model_index.json in {folder}") from None
    pipeline_class = getattr(diffusers, str(class_name), None)
    missing = missing_packages(pipeline_class) if isinstance(pipeline_class, type) else []
    if missing:  # diffusers exports a placeholder (Kolors without sentencepiece): say what to install
        raise UserError(f"{folder}: {class_name} needs the Python package{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)}, not installed here: pip install {' '.join(missing)}")
    if pipeline_class is None or not issubclass(pipeline_class, diffusers.DiffusionPipeline):
        raise UserError(f"{folder}: {class_name!r} is not a diffusers pipeline class")
    refusal = not_text_to_image(pipeline_class)
    if refusal:
        raise UserError(f"{folder} holds a {class_name}, not a text-to-image pipeline: {refusal}")
    if not isinstance(index, dict):
        raise UserError(f"malformed model_index.json in {folder}")
    check_components(folder, index)  # before anything is imported or loaded for them
    for component, value in index.items():
        named = not component.startswith("_") and isinstance(value, list) and value and value[0]
        if named and not (folder / component).is_dir():
            raise UserError(f"{folder}: component folder {component!r} is missing")
    check_configs(folder)
    check_tokenizers(folder, index)
    check_weight_entries(folder, {name for name, value in index.items() if isinstance(value, list) and any(value)})
    return class_name


def not_text_to_image(pipeline_class) -> str | None:
    """Why a diffusers pipeline class cannot be a source by itself (None if it can): it must take a prompt and no
    input image, need nothing else (a decoder needs the image embeddings its prior makes), and return images, as
    its __call__'s return annotation says (video, audio and 3D pipelines, and priors, return something else)."""
    accepted = inspect.signature(pipeline_class.__call__).parameters
    name = pipeline_class.__name__
    if "prompt" not in accepted:
        return "it takes no prompt"
    words = [what for word, what in _NOT_IMAGE_WORDS.items() if word in name]
    if ("image" in accepted or words) and not _listed_text_to_image(name):
        return "it edits an input image" if "image" in accepted else words[0]
    needed = [name for name, p in accepted.items() if name not in ("self", "prompt") and p.default is p.empty
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if needed:
        return f"it also needs {', '.join(needed)} (a decoder or a stage of another pipeline)"
    if pipeline_class.__name__.endswith("PriorPipeline"):
        return "a prior makes image embeddings for a decoder (add the combined pipeline)"
    outputs = _output_fields(pipeline_class)
    if outputs and "images" not in outputs:
        return f"it returns {', '.join(sorted(outputs))}, not images"
    return None


# Pipelines outside diffusers' own text-to-image list whose name says what else they need or make (older ones have
# no return annotation to read).
_NOT_IMAGE_WORDS = {"Video": "it makes video", "Audio": "it makes audio", "Music": "it makes audio",
                    "ShapE": "it makes 3D objects", "Inpaint": "it edits an input image",
                    "Edit": "it edits an input image", "Control": "it needs a control image"}


def _listed_text_to_image(name: str) -> bool:
    """Whether diffusers itself maps the class as text-to-image (AutoPipelineForText2Image's table; Flux.2 and
    Qwen-Image 2.1 take optional reference images), control and inpainting pipelines aside. Asked only when a class
    takes an `image` or has a telling name: the table imports every pipeline it names (seconds)."""
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    listed = {cls.__name__ for cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values()}
    return name in listed and "Control" not in name and "Inpaint" not in name


def _output_fields(pipeline_class) -> set[str]:
    """The fields of the output dataclasses a pipeline's __call__ is annotated to return (empty if it says none)."""
    import dataclasses
    import sys
    import typing

    from diffusers.utils import BaseOutput

    annotation = inspect.signature(pipeline_class.__call__).return_annotation
    if isinstance(annotation, str):  # postponed annotations: named in the pipeline's own module
        names = {part.strip() for part in annotation.split("|")}
        scope = vars(sys.modules[pipeline_class.__module__])
        found = [scope.get(name) for name in names]
    else:
        found = list(typing.get_args(annotation)) or [annotation]
    fields: set[str] = set()
    for cls in found:
        if isinstance(cls, type) and issubclass(cls, BaseOutput) and dataclasses.is_dataclass(cls):
            fields |= {field.name for field in dataclasses.fields(cls)}
    return fields


class _CutPromptOnce(logging.Filter):
    """diffusers warns at every generation of a description longer than its text encoder's window, quoting the
    whole cut-off text: a long description printed kilobytes per image, past --quiet. Said once, in one line
    (and transformers' "Token indices sequence length ... will result in indexing errors", wrong here, not)."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Token indices sequence length is longer than the specified maximum"):
            return False
        if not message.startswith("The following part of your input was truncated"):
            return True
        if self.said:
            return False
        self.said = True
        window = re.search(r"up to (\d+) tokens", message)
        record.msg, record.args = (f"a description is longer than a generator's text encoder reads "
                                   f"({window.group(1) if window else 'its'} tokens): its end is left out "
                                   "(said once)"), ()
        return True


_CUT_PROMPT = _CutPromptOnce()  # one for every handler: once a process, whichever handler shows it


def _say_cut_prompts_once() -> None:
    for library in ("diffusers", "transformers"):
        for handler in logging.getLogger(library).handlers:  # each library's own, to stderr (neither propagates)
            if _CUT_PROMPT not in handler.filters:
                handler.addFilter(_CUT_PROMPT)


def load_pipeline(folder: Path, params: GenerationParams, device: str):
    """Load a pipeline folder the way a user's real checkpoint is loaded; one-line errors if not."""
    import diffusers
    import torch
    from diffusers import DiffusionPipeline

    import transformers

    class_name = check_pipeline_folder(folder)
    _say_cut_prompts_once()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    dtype = pipeline_dtype(class_name, device) or torch.float32
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except Exception as exc:
        raise UserError(f"cannot load pipeline {folder}: {first_line(exc)}") from exc
    lacking = unloaded_tensors(pipe)
    if lacking:
        raise UserError(f"cannot load pipeline {folder}: {lacking}")
    check_scheduler(params.scheduler)
    if params.scheduler:
        pipe.scheduler = getattr(diffusers, params.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# Pipelines whose activations overflow float16 (black or NaN images): run in bfloat16 on a GPU that has it. Qwen-Image,
# Z-Image and Stable Cascade are reported to give NaN latents in float16 (ComfyUI #10751, Tongyi-MAI/Z-Image #14);
# HiDream and Chroma are released and run in bfloat16.
BF16_PIPELINES = ("Flux", "StableDiffusion3", "Sana", "HunyuanDiT", "Lumina", "CogView", "QwenImage", "ZImage",
                  "HiDream", "Chroma", "StableCascade", "Wuerstchen")


def wants_bfloat16(class_name: str) -> bool:
    """Whether a pipeline class runs in bfloat16 rather than float16 on a GPU (BF16_PIPELINES)."""
    return class_name.startswith(BF16_PIPELINES)


def pipeline_dtype(class_name: str, device: str | None):
    """The dtype a pipeline runs in on `device`: None (float32) on the CPU; on CUDA float16, except
    bfloat16 for the transformer families that overflow float16, where the GPU supports it."""
    import torch

    if not str(device or "").startswith("cuda"):
        return None
    if wants_bfloat16(class_name) and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def check_scheduler(name: str | None) -> None:
    import diffusers

    if name and not (name.endswith("Scheduler") and hasattr(getattr(diffusers, name, None), "from_config")):
        raise UserError(f"unknown scheduler {name!r} (a diffusers class such as DDIMScheduler)")
