"""LoRA adapters on a diffusers pipeline folder, stored as kind "lora".

`source add NAME PIPELINE_DIR --lora FILE[:SCALE][,FILE[:SCALE]...]` enrols the base folder with one or
more adapter files (diffusers, kohya or A1111 LoRA `.safetensors`, whatever diffusers' `load_lora_weights`
reads) at their scales (default 1.0), with the recipe parameters of the "diffusers" kind. Each combination
is its own source: the fingerprint is the base folder's fingerprint, each adapter file's full SHA-256 with
its scale (in a canonical order: adapters add up, so their order does not change a source), and the recipe.

Sources of one base share one pipeline in memory: `_BaseCache` keeps one per (base folder fingerprint,
device); each adapter is loaded once into it under a name derived from its content
(`load_lora_weights(..., adapter_name=...)`) and every batch first selects its source's adapters and
scales with `set_adapters` and its scheduler, under the base's lock. The base is never reloaded to switch.
When the engine unloads a LoRA generator its adapters leave the base (if no other source uses them); the
base itself is freed when its last source unloads, except that one idle base is kept until another base
is loaded (so switching between LoRAs of one base never reloads it, even with one pipeline resident).

Loading adapters needs `peft` (diffusers' LoRA backend).
"""
from __future__ import annotations

import contextlib
import json
import math
import threading
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.errors import SourceError, UserError, first_line
from engine.generate import DiffusersGenerator
from engine.sources import Param, Recipe, SourceKind, fingerprint
from engine.sources.single_file import (RECIPE_PARAMS, check_safetensors, file_sha256, generation_params,
                                        safetensors_keys, stored_recipe)
from engine.sources.lora_keys import check_adapter_fits, lycoris_kind


def parse_loras(value) -> list[tuple[str, float]]:
    """`A.safetensors:0.8,B.safetensors` (or a list of such strings, or of (file, scale) pairs) -> pairs.

    A trailing `:SCALE` that is no number is read as part of the path when it looks like one (a colon in a
    folder or file name, `C:\\...`); otherwise it is a mistyped scale, refused by name."""
    if value is None or value == "" or value == []:
        raise UserError("a LoRA source needs --lora FILE[:SCALE] (comma-separated or repeated for several)")
    items: list[tuple[str, Any]] = []
    for item in ([value] if isinstance(value, (str, tuple)) else list(value)):
        if isinstance(item, tuple):
            items.append((str(item[0]), item[1]))
            continue
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            path, colon, tail = part.rpartition(":")
            try:
                items.append((path, float(tail)) if colon and path else (part, 1.0))
            except ValueError:
                if _scale_typo(tail):
                    raise UserError(f"--lora FILE:SCALE: {tail!r} is not a number (in {part})") from None
                items.append((part, 1.0))
    pairs: list[tuple[str, float]] = []
    for path, given in items:
        try:
            scale = float(given)
        except (TypeError, ValueError):
            raise UserError(f"LoRA scale of {path} must be a number, not {given!r}") from None
        if not math.isfinite(scale):
            raise UserError(f"LoRA scale of {path} must be finite, not {scale}")
        if scale == 0:  # the base under another name: a twin of the base's own source that no check would catch
            raise UserError(f"LoRA scale of {path} is 0, at which it changes nothing: leave it out (the base folder "
                            "alone is its own source)")
        pairs.append((path, scale))
    if not pairs:
        raise UserError("a LoRA source needs --lora FILE[:SCALE]")
    return pairs


def _scale_typo(tail: str) -> bool:
    """`FILE:x`: a tail that is no number and no path (an adapter file ends in .safetensors), read without
    touching the disk (the service parses before it checks where a path may point)."""
    return not any(sep in tail for sep in "/\\") and not tail.lower().endswith(".safetensors")


FAR_SCALE = 8.0  # sliders are used to about +-8, other adapters to about +-2


def _far_scale(adapters: list[dict]) -> str | None:
    """A warning for a scale no adapter is used at (a typed 8 for 0.8): accepted, its images may be noise."""
    far = [a for a in adapters if abs(a["scale"]) > FAR_SCALE]
    if not far:
        return None
    return (f"LoRA scale {far[0]['scale']:g} of {Path(far[0]['file']).name} is far beyond what adapters are used at "
            f"(about -2 to 2, sliders to +-{FAR_SCALE:g}): its images may be noise; check the scale is no typo")


