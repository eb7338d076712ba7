"""What generator front-ends write about a generation: AUTOMATIC1111/Forge, ComfyUI, InvokeAI,
NovelAI and Fooocus, each read from the text fields a container gave.

Every parser takes untrusted text and returns a GenerationMetadata or None; wrong types and
out-of-range numbers become absent fields (the latter listed in `invalid`), never exceptions.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields, replace

MAX_PROMPT = 64 << 10  # a prompt longer than this is cut (with a note)
MAX_SETTINGS = 64  # raw key/value settings kept
MAX_VALUE = 2000  # chars per raw setting value
MAX_GRAPH_NODES = 5000  # ComfyUI graphs larger than this are not walked
MAX_DEPTH = 64  # ComfyUI link hops followed from a sampler
MAX_PARAMS_LINE = 32 << 10  # A1111's settings line (with LoRA/TI hash lists) is far shorter


@dataclass(frozen=True)
class GenerationMetadata:
    """The generation recipe a file claims for itself (claims: metadata is easy to forge)."""
    tool: str  # automatic1111, forge, comfyui, invokeai, novelai, fooocus
    source: str  # where it was read: "png:parameters", "exif:UserComment", ...
    prompt: str | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    sampler: str | None = None
    scheduler: str | None = None
    cfg_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model_name: str | None = None
    model_hash: str | None = None
    settings: tuple[tuple[str, str], ...] = field(default=())  # raw key/values as written
    # recipe fields the file wrote as a number out of range, or NaN (absent above): a redraw must not fill them
    # from the source as if the file had left them out. A value that is no number (a ComfyUI expression, an
    # unresolved link) is only absent: the file did not say it.
    invalid: tuple[str, ...] = ()
    # recipe fields written as one value per step (InvokeAI's cfg_scale may be a list): absent above, and a
    # redraw, which takes one value, refuses them
    per_step: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("settings", "invalid", "per_step")}
        out["settings"] = dict(self.settings)
        out["invalid"] = list(self.invalid)
        out["per_step"] = list(self.per_step)
        return out


# --- value coercion ------------------------------------------------------------------------

def _int(v, lo: int, hi: int) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*-?\d{1,25}\s*", v):
        v = int(v)
    return v if isinstance(v, int) and lo <= v <= hi else None


def _float(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        try:
            v = float(v.strip()) if len(v) < 40 else None
        except ValueError:
            return None
    if isinstance(v, (int, float)) and math.isfinite(v) and -1e6 < v < 1e6:
        return float(v)
    return None


def _is_number(v) -> bool:
    """A number as the file wrote it (`7`, `"1e12"`, `"NaN"`); not an expression, a link or a list."""
    if isinstance(v, bool):
        return False
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            return False
        return True
    return isinstance(v, (int, float))


class _Checked:
    """Coerces recipe fields like _int/_float, remembering the names of those written as a number out of range."""

    def __init__(self) -> None:
        self.invalid: list[str] = []

    def int(self, name: str, v, lo: int, hi: int) -> int | None:
        return self._note(name, v, _int(v, lo, hi))

    def float(self, name: str, v) -> float | None:
        return self._note(name, v, _float(v))

    def _note(self, name: str, v, got):
        if got is None and _is_number(v) and name not in self.invalid:
            self.invalid.append(name)
        return got


def _str(v, limit: int = 1000) -> str | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        return None
    v = v.strip()
    return v[:limit] or None


def _prompt(v, notes: list[str], what: str) -> str | None:
    if not isinstance(v, str):
        return None
    v = v.strip()
    if len(v) > MAX_PROMPT:
        notes.append(f"{what} cut to {MAX_PROMPT} characters")
        v = v[:MAX_PROMPT]
    return v or None


_SEED = (-(2 ** 63), 2 ** 64 - 1)  # ComfyUI draws seeds up to 2^64-1
_STEPS = (1, 10_000)
_SIDE = (1, 100_000)


def _settings(d: dict) -> tuple[tuple[str, str], ...]:
    out = []
    for k, v in list(d.items())[:MAX_SETTINGS]:
        if not isinstance(v, str):
            try:
                v = json.dumps(v)
            except (TypeError, ValueError, RecursionError):
                continue
        out.append((str(k)[:200], v[:MAX_VALUE]))
    return tuple(out)


def _json(text: str, where: str, notes: list[str]):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        notes.append(f"{where}: not valid JSON ({type(e).__name__}); ignored")
        return None


# --- dispatch --------------------------------------------------------------------------------

def from_texts(texts: dict[str, str], where: str, notes: list[str]) -> GenerationMetadata | None:
    """The first front-end whose fields are present and parse. `where` prefixes the source."""
    if "invokeai_metadata" in texts:
        got = invokeai(texts["invokeai_metadata"], f"{where}:invokeai_metadata", notes)
        if got:
            return got
    params = texts.get("parameters")
    if params is not None:
        got = (fooocus(params, f"{where}:parameters", notes) if params.lstrip().startswith("{")
               else a1111(params, f"{where}:parameters", notes))
        if got:
            if "prompt" in texts or "workflow" in texts:  # ComfyUI savers that also write A1111 text
                return replace(got, tool="comfyui")
            return got
    if "prompt" in texts:
        got = comfyui(texts["prompt"], f"{where}:prompt", notes)
        if got:
            return got
    if "Comment" in texts and ("Description" in texts or texts.get("Software", "").startswith("NovelAI")):
        got = novelai(texts, where, notes)
        if got:
            return got
    if "sd-metadata" in texts:
        got = invokeai_v2(texts["sd-metadata"], f"{where}:sd-metadata", notes)
        if got:
            return got
    if "workflow" in texts:
        graph = _json(texts["workflow"], f"{where}:workflow", notes)
        if isinstance(graph, dict):
            notes.append(f"{where}:workflow: a ComfyUI editor workflow without the executed prompt graph; "
                         "its prompt is not read")
            return GenerationMetadata(tool="comfyui", source=f"{where}:workflow")
    return None


# --- AUTOMATIC1111 / Forge -------------------------------------------------------------------

# the "Key: " of one item of the last line, and a JSON-quoted value (values with commas are quoted)
_A1111_KEY = re.compile(r'\s*([\w][\w \-/()+.]{0,60}?):\s*')
_A1111_QUOTED = re.compile(r'"(?:\\.|[^\\"]){0,4000}"(?=\s*(?:,|$))')
MAX_ITEMS = 256  # items of the settings line read (each costs at most one quoted-value scan of 4000)


def _a1111_items(line: str) -> list[tuple[str, str]]:
    """The `Key: value` items of a settings line, left to right in one pass; text that is not an item is
    skipped to the next comma. (A findall of one item pattern backtracked for 4 s on a hostile 32 KB line.)"""
    items: list[tuple[str, str]] = []
    pos, end = 0, len(line)
    while pos < end and len(items) < MAX_ITEMS:
        key = _A1111_KEY.match(line, pos)
        if key is None:
            comma = line.find(",", pos)
            pos = end if comma < 0 else comma + 1
            continue
        pos = key.end()
        quoted = _A1111_QUOTED.match(line, pos) if line.startswith('"', pos) else None
        if quoted is not None:
            value, pos = quoted.group(0), quoted.end()
            comma = line.find(",", pos)
            pos = end if comma < 0 else comma + 1
        else:
            comma = line.find(",", pos)
            value, pos = line[pos:end if comma < 0 else comma], end if comma < 0 else comma + 1
        items.append((key.group(1), value[:4000]))
    return items


def a1111(text: str, where: str, notes: list[str]) -> GenerationMetadata | None:
    """`prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ...`"""
    lines = text.strip().split("\n")
    settings: dict[str, str] = {}
    if len(lines[-1]) > MAX_PARAMS_LINE:  # bounded so the item pattern stays cheap on hostile text
        notes.append(f"{where}: last line of {len(lines[-1])} characters is not read as settings")
    elif (items := _a1111_items(lines[-1])) and len(items) >= 3 and lines[-1].lstrip().startswith(
            items[0][0]):
        for k, v in items:
            v = v.strip()
            if v.startswith('"') and v.endswith('"') and len(v) >= 2:
                try:
                    v = json.loads(v)
                except ValueError:
                    v = v[1:-1]
            settings.setdefault(k.strip(), str(v))
        lines = lines[:-1]
    if "Steps" not in settings and not any(line.startswith("Negative prompt:") for line in lines):
        return None  # not A1111 text (or nothing we can use from it)
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    into_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            into_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative_lines if into_negative else prompt_lines).append(line)
    width = height = None
    checked = _Checked()
    if m := re.fullmatch(r"\s*(\d{1,6})\s*x\s*(\d{1,6})\s*", settings.get("Size", "")):
        width, height = checked.int("width", m.group(1), *_SIDE), checked.int("height", m.group(2), *_SIDE)
    elif settings.get("Size"):
        checked.invalid.append("size")
    version = settings.get("Version", "")
    tool = "fooocus" if "Fooocus" in version else "forge" if re.match(r"f\d", version) else "automatic1111"
    return GenerationMetadata(
        tool=tool, source=where,
        prompt=_prompt("\n".join(prompt_lines), notes, f"{where} prompt"),
        negative_prompt=_prompt("\n".join(negative_lines), notes, f"{where} negative prompt"),
        steps=checked.int("steps", settings.get("Steps"), *_STEPS),
        sampler=_str(settings.get("Sampler")),
        scheduler=_str(settings.get("Schedule type")),
        cfg_scale=checked.float("cfg_scale", settings.get("CFG scale")),
        seed=checked.int("seed", settings.get("Seed"), *_SEED),
        width=width, height=height,
        model_name=_str(settings.get("Model")),
        model_hash=_str(settings.get("Model hash"), 100),
        settings=_settings(settings), invalid=tuple(checked.invalid),
    )


# --- ComfyUI ---------------------------------------------------------------------------------

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
    graph = _json(text, where, notes)
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
    checked = _Checked()
    return GenerationMetadata(
        tool="comfyui", source=where,
        prompt=_prompt("\n".join(positive), notes, f"{where} prompt") if positive else None,
        negative_prompt=_prompt("\n".join(negative), notes, f"{where} negative prompt") if negative else None,
        steps=checked.int("steps", _value(nodes, s.get("steps")), *_STEPS),
        sampler=_str(_value(nodes, s.get("sampler_name"))),
        scheduler=_str(_value(nodes, s.get("scheduler"))),
        cfg_scale=checked.float("cfg_scale", _value(nodes, s.get("cfg", cond.get("cfg")))),
        seed=checked.int("seed", _value(nodes, s.get("seed", s.get("noise_seed"))), *_SEED),
        width=checked.int("width", _value(nodes, latent.get("width")), *_SIDE),
        height=checked.int("height", _value(nodes, latent.get("height")), *_SIDE),
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
    """A literal input, or the literal behind a link to a primitive-like node (seed, int, float...)."""
    for _ in range(MAX_DEPTH):
        node_id = _follow(nodes, v)
        if node_id is None:
            return v if not isinstance(v, list) else None
        inputs = nodes[node_id]["inputs"]
        literals = [x for k, x in inputs.items() if k in ("seed", "noise_seed", "value", "int", "float", "number",
                                                          "string", "steps", "cfg", "sampler_name", "scheduler")]
        v = literals[0] if literals else None
    return None


def _texts(nodes: dict, link, avoid: str) -> list[str]:
    """Prompt strings upstream of a conditioning link, depth-first, each node once; `avoid` is the
    other polarity's input name (ControlNet appliers carry both positive and negative)."""
    out: list[str] = []
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
                if x.strip() and x.strip() not in out:
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
                return _str(inputs[k], 500)
        v = inputs.get("model")
    return None


