"""A source's recipe in words: what `source list` and the demo show, and the command that recreates it.

A resynthesis only resembles the query when it is made the way the query was (steps, guidance, size,
scheduler): the recipe is half of what a source is, so it is shown wherever sources are listed.
"""
from __future__ import annotations

import shlex

# pipeline parameters in the order a person reads them, with the words for "not set"
PIPELINE = (("steps", None), ("guidance", None), ("size", "pipeline's"), ("scheduler", "pipeline's"),
            ("negative_prompt", None))
# shown in the model column, or not about the images (how fast, how long to wait, where the key is)
HIDDEN = {"url", "model", "path", "api_key_env", "concurrency", "timeout"}


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def pipeline_scheduler(path: str | None) -> str | None:
    """The scheduler class a diffusers folder ships with (its scheduler_config.json), if readable."""
    import json
    from pathlib import Path

    if not path:
        return None
    try:
        name = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def recipe(kind: str, params: dict, path: str | None = None) -> str:
    """A stored source's recipe in words, as its kind describes it (`SourceKind.describe_recipe`); a kind
    this installation does not know is shown by its stored fields."""
    from engine import sources
    from engine.errors import UserError

    try:
        found = sources.get(kind)
    except UserError:
        return describe(params, path)
    return found.describe_recipe(params, path)


def describe(params: dict, path: str | None = None) -> str:
    """"steps 2, guidance 7, size pipeline's, scheduler pipeline's" (a pipeline recipe: params with steps);
    then the other stored fields, in their stored order, unset ones left out."""
    parts = []
    if "steps" in params:
        for key, unset in PIPELINE:
            value = params.get(key)
            if value is None or value == "":
                own = pipeline_scheduler(path) if key == "scheduler" else None
                if own:
                    parts.append(f"scheduler {own} (the pipeline's own)")
                elif unset:
                    parts.append(f"{key} {unset}")
                continue
            parts.append(f"{key.replace('_', ' ')} {value!r}" if key == "negative_prompt"
                         else f"{key} {_number(value)}")
        known = {k for k, _ in PIPELINE}
    else:
        known = set()
    for key, value in params.items():
        if key in known or key in HIDDEN or value in (None, "", {}, []):
            continue
        parts.append(f"{key.replace('_', ' ')} {_number(value) if not isinstance(value, dict) else value}")
    return ", ".join(parts) or "-"


def add_command(name: str, path: str | None, params: dict, store: str | None = None) -> str:
    """The `resynth source add` line that registers `path` with this recipe (pipeline sources)."""
    words = ["resynth", "source", "add", name, str(path)]
    for key, _ in PIPELINE:
        value = params.get(key)
        if value is not None and value != "":
            words += [f"--{key.replace('_', '-')}", _number(value)]
    if store:
        words += ["--store", store]
    return " ".join(shlex.quote(w) for w in words)


def table(rows: list[dict]) -> str:
    """`source list` in text: name, kind, recipe, and where the model is."""
    if not rows:
        return "no sources (add one with `resynth source add NAME PIPELINE_DIR`)"
    cells = [(r["name"], r["kind"], recipe(r["kind"], r.get("params") or {}, r.get("path")), _where(r)) for r in rows]
    widths = [max(len(c[i]) for c in cells + [("name", "kind", "recipe", "model")]) for i in range(3)]
    head = f"{'name':{widths[0]}}  {'kind':{widths[1]}}  {'recipe':{widths[2]}}  model"
    return "\n".join([head] + [f"{a:{widths[0]}}  {b:{widths[1]}}  {c:{widths[2]}}  {d}" for a, b, c, d in cells])


def _where(row: dict) -> str:
    params = row.get("params") or {}
    if params.get("url") and params.get("model"):  # an API source: its model, at the endpoint it calls
        return f"{params['model']} at {row.get('path') or params['url']}"
    if row.get("path"):
        return str(row["path"])
    if params.get("url"):
        return f"{params['model']} at {params['url']}" if params.get("model") else str(params["url"])
    return "-"
