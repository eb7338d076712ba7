"""Which layers of a base folder a LoRA file changes, checked at `source add` from file headers only.

diffusers loads a LoRA whose tensors only partly match its base without a word: tensors for layers the base
lacks (an SDXL LoRA's second text encoder on SD 1.x, kohya keys for blocks that do not exist) are dropped,
and a DoRA's `dora_scale` magnitudes are filtered out with a log line. The source so enrolled is a part of
the adapter its images are attributed to. Here every tensor of the adapter, after diffusers' own conversion
of kohya/A1111 names (`lora_state_dict`), must name a component of the base, a layer of that component's
weights (read from their safetensors headers, nothing loaded) and fit its shape; otherwise `source add`
refuses in one line with the count and a few of the tensors that would have been ignored.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from engine.errors import UserError, first_line

# the factor a tensor is, after the module it adapts: peft (lora_A/B), diffusers' older names, kohya's
_FACTOR = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|"
                     r"lora_linear_layer\.up|lora_down|lora_up|lora_magnitude_vector)(?:\.(?:weight|bias))?$")
_DOWN = ("lora_A", "lora.down", "lora_linear_layer.down", "lora_down")
_UP = ("lora_B", "lora.up", "lora_linear_layer.up", "lora_up")
# kinds of adapter diffusers cannot load (LyCORIS LoHa, LoKr, OFT/BOFT, GLoRA, IA3): refused, never half-loaded
_LYCORIS = re.compile(r"hada_|lokr_|\.oft_|\.on_input$|\.(?:a1|a2|b1|b2)\.weight$")
EXAMPLES = 3


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


def _converted(tensors: dict, folder: Path, cls, components: set[str]) -> dict:
    """The adapter's tensors under the layer names diffusers loads them by: its own conversions, in the order
    `load_lora_weights` runs them (kohya/A1111 names, then each component's older diffusers names to peft's)."""
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
            state = cls.lora_state_dict(dict(tensors), **kwargs)
            if isinstance(state, tuple):  # (state dict, alphas) for the UNet families; the dict alone for Flux
                state = state[0]
            plain = next((key for key in state if "lora" not in key), None)
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
    except Exception as exc:  # diffusers' converters refuse names they cannot place: so would its loader
        raise UserError(f"diffusers cannot read this LoRA's tensor names for {folder.name} "
                        f"({component or 'its converter'}): {first_line(exc)}") from exc
    return {f"{component}.{rest}" if component else rest: tensor
            for component, part in parts.items() for rest, tensor in part.items()}


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
    state = _converted(tensors, folder, cls, components)
    bases: dict[str, dict | None] = {}
    unmatched, misfit = [], []
    ranks: dict[tuple[str, str], list] = {}
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
        if key.endswith(".bias"):
            continue
        if part == "lora_magnitude_vector":
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
        raise UserError(f"{file.name}: {len(unmatched)} of {len(state)} LoRA tensors match no layer of {folder.name} "
                        f"(e.g. {', '.join(unmatched[:EXAMPLES])}): made for another base model, it would load "
                        "only in part")
    if misfit:
        raise UserError(f"{file.name}: {len(misfit)} of {len(state)} LoRA tensors do not fit the layers of "
                        f"{folder.name} (e.g. {'; '.join(misfit[:EXAMPLES])}): made for another base model")
    uneven = [f"{c}.{m}" for (c, m), (down, up) in ranks.items() if down is not None and up is not None and down != up]
    if uneven:
        raise UserError(f"{file.name}: the two factors of {len(uneven)} layers have different ranks (e.g. "
                        f"{', '.join(uneven[:EXAMPLES])}): a broken adapter")
