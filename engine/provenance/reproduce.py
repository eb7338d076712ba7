"""Reproduce an image from the recipe its own metadata gives, on the enrolled source it names.

A diffusion pipeline is deterministic given its weights, prompt, sampler, steps, guidance, size and seed:
the right model with the file's recipe redraws the image almost pixel for pixel, which is near-proof of
the claim; the wrong model, an edited image or forged metadata does not. One extra generation per
(source, recipe), stored under the role "reproduction" (never a reference: no role filter of the method
reads it), keyed by the recipe, so a repeat costs no generation. The result sits beside the resynthesis
ranking in `evidence.provenance.reproduction` and never changes it.
"""
from __future__ import annotations

import io
import math
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from index.keys import cache_key, canonical_json, normalise_description, sha256_text

if TYPE_CHECKING:
    from engine.attribute import Plan
    from engine.provenance.generators import GenerationMetadata
    from engine.workspace import Workspace

ROLE = "reproduction"
# The decision is on the PSNR of both images box-downsampled by LOWPASS (at the query's size): recompression
# and resampling noise is high-frequency, another seed's image differs everywhere. Measured on the tiny zoo
# (64 px, 3 pipelines x 2 prompts): a copy re-saved as JPEG 95 / 75 scores 36-37 / 32-33 dB there (19-21 /
# 18-19 dB at full size), another seed 19-21 dB (12-14 at full size); a bit-exact redraw is PSNR_CAP.
REPRODUCED_PSNR = 28.0
LOWPASS = 4
PSNR_CAP = 100.0  # identical images (an infinite PSNR is not JSON)
MAX_SIDE = 4096  # a recipe larger than this is not redrawn (memory), whatever the file claims
# A file's recipe is the attacker's text: a redraw runs inside an attribution (a request, in the service), so
# its cost is bounded whatever the file says. 150 is AUTOMATIC1111's steps slider; ComfyUI allows 10000.
MAX_STEPS = 150
MAX_WORK = 150 * 2048 * 2048  # steps x pixels: 150 steps at 2048 x 2048, 37 at 4096 x 4096 (SDXL's own is 30 x 1 MP)
MAX_GUIDANCE = 100.0
SEEDS = 2 ** 64  # torch generators take seeds in [0, 2^64); ComfyUI draws from all of it
STORED_SEED = 2 ** 63 - 1  # the largest seed the store's seed column (BIGINT) holds on every backend

# Front-end sampler names (AUTOMATIC1111/Forge, ComfyUI, InvokeAI; lower case) -> diffusers scheduler
# class and config overrides. Only names with a faithful diffusers counterpart; others are "unknown".
# InvokeAI writes its sampler as `scheduler` with a `_k` suffix for Karras ("euler", "dpmpp_2m_k", "kdpm_2_a").
_DPM_SDE = {"algorithm_type": "sde-dpmsolver++"}
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler a": ("EulerAncestralDiscreteScheduler", {}), "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++ 2m": ("DPMSolverMultistepScheduler", {}), "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++ 2m sde": ("DPMSolverMultistepScheduler", _DPM_SDE),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", _DPM_SDE),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}), "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm2 a": ("KDPM2AncestralDiscreteScheduler", {}), "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "kdpm_2": ("KDPM2DiscreteScheduler", {}), "kdpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "plms": ("PNDMScheduler", {}), "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}), "uni_pc": ("UniPCMultistepScheduler", {}),
}
KARRAS = {"DPMSolverMultistepScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
          "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler"}
PLAIN_SCHEDULES = {"", "automatic", "normal", "simple", "default"}
# A1111 settings that mean the pixels are not one text-to-image pass at the recipe's seed
NOT_ONE_PASS = ("Hires upscale", "Hires steps", "Denoising strength", "Variation seed", "Mask blur", "ADetailer model")


@dataclass(frozen=True)
class Recipe:
    """Exactly what is redrawn: the file's recipe, with the fields it left out taken from the source (`filled`)."""
    prompt: str
    negative_prompt: str | None
    steps: int
    guidance: float
    width: int | None
    height: int | None
    seed: int
    scheduler: str
    scheduler_config: tuple[tuple[str, Any], ...] = ()
    filled: tuple[str, ...] = ()

    def hash(self) -> str:
        """The recipe part of the cache key; tagged so it never equals a resynthesis recipe's hash."""
        data = asdict(self)
        data.pop("filled")
        return sha256_text(canonical_json(["reproduction", data]))

    def summary(self) -> dict:
        return {"steps": self.steps, "sampler": self.scheduler, "scheduler_config": dict(self.scheduler_config),
                "guidance": self.guidance, "width": self.width, "height": self.height, "seed": self.seed,
                "negative_prompt": self.negative_prompt, "filled_from_source": list(self.filled)}


