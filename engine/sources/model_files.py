"""What a model folder or file may hold before anything of it is loaded: checks that read headers, names and
configs only, so that a hostile or broken download is refused in one line at `source add` (and again before a
load), never run, never allowed to exhaust memory, and never found only at the first generation.

- weight files: a safetensors header as the safetensors library validates it (bounded like it); a PyTorch
  zip scanned (never unpickled) for callables `torch.load(weights_only=True)` would refuse;
- a folder's files, linked component folders included (a component linked from elsewhere is part of the
  model: its weights count in the fingerprint), without walking on through links;
- model_index.json components: only classes diffusers loads without running code from the folder.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from engine.errors import UserError, first_line

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"}
# The safetensors library refuses a longer header (its MAX_HEADER_SIZE): a longer one passed here would fail
# only at the first generation. A crafted header of this size costs seconds and about 2 GB to parse, as in the
# library itself; a real model's is well under 1 MB.
MAX_SAFETENSORS_HEADER = 100_000_000


def check_weight_file(path: Path, scan_pickle: bool = True) -> None:
    """Cheap structural check of a weight file, without loading its tensors: a safetensors header must be
    what the safetensors library itself accepts (bounded JSON, known dtypes, in-range contiguous offsets that
    end exactly at the end of the file); a PyTorch file must be a zip or a pickle, and a zip must name no
    Python callable outside what `torch.load(weights_only=True)` allows (a payload that would run code)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if path.suffix == ".safetensors":
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= min(size - 8, MAX_SAFETENSORS_HEADER):
                raise UserError(f"corrupt weight file {path}: not a safetensors file (bad header length)")
            try:
                header = json.loads(handle.read(length))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
                raise UserError(f"corrupt weight file {path}: unreadable safetensors header") from None
            described = 8 + length + end
            if described != size:
                said = described if described < 1 << 64 else "far more"  # offsets are JSON: any integer parses
                raise UserError(f"corrupt weight file {path}: {size} bytes, the header describes {said} "
                                "(truncated or padded)")
            _check_safetensors_layout(path)
        elif path.suffix in {".bin", ".pt", ".pth", ".ckpt"}:
            if head.startswith(b"PK\x03\x04"):
                if scan_pickle:
                    _check_pickle_globals(path)
            elif head[:1] != b"\x80":
                raise UserError(f"corrupt weight file {path}: neither a PyTorch zip nor a pickle")


def _check_safetensors_layout(path: Path) -> None:
    """The safetensors library's own header validation (dtypes, shapes, offsets), reading no tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as exc:
        raise UserError(f"corrupt weight file {path}: {first_line(exc).removeprefix('Error while ')}") from None


def _check_pickle_globals(path: Path) -> None:
    """A PyTorch zip whose pickle names callables `torch.load(weights_only=True)` refuses holds code that would
    run if it were unpickled unsafely: refused by name at `source add`, rather than at the first generation.
    The pickle is only scanned (torch's own scanner), never executed; its declared size is bounded first, so a
    zip bomb cannot make the scan inflate gigabytes."""
    import zipfile

    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")]
        if len(pickles) != 1 or pickles[0].file_size > MAX_SAFETENSORS_HEADER:
            raise UserError(f"corrupt weight file {path}: not a PyTorch checkpoint (no single bounded data.pkl)")
        unsafe = get_unsafe_globals_in_checkpoint(str(path))
    except UserError:
        raise
    except Exception as exc:  # a damaged zip or pickle: whatever torch says, in one line
        raise UserError(f"corrupt weight file {path}: {first_line(exc)}") from None
    if unsafe:
        raise UserError(f"{path} is a pickle that would call {', '.join(sorted(unsafe)[:3])} when loaded (code "
                        "shipped with the model): refused, nothing of it was run; use the model's .safetensors "
                        "weights")



def model_files(folder: Path) -> list[Path]:
    """Every entry under `folder` that is not a folder (files, and links or pipes posing as files), sorted. A
    folder linked from the top level (a component shared with another model) adds its own entries but not its
    subfolders: diffusers reads a component's top level only, and a link to / must not walk the whole disk.
    An unreadable folder raises OSError."""
    found: list[Path] = []

    def fail(exc: OSError) -> None:
        raise exc

    for root, dirs, files in os.walk(folder, onerror=fail):  # links to folders are listed, never descended
        found += [Path(root) / name for name in files]
        if Path(root) == Path(folder):
            for name in dirs:
                linked = Path(root) / name
                if linked.is_symlink():
                    with os.scandir(linked) as entries:
                        found += [linked / entry.name for entry in entries if not entry.is_dir()]
    return sorted(found)


# what diffusers and transformers read from a folder besides weights: configs, vocabularies, merges, spiece models
READ_SUFFIXES = {".json", ".txt", ".model"}


def check_weight_entries(folder: Path, components: set[str]) -> None:
    """Each weight file of a folder checked; a weight, config or vocabulary name that is no regular file (a
    pipe, a device such as /dev/zero, a dangling or looping link) refused: reading it would hang or never end,
    and no fingerprint could cover it. Pickles are scanned only at the top level of a model_index.json component
    (`components`), the files diffusers loads: a whole repository's own .ckpt beside its folders (sd-v1-5's
    v1-5-pruned.ckpt) or a training run's checkpoint-500/optimizer.bin is never unpickled, and a Lightning
    callback in it must not refuse the model."""
    for entry in model_files(folder):
        if entry.suffix not in WEIGHT_SUFFIXES | READ_SUFFIXES:
            continue
        if not entry.is_file():
            raise UserError(f"{entry} is not a regular file (a pipe, device, folder or broken link): model files "
                            "must be files")
        if entry.suffix in WEIGHT_SUFFIXES:
            check_weight_file(entry, scan_pickle=entry.parent.name in components and entry.parent.parent == folder)
        if entry.parent.name in components and entry.parent.parent == folder and SHARD_INDEX.fullmatch(entry.name):
            _check_shard_index(folder, entry)


SHARD_INDEX = re.compile(r"[^.]+\.(safetensors|bin)\.index\.json")  # what diffusers reads (no variant: .fp16.)


def _check_shard_index(folder: Path, index: Path) -> None:
    """A sharded component's index must name only files beside it, all there or none (configs only): a download
    cut short (a missing shard) was enrolled and failed at the first generation; a name such as ../../x reads
    elsewhere.
    Another kind's index (a .bin one beside a .safetensors one) is not the one diffusers reads: not checked."""
    if index.name.endswith(".bin.index.json") and any(index.parent.glob("*.safetensors.index.json")):
        return
    where = f"{index.relative_to(folder)} in {folder}"
    if index.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{where} is {index.stat().st_size >> 20} MiB: not a shard index (real ones are a few KB)")
    try:
        weight_map = json.loads(index.read_bytes()).get("weight_map")
    except (ValueError, RecursionError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"malformed {where}: no weight_map of tensor names to shard files")
    wrong = sorted({name for name in weight_map.values() if Path(name).name != name or name in (".", "..")})
    if wrong:
        raise UserError(f"{where} names shard files outside its folder (e.g. {', '.join(wrong[:3])})")
    missing = sorted({name for name in weight_map.values() if not (index.parent / name).is_file()})
    if missing and len(missing) < len(set(weight_map.values())):  # none there: configs only (a --config folder)
        raise UserError(f"{where} names {len(missing)} shard file{'s' * (len(missing) != 1)} that "
                        f"{'are' if len(missing) != 1 else 'is'} not there (e.g. {', '.join(missing[:3])}): an "
                        "unfinished download? The folder must hold every shard")


