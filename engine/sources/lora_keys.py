"""Which layers of a base folder a LoRA file changes, checked at `source add` from file headers only.

diffusers loads a LoRA whose tensors only partly match its base without a word: tensors for layers the base
lacks (an SDXL LoRA's second text encoder on SD 1.x, kohya keys for blocks that do not exist) are dropped,
and a DoRA's `dora_scale` magnitudes are filtered out with a log line. The source so enrolled is a part of
the adapter its images are attributed to. Here every tensor of the adapter, after diffusers' own conversion
of kohya/A1111 names (`lora_state_dict`), must name a component of the base, a layer of that component's
weights (read from their safetensors headers, nothing loaded) and fit its shape; otherwise `source add`
refuses in one line with the count and a few of the tensors that would have been ignored.

diffusers' converters drop tensors too, before any layer is matched: its Flux converter filters out kohya/ComfyUI
`diff_b` and norm `diff` tensors, T5 (`text_encoders.t5xxl`, `lora_te2_`) and position-embedding parts, names
outside `lora_unet_`/`lora_te_`, a kohya text encoder beside peft names; most with an INFO log line, some silently.
So the conversion runs on traced tensors (each remembers which of the file's tensors it was computed from), and a
tensor of the file that reaches no converted tensor, unless all zeros (nothing lost) or an alpha of a module that
did, is refused the same way. Flux norm tensors (`norm_q`/`norm_k`, a Control LoRA's) are refused: diffusers
writes them straight into the base's weights, where the adapter's scale does not reach them and unloading the
adapter does not undo them, so the base shared by every LoRA source of that folder would change. A `lora_B` bias
on some layers of a component and not others is refused: diffusers then leaves the others' bias uninitialised;
so is a bias on another factor (peft has none, diffusers leaves it out) or one of another length than the layer's.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from engine.errors import UserError, plural

# the factor a tensor is, after the module it adapts: peft (lora_A/B), diffusers' older names, kohya's
_FACTOR = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|"
                     r"lora_linear_layer\.up|lora_down|lora_up|lora_magnitude_vector)(?:\.(?:weight|bias))?$")
_DOWN = ("lora_A", "lora.down", "lora_linear_layer.down", "lora_down")
_UP = ("lora_B", "lora.up", "lora_linear_layer.up", "lora_up")
# kinds of adapter diffusers cannot load (LyCORIS LoHa, LoKr, OFT/BOFT, GLoRA, IA3, LoCon's Tucker `lora_mid`):
# refused, never half-loaded
_LYCORIS = re.compile(r"hada_|lokr_|\.oft_|\.on_input$|\.(?:a1|a2|b1|b2)\.weight$|\.lora_mid\.")
EXAMPLES = 3
# components of other pipelines: a tensor named for one was made for another kind of base
_PARTS = ("unet", "transformer", "prior", "decoder", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def lycoris_kind(keys) -> str | None:
    """The first tensor name of an adapter kind diffusers cannot load, or None."""
    return next((k for k in keys if _LYCORIS.search(k)), None)


def _base_shapes(folder: Path, component: str) -> dict[str, list] | None:
    """Layer name (without `.weight`) -> weight shape of one component, from its safetensors headers (all shards
    and variants); None where it has none to read (pickled weights: checked when they load)."""
    from engine.sources.single_file import safetensors_header

    files = sorted((folder / component).glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, list] = {}
    for file in files:
        for key, entry in safetensors_header(file).items():
            if key.endswith(".weight") and isinstance(entry, dict):
                shapes[_plain(key[:-len(".weight")])] = list(entry.get("shape") or [])
    return shapes


def _plain(module: str) -> str:
    """A text encoder's layer names with or without transformers' `text_model.` prefix (saved either way)."""
    return module.removeprefix("text_model.")


def _traced(tensors: dict) -> dict:
    """The adapter's tensors, each marked with its own name; what torch computes from them (scaled, split,
    chunked, concatenated, copied into) carries the names of its inputs (`_tensor_class`), so a tensor of the
    file that reaches no output of diffusers' conversion was dropped by it."""
    wrapped = {}
    for key, tensor in tensors.items():
        traced = tensor.as_subclass(_tensor_class())
        traced._sources = frozenset((key,))
        wrapped[key] = traced
    return wrapped