def scheduler_for(sampler: str | None, schedule: str | None = None) -> tuple[str, dict[str, Any]] | str:
    """(diffusers scheduler class, config overrides) of a front-end sampler name, or why not (a string)."""
    import diffusers

    name = (sampler or "").strip()
    if name.endswith("Scheduler") and hasattr(getattr(diffusers, name, None), "from_config"):
        return name, {}  # a diffusers class name, as diffusers scripts write it
    key = name.lower()
    karras = key.endswith(" karras") or key.endswith("_k")
    key = key.removesuffix(" karras").removesuffix("_k").strip()
    # ComfyUI's "_gpu" variants draw their noise on the GPU, the same algorithm; NovelAI writes "k_euler"
    key = key.removesuffix("_gpu").removeprefix("k_")
    if key not in SAMPLERS:
        return f"unknown sampler {name!r}"
    cls, config = SAMPLERS[key]
    plan = (schedule or "").strip().lower()
    if plan == "karras":
        karras = True
    elif plan not in PLAIN_SCHEDULES:
        return f"unknown schedule type {schedule!r} for sampler {name!r}"
    if karras:
        if cls not in KARRAS:
            return f"no Karras schedule for sampler {name!r}"
        config = {**config, "use_karras_sigmas": True}
    return cls, dict(config)


def recipe_of(meta: "GenerationMetadata", source, image_size: tuple[int, int]) -> Recipe | str:
    """The recipe to redraw on `source`, or why the file's metadata cannot be redrawn (a string)."""
    import json

    from engine.recipes import pipeline_scheduler

    if meta.invalid:  # written but unusable: never filled from the source as if the file had left it out
        return f"the file's {', '.join(meta.invalid)} out of range or not a number"
    if meta.per_step:
        named = ", ".join("guidance" if f == "cfg_scale" else f for f in meta.per_step)
        return f"{named} per step (a list) cannot be redrawn"
    if meta.seed is None:
        return "no seed in the metadata"
    if not 0 <= meta.seed < SEEDS:
        return f"seed {meta.seed} is not one a generator draws with (0 to 2^64-1)"
    if not meta.prompt or not normalise_description(meta.prompt):  # control characters alone: no words, and a
        # redraw from them stored an empty description and reported a conflict
        return "no prompt in the metadata"
    settings = dict(meta.settings)
    extra = [k for k in NOT_ONE_PASS if k in settings]
    if extra:
        return f"not one text-to-image pass ({', '.join(extra)})"
    params = json.loads(source.params_json or "{}") if getattr(source, "params_json", None) else {}
    filled = []
    sampler = meta.sampler
    if not sampler:
        sampler = params.get("scheduler") or pipeline_scheduler(source.path) or ""
        filled.append("sampler")
    found = scheduler_for(sampler, meta.scheduler)
    if isinstance(found, str):
        return found
    steps, guidance = meta.steps, meta.cfg_scale
    if steps is None:
        steps = int(params.get("steps") or 30)
        filled.append("steps")
    if guidance is None:
        guidance = float(params.get("guidance") or 7.0)
        filled.append("guidance")
    if not 1 <= steps <= MAX_STEPS:
        return f"{steps} steps: a redraw takes at most {MAX_STEPS}"
    if not 0 <= guidance <= MAX_GUIDANCE:
        return f"guidance {guidance:g} is outside 0 to {MAX_GUIDANCE:g}"
    width, height = meta.width, meta.height
    if width is None or height is None:
        width, height = image_size
        filled.append("size (the image's)")
    if width % 8 or height % 8 or not 8 <= width <= MAX_SIDE or not 8 <= height <= MAX_SIDE:
        return f"size {width}x{height} cannot be drawn (a multiple of 8 up to {MAX_SIDE} per side)"
    if steps * width * height > MAX_WORK:
        return f"{steps} steps at {width}x{height} is more than a redraw may cost (steps x pixels <= {MAX_WORK})"
    return Recipe(prompt=meta.prompt, negative_prompt=meta.negative_prompt or None, steps=int(steps),
                  guidance=float(guidance), width=int(width), height=int(height), seed=int(meta.seed),
                  scheduler=found[0], scheduler_config=tuple(sorted(found[1].items())), filled=tuple(filled))


