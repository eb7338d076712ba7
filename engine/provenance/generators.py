"""What generator front-ends write about a generation: AUTOMATIC1111/Forge, ComfyUI, InvokeAI,
NovelAI and Fooocus, each read from the text fields a container gave.

Every parser takes untrusted text and returns a GenerationMetadata or None; wrong types and
out-of-range numbers become absent fields (the latter listed in `invalid`), never exceptions.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace

from engine.provenance.comfyui import comfyui
from engine.provenance.values import (Checked, GenerationMetadata, MAX_PARAMS_LINE, SEED_RANGE, SIDE_RANGE,
                                     STEPS_RANGE, as_prompt, as_str, no_surrogates, parse_json,
                                     settings_of)


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
        graph = parse_json(texts["workflow"], f"{where}:workflow", notes)
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
                    v = no_surrogates(json.loads(v))
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
    checked = Checked()
    if m := re.fullmatch(r"\s*(\d{1,6})\s*x\s*(\d{1,6})\s*", settings.get("Size", "")):
        width, height = checked.int("width", m.group(1), *SIDE_RANGE), checked.int("height", m.group(2), *SIDE_RANGE)
    elif settings.get("Size"):
        checked.invalid.append("size")
    version = settings.get("Version", "")
    tool = "fooocus" if "Fooocus" in version else "forge" if re.match(r"f\d", version) else "automatic1111"
    return GenerationMetadata(
        tool=tool, source=where,
        prompt=as_prompt("\n".join(prompt_lines), notes, f"{where} prompt"),
        negative_prompt=as_prompt("\n".join(negative_lines), notes, f"{where} negative prompt"),
        steps=checked.int("steps", settings.get("Steps"), *STEPS_RANGE),
        sampler=as_str(settings.get("Sampler")),
        scheduler=as_str(settings.get("Schedule type")),
        cfg_scale=checked.float("cfg_scale", settings.get("CFG scale")),
        seed=checked.int("seed", settings.get("Seed"), *SEED_RANGE),
        width=width, height=height,
        model_name=as_str(settings.get("Model")),
        model_hash=as_str(settings.get("Model hash"), 100),
        settings=settings_of(settings), invalid=tuple(checked.invalid),
    )


# --- InvokeAI --------------------------------------------------------------------------------

def invokeai(text: str, where: str, notes: list[str]) -> GenerationMetadata | None:
    d = parse_json(text, where, notes)
    if not isinstance(d, dict):
        return None
    model: dict = d["model"] if isinstance(d.get("model"), dict) else {}
    checked = Checked()
    return GenerationMetadata(
        tool="invokeai", source=where,
        prompt=as_prompt(d.get("positive_prompt"), notes, f"{where} prompt"),
        negative_prompt=as_prompt(d.get("negative_prompt"), notes, f"{where} negative prompt"),
        steps=checked.int("steps", d.get("steps"), *STEPS_RANGE),
        sampler=as_str(d.get("scheduler")),  # InvokeAI names its sampler "scheduler" ("euler", "dpmpp_2m_k")
        cfg_scale=checked.float("cfg_scale", d.get("cfg_scale")),
        seed=checked.int("seed", d.get("seed"), *SEED_RANGE),
        width=checked.int("width", d.get("width"), *SIDE_RANGE),
        height=checked.int("height", d.get("height"), *SIDE_RANGE),
        model_name=as_str(model.get("name", model.get("model_name"))) or as_str(d.get("model")),
        model_hash=as_str(model.get("hash"), 200),
        settings=settings_of({k: v for k, v in d.items() if k not in ("positive_prompt", "negative_prompt")}),
        invalid=tuple(checked.invalid), per_step=("cfg_scale",) if isinstance(d.get("cfg_scale"), list) else (),
    )


def invokeai_v2(text: str, where: str, notes: list[str]) -> GenerationMetadata | None:
    """InvokeAI 2.x `sd-metadata`: {"model_weights", "model_hash", "image": {"prompt", "seed", ...}}."""
    d = parse_json(text, where, notes)
    if not isinstance(d, dict) or not isinstance(d.get("image"), dict):
        return None
    img = d["image"]
    prompt = img.get("prompt")
    if isinstance(prompt, list):  # [{"prompt": "...", "weight": 1.0}, ...]
        prompt = " ".join(p["prompt"] for p in prompt if isinstance(p, dict) and isinstance(p.get("prompt"), str))
    checked = Checked()
    return GenerationMetadata(
        tool="invokeai", source=where, prompt=as_prompt(prompt, notes, f"{where} prompt"),
        steps=checked.int("steps", img.get("steps"), *STEPS_RANGE), sampler=as_str(img.get("sampler")),
        cfg_scale=checked.float("cfg_scale", img.get("cfg_scale")),
        seed=checked.int("seed", img.get("seed"), *SEED_RANGE),
        width=checked.int("width", img.get("width"), *SIDE_RANGE),
        height=checked.int("height", img.get("height"), *SIDE_RANGE),
        model_name=as_str(d.get("model_weights")), model_hash=as_str(d.get("model_hash"), 200),
        invalid=tuple(checked.invalid),
    )


# --- NovelAI ---------------------------------------------------------------------------------

def novelai(texts: dict[str, str], where: str, notes: list[str]) -> GenerationMetadata | None:
    """`Description` (prompt), `Comment` JSON (uc = negative, scale = guidance), `Source` (model)."""
    d = parse_json(texts["Comment"], f"{where}:Comment", notes)
    if not isinstance(d, dict):
        return None
    source = as_str(texts.get("Source"), 200)
    model_hash = None
    if source and (m := re.search(r"\b([0-9A-Fa-f]{8})$", source)):
        model_hash = m.group(1)
    checked = Checked()
    return GenerationMetadata(
        tool="novelai", source=f"{where}:Comment",
        prompt=as_prompt(texts.get("Description") or d.get("prompt"), notes, f"{where} prompt"),
        negative_prompt=as_prompt(d.get("uc"), notes, f"{where} negative prompt"),
        steps=checked.int("steps", d.get("steps"), *STEPS_RANGE), sampler=as_str(d.get("sampler")),
        scheduler=as_str(d.get("noise_schedule")), cfg_scale=checked.float("cfg_scale", d.get("scale")),
        seed=checked.int("seed", d.get("seed"), *SEED_RANGE),
        width=checked.int("width", d.get("width"), *SIDE_RANGE),
        height=checked.int("height", d.get("height"), *SIDE_RANGE),
        model_name=source, model_hash=model_hash,
        settings=settings_of({k: v for k, v in d.items() if k not in ("prompt", "uc")}), invalid=tuple(checked.invalid),
    )


# --- Fooocus ---------------------------------------------------------------------------------

def fooocus(text: str, where: str, notes: list[str]) -> GenerationMetadata | None:
    """Fooocus' JSON scheme in `parameters` (snake_case keys; older logs use "Title Case")."""
    d = parse_json(text, where, notes)
    if not isinstance(d, dict):
        return None
    k = {str(key).strip().lower().replace(" ", "_"): v for key, v in d.items()}
    width = height = None
    checked = Checked()
    res = k.get("resolution")
    if isinstance(res, str) and (m := re.search(r"(\d{1,6})\D{1,4}(\d{1,6})", res)):
        width, height = checked.int("width", m.group(1), *SIDE_RANGE), checked.int("height", m.group(2), *SIDE_RANGE)
    elif isinstance(res, list) and len(res) == 2:
        width, height = checked.int("width", res[0], *SIDE_RANGE), checked.int("height", res[1], *SIDE_RANGE)
    elif res not in (None, ""):
        checked.invalid.append("size")
    return GenerationMetadata(
        tool="fooocus", source=where,
        prompt=as_prompt(k.get("prompt"), notes, f"{where} prompt"),
        negative_prompt=as_prompt(k.get("negative_prompt"), notes, f"{where} negative prompt"),
        steps=checked.int("steps", k.get("steps"), *STEPS_RANGE), sampler=as_str(k.get("sampler")),
        scheduler=as_str(k.get("scheduler")),
        cfg_scale=checked.float("cfg_scale", k.get("guidance_scale", k.get("cfg_scale"))),
        seed=checked.int("seed", k.get("seed"), *SEED_RANGE),
        width=width, height=height,
        model_name=as_str(k.get("base_model")), model_hash=as_str(k.get("base_model_hash"), 200),
        settings=settings_of({key: v for key, v in k.items() if key not in ("prompt", "negative_prompt", "full_prompt",
                                                                          "full_negative_prompt")}),
        invalid=tuple(checked.invalid),
    )
