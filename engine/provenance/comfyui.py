"""What ComfyUI writes: the executed prompt graph (node id -> {class_type, inputs}), walked from its sampler."""
from __future__ import annotations

from engine.provenance.values import (Checked, GenerationMetadata, MAX_SETTINGS, MAX_VALUE, SEED_RANGE, SIDE_RANGE,
                                     STEPS_RANGE, as_prompt, as_str, parse_json)

MAX_GRAPH_NODES = 5000  # ComfyUI graphs larger than this are not walked
MAX_DEPTH = 64  # ComfyUI link hops followed from a sampler


_NOT_CONDITIONING = ("clip", "model", "vae", "image", "control_net", "mask", "clip_vision", "style_model",
                     "upscale_model")
_TEXT_INPUTS = ("text", "text_g", "text_l", "prompt", "string", "value", "text_positive", "text_negative")


def comfyui(text: str, where: str, notes: list[str]) -> GenerationMetadata | None:
    """The executed graph (node id -> {class_type, inputs}); a link is [node_id, output_index].

    The prompt is the text reached upstream from a sampler's `positive` input (through
    conditioning combiners, ControlNet appliers, string nodes); seed/steps/cfg/sampler are the
    sampler's own inputs (or the nodes they link to); the model is the checkpoint/UNet loader
    reached from its `model` input (through LoRA loaders).
    """
    graph = parse_json(text, where, notes)
    if not isinstance(graph, dict) or not graph:
        return None
    if len(graph) > MAX_GRAPH_NODES:
        notes.append(f"{where}: graph of {len(graph)} nodes is too large to walk")
        return GenerationMetadata(tool="comfyui", source=where)
    nodes = {str(k): v for k, v in graph.items() if isinstance(v, dict) and isinstance(v.get("inputs"), dict)}
    if not nodes:
        return None
    samplers = [k for k, v in sorted(nodes.items(), key=lambda kv: _node_order(kv[0])) if _is_sampler(v["inputs"])]
    if not samplers:
        notes.append(f"{where}: no sampler node with a positive input; prompt not read")
        return GenerationMetadata(tool="comfyui", source=where, settings=_comfy_summary(nodes))
    if len(samplers) > 1:
        notes.append(f"{where}: {len(samplers)} sampler nodes; the first ({samplers[0]}) is reported")
    s = nodes[samplers[0]]["inputs"]
    guider = _follow(nodes, s.get("guider"))  # SamplerCustomAdvanced: conditioning lives on the guider
    cond = nodes[guider]["inputs"] if guider else s
    positive = _texts(nodes, cond.get("positive", cond.get("conditioning")), avoid="negative")
    negative = _texts(nodes, cond.get("negative"), avoid="positive")
    latent = nodes.get(_follow(nodes, s.get("latent_image")) or "", {}).get("inputs", {})
    model = _model(nodes, s.get("model", (guider and cond.get("model"))))
    checked = Checked()
    return GenerationMetadata(
        tool="comfyui", source=where,
        prompt=as_prompt("\n".join(positive), notes, f"{where} prompt") if positive else None,
        negative_prompt=as_prompt("\n".join(negative), notes, f"{where} negative prompt") if negative else None,
        steps=checked.int("steps", _value(nodes, s.get("steps")), *STEPS_RANGE),
        sampler=as_str(_value(nodes, s.get("sampler_name"))),
        scheduler=as_str(_value(nodes, s.get("scheduler"))),
        cfg_scale=checked.float("cfg_scale", _value(nodes, s.get("cfg", cond.get("cfg")))),
        seed=checked.int("seed", _value(nodes, s.get("seed", s.get("noise_seed"))), *SEED_RANGE),
        width=checked.int("width", _value(nodes, latent.get("width")), *SIDE_RANGE),
        height=checked.int("height", _value(nodes, latent.get("height")), *SIDE_RANGE),
        model_name=model,
        settings=_comfy_summary(nodes, samplers[0]), invalid=tuple(checked.invalid),
    )


def _is_sampler(inputs: dict) -> bool:
    """A node that denoises a latent from conditioning (ControlNet appliers also take `positive`)."""
    denoises = "latent_image" in inputs or "steps" in inputs
    return denoises and ("positive" in inputs or "guider" in inputs)


def _node_order(key: str):
    return (0, int(key), "") if key.isdigit() and len(key) < 12 else (1, 0, key)


def _follow(nodes: dict, link) -> str | None:
    """The node id a link input points to, or None for a literal value / dangling link."""
    if isinstance(link, list) and len(link) == 2 and isinstance(link[0], (str, int)) and str(link[0]) in nodes:
        return str(link[0])
    return None


def _value(nodes: dict, v):
    """A literal input, or the literal behind a link to a primitive-like node (seed, int, float...). Each node
    once: a node linking to itself, with 150,000 other inputs scanned at each of MAX_DEPTH hops, took 9 s."""
    seen: set[str] = set()
    for _ in range(MAX_DEPTH):
        node_id = _follow(nodes, v)
        if node_id is None:
            return v if not isinstance(v, list) else None
        if node_id in seen:  # a cycle holds no literal
            return None
        seen.add(node_id)
        inputs = nodes[node_id]["inputs"]
        literals = [x for k, x in inputs.items() if k in ("seed", "noise_seed", "value", "int", "float", "number",
                                                          "string", "steps", "cfg", "sampler_name", "scheduler")]
        v = literals[0] if literals else None
    return None


def _texts(nodes: dict, link, avoid: str) -> list[str]:
    """Prompt strings upstream of a conditioning link, depth-first, each node once; `avoid` is the
    other polarity's input name (ControlNet appliers carry both positive and negative)."""
    out: list[str] = []
    kept: set[str] = set()  # what `out` holds: a list scanned for each new text took 18 s for 40,000 of them
    seen: set[str] = set()
    stack = [(link, 0)]
    while stack:
        v, depth = stack.pop()
        node_id = _follow(nodes, v)
        if node_id is None or node_id in seen or depth > MAX_DEPTH or len(seen) > MAX_GRAPH_NODES:
            continue
        seen.add(node_id)
        inputs = nodes[node_id]["inputs"]
        pending = []
        for k, x in inputs.items():
            if k in _TEXT_INPUTS and isinstance(x, str):
                if x.strip() and x.strip() not in kept:
                    kept.add(x.strip())
                    out.append(x.strip())
            elif isinstance(x, list) and k != avoid and k not in _NOT_CONDITIONING:
                pending.append((x, depth + 1))
        stack.extend(reversed(pending))
    return out


def _model(nodes: dict, link) -> str | None:
    """The checkpoint/UNet name upstream of a sampler's model input (through LoRA and patch nodes)."""
    seen: set[str] = set()
    v = link
    for _ in range(MAX_DEPTH):
        node_id = _follow(nodes, v)
        if node_id is None or node_id in seen:
            return None
        seen.add(node_id)
        inputs = nodes[node_id]["inputs"]
        for k in ("ckpt_name", "unet_name", "model_name", "model_path"):
            if isinstance(inputs.get(k), str):
                return as_str(inputs[k], 500)
        v = inputs.get("model")
    return None


def _comfy_summary(nodes: dict, sampler: str | None = None) -> tuple[tuple[str, str], ...]:
    kinds = sorted({str(v.get("class_type", "?"))[:100] for v in nodes.values()})[:MAX_SETTINGS]
    out = {"nodes": str(len(nodes)), "node_types": ", ".join(kinds)[:MAX_VALUE]}
    if sampler:
        out["sampler_node"] = f"{sampler} ({str(nodes[sampler].get('class_type', '?'))[:100]})"
    return tuple(out.items())