def _comfy_summary(nodes: dict, sampler: str | None = None) -> tuple[tuple[str, str], ...]:
    kinds = sorted({str(v.get("class_type", "?"))[:100] for v in nodes.values()})[:MAX_SETTINGS]
    out = {"nodes": str(len(nodes)), "node_types": ", ".join(kinds)[:MAX_VALUE]}
    if sampler:
        out["sampler_node"] = f"{sampler} ({str(nodes[sampler].get('class_type', '?'))[:100]})"
    return tuple(out.items())


# --- InvokeAI --------------------------------------------------------------------------------

def invokeai(text: str, where: str, notes: list[str]) -> GenerationMetadata | None:
    d = _json(text, where, notes)
    if not isinstance(d, dict):
        return None
    model: dict = d["model"] if isinstance(d.get("model"), dict) else {}
    checked = _Checked()
    return GenerationMetadata(
        tool="invokeai", source=where,
        prompt=_prompt(d.get("positive_prompt"), notes, f"{where} prompt"),
        negative_prompt=_prompt(d.get("negative_prompt"), notes, f"{where} negative prompt"),
        steps=checked.int("steps", d.get("steps"), *_STEPS),
        sampler=_str(d.get("scheduler")),  # InvokeAI names its sampler "scheduler" ("euler", "dpmpp_2m_k")
        cfg_scale=checked.float("cfg_scale", d.get("cfg_scale")),
        seed=checked.int("seed", d.get("seed"), *_SEED),
        width=checked.int("width", d.get("width"), *_SIDE), height=checked.int("height", d.get("height"), *_SIDE),
        model_name=_str(model.get("name", model.get("model_name"))) or _str(d.get("model")),
        model_hash=_str(model.get("hash"), 200),
        settings=_settings({k: v for k, v in d.items() if k not in ("positive_prompt", "negative_prompt")}),
        invalid=tuple(checked.invalid), per_step=("cfg_scale",) if isinstance(d.get("cfg_scale"), list) else (),
    )