def _sources(values) -> set[str]:
    found: set[str] = set()
    for value in values:
        found.update(getattr(value, "_sources", ()))
    return found


_CLASS: list = []


def _tensor_class():
    """The tensor subclass of `_traced` (torch's `__torch_function__` protocol), made at first use: importing
    torch at the top would load it for every `import engine`."""
    if _CLASS:
        return _CLASS[0]
    import torch

    def gather(value, found: set) -> None:
        if isinstance(value, torch.Tensor):
            found.update(getattr(value, "_sources", ()))
        elif isinstance(value, (list, tuple)):
            for item in value:
                gather(item, found)
        elif isinstance(value, dict):
            for item in value.values():
                gather(item, found)

    def mark(value, found: frozenset) -> None:
        if isinstance(value, torch.Tensor):
            value._sources = getattr(value, "_sources", frozenset()) | found  # type: ignore[attr-defined]
        elif isinstance(value, (list, tuple)):
            for item in value:
                mark(item, found)

    class Traced(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            result = super().__torch_function__(func, types, args, kwargs)
            found: set[str] = set()
            gather(args, found)
            gather(kwargs, found)
            if found:
                mark(result, frozenset(found))
                name = getattr(func, "__name__", "")
                if args and (name.endswith("_") or name == "__setitem__"):  # in place: `out[:n] = x`, `x *= s`
                    mark(args[0], frozenset(found))
            return result

    _CLASS.append(Traced)
    return Traced


def _dropped(tensors: dict, kept: set[str]) -> list[str]:
    """The adapter's tensors a conversion left out that would have changed something: not all zeros, not a
    factor of a module whose other factor is all zeros (B·A is zero: an untrained T5 module's lora_up is), and
    not the alpha of a module whose factors were kept (an alpha is read as a number, not carried as a tensor)."""
    from bisect import bisect_left

    modules = {key.rpartition(".")[0] for key in kept}
    used = sorted(modules)  # the names under a module lie together from `module.` on: no scan of all per alpha
    left = [key for key in tensors if key not in kept]
    null = {_factor_of(key) for key in left if _factor_of(key) and not bool(tensors[key].any())}
    dropped = []
    for key in left:
        tensor = tensors[key]
        if _factor_of(key) in null:
            continue
        if key.endswith("alpha") and tensor.numel() == 1:
            module = key.removesuffix("alpha").rstrip("._")
            at = bisect_left(used, module + ".")
            if module in null or module in modules or (at < len(used) and used[at].startswith(module + ".")):
                continue
        if not bool(tensor.any()):
            continue
        dropped.append(key)
    return sorted(dropped, key=lambda key: key.endswith("alpha"))  # the factors first: they name what is lost


def _factor_of(key: str) -> str | None:
    """The module whose down or up weight `key` is (a bias or a DoRA magnitude is not: it acts without B·A)."""
    found = _FACTOR.match(key)
    if found is None or key.endswith(".bias") or found["part"] not in _DOWN + _UP:
        return None
    return found["module"]


def _said(exc: BaseException) -> str:
    """A converter's error on one line, with the tensor names it lists below its first line ("Incompatible keys
    detected:" alone names none), bounded."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _converted(name: str, tensors: dict, folder: Path, cls, components: set[str]) -> tuple[dict, list[str]]:
    """The adapter's tensors under the layer names diffusers loads them by: its own conversions, in the order
    `load_lora_weights` runs them (kohya/A1111 names, then each component's older diffusers names to peft's);
    and the file's tensors those conversions drop."""
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    from engine.sources.lora import _quiet

    kwargs = {}
    config = folder / "unet" / "config.json"
    if config.is_file():  # SDXL kohya files name blocks as the original code did: mapped by the UNet's layout
        from diffusers.configuration_utils import FrozenDict

        kwargs["unet_config"] = FrozenDict(json.loads(config.read_text()))  # read by attribute, as unet.config is
    parts: dict[str, dict] = {}
    component = ""
    try:
        with _quiet():
            state = cls.lora_state_dict(_traced(tensors), **kwargs)
            if isinstance(state, tuple):  # (state dict, alphas) for the UNet families; the dict alone for Flux
                state = state[0]
            dropped = _dropped(tensors, _sources(state.values()))
            plain = next((key for key in state if "lora" not in key), None)
            norms = getattr(cls, "_control_lora_supported_norm_keys", ())
            if plain is not None and any(norm in plain for norm in norms):
                raise UserError(f"{name}: its tensor {plain} replaces a norm layer of {folder.name} outright (as a "
                                "Flux Control LoRA's do): diffusers writes it into the base's weights, where the "
                                "adapter's scale does not reach it and unloading the adapter does not undo it")
            if plain is not None and norms:  # Flux's loader takes a file if any name holds 'lora', drops the rest
                raise UserError(f"{name}: diffusers ignores its tensor {plain} (no 'lora' in its name) on "
                                f"{folder.name}: it would load only in part")
            if plain is not None:  # load_lora_weights' own format check, which it makes only at the first generation
                raise ValueError(f"tensor {plain} has no 'lora' in its name, and diffusers loads no such file")
            for key, tensor in state.items():
                component, _, rest = key.partition(".")
                parts.setdefault(component if rest else "", {})[rest or key] = tensor
            for component, part in parts.items():
                if component not in components:  # ignored by the loader: reported as matching nothing
                    continue
                if component.startswith("text_encoder"):
                    parts[component] = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
                elif component and "lora_A" not in next(iter(part)):
                    parts[component] = convert_unet_state_dict_to_peft(part)
    except UserError:
        raise
    except Exception as exc:  # diffusers' converters refuse names they cannot place: so would its loader
        raise UserError(f"diffusers cannot read this LoRA's tensor names for {folder.name} "
                        f"({component or 'its converter'}): {_said(exc)}") from exc
    return {f"{component}.{rest}" if component else rest: tensor
            for component, part in parts.items() for rest, tensor in part.items()}, dropped


def check_adapter_fits(file: Path, tensors: dict, folder: Path) -> None:
    """Refuse an adapter any of whose tensors would be ignored, or would not fit, when loaded on `folder`."""
    from engine.sources.single_file import safetensors_header

    metadata = safetensors_header(file).get("__metadata__")
    recorded = metadata.get("lora_adapter_metadata") if isinstance(metadata, dict) else None
    if recorded is not None:  # diffusers parses it at load: a broken one failed every generation
        try:
            if not isinstance(json.loads(recorded), dict):
                raise ValueError
        except (TypeError, ValueError, RecursionError):
            raise UserError(f"{file.name}: its lora_adapter_metadata is not a JSON object (the adapter's config, "
                            "which diffusers reads when it loads the file)") from None
    if any("dora_scale" in k for k in tensors):
        raise UserError(f"{file.name} is a DoRA (dora_scale tensors), whose magnitudes diffusers drops when it "
                        "loads it: it would generate as another adapter")
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    cls = getattr(diffusers, str(index.get("_class_name")), None)
    if cls is None or not hasattr(cls, "load_lora_weights"):
        raise UserError(f"{folder.name} is a {index.get('_class_name')} pipeline, into which diffusers loads no LoRA")
    # the components diffusers loads adapters into (a "vae." tensor would be dropped), of those the base has
    components = {name for name in getattr(cls, "_lora_loadable_modules", ())
                  if isinstance(index.get(name), list) and index[name][0] is not None}
    state, dropped = _converted(file.name, tensors, folder, cls, components)
    if dropped:
        raise UserError(f"{file.name}: diffusers' {cls.__name__} drops {len(dropped)} of {len(tensors)} tensors of "
                        f"this LoRA as it converts them (e.g. {', '.join(dropped[:EXAMPLES])}): parts it does not "
                        "support (T5, diff_b/norm diff, position embedding, unknown names); it would load only in part")
    bases: dict[str, dict | None] = {}
    unmatched, misfit, downward = [], [], []
    ranks: dict[tuple[str, str], list] = {}
    biased: set[tuple[str, str]] = set()  # layers with a lora_B bias (peft's lora_bias)
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        found = _FACTOR.match(rest) if component in components else None
        if found is None:
            unmatched.append(key)
            continue
        if component not in bases:
            bases[component] = _base_shapes(folder, component)
        layers = bases[component]
        if layers is None:
            continue
        module, part = found["module"], found["part"]
        weight = layers.get(_plain(module))
        if weight is None:
            unmatched.append(key)
            continue
        shape = list(tensor.shape)
        if key.endswith(".bias") and part not in _UP:  # peft gives lora_B alone a bias: diffusers leaves this out
            if bool(tensor.any()):
                downward.append(key)
            continue
        if key.endswith(".bias"):  # one per output feature of the layer
            biased.add((component, module))
            fits = shape == weight[:1]
        elif part == "lora_magnitude_vector":
            fits = shape[:1] == weight[:1]
        elif part in _DOWN:
            fits = len(shape) >= 2 and shape[1:2] == weight[1:2]
            ranks.setdefault((component, module), [None, None])[0] = shape[0] if shape else None
        else:
            fits = len(shape) >= 2 and shape[:1] == weight[:1]
            ranks.setdefault((component, module), [None, None])[1] = shape[1] if len(shape) > 1 else None
        if not fits:
            misfit.append(f"{key} {shape} on a {weight} layer")
    if unmatched:
        # kohya Flux files' final_layer/img_in/time_in tensors come out of diffusers' converter with no
        # `transformer.` prefix, and its loader skips them: no other base model is involved
        named = {key.partition(".")[0] for key in unmatched}
        unloaded = sorted(named & set(index) - components)
        why = (f"diffusers loads no LoRA into its {unloaded[0]}" if unloaded
               else "made for another base model" if named & (set(index) | set(_PARTS))
               else "named for no part of the pipeline after diffusers' conversion, which its loader skips")
        raise UserError(f"{file.name}: {len(unmatched)} of {len(state)} LoRA tensors match no layer of {folder.name} "
                        f"(e.g. {', '.join(unmatched[:EXAMPLES])}): {why}, it would load "
                        "only in part")
    if misfit:
        raise UserError(f"{file.name}: {len(misfit)} of {len(state)} LoRA tensors do not fit the layers of "
                        f"{folder.name} (e.g. {'; '.join(misfit[:EXAMPLES])}): made for another base model")
    if downward:
        raise UserError(f"{file.name}: {len(downward)} of {len(state)} LoRA tensors are biases of a factor other "
                        f"than lora_B (e.g. {', '.join(downward[:EXAMPLES])}), which peft has none of and diffusers "
                        "leaves out: it would load only in part")
    # a layer with one factor only: peft leaves the other on the meta device and the layer adds nothing
    halves = [f"{c}.{m}" for (c, m), (down, up) in ranks.items() if (down is None) != (up is None)]
    if halves:
        raise UserError(f"{file.name}: {plural(len(halves), 'layer')} {'has' if len(halves) == 1 else 'have'} only "
                        f"one of its two factors (e.g. {', '.join(halves[:EXAMPLES])}): a broken adapter, which "
                        "diffusers would load without those layers")
    uneven = [f"{c}.{m}" for (c, m), (down, up) in ranks.items() if down is not None and up is not None and down != up]
    if uneven:
        raise UserError(f"{file.name}: the two factors of {len(uneven)} layers have different ranks (e.g. "
                        f"{', '.join(uneven[:EXAMPLES])}): a broken adapter")
    # diffusers turns lora_bias on for a whole component when any of its layers has a lora_B bias; the layers
    # without one keep an uninitialised (meta) bias and every generation fails ("Tensor on device meta")
    with_bias = {component for component, _ in biased}
    unbiased = sorted(f"{c}.{m}" for c, m in ranks if c in with_bias and (c, m) not in biased)
    if unbiased:
        raise UserError(f"{file.name}: {plural(len(unbiased), 'adapted layer')} "
                        f"{'has' if len(unbiased) == 1 else 'have'} no lora_B bias beside layers that have one "
                        f"(e.g. {', '.join(unbiased[:EXAMPLES])}): diffusers leaves their bias uninitialised and "
                        "every generation fails")