def draw(generator, recipe: Recipe) -> Image.Image:
    """One image with exactly `recipe` on a loaded diffusers generator. The pipeline is rebuilt around its
    own modules with the recipe's scheduler (diffusers' `components`), so the source's pipeline, which
    ordinary resynthesis uses, is never altered."""
    import inspect

    import diffusers
    import torch

    pipe = generator.load()
    scheduler = getattr(diffusers, recipe.scheduler).from_config(pipe.scheduler.config, **dict(recipe.scheduler_config))
    components = {**pipe.components, "scheduler": scheduler}
    accepted = inspect.signature(type(pipe).__init__).parameters
    for name in accepted:  # the loaded pipeline's own settings (requires_safety_checker, force_zeros_for_empty_prompt)
        if name not in components and name in pipe.config and not name.startswith("_"):
            components[name] = pipe.config[name]
    own = type(pipe)(**{k: v for k, v in components.items() if k in accepted})
    own.set_progress_bar_config(disable=True)
    call = inspect.signature(own.__call__).parameters
    kwargs: dict[str, Any] = {"num_inference_steps": recipe.steps, "guidance_scale": recipe.guidance,
                              "height": recipe.height, "width": recipe.width, "output_type": "pil"}
    if recipe.negative_prompt:
        kwargs["negative_prompt"] = recipe.negative_prompt
    kwargs = {k: v for k, v in kwargs.items() if k in call}
    with torch.inference_mode():
        image = own(prompt=recipe.prompt, generator=torch.Generator(device="cpu").manual_seed(recipe.seed),
                    **kwargs).images[0]
    generator.calls += 1
    return image.convert("RGB")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse))


