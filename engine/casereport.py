"""The case report: one self-contained HTML file an analyst can file and someone else can check later.

A header names what the answer depends on (store, embedder, every source with its fingerprint and
recipe, the options, the exact command, versions, time); then, per query, its thumbnail, the verdict,
margin, the scores as bars, each source's closest stored resyntheses as thumbnails with their
similarities, and the provenance found in the file when there is some.

Nothing in the file is fetched from elsewhere: images are re-encoded by Pillow (bounded to THUMB
pixels a side) and embedded as data: URIs; there is no script. Every text is escaped: paths,
prompts, captions and source names are hostile input. The file is written streamed (one query at a
time) and atomically, so a report over a large folder holds one query's images in memory at once.

Used by `resynth triage`, `resynth attribute --report FILE` and the page's download (POST /v1/report).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
import re
import shlex
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from PIL import Image

from index.keys import UNPRINTABLE

THUMB = 160  # longest side of an embedded thumbnail, in pixels
CACHED_THUMBS = 512  # evidence thumbnails kept between queries (resyntheses recur across a folder)
EVIDENCE_SOURCES = 6  # best-scored sources whose closest resyntheses a report of several queries shows as images
SHOWN_TEXT = 2000  # characters of a description, or of one provenance value, shown in a case
# Characters of one case's provenance JSON: a file's text is bounded on reading (a 64 K prompt, 64 settings
# of 2000), but a 3 KB zTXt of quotes inflates to that and escapes 7-fold (\&quot;): 1.8 MB of report per
# 3 KB file before. The answer's JSON (results.jsonl, --json, /v1/attribute) keeps every value whole.
MAX_PROVENANCE = 20_000
OPEN_PROVENANCE = 8000  # a larger block starts folded
# index.keys.UNPRINTABLE (bidi overrides and isolates, control and invisible characters) other than tab, newline
# and carriage return, which show as whitespace: a hostile prompt or file name with U+202E ("...\u202egnp.exe")
# would otherwise display reversed and make the text after it read backwards (a score, a verdict). Shown as
# visible escapes instead.
_WHITESPACE = "\t\n\r"


# ----- what the report depends on -------------------------------------------------------------------
def versions() -> dict[str, str]:
    """resynth, Python and (read from the installed metadata, not imported) torch, open_clip, diffusers."""
    from importlib import metadata

    out = {"resynth": _version("resynth", metadata), "python": platform.python_version()}
    for name in ("torch", "open_clip_torch", "diffusers", "Pillow"):
        found = _version(name, metadata)
        if found:
            out[name] = found
    return out


def _version(name: str, metadata) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def header(ws, command: str | None = None, options=None, store_label: str | None = None) -> dict:
    """Everything the answers depend on. `store_label` replaces the store's path (the service does not
    disclose its filesystem)."""
    from engine.recipes import recipe

    store = ws.store
    calibration = store.config.get("calibration")
    rows = []
    for s in ws.sources():
        params = _json(s.params_json)
        rows.append({"name": s.name, "kind": s.kind, "fingerprint": s.fingerprint,
                     "recipe": recipe(s.kind, params, s.path)})  # the path reads its scheduler, is not shown
    return {"store": store_label if store_label is not None else str(Path(store.root).resolve()),
            "embedder": store.embedder_identity, "sources": rows,
            "calibration": calibration_text(calibration, paths=store_label is None),
            "options": options.to_dict() if options is not None and hasattr(options, "to_dict") else options,
            "command": command, "versions": versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def calibration_text(calibration: Any, paths: bool = True) -> str:
    """What the verdicts' thresholds rest on: a reader weighs "known" fitted on 60 originals otherwise than on
    6000 ("fitted" alone said neither how many nor for which options). `paths`: name the manifest it was
    fitted on (not for the service, which does not disclose its filesystem)."""
    if not calibration:
        return "none (verdicts are uncalibrated)"
    notes = calibration.get("notes") if isinstance(calibration, dict) else None
    if not isinstance(notes, dict):
        return "fitted"
    used = _dict(notes.get("used"))
    parts = [f"{label} {notes[k]}" for k, label in (("mode", "mode"), ("aggregation", "aggregation"),
                                                    ("open_set_score", "open-set score")) if notes.get(k) is not None]
    for key, label in (("open_set_auroc", "unknown-source AUROC"), ("ece_calibrated", "ECE")):
        if isinstance(notes.get(key), (int, float)):
            parts.append(f"{label} {notes[key]:.3f} as fitted")
    text = "fitted" + (f" from {notes['fitted_on']}" if notes.get("fitted_on") and paths else "")
    text += f": {used['text']}" if used.get("text") else ""
    text += f" ({', '.join(parts)})" if parts else ""
    return text + "; a verdict made with other options says it is uncalibrated"


def _json(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def command_line(words: Iterable[Any]) -> str:
    """A shell-quoted command line (what a reader pastes to reproduce the report). A word holding a character
    the report shows as an escape (a bidi override, a control character, a byte of a file name that is not
    UTF-8) is quoted as bash's $'...' with its bytes as \\xNN, which bash reads alike in every locale: shown as it
    was, '\\u202e' pasted in plain quotes named another file."""
    return " ".join(_ansi_c(w) if _UNSHOWN.search(w) else shlex.quote(w) for w in map(str, words))


_UNSHOWN = re.compile(f"{UNPRINTABLE.pattern}|[\udc80-\udcff]")


def _ansi_c(word: str) -> str:
    def one(c: str) -> str:
        if c in "\\'":
            return "\\" + c
        if "\udc80" <= c <= "\udcff":  # a byte of a name that is not UTF-8, as os.fsdecode keeps it
            return f"\\x{ord(c) - 0xdc00:02x}"
        if _UNSHOWN.match(c):  # its UTF-8 bytes: bash reads \\u/\\U by the locale, and under LC_ALL=C kept
            # '\\u202E' as those six characters (another file) and dropped a tag character
            return "".join(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogatepass"))
        return c
    return "$'" + "".join(map(one, word)) + "'"


def option_words(args) -> list[str]:
    """The attribution options given on a command line (engine.options flags), as flags again, each in
    its read form (`--seed ' 5'` is written `--seed 5`, `--sources b,a` as the sources Options keeps)."""
    from dataclasses import fields

    from engine.options import Options, from_args

    options = from_args(args)  # the command has read them already: no error here
    words: list[str] = []
    for f in fields(Options):
        if getattr(args, f.name, None) is None:
            continue
        value, flag = getattr(options, f.name), f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            words += [f"--{flag}", ",".join(value) if isinstance(value, tuple) else str(value)]
    return words


def attribute_command(args, images: Iterable[Any]) -> str:
    """The `resynth attribute` line that reproduces a report: absolute paths, every option given."""
    from engine.workspace import store_path

    words: list[Any] = ["resynth", "attribute", *(Path(i).resolve() for i in images),
                        "--store", store_path(args.store).resolve()]
    if getattr(args, "prompt", None):
        words += ["--prompt", args.prompt]
    if getattr(args, "captioner", None):
        words += ["--captioner", Path(args.captioner).resolve()]
    return command_line(words + option_words(args))


# ----- images ------------------------------------------------------------------------------------------
def thumbnail(image: Any, size: int = THUMB) -> str | None:
    """A data: URI of `image` (a path, bytes or PIL image) re-encoded within size x size pixels: PNG
    when it has transparency, else JPEG. None when it cannot be read (the report says so instead)."""
    try:
        if isinstance(image, Image.Image):
            picture = image.copy()
        else:
            from engine.images import decode, read_image

            picture = decode(bytes(image), "image") if isinstance(image, (bytes, bytearray)) else read_image(image)[0]
        picture.thumbnail((size, size))
        alpha = picture.mode in ("RGBA", "LA", "PA")
        picture = picture.convert("RGBA" if alpha else "RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG" if alpha else "JPEG", quality=85)
    except Exception:  # noqa: BLE001 - an unreadable image is shown as missing, never a failed report
        return None
    kind = "png" if alpha else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Evidence:
    """Thumbnails of stored images by id, kept for reuse: the bytes are the catalog's, checked against its
    sha256 wherever they live, so a stored file altered since is shown as missing, never as evidence."""

    def __init__(self, store):
        self.store = store
        self.kept: OrderedDict[int, str | None] = OrderedDict()

    def uri(self, image_id: Any) -> str | None:
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            return None
        if image_id in self.kept:
            self.kept.move_to_end(image_id)
            return self.kept[image_id]
        try:
            path = self.store.image_bytes(image_id)
        except Exception:  # noqa: BLE001 - a row removed meanwhile, a file this user may not read: no thumbnail
            path = None
        found = thumbnail(path) if path is not None else None
        self.kept[image_id] = found
        if len(self.kept) > CACHED_THUMBS:
            self.kept.popitem(last=False)
        return found


# ----- the HTML ----------------------------------------------------------------------------------------
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;color:#1d2330;max-width:1100px;margin:1.5rem auto;padding:0 1rem;
overflow-wrap:anywhere}
h1{font-size:1.3rem;margin:.2rem 0}h2{font-size:1.05rem;margin:0 0 .3rem;word-break:break-all}
table.meta{border-collapse:collapse;margin:.5rem 0 1rem}table.meta td,table.meta th{border:1px solid #d0d5dd;
padding:.2rem .5rem;text-align:left;vertical-align:top;font-size:.85rem}
table.meta th{overflow-wrap:normal}code{overflow-wrap:anywhere}
section.case{border:1px solid #d0d5dd;border-radius:8px;padding:.8rem;margin:1rem 0;break-inside:avoid}
.top{display:flex;gap:1rem;flex-wrap:wrap}.top>div:not(.missing){min-width:0;flex:1}
.top img,.thumbs img{border-radius:4px;background:#eef1f6}
.badge{display:inline-block;padding:0 .5rem;border-radius:999px;font-size:.8rem;font-weight:600;white-space:nowrap}
.known{background:#dcfae6;color:#067647}.unknown{background:#fef0c7;color:#b54708}.real{background:#d1e9ff;color:#175cd3}
.uncalibrated,.none{background:#eaecf0;color:#344054}.error{background:#fee4e2;color:#b42318}
.bars{display:grid;grid-template-columns:minmax(0,11rem) minmax(3rem,1fr) auto;gap:.2rem .5rem;align-items:center;
margin:.3rem 0}.bar{display:contents}td.kind{overflow-wrap:normal}
ul.notes{margin:.3rem 0;padding-left:1.2rem;color:#b54708;font-size:.85rem}
.track{background:#eef1f6;border-radius:3px;height:.9rem;overflow:hidden}.fill{background:#2f6fed;height:100%}
.fill.top{background:#12b76a}.num{font-variant-numeric:tabular-nums;font-size:.8rem;text-align:right;white-space:nowrap}
.muted{color:#667085;font-size:.85rem}.sources{display:flex;flex-wrap:wrap;gap:0 1.5rem}
.source{margin:.4rem 0;max-width:100%}.source>div:first-child{font-size:.85rem;font-weight:600}
.thumbs{display:flex;gap:.4rem;flex-wrap:wrap}figure{margin:0;text-align:center}
figcaption{font-size:.75rem;color:#667085}.missing{width:80px;height:80px;display:flex;align-items:center;
justify-content:center;background:#eef1f6;color:#667085;font-size:.7rem}
pre{white-space:pre-wrap;word-break:break-all;font-size:.8rem;background:#f7f8fa;padding:.4rem}
.track,.fill,.badge{-webkit-print-color-adjust:exact;print-color-adjust:exact}  /* printed: bars are backgrounds */
"""