def check_components(folder: Path, index: dict) -> None:
    """Refuse a model_index.json component that diffusers could load only by running code or could not load
    at all: a library other than diffusers, transformers or a diffusers pipeline module (a name such as "os"
    or "my_module"), custom code beside the component (unet/my_unet.py), a name leaving the folder, or a
    class that is no loadable model, scheduler, tokenizer or processor (os.system, AutoModel)."""
    from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES

    for component, value in index.items():
        if component.startswith("_") or not isinstance(value, list) or not any(value):
            continue
        if Path(component).name != component or component in (".", ".."):
            raise UserError(f"{folder}: component name {component!r} in model_index.json is not a folder name")
        if len(value) != 2 or not all(isinstance(part, str) and part for part in value):
            raise UserError(f"{folder}: component {component!r} in model_index.json is not [library, class]")
        library, class_name = value
        where = f"{folder}: component {component!r} ({library}.{class_name})"
        if (folder / component / f"{library}.py").exists():
            raise UserError(f"{where} is custom code shipped in the folder ({component}/{library}.py): resynth "
                            "never runs code from a model folder")
        if library in LOADABLE_CLASSES and library != "onnxruntime.training":
            import importlib

            module = importlib.import_module(library)
            bases = [getattr(module, name, None) for name in LOADABLE_CLASSES[library]]
        elif _pipeline_module(library) is not None:  # a pipeline's own module (stable_diffusion's safety checker)
            module, bases = _pipeline_module(library), []
        else:
            raise UserError(f"{where} names a library diffusers does not load components from (only diffusers, "
                            "transformers and diffusers' pipeline modules): nothing was imported")
        found = getattr(module, _current_name(library, class_name), None)
        if not isinstance(found, type):
            raise UserError(f"{where}: {library} has no class {class_name}")
        if bases and not any(isinstance(base, type) and issubclass(found, base) for base in bases):
            raise UserError(f"{where} is not a model, scheduler, tokenizer or processor class diffusers loads "
                            "(an Auto class needs code that resynth does not run)")
        missing = missing_packages(found)
        if missing:
            raise UserError(f"{where} needs the Python package{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)}, not installed here: pip install {' '.join(missing)}")


