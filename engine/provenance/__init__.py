"""Provenance: what an image file says about itself, read offline and cheaply.

`read_provenance(path_or_bytes)` gathers five independent kinds of evidence:
- metadata: the generation recipe front-ends write (AUTOMATIC1111/Forge, ComfyUI, InvokeAI,
  NovelAI, Fooocus): prompt, negative prompt, seed, steps, sampler, guidance, size, model;
- digital_source_type: IPTC's term from XMP (or from a C2PA action when XMP has none);
- exif: camera make/model and software;
- c2pa: a signed manifest's summary and validation state (optional dependency c2pa-python);
- watermark: the SDXL / SD 1.x invisible watermarks (optional dependency invisible-watermark).

Everything but C2PA and the watermark is standard library; nothing imports torch. Hostile or
malformed metadata never raises: a bad field is absent, with a line in `notes`. All of it is
what the file *claims*: metadata and XMP are trivially forged; only a `valid` C2PA state is
signed evidence, and then only of who signed it.
"""
from __future__ import annotations

import copy
import errno
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.provenance.containers import (Container, parse_exif, read_container, source_type_term,
                                          xmp_digital_source_type)
from engine.provenance.generators import GenerationMetadata, from_texts

SCHEMA = 1
MAX_FILE = 256 << 20  # bytes of a file read for provenance
MAX_NOTES = 50

_GENERATIVE = {"trainedAlgorithmicMedia": "yes", "compositeWithTrainedAlgorithmicMedia": "partly",
               "digitalCapture": "no", "computationalCapture": "no", "negativeFilm": "no",
               "positiveFilm": "no", "print": "no"}

__all__ = ["Provenance", "GenerationMetadata", "read_provenance", "SCHEMA"]


@dataclass(frozen=True)
class Provenance:
    """Evidence one file carries. `to_dict()` is the stable JSON shape (schema 1)."""
    format: str | None = None
    metadata: GenerationMetadata | None = None
    digital_source_type: dict | None = None  # {term, uri, source: xmp|c2pa, generative_ai: yes|partly|no|null}
    exif: dict | None = None  # {make, model, software}, only those present
    c2pa: dict = field(default_factory=lambda: {"state": "skipped"})
    watermark: dict | None = None  # {name: sdxl|sd1, method, bits, matched, agreement, note}
    watermark_check: dict = field(default_factory=lambda: {"state": "skipped"})
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "format": self.format,
            "metadata": self.metadata.to_dict() if self.metadata else None,
            "digital_source_type": copy.deepcopy(self.digital_source_type),
            "exif": copy.deepcopy(self.exif),
            "c2pa": copy.deepcopy(self.c2pa),
            "watermark": copy.deepcopy(self.watermark),
            "watermark_check": copy.deepcopy(self.watermark_check),
            "notes": list(self.notes),
        }

    def description(self) -> tuple[str | None, str | None]:
        """(embedded prompt, "metadata"), or (None, None) when the file names no prompt."""
        if self.metadata is not None and self.metadata.prompt:
            return self.metadata.prompt, "metadata"
        return None, None

    def recipe(self) -> dict:
        """What a "reproduce from the recipe" run needs, only the fields the metadata gives."""
        m = self.metadata
        if m is None:
            return {}
        got = {"tool": m.tool, "prompt": m.prompt, "negative_prompt": m.negative_prompt, "steps": m.steps,
               "guidance": m.cfg_scale, "width": m.width, "height": m.height, "seed": m.seed,
               "sampler": m.sampler, "scheduler": m.scheduler, "model_name": m.model_name,
               "model_hash": m.model_hash}
        return {k: v for k, v in got.items() if v is not None}

    @property
    def claims_generated(self) -> bool | None:
        """True when any evidence says "generated" (metadata, IPTC term, C2PA action, watermark),
        False when the IPTC term says capture and nothing else says generated, else None."""
        dst = (self.digital_source_type or {}).get("generative_ai")
        if self.metadata or self.watermark or dst in ("yes", "partly"):
            return True
        return False if dst == "no" else None