def e(value: Any) -> str:
    """HTML-escaped text, with bidi overrides, control and invisible characters made visible (`UNPRINTABLE`), and the
    lone surrogates of a file name that is not UTF-8 (which no UTF-8 writer accepts) as \\udcNN."""
    text = "" if value is None else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    shown = UNPRINTABLE.sub(lambda m: m.group() if m.group() in _WHITESPACE else _escape(m.group()), text)
    return html.escape(shown, quote=True)


def _escape(c: str) -> str:
    """\\uNNNN, or \\UNNNNNNNN past U+FFFF: a tag character written \\ue0041 read as U+E004 and a '1'."""
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


def _shown(text: Any, limit: int = SHOWN_TEXT) -> str:
    """`text` cut to `limit` characters, saying how many were left out."""
    text = "" if text is None else str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


def _fraction(value: Any) -> float:
    """A probability as a bar width in [0, 1]; anything else (None, NaN, text) is an empty bar."""
    try:
        number = float(value or 0)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, min(1.0, number)) if number == number else 0.0


def _number(value: Any, digits: int = 4) -> str:
    """A number to `digits` decimals; "n/a" for anything else, NaN and infinities included (never "nan")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def render_header(head: dict, title: str = "resynth case report") -> str:
    rows = [("store", head.get("store")), ("embedder", head.get("embedder")),
            ("calibration", head.get("calibration")), ("command", head.get("command")),
            ("options", json.dumps(head.get("options"), sort_keys=True) if head.get("options") else None),
            ("versions", ", ".join(f"{k} {v}" for k, v in (head.get("versions") or {}).items())),
            ("created (UTC)", head.get("created"))]
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
           f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
           f"<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
           f"style-src 'unsafe-inline'\"><title>{e(title)}</title><style>{STYLE}</style></head><body>",
           f"<h1>{e(title)}</h1><table class='meta'>"]
    out += [f"<tr><th>{e(k)}</th><td><code>{e(v)}</code></td></tr>" for k, v in rows if v not in (None, "")]
    out.append("</table><table class='meta'><tr><th>source</th><th>kind</th><th>fingerprint</th><th>recipe</th></tr>")
    out += [f"<tr><td>{e(s.get('name'))}</td><td class='kind'>{e(s.get('kind'))}</td><td><code>"
            f"{e(s.get('fingerprint'))}</code></td><td>{e(s.get('recipe'))}</td></tr>"
            for s in head.get("sources") or ()]
    out.append("</table>")
    return "".join(out)


def _verdict(result: dict) -> str:
    verdict = result.get("verdict") or "none"
    predicted = result.get("predicted")
    ev = _dict(result.get("evidence"))
    if verdict == "none" or not predicted:
        words = "no source could be scored"
    elif verdict == "known":
        words = f"{predicted} (known source)"
    elif verdict == "unknown":
        words = f"unknown source (closest: {predicted})"
    elif verdict == "real":
        words = f"real: no sign of generation (closest source: {predicted})"
    else:
        words = f"{predicted} (uncalibrated: {ev.get('why', 'no acceptance threshold')})"
    test = f" · {_decided_by(verdict, ev)}" if ev.get("threshold") is not None or ev.get("score") is not None else ""
    if "references" in ev:
        test += f" · {e(_plural(ev['references'], 'reference'))}"
    real = ev.get("real") if isinstance(ev.get("real"), dict) else None
    if real:  # the "real" rule's value, stated for every query of a store calibrated with photographs
        test += f" · real rule {_number(real.get('value'))} vs threshold {_number(real.get('threshold'))}"
    claim = ev.get("provenance") if isinstance(ev.get("provenance"), dict) else None
    if claim and claim.get("conclusion"):  # what the file's own recipe says, beside the ranking
        test += f" · provenance: {e(claim['conclusion'])}"
    return f"<span class='badge {e(verdict)}'>{e(verdict)}</span> <strong>{e(words)}</strong>{test}"


def _decided_by(verdict: str, ev: dict) -> str:
    """The test that decided the verdict, as the CLI states it: with a calibrated open-set score, its value
    against its own threshold (the best similarity beside a Mahalanobis threshold compared two scales)."""
    rejected = (ev.get("open_set_verdict") if verdict == "real" else verdict) == "unknown"
    sign = "&lt;" if rejected else "≥"
    if ev.get("open_set_score") is not None:
        return (f"{e(ev['open_set_score'])} {_number(ev.get('value'), 2)} {sign} threshold "
                f"{_number(ev.get('threshold'), 2)} (best score {_number(ev.get('score'))})")
    if ev.get("threshold") is not None:  # similarities crowd near 1: 4 decimals, as the ranking shows them
        return f"score {_number(ev.get('score'))} {sign} threshold {_number(ev.get('threshold'))}"
    return f"score {_number(ev.get('score'))}"


def _dict(value: Any) -> dict:
    """`value` when it is a dict, else an empty one (an answer's JSON read back may hold anything)."""
    return value if isinstance(value, dict) else {}


def _plural(count: Any, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def notes(result: dict) -> list[str]:
    """The answer's notes (what the ranking cannot show by itself, the CLI's `note:` lines), why a source was
    not scored, and, before a calibration, that p is no probability: the report says what the CLI says."""
    found = [str(n) for n in result.get("notes") or () if n] if isinstance(result.get("notes"), list) else []
    failed = _dict(result.get("failed"))
    found += [f"{name} was not scored (it failed): {why}" for name, why in failed.items()]
    if result.get("scores") and not result.get("calibrated"):
        ev = _dict(result.get("evidence"))
        found.append("p: a softmax of the scores, not a calibrated probability ("
                     f"{ev.get('why') or 'no current calibration: `resynth calibrate`'})")
    return found


def render_case(number: int, entry: dict, evidence: Evidence | None, shown_sources: int | None = None) -> str:
    """One query: `entry` holds "label", optional "sha256", "thumb" (data URI) and "result" or "error";
    `shown_sources`: how many of the best-scored sources show their closest resyntheses as images (the others'
    as numbers)."""
    label, result = entry.get("label"), entry.get("result")
    thumb = entry.get("thumb")
    out = [f"<section class='case' id='q{number}'><div class='top'>",
           f"<figure><img src='{e(thumb)}' alt='query {number}'><figcaption>query</figcaption></figure>" if thumb
           else "<div class='missing'>no image</div>", f"<div><h2>{number}. {e(label)}</h2>"]
    if entry.get("sha256"):
        out.append(f"<div class='muted'>sha256 <code>{e(entry['sha256'])}</code></div>")
    if entry.get("gone"):
        out.append("<div><span class='badge unknown'>gone</span> not under the folder at this run: the answer of an "
                   "earlier run, kept</div>")
    if result is None:
        out.append(f"<p><span class='badge error'>error</span> {e(entry.get('error'))}</p></div></div></section>")
        return "".join(out)
    if result.get("description_from") == "none" or not result.get("description"):
        described = "no description: nearest stored references only"
    else:
        described = f"description from {e(result.get('description_from'))}: “{e(_shown(result.get('description')))}”"
    copied = (f" · same bytes as {e(entry['duplicate_of'])}: its answer, nothing generated again"
              if entry.get("duplicate_of") else "")
    out.append(f"<p>{_verdict(result)}</p><div class='muted'>margin {_number(result.get('margin'))} · {described} · "
               f"resyntheses of this description: {e(result.get('cached', 0))} cached, {e(result.get('generated', 0))} "
               f"generated{copied}</div>")
    found_notes = notes(result)
    if found_notes:
        out.append("<ul class='notes'>" + "".join(f"<li>note: {e(n)}</li>" for n in found_notes) + "</ul>")
    out.append("</div></div>")
    scores = [s for s in result.get("scores") or () if isinstance(s, dict)]
    out.append("<div class='bars'>" if scores else "")
    for i, s in enumerate(scores):
        width = 100 * _fraction(s.get("probability"))
        refs = s.get("resyntheses")
        count = f" · {e(refs)} ref{'' if refs == 1 else 's'}" if refs is not None else ""
        # green marks the attributed source: only a "known" verdict names one (an unknown one's closest is not it)
        top = " top" if i == 0 and result.get("verdict") == "known" else ""
        out.append(f"<div class='bar'><span>{e(s.get('source'))}</span><div class='track'><div class='fill{top}' "
                   f"style='width:{width:.1f}%'></div></div><span "
                   f"class='num'>{_number(s.get('score'))} · p {_number(s.get('probability'), 3)}{count}</span></div>")
    out.append("</div>" if scores else "")
    missing = result.get("missing") or []
    if missing:
        out.append(f"<div class='muted'>not scored: {e(', '.join(map(str, missing)))}</div>")
    closest = result.get("closest") if isinstance(result.get("closest"), dict) else {}
    if any(closest.get(s.get("source")) for s in scores):  # side by side: twenty sources' evidence is not twenty rows
        out.append("<div class='muted'>closest stored resyntheses of each source (similarity to the query, image "
                   "id)</div>")
    out.append("<div class='sources'>")
    pictured = scores if shown_sources is None else scores[:shown_sources]
    for s in pictured:
        rows = closest.get(s.get("source")) or []
        if not rows:
            continue
        out.append(f"<div class='source'><div>{e(s.get('source'))}</div>"
                   "<div class='thumbs'>")
        for row in rows:
            uri = evidence.uri(row.get("image_id")) if evidence is not None and isinstance(row, dict) else None
            sim = _number(row.get("similarity") if isinstance(row, dict) else None)
            picture = (f"<img src='{e(uri)}' alt='{e(s.get('source'))} resynthesis'>" if uri
                       else "<div class='missing'>not shown</div>")
            ident = row.get("image_id") if isinstance(row, dict) else ""
            out.append(f"<figure>{picture}<figcaption>sim {sim}<br>#{e(ident)}</figcaption></figure>")
        out.append("</div></div>")
    out.append("</div>")
    rest = [(s.get("source"), _number(_dict((closest.get(s.get("source")) or [{}])[0]).get("similarity")))
            for s in scores[len(pictured):] if closest.get(s.get("source"))]
    if rest:
        out.append(f"<div class='muted'>closest resynthesis of the other {len(rest)} sources (as images in a report of "
                   f"this query alone): {e('; '.join(f'{name} {sim}' for name, sim in rest))}</div>")
    found = provenance(result)
    if found:  # as written (not \\u-escaped: a prompt in another script stays readable)
        whole = len(json.dumps(found, indent=1, sort_keys=True, default=str, ensure_ascii=False))
        text = json.dumps(_cut(found), indent=1, sort_keys=True, default=str, ensure_ascii=False)
        if len(text) > MAX_PROVENANCE:
            text = f"{text[:MAX_PROVENANCE]}\n… ({len(text) - MAX_PROVENANCE} more characters in the JSON answer)"
        unfold = " open" if len(text) <= OPEN_PROVENANCE else ""
        size = f"{whole} characters" + (f", cut to {len(text)}" if whole != len(text) else "")
        out.append(f"<details{unfold}><summary>provenance ({size})</summary><pre>{e(text)}</pre></details>")
    out.append("</section>")
    return "".join(out)


def _cut(value: Any, depth: int = 0) -> Any:
    """`value` with every string over SHOWN_TEXT characters cut (saying how much), at any depth."""
    if isinstance(value, str):
        return _shown(value)
    if depth > 20:
        return "…"
    if isinstance(value, dict):
        return {k: _cut(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_cut(v, depth + 1) for v in value]
    return value


def provenance(result: dict) -> dict:
    """What the file says about itself and what that claims, without the empty fields."""
    found = result.get("provenance")
    if not isinstance(found, dict):
        found = {}
    out = {k: v for k, v in found.items() if k != "schema" and v not in (None, "", [], {})}
    claim = (result.get("evidence") or {}).get("provenance")
    if claim:
        out["claim"] = claim
    return out


def answer_words(result: dict) -> str:
    """A verdict in a few words for the index: an unknown or real verdict's best source is only its closest."""
    verdict, predicted = result.get("verdict") or "none", result.get("predicted")
    if not predicted or verdict == "none":
        return "no source could be scored"
    if verdict in ("unknown", "real"):
        return f"none of the enrolled sources (closest: {predicted})"
    return str(predicted) + ("" if verdict == "known" else " (uncalibrated)")


def render_index(rows: list[dict]) -> str:
    """A table of every query (a link to its case), its verdict and margin, with the count of each verdict:
    what a reader of a 500-image triage looks at first. `rows`: entries without their images."""
    counts: dict[str, int] = {}
    out = []
    for number, row in enumerate(rows, start=1):
        result = row.get("result") if isinstance(row.get("result"), dict) else None
        verdict = (result.get("verdict") or "none") if result is not None else "error"
        counts[verdict] = counts.get(verdict, 0) + 1
        words = answer_words(result) if result is not None else _shown(row.get("error"), 200)
        margin = _number(result.get("margin")) if result is not None else ""
        out.append(f"<tr><td class='num'><a href='#q{number}'>{number}</a></td><td>{e(row.get('label'))}</td>"
                   f"<td><span class='badge {e(verdict)}'>{e(verdict)}</span></td><td>{e(words)}</td>"
                   f"<td class='num'>{margin}</td></tr>")
    tally = ", ".join(f"{count} {verdict}" for verdict, count in sorted(counts.items(), key=lambda c: -c[1]))
    return (f"<p><strong>{len(rows)} quer{'y' if len(rows) == 1 else 'ies'}: {e(tally)}</strong></p>"
            "<table class='meta index'><tr><th>#</th><th>query</th><th>verdict</th><th>answer</th><th>margin</th></tr>"
            + "".join(out) + "</table>")


def index_of(report: dict) -> list[dict]:
    """`render_index` rows of an attribution's JSON (`Report.to_dict()`)."""
    return [{"label": r.get("query"), "result": r} for r in report.get("results") or [] if isinstance(r, dict)]


def render(head: dict, entries: Iterable[dict], store=None, title: str = "resynth case report",
           index: list[dict] | None = None) -> Iterator[str]:
    """The report in pieces (header, the index of queries when there are several, one per query, end): write
    them as they come."""
    evidence = Evidence(store) if store is not None else None
    yield render_header(head, title)
    if index is not None and len(index) > 1:
        yield render_index(index)
    # a report of several queries pictures the evidence of each one's best EVIDENCE_SOURCES: 500 queries over 22
    # sources embedded 33,000 thumbnails, 300-900 MB of HTML no browser opens well
    shown = EVIDENCE_SOURCES if index is not None and len(index) > 1 else None
    count = 0
    for count, entry in enumerate(entries, start=1):
        yield render_case(count, entry, evidence, shown)
    yield f"<p class='muted'>{count} quer{'y' if count == 1 else 'ies'}.</p></body></html>\n"


def write(path: str | os.PathLike, head: dict, entries: Iterable[dict], store=None,
          title: str = "resynth case report", index: list[dict] | None = None) -> Path:
    """Write the report atomically (a temporary file beside it, then renamed)."""
    from engine.errors import writing

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                _write_all(handle, render(head, entries, store, title, index))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _write_all(handle: IO[str], pieces: Iterable[str]) -> None:
    for piece in pieces:
        handle.write(piece)


def to_string(head: dict, entries: Iterable[dict], store=None, title: str = "resynth case report",
              index: list[dict] | None = None) -> str:
    return "".join(render(head, entries, store, title, index))


def entries_of(report: dict, images: Iterable[Any]) -> Iterator[dict]:
    """Report entries from an attribution's JSON (`Report.to_dict()`) and its query images, in order."""
    for result, image in zip(report.get("results") or [], images):
        yield {"label": result.get("query"), "thumb": thumbnail(image), "result": result}


def write_attribution(path: str | os.PathLike, ws, report, images: list, options=None,
                      command: str | None = None) -> Path:
    """`resynth attribute --report FILE`: the report of one attribution (a Report or its JSON)."""
    data = report.to_dict() if hasattr(report, "to_dict") else report
    return write(path, header(ws, command, options), entries_of(data, images), ws.store, index=index_of(data))