def pixel_similarity(query: Image.Image, made: Image.Image) -> dict:
    """PSNR (dB, capped) and mean absolute difference (0-255) of two decoded RGB images at the query's size,
    and the PSNR of both box-downsampled by LOWPASS (`psnr_lowpass_db`, what decides); the redraw is resized
    (Lanczos) to the query's size when they differ, which is said."""
    query = query.convert("RGB")
    resized = made.size != query.size
    made = (made.resize(query.size, Image.Resampling.LANCZOS) if resized else made).convert("RGB")
    a, b = np.asarray(query, np.float64), np.asarray(made, np.float64)
    small = (max(1, query.width // LOWPASS), max(1, query.height // LOWPASS))
    low_a = np.asarray(query.resize(small, Image.Resampling.BOX), np.float64)
    low_b = np.asarray(made.resize(small, Image.Resampling.BOX), np.float64)
    return {"psnr_db": round(_psnr(a, b), 3), "psnr_lowpass_db": round(_psnr(low_a, low_b), 3),
            "mean_abs_diff": round(float(np.abs(a - b).mean()), 4), "resized": resized}


def check(ws: "Workspace", query, claim: dict, vector: np.ndarray, plan: "Plan") -> dict:
    """The reproduction result of one query whose metadata claims an enrolled source (`claim`, from
    engine.compare.provenance_claim): {state, why?, source, recipe, similarity, cached, rule}. States:
    "reproduced", "not reproduced", "not reproducible" (why), "skipped" (why), "failed" (why)."""
    name = claim.get("enrolled")
    meta = query.provenance.metadata if query.provenance is not None else None
    if name is None or meta is None:
        return {"state": "not reproducible", "why": "the model the file names is not enrolled"}
    if plan.options.mode == "dataset":
        return {"state": "skipped", "why": "dataset mode generates nothing"}
    source = next((s for s in ws.sources() if s.name == name), None)
    if source is None:
        return {"state": "not reproducible", "why": f"source {name} was removed"}
    from engine.generate import DiffusersGenerator
    from engine.sources import kind_of

    kind = kind_of(source)
    if not kind.generates or kind.costs_money:
        return {"state": "not reproducible", "why": f"a {source.kind} source is not redrawn from a recipe"}
    recipe = recipe_of(meta, source, query.image.size)
    if isinstance(recipe, str):
        return {"state": "not reproducible", "why": f"recipe not reproducible ({recipe})"}
    out: dict[str, Any] = {"source": name, "recipe": recipe.summary(),
                           "rule": f"reproduced when the PSNR at 1/{LOWPASS} size >= {REPRODUCED_PSNR:g} dB"}
    started = time.perf_counter()
    try:
        made, made_vector, cached = _cached_or_drawn(ws, source, recipe, plan.embedder, DiffusersGenerator)
    except _NotDrawable as exc:
        return {"state": "not reproducible", "why": str(exc), **out}
    except Exception as exc:  # the claim is context: a failed redraw never fails the attribution
        from engine.errors import first_line

        return {"state": "failed", "why": first_line(exc)[:300], **out}
    finally:
        ws._time("reproduce", started)
    similarity = pixel_similarity(query.image, made)
    q = np.asarray(vector, np.float64).ravel()
    m = np.asarray(made_vector, np.float64).ravel()
    norms = float(np.linalg.norm(q) * np.linalg.norm(m))
    similarity["clip_cosine"] = round(float(q @ m) / max(norms, 1e-12), 6)
    reproduced = similarity["psnr_lowpass_db"] >= REPRODUCED_PSNR
    return {"state": "reproduced" if reproduced else "not reproduced", **out, "similarity": similarity,
            "cached": cached}


class _NotDrawable(Exception):
    pass


_DRAW_LOCK = threading.Lock()


def _cached_or_drawn(ws: "Workspace", source, recipe: Recipe, embedder: str,
                     plain) -> tuple[Image.Image, np.ndarray, bool]:
    """(redrawn image, its vector, whether it came from the store): stored under the role "reproduction"
    with the cache key of (prompt, source, seed, recipe), so the same claim is redrawn once."""
    from engine.resynthesis import image_path, png_bytes
    from index.store import NewImage

    store = ws.store
    key = cache_key(sha256_text(normalise_description(recipe.prompt)), source.fingerprint, recipe.seed,
                    recipe.hash(), embedder)
    found = store.existing_keys([key])
    if key in found:
        data = _stored_bytes(store, store.image_id_for_key(key))
        if data is not None:  # else gone or altered: drawn again
            with Image.open(io.BytesIO(data)) as stored:
                image = stored.convert("RGB")
            return image, store.vectors(np.array([found[key]], np.int64))[0], True
    generator = ws.generator(source.name)
    if not isinstance(generator, plain) or type(generator).__name__ == "LoraGenerator":
        raise _NotDrawable(f"a {source.kind} source is not redrawn from a recipe yet")
    from engine.sources import kind_of

    # one redraw at a time per process (in the service it runs in a request's scoring step), and the pipeline
    # held as a generation holds it (engine.models.Models.generating: its load, its scheduler, its room)
    with ws.models.generating(generator) if kind_of(source).needs_gpu else nullcontext(), _DRAW_LOCK:
        image = draw(generator, recipe)
    vector = ws.embed([image])[0]
    relative = image_path(source.fingerprint, key)
    file_hash = store.write_image(relative.as_posix(), png_bytes(image))  # the store folder or its object store
    store.add_images([NewImage(key=key, role=ROLE, source_id=source.id,
                               description_id=store.description_id(recipe.prompt), file_hash=file_hash,
                               path=relative.as_posix(), vector=vector,
                               seed=recipe.seed if recipe.seed <= STORED_SEED else None,  # the key holds it
                               params_hash=recipe.hash())])
    return image, vector, False


def _stored_bytes(store, image_id: int | None) -> bytes | None:
    if image_id is None:
        return None
    return store.image_bytes(image_id)  # checked against the catalog's sha256, wherever the file lives


def conclusion(claim: dict, predicted: str | None) -> str:
    """One sentence for a person: what the claim, its redraw and the ranking say together."""
    name, state = claim.get("enrolled"), (claim.get("reproduction") or {}).get("state")
    if name is None:
        return f"the file names {claim.get('claims')!r}, which matches no enrolled source"
    if state == "reproduced":
        if predicted == name:
            return f"agreement: reproduced on {name} from the file's recipe, which the resynthesis ranking also names"
        return f"conflict: reproduced on {name} from the file's recipe, but the resynthesis ranking names {predicted}"
    if state == "not reproduced":
        return (f"conflict: the file claims {name}, but its recipe is not reproduced there (another model, an "
                "edited image, forged metadata, or a front-end whose noise differs from diffusers')")
    side = "agrees with" if claim.get("agrees") else "differs from" if claim.get("agrees") is False else "beside"
    why = (claim.get("reproduction") or {}).get("why")
    return f"the file claims {name} ({side} the resynthesis ranking); not redrawn: {why}"