def unloaded_tensors(pipe) -> str | None:
    """Why a loaded pipeline cannot run, if a component's weight files lacked some of its tensors: diffusers
    leaves those on the meta device with a warning, and moving the pipeline to its device was a traceback."""
    import itertools

    import torch

    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            lacking = [key for key, tensor in itertools.chain(component.named_parameters(), component.named_buffers())
                       if tensor.is_meta]
            if lacking:
                return (f"its {name} weight files lack {len(lacking)} of its tensors (e.g. {', '.join(lacking[:3])}): "
                        "incomplete, or made for another config")
    return None


# Component classes that import a package only when built (so the class itself imports fine): Kolors' ChatGLM
# tokenizer reads its tokenizer.model with sentencepiece, which neither diffusers nor resynth requires.
NEEDS_PACKAGES = {"ChatGLMTokenizer": ("sentencepiece",)}


def missing_packages(cls: type) -> list[str]:
    """The packages a component class needs that are not installed: a library's placeholder class (a DummyObject,
    what diffusers and transformers export when a backend is missing) names its backends; NEEDS_PACKAGES the rest.
    Without this a folder is enrolled and fails at its first generation."""
    import importlib.util

    if type(cls).__name__ == "DummyObject":
        backends = type.__getattribute__(cls, "_backends") if "_backends" in vars(cls) else ["its backend"]
        return [str(name) for name in backends if importlib.util.find_spec(str(name)) is None] or [str(backends)]
    return [name for name in NEEDS_PACKAGES.get(cls.__name__, ()) if importlib.util.find_spec(name) is None]


def _pipeline_module(library: str):
    """diffusers.pipelines.<library>, one of diffusers' own modules (imported lazily: kolors is not an attribute
    until imported), or None; nothing outside diffusers is ever imported for a name a folder gives."""
    import importlib
    import importlib.util

    import diffusers

    if not library.isidentifier():  # no dots: nothing but a direct submodule of diffusers.pipelines
        return None
    if not hasattr(diffusers.pipelines, library):
        if importlib.util.find_spec(f"diffusers.pipelines.{library}") is None:
            return None
        importlib.import_module(f"diffusers.pipelines.{library}")
    return getattr(diffusers.pipelines, library, None)


def _current_name(library: str, class_name: str) -> str:
    """A transformers class renamed since the folder was saved, by its current name (diffusers' own remap)."""
    if library != "transformers":
        return class_name
    try:
        from diffusers.pipelines.pipeline_loading_utils import _maybe_remap_transformers_class
    except ImportError:  # an older diffusers without the remap
        return class_name
    return _maybe_remap_transformers_class(class_name) or class_name


# what a tokenizer folder may hold besides its vocabulary: with these alone, transformers builds an empty tokenizer
_TOKENIZER_SETTINGS = {"tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "config.json",
                       "chat_template.jinja", "chat_template.json"}


def check_tokenizers(folder: Path, index: dict) -> None:
    """Refuse a tokenizer component without a vocabulary file (tokenizer.json, vocab.json, spiece.model ...):
    transformers loads it anyway as a tokenizer of two tokens, so every prompt would be ignored, silently."""
    for component, value in index.items():
        if component.startswith("tokenizer") and isinstance(value, list) and any(value):
            vocabulary = [p for p in (folder / component).iterdir()
                          if p.is_file() and p.name not in _TOKENIZER_SETTINGS and not p.name.startswith(".")]
            if not vocabulary:
                raise UserError(f"{folder}: {component} holds no vocabulary file (tokenizer.json, vocab.json with "
                                "merges.txt, spiece.model ...): it would read every prompt as unknown tokens")


MAX_CONFIG_BYTES = 16 << 20
# Schedulers allocate several arrays of num_train_timesteps (1000 in every released model): a crafted 10**9
# would take gigabytes at each load
MAX_TRAIN_TIMESTEPS = 100_000


def check_configs(folder: Path) -> None:
    """Every `*config.json` of a folder parses to a JSON object: a list or a nest a million deep was enrolled and
    failed at the first generation (or, in a single-file source's --config folder, was a traceback)."""
    for entry in model_files(folder):
        if entry.name.endswith("config.json") and entry.is_file():
            if entry.stat().st_size > MAX_CONFIG_BYTES:
                raise UserError(f"{entry.relative_to(folder)} in {folder} is {entry.stat().st_size >> 20} MiB: not a "
                                "config (real ones are a few KB)")
            try:
                parsed = json.loads(entry.read_bytes())
            except (ValueError, RecursionError):
                parsed = None
            if not isinstance(parsed, dict):
                raise UserError(f"malformed {entry.relative_to(folder)} in {folder}: not a JSON object")
            steps = parsed.get("num_train_timesteps") if entry.name == "scheduler_config.json" else None
            whole = isinstance(steps, (int, float)) and not isinstance(steps, bool) and float(steps).is_integer()
            # 1000 or 1000.0, not inf or true
            if steps is not None and not (whole and 0 < steps <= MAX_TRAIN_TIMESTEPS):
                raise UserError(f"{entry.relative_to(folder)} in {folder}: num_train_timesteps {steps!r} is not a "
                                f"count from 1 to {MAX_TRAIN_TIMESTEPS} (the scheduler allocates arrays that long)")