def read_provenance(source: str | os.PathLike | bytes | bytearray | memoryview, *,
                    trust_anchors: str | os.PathLike | None = None,
                    c2pa: bool = True, watermark: bool = True) -> Provenance:
    """Provenance of an image file (path) or its bytes.

    trust_anchors: a PEM file of C2PA trust anchors (else $RESYNTH_C2PA_TRUST_ANCHORS; none means
    every signer is "untrusted"). c2pa / watermark: False skips those checks (the watermark check
    decodes the pixels, about a second for a megapixel image). Raises only OSError for a path that
    cannot be read and TypeError for an unsupported argument; never for the file's content.
    """
    notes: list[str] = []
    data = _read(source, notes)
    box = Container()
    try:
        box = read_container(data)
    except Exception as e:  # a bug here must not become the caller's traceback
        notes.append(f"container: internal error {type(e).__name__}: {e}")
    notes.extend(box.notes)

    exif_fields: dict[str, str] = {}
    if box.exif is not None:
        try:
            exif_fields = parse_exif(box.exif, notes)
        except Exception as e:
            notes.append(f"exif: internal error {type(e).__name__}: {e}")

    metadata = _safe(lambda: _metadata(box, exif_fields, notes), "metadata", notes)
    # ComfyUI's WebP saver stores its graphs as "prompt:{...}" / "workflow:{...}" in Model / Make
    camera = {k: v[:256] for k, v in exif_fields.items()
              if k in ("make", "model", "software") and v and not v.startswith(("prompt:", "workflow:"))} or None

    c2pa_state = _safe(lambda: _c2pa(data, trust_anchors, box.xmp), "c2pa", notes) if c2pa else None
    c2pa_state = c2pa_state or {"state": "skipped" if not c2pa else "unavailable"}
    mark, mark_state = None, {"state": "skipped"}
    if watermark:
        from engine.provenance import watermark as wm
        mark, mark_state = _safe(lambda: wm.check(data), "watermark", notes) or (None, {"state": "skipped"})

    dst = _safe(lambda: _digital_source_type(box, c2pa_state), "digital_source_type", notes)
    if dst and dst["source"] == "c2pa" and c2pa_state.get("state") == "invalid":  # tampered or forged: its
        # term is as much a claim as XMP's, though `source` names C2PA
        notes.append("digital_source_type: read from a C2PA manifest that failed validation: a claim, not evidence")
    if len(notes) > MAX_NOTES:
        notes = notes[:MAX_NOTES] + [f"... and {len(notes) - MAX_NOTES} more notes"]
    return Provenance(format=box.format, metadata=metadata, digital_source_type=dst, exif=camera,
                      c2pa=c2pa_state, watermark=mark, watermark_check=mark_state,
                      notes=tuple(n[:500] for n in notes))


def _read(source, notes: list[str]) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        data = _read_regular(Path(source))
    else:
        raise TypeError(f"read_provenance takes a path or bytes, not {type(source).__name__}")
    if len(data) > MAX_FILE:
        notes.append(f"file larger than {MAX_FILE} bytes: only its beginning is read")
        data = data[:MAX_FILE]
    return data


def _read_regular(path: Path) -> bytes:
    """A regular file's first MAX_FILE + 1 bytes; anything else is an OSError: a FIFO nobody writes to made
    open() wait forever, /dev/zero cost 256 MB of zeros. O_NONBLOCK keeps the open itself from waiting."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL,
                      "a folder" if stat.S_ISDIR(mode) else "not a regular file", str(path))
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_FILE + 1)


def _safe(fn, what: str, notes: list[str]):
    try:
        return fn()
    except Exception as e:
        notes.append(f"{what}: internal error {type(e).__name__}: {str(e)[:200]}")
        return None


def _metadata(box: Container, exif: dict[str, str], notes: list[str]) -> GenerationMetadata | None:
    fmt = box.format or "file"
    if box.texts and (got := from_texts(box.texts, fmt, notes)):
        return got
    comfy = {key: exif[tag][len(key) + 1:] for key, tag in (("prompt", "model"), ("workflow", "make"))
             if exif.get(tag, "").startswith(key + ":")}
    if comfy and (got := from_texts(comfy, "exif", notes)):
        return got
    for text, label in ((exif.get("user_comment"), "exif:UserComment"), (box.texts.get("comment"), f"{fmt}:comment")):
        if text and (got := from_texts({"parameters": text}, label, notes)):
            return replace(got, source=label)  # A1111 text (or Fooocus JSON) outside a named field
    return None


def _c2pa(data: bytes, trust_anchors, xmp: str | None) -> dict:
    from engine.provenance import c2pa_check

    return c2pa_check.check(data, trust_anchors, xmp)


def _digital_source_type(box: Container, c2pa_state: dict) -> dict | None:
    uri, source = None, None
    if box.xmp:
        uri, source = xmp_digital_source_type(box.xmp), "xmp"
    if not uri and c2pa_state.get("digital_source_type"):
        uri, source = c2pa_state["digital_source_type"], "c2pa"
    if not uri:
        return None
    term = source_type_term(uri)
    return {"term": term, "uri": uri[:500], "source": source, "generative_ai": _GENERATIVE.get(term or "")}