def invokeai_v2(text: str, where: str, notes: list[str]) -> GenerationMetadata | None:
    """InvokeAI 2.x `sd-metadata`: {"model_weights", "model_hash", "image": {"prompt", "seed", ...}}."""
    d = _json(text, where, notes)
    if not isinstance(d, dict) or not isinstance(d.get("image"), dict):
        return None
    img = d["image"]
    prompt = img.get("prompt")
    if isinstance(prompt, list):  # [{"prompt": "...", "weight": 1.0}, ...]
        prompt = " ".join(p["prompt"] for p in prompt if isinstance(p, dict) and isinstance(p.get("prompt"), str))
    checked = _Checked()
    return GenerationMetadata(
        tool="invokeai", source=where, prompt=_prompt(prompt, notes, f"{where} prompt"),
        steps=checked.int("steps", img.get("steps"), *_STEPS), sampler=_str(img.get("sampler")),
        cfg_scale=checked.float("cfg_scale", img.get("cfg_scale")), seed=checked.int("seed", img.get("seed"), *_SEED),
        width=checked.int("width", img.get("width"), *_SIDE), height=checked.int("height", img.get("height"), *_SIDE),
        model_name=_str(d.get("model_weights")), model_hash=_str(d.get("model_hash"), 200),
        invalid=tuple(checked.invalid),
    )


