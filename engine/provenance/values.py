"""The fields of a generation recipe as a file states them, checked: untrusted values of the wrong type or out
of range become absent (those written as a number out of range are listed in `invalid`), never exceptions.
Shared by the front-end parsers (engine.provenance.generators, engine.provenance.comfyui)."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields

MAX_PROMPT = 64 << 10  # a prompt longer than this is cut (with a note)
MAX_SETTINGS = 64  # raw key/value settings kept
MAX_VALUE = 2000  # chars per raw setting value
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

def as_int(v, lo: int, hi: int) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*-?\d{1,25}\s*", v):
        v = int(v)
    return v if isinstance(v, int) and lo <= v <= hi else None


def as_float(v) -> float | None:
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


def is_number(v) -> bool:
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


class Checked:
    """Coerces recipe fields like as_int/as_float, remembering the names of those written as a number out of range."""

    def __init__(self) -> None:
        self.invalid: list[str] = []

    def int(self, name: str, v, lo: int, hi: int) -> int | None:
        return self._note(name, v, as_int(v, lo, hi))

    def float(self, name: str, v) -> float | None:
        return self._note(name, v, as_float(v))

    def _note(self, name: str, v, got):
        if got is None and is_number(v) and name not in self.invalid:
            self.invalid.append(name)
        return got


def as_str(v, limit: int = 1000) -> str | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        return None
    v = v.strip()
    return v[:limit] or None


def as_prompt(v, notes: list[str], what: str) -> str | None:
    if not isinstance(v, str):
        return None
    v = v.strip()
    if len(v) > MAX_PROMPT:
        notes.append(f"{what} cut to {MAX_PROMPT} characters")
        v = v[:MAX_PROMPT]
    return v or None


SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # ComfyUI draws seeds up to 2^64-1
STEPS_RANGE = (1, 10_000)
SIDE_RANGE = (1, 100_000)


def settings_of(d: dict) -> tuple[tuple[str, str], ...]:
    out = []
    for k, v in list(d.items())[:MAX_SETTINGS]:
        if not isinstance(v, str):
            try:
                v = json.dumps(v)
            except (TypeError, ValueError, RecursionError):
                continue
        out.append((str(k)[:200], v[:MAX_VALUE]))
    return tuple(out)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def no_surrogates(text: str) -> str:
    """`text` with each lone UTF-16 surrogate (which JSON's `\\ud800` escape yields) as U+FFFD: such a
    string cannot be encoded as UTF-8, and an embedded prompt holding one failed the request with a
    traceback when it was hashed as the query's description."""
    return _SURROGATE.sub("\ufffd", text)


def parse_json(text: str, where: str, notes: list[str]):
    """The file's JSON, its strings (keys too) free of lone surrogates."""
    try:
        value = json.loads(text)
        if _SURROGATE_ESCAPE.search(text):  # only then can a string hold one: re-read it cleaned
            value = json.loads(no_surrogates(json.dumps(value, ensure_ascii=False)))
        return value
    except (ValueError, RecursionError) as e:
        notes.append(f"{where}: not valid JSON ({type(e).__name__}); ignored")
        return None