def adapter_file(given: str) -> str:
    """A folder given as an adapter (as diffusers saves one, `pytorch_lora_weights.safetensors`, or a downloaded
    LoRA repository) stands for the one .safetensors file in it; it was refused as "LoRA file not found"."""
    folder = Path(given).expanduser()
    if not folder.is_dir():
        return given
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        names = f" ({', '.join(f.name for f in files[:3])})" if files else ""
        raise UserError(f"--lora {given} is a folder holding {len(files)} .safetensors files{names}: give the adapter "
                        "file itself")
    return str(files[0])  # a link to a blob elsewhere (a Hugging Face cache snapshot) included


def check_adapter_values(file: Path) -> dict:
    """Refuse, at `source add`, an adapter that can only make garbage: a NaN or infinite value (weights or
    alpha), which diffusers loads and decodes into black images, or a rank of 0 (an empty low-rank factor),
    which it refuses only at the first generation. Returns its tensors (adapters are small) for the layer check."""
    import torch
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(file), framework="pt") as handle:
        for key in handle.keys():
            tensor = tensors[key] = handle.get_tensor(key)
            if tensor.numel() == 0:
                raise UserError(f"{file.name}: tensor {key} is empty (an adapter of rank 0 changes nothing and "
                                "does not load)")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float()).all()):
                raise UserError(f"{file.name}: tensor {key} holds NaN or infinite values (a broken or hostile "
                                "adapter: every image it made would be black)")
    return tensors


def _inert(tensors: dict) -> str | None:
    """Why an adapter changes nothing (every up factor, every down factor or every alpha all zeros), else
    None: enrolled, it generated the base's images under another name, as scale 0 would. A tensor of any
    other name (a DoRA magnitude, a .diff, a form not listed here) may change the base on its own: not inert."""
    kinds = {"up": ("lora_B.", "lora_up.", "lora.up.", "lora_linear_layer.up.", "lora_embedding_B."),
             "down": ("lora_A.", "lora_down.", "lora.down.", "lora_linear_layer.down.", "lora_embedding_A."),
             "alpha": (".alpha.",)}
    found: dict[str, list] = {kind: [] for kind in kinds}
    for key, tensor in tensors.items():
        kind = next((kind for kind, marks in kinds.items() if any(mark in key + "." for mark in marks)), None)
        if kind is None:
            return None
        found[kind].append(tensor)
    for kind, what in (("up", "lora_B/up factors are all zeros (saved before training? peft starts lora_B at zero)"),
                       ("down", "lora_A/down factors are all zeros"), ("alpha", "alphas are all zeros")):
        if found[kind] and not any(bool(tensor.any()) for tensor in found[kind]):
            return what
    return None


def adapter_name(sha256: str) -> str:
    """The name an adapter file is loaded under: its content, so one file is loaded once per base."""
    return "lora_" + sha256[:20]