# --- NovelAI ---------------------------------------------------------------------------------

def novelai(texts: dict[str, str], where: str, notes: list[str]) -> GenerationMetadata | None:
    """`Description` (prompt), `Comment` JSON (uc = negative, scale = guidance), `Source` (model)."""
    d = _json(texts["Comment"], f"{where}:Comment", notes)
    if not isinstance(d, dict):
        return None
    source = _str(texts.get("Source"), 200)
    model_hash = None
    if source and (m := re.search(r"\b([0-9A-Fa-f]{8})$", source)):
        model_hash = m.group(1)
    checked = _Checked()
    return GenerationMetadata(
        tool="novelai", source=f"{where}:Comment",
        prompt=_prompt(texts.get("Description") or d.get("prompt"), notes, f"{where} prompt"),
        negative_prompt=_prompt(d.get("uc"), notes, f"{where} negative prompt"),
        steps=checked.int("steps", d.get("steps"), *_STEPS), sampler=_str(d.get("sampler")),
        scheduler=_str(d.get("noise_schedule")), cfg_scale=checked.float("cfg_scale", d.get("scale")),
        seed=checked.int("seed", d.get("seed"), *_SEED),
        width=checked.int("width", d.get("width"), *_SIDE), height=checked.int("height", d.get("height"), *_SIDE),
        model_name=source, model_hash=model_hash,
        settings=_settings({k: v for k, v in d.items() if k not in ("prompt", "uc")}), invalid=tuple(checked.invalid),
    )


# --- Fooocus ---------------------------------------------------------------------------------

def fooocus(text: str, where: str, notes: list[str]) -> GenerationMetadata | None:
    """Fooocus' JSON scheme in `parameters` (snake_case keys; older logs use "Title Case")."""
    d = _json(text, where, notes)
    if not isinstance(d, dict):
        return None
    k = {str(key).strip().lower().replace(" ", "_"): v for key, v in d.items()}
    width = height = None
    checked = _Checked()
    res = k.get("resolution")
    if isinstance(res, str) and (m := re.search(r"(\d{1,6})\D{1,4}(\d{1,6})", res)):
        width, height = checked.int("width", m.group(1), *_SIDE), checked.int("height", m.group(2), *_SIDE)
    elif isinstance(res, list) and len(res) == 2:
        width, height = checked.int("width", res[0], *_SIDE), checked.int("height", res[1], *_SIDE)
    elif res not in (None, ""):
        checked.invalid.append("size")
    return GenerationMetadata(
        tool="fooocus", source=where,
        prompt=_prompt(k.get("prompt"), notes, f"{where} prompt"),
        negative_prompt=_prompt(k.get("negative_prompt"), notes, f"{where} negative prompt"),
        steps=checked.int("steps", k.get("steps"), *_STEPS), sampler=_str(k.get("sampler")),
        scheduler=_str(k.get("scheduler")),
        cfg_scale=checked.float("cfg_scale", k.get("guidance_scale", k.get("cfg_scale"))),
        seed=checked.int("seed", k.get("seed"), *_SEED),
        width=width, height=height,
        model_name=_str(k.get("base_model")), model_hash=_str(k.get("base_model_hash"), 200),
        settings=_settings({key: v for key, v in k.items() if key not in ("prompt", "negative_prompt", "full_prompt",
                                                                          "full_negative_prompt")}),
        invalid=tuple(checked.invalid),
    )