class Lora(SourceKind):
    name = "lora"
    summary = ("LoRA adapters on a diffusers pipeline folder (each combination of files and scales its own "
               "source; sources of one base share its pipeline in memory)")
    examples = ("resynth source add anime-v2 ~/models/sd15 --lora ~/loras/anime-v2.safetensors:0.8",
                "resynth source add two ~/models/sd15 --lora a.safetensors:0.6 --lora b.safetensors")
    params = (
        Param("path", str, None, "base diffusers pipeline folder", positional=True, required=True, metavar="DIR"),
        Param("lora", str, None, "LoRA adapter file with an optional scale (default 1.0); repeat the flag (or "
              "separate by commas) for several", required=True, metavar="FILE[:SCALE]", repeatable=True),
    ) + RECIPE_PARAMS

    def prepare(self, name: str, path, lora=None, steps: int = 30, guidance: float = 7.0, size: int | None = None,
                scheduler: str | None = None, negative_prompt: str | None = None) -> Recipe:
        from engine.generate import FINGERPRINT_FORMS, check_pipeline_folder, fingerprint_folder

        from engine.sources.pipeline import check_weights_present

        folder = Path(path).expanduser().resolve()
        check_pipeline_folder(folder)
        check_weights_present(folder)  # the base's own weights (a configs-only folder fails at first generation)
        adapters = []
        for given, scale in parse_loras(lora):
            try:
                file = check_safetensors(adapter_file(given), "LoRA file")
            except UserError as exc:  # "not found: .../style" of a file "style, v2.safetensors"
                if "," not in str(lora) or Path(given).expanduser().exists():
                    raise
                raise UserError(f"{exc} (--lora splits at commas: rename a file whose name holds one)") from None
            keys = safetensors_keys(file)
            lycoris = lycoris_kind(keys)
            if lycoris is not None:
                raise UserError(f"{file} is a LyCORIS adapter (LoHa/LoKr/OFT/GLoRA/IA3 tensors such as {lycoris}), "
                                "which diffusers cannot load: only LoRA adapters are supported")
            if not keys:
                raise UserError(f"{file} holds no tensors: an empty adapter")
            if not any("lora" in k.lower() for k in keys):
                raise UserError(f"{file} holds no LoRA weights (no *lora* tensors): a full checkpoint is a "
                                "single-file source, not an adapter")
            tensors = check_adapter_values(file)
            inert = _inert(tensors)
            if inert:
                raise UserError(f"{file.name} changes nothing: its {inert}; its source would be the base under "
                                "another name")
            check_adapter_fits(file, tensors, folder)
            adapters.append({"file": str(file), "scale": scale, "sha256": file_sha256(file)})
        adapters.sort(key=lambda a: (a["sha256"], a["scale"]))
        seen = [a["sha256"] for a in adapters]
        if len(set(seen)) != len(seen):
            raise UserError("the same LoRA file is given twice: give it once with the summed scale")
        recipe = generation_params(steps, guidance, size, scheduler, negative_prompt)
        *older, now = [fingerprint(self.name, fingerprint_folder(folder, linked, whole),
                                   [[a["sha256"], a["scale"]] for a in adapters], asdict(recipe))
                       for linked, whole in FINGERPRINT_FORMS]
        return Recipe(path=str(folder), params={**asdict(recipe), "loras": adapters}, fingerprint=now,
                      older=tuple(older),
                      twin="already uses this base with the same adapters, scales and parameters",
                      warning=_far_scale(adapters))

    def params_hash(self, source) -> str:
        from index.keys import canonical_json, sha256_text

        loras = json.loads(source.params_json)["loras"]
        return sha256_text(canonical_json([asdict(stored_recipe(source.params_json)),
                                           [[a["sha256"], a["scale"]] for a in loras]]))

    def describe_recipe(self, params: dict, path: str | None) -> str:
        from engine.recipes import describe

        adapters = ", ".join(f"{Path(a['file']).name} x{a['scale']:g}" for a in params.get("loras", []))
        return describe({k: v for k, v in params.items() if k != "loras"}, path) + f", LoRA {adapters}"

    def load(self, source, device: str | None):
        stored = json.loads(source.params_json)
        return LoraGenerator(source.name, Path(source.path), stored_recipe(source.params_json), stored["loras"],
                             device, fingerprint=source.fingerprint,
                             recheck=lambda *how: self.current_fingerprint(source, *how))

    def current_fingerprint(self, source, linked: bool = True, whole: bool = True) -> str:
        """The base folder as it is now, with the adapters as recorded (their files are re-hashed at attach)."""
        from engine.generate import fingerprint_folder

        params = json.loads(source.params_json)
        recipe = {k: v for k, v in params.items() if k != "loras"}
        return fingerprint(self.name, fingerprint_folder(Path(source.path), linked, whole),
                           [[a["sha256"], a["scale"]] for a in params["loras"]], recipe)


class _Base:
    """One loaded base pipeline shared by the LoRA sources of that base."""

    def __init__(self, key, pipe):
        self.key = key
        self.pipe = pipe
        self.lock = threading.RLock()  # held while adapters are switched and a batch runs
        self.users: dict[int, set[str]] = {}  # id(generator) -> its adapter names
        self.adapters: set[str] = set()  # loaded into pipe


class _BaseCache:
    """Per-process base pipelines, keyed by (base folder fingerprint, device, dtype)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._bases: dict[tuple, _Base] = {}
        self._idle: tuple | None = None  # the one base kept with no user
        self.loads: dict[str, int] = {}  # base folder fingerprint -> times loaded (tests and benchmarks)

    def acquire(self, generator: "LoraGenerator") -> _Base:
        from engine.generate import fingerprint_folder, load_pipeline
        from engine.sources.single_file import generation_params

        key = (fingerprint_folder(generator.folder, whole=True), str(generator.device))  # its content, all of it
        with self._lock:
            base = self._bases.get(key)
            if base is None:
                if self._idle is not None and self._idle != key:  # room for this one: drop the idle base
                    self._drop(self._idle)
                pipe = load_pipeline(generator.folder, generation_params(), generator.device)
                base = self._bases[key] = _Base(key, pipe)
                self.loads[key[0]] = self.loads.get(key[0], 0) + 1
            if self._idle == key:
                self._idle = None
            base.users[id(generator)] = set()
            return base

    def release(self, generator: "LoraGenerator", base: _Base) -> None:
        with self._lock, base.lock:
            base.users.pop(id(generator), None)
            still = set().union(*base.users.values()) if base.users else set()
            unused = sorted(base.adapters - still)
            if unused:
                try:
                    with _quiet():  # peft warns "Adapter ... was active which is now deleted": it is meant to be
                        base.pipe.delete_adapters(unused)
                except Exception:  # a half-loaded adapter: forget the whole base rather than keep a bad one
                    self._drop(base.key)
                    return
                base.adapters -= set(unused)
            if not base.users:
                if self._idle is not None and self._idle != base.key:
                    self._drop(self._idle)
                self._idle = base.key

    def drop_idle(self, keep_for=None) -> None:
        """Drop the base kept with no user (it counts against `max_loaded` like any pipeline), unless it is
        the base of `keep_for`, the LoRA generator about to load."""
        with self._lock:
            if self._idle is None:
                return
            if isinstance(keep_for, LoraGenerator):
                from engine.generate import fingerprint_folder

                if (fingerprint_folder(keep_for.folder, whole=True), str(keep_for.device)) == self._idle:
                    return
            self._drop(self._idle)

    def _drop(self, key) -> None:
        from engine.generate import free_device_memory, pipeline_bytes

        base = self._bases.pop(key, None)
        if self._idle == key:
            self._idle = None
        if base is not None:
            nbytes = pipeline_bytes(base.pipe)
            del base
            free_device_memory(nbytes)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._bases):
                self._drop(key)
            self.loads.clear()


BASES = _BaseCache()


def base_loads(folder) -> int:
    """How many times this process loaded the base pipeline of `folder` (0: never)."""
    from engine.generate import fingerprint_folder

    return BASES.loads.get(fingerprint_folder(Path(folder), whole=True), 0)


@contextlib.contextmanager
def _quiet():
    import diffusers

    level = diffusers.utils.logging.get_verbosity()
    # CRITICAL, not ERROR: a LoRA for another base logs one "size mismatch" line per tensor before it raises
    diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers.utils.logging.set_verbosity(level)


def _forget_adapter(pipe, name: str) -> None:
    """Remove what a failed load left of adapter `name`, so that a later load may use the name again."""
    try:
        if any(name in found for found in pipe.get_list_adapters().values()):
            pipe.delete_adapters([name])
    except Exception:  # nothing more to do: a later load of this file fails in one line again
        pass


class LoraGenerator(DiffusersGenerator):
    """A base pipeline folder with adapters at their scales: generates like the same adapters fused in."""

    def __init__(self, name: str, folder: Path, params, loras: list[dict], device: str | None = None,
                 fingerprint: str | None = None, recheck=None):
        super().__init__(name, folder, params, device, fingerprint=fingerprint, recheck=recheck)
        self.loras = [dict(a) for a in loras]
        self._base: _Base | None = None
        self._scheduler = None

    def load(self):
        if self._base is None:
            self.check_unchanged()
            try:
                base = BASES.acquire(self)
            except UserError as exc:
                raise SourceError(self.name, str(exc)) from exc
            try:
                self._attach(base)
            except BaseException:
                BASES.release(self, base)
                raise
            self._base = base
        return self._base.pipe

    def _attach(self, base: _Base) -> None:
        import diffusers

        names = []
        with base.lock:
            for adapter in self.loras:
                file = Path(adapter["file"])
                try:
                    if file_sha256(file) != adapter["sha256"]:
                        raise SourceError(self.name, f"LoRA file {file} changed since the source was added "
                                                     "(add it again under a new name)")
                except OSError as exc:
                    raise SourceError(self.name, f"LoRA file {file} is unreadable: {first_line(exc)}") from exc
                name = adapter_name(adapter["sha256"])
                if name not in base.adapters:
                    try:
                        with _quiet():  # "no LoRA keys for the text encoder" and the like, once per adapter
                            # by path, not as a dict of its tensors: diffusers then reads the config the file
                            # records (lora_adapter_metadata: lora_alpha, rank patterns), else taken as alpha = rank
                            base.pipe.load_lora_weights(str(file), adapter_name=name, local_files_only=True)
                    except ImportError as exc:
                        raise SourceError(self.name, f"LoRA sources need peft installed ({first_line(exc)})") from exc
                    except Exception as exc:
                        _forget_adapter(base.pipe, name)  # half loaded (UNet yes, text encoder no): name stays taken
                        why = ("its tensor shapes differ from the model's" if "size mismatch" in str(exc)
                               else first_line(exc))
                        raise SourceError(self.name, f"cannot load LoRA {file.name} on {self.folder.name} (made for "
                                                     f"another base model?): {why}") from exc
                    if not any(name in found for found in base.pipe.get_list_adapters().values()):
                        raise SourceError(self.name, f"LoRA {file.name} matches no layer of {self.folder.name}: it "
                                                     "was made for another base model")
                    try:  # a source added before `source add` checked every tensor: never used half loaded
                        check_adapter_fits(file, check_adapter_values(file), self.folder)
                    except UserError as exc:
                        _forget_adapter(base.pipe, name)
                        raise SourceError(self.name, str(exc)) from exc
                    base.adapters.add(name)
                names.append(name)
            base.users[id(self)] = set(names)
            scheduler = base.pipe.scheduler
            if self.params.scheduler:
                scheduler = getattr(diffusers, self.params.scheduler).from_config(scheduler.config)
            self._scheduler = scheduler

    def _select(self, pipe) -> None:
        names = [adapter_name(a["sha256"]) for a in self.loras]
        try:  # a failure here is this source's, never the whole request's
            pipe.set_adapters(names, adapter_weights=[float(a["scale"]) for a in self.loras])
        except Exception as exc:
            raise SourceError(self.name, f"cannot select its LoRA adapters: {first_line(exc)}") from exc
        pipe.scheduler = self._scheduler

    def _run_batch(self, pipe, jobs):
        base = self._base
        with base.lock:  # siblings share the pipeline: select ours for the whole batch
            original = pipe.scheduler
            try:
                self._select(pipe)
                return super()._run_batch(pipe, jobs)
            finally:
                pipe.scheduler = original

    def unload(self) -> None:
        if self._base is not None:
            base, self._base = self._base, None
            BASES.release(self, base)

    @property
    def _pipe(self):  # DiffusersGenerator reads self._pipe (default batch size): the shared base's
        return self._base.pipe if getattr(self, "_base", None) is not None else None

    @_pipe.setter
    def _pipe(self, value) -> None:  # set to None by DiffusersGenerator.__init__; the base is ours to manage
        pass


# ----- adapters for tests and benchmarks ----------------------------------------------------------------
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def write_random_lora(base_folder, target, seed: int, rank: int = 4, alpha: int | None = None) -> Path:
    """Write a random (non-zero) diffusers-format LoRA on the UNet attention layers of a base folder.

    peft's default init leaves B = 0 (an adapter with no effect); `init_lora_weights=False` keeps both
    factors random, seeded by `seed`, so each file is a distinct small fine-tune of the base."""
    import diffusers
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    target = Path(target)
    pipe = diffusers.DiffusionPipeline.from_pretrained(base_folder, local_files_only=True)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=False,
                        target_modules=list(LORA_TARGETS))
    pipe.unet.add_adapter(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    # with its config in the file's metadata (lora_alpha), as diffusers' training scripts save it
    type(pipe).save_lora_weights(str(target.parent), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                 weight_name=target.name, safe_serialization=True,
                                 unet_lora_adapter_metadata=config.to_dict())
    return target


def write_fused_folder(base_folder, loras, target) -> Path:
    """The base folder with adapters fused into its weights (`fuse_lora`) and saved as a plain diffusers
    folder: what a LoRA source must generate like."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(base_folder, local_files_only=True)
    for i, (file, scale) in enumerate(parse_loras(loras)):  # one at a time: each fused at its own scale
        pipe.load_lora_weights(str(file), adapter_name=f"fused{i}", local_files_only=True)
        pipe.fuse_lora(adapter_names=[f"fused{i}"], lora_scale=scale)
        pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    pipe.save_pretrained(target)
    return Path(target)
