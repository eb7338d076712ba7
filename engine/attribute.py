"""What an attribution is: the query, the plan of one request, the per-source scores and the result.

The steps that produce these are engine.request's (one implementation, used by the library, CLI,
service, demo and benchmarks); this module holds the data and the pure scoring rule.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from engine.aggregate import aggregate
from engine.calibration import DEFAULT_TEMPERATURE, Calibration
from engine.images import ImageInput, read_image
from engine.options import Options
from engine.sources import kind_of
from index.keys import cache_key
from index.store import Source, StoredReference

if TYPE_CHECKING:
    from engine.provenance import Provenance


@dataclass
class Query:
    image: Image.Image
    file_hash: str
    label: str
    prompt: str | None = None
    provenance: "Provenance | None" = None  # what the file says about itself (None: no file was read)

    @classmethod
    def read(cls, source: ImageInput, prompt: str | None = None, label: str | None = None, **limits) -> "Query":
        """Any accepted input (path, bytes, PIL image) through the one image reader; the file's own
        provenance (engine.provenance) is read beside it while its bytes are at hand."""
        from engine.describe import clean_prompt

        if label is None:
            label = "image" if isinstance(source, (bytes, bytearray, Image.Image)) else str(source)
        image, file_hash = read_image(source, label, **limits)
        return cls(image, file_hash, label, clean_prompt(prompt), provenance_of(source))

    from_path = read  # the name earlier code used

    @property
    def embedded_prompt(self) -> str | None:
        """The prompt the file's generation metadata names (normalised), or None."""
        from index.keys import normalise_description

        text, _ = self.provenance.description() if self.provenance is not None else (None, None)
        return (normalise_description(text) or None) if text else None


def provenance_of(source: ImageInput) -> "Provenance":
    """The provenance of an input, as `Query.read` takes it. Metadata and C2PA only: they cost about a
    millisecond for a 512 px PNG, where the invisible-watermark check decodes the pixels again (about
    130 ms, several times the image decode), so it is left to `read_provenance` callers who ask.
    A PIL image carries no file: its provenance is empty, with a note saying why."""
    from engine.provenance import Provenance, read_provenance

    if isinstance(source, Image.Image):
        return Provenance(notes=("a decoded image was given, not its file: nothing the file carries was read",))
    try:
        return read_provenance(source, watermark=False)
    except (OSError, TypeError) as exc:  # the image was read a moment ago: gone or replaced since
        return Provenance(notes=(f"file not readable for provenance: {type(exc).__name__}",))


@dataclass
class SourceScore:
    source: str
    score: float
    resyntheses: int  # references compared (resyntheses, plus originals with original_refs)
    probability: float = 0.0


@dataclass
class Attribution:
    query: str
    description: str
    # "prompt" (the caller's), "metadata" (the prompt the file's generation metadata names), "store"
    # (the description stored for an identical image), "caption", or "none" (dataset mode, no prompt)
    description_from: str
    predicted: str | None
    margin: float | None
    scores: list[SourceScore]
    missing: list[str]  # sources not scored for this query (no resynthesis of this description, or failed)
    # True: verdict "unknown" (below the calibrated threshold); False: verdict "known"; None when no
    # claim is made either way (verdict "uncalibrated" or "none"), so it never contradicts `verdict`
    unknown: bool | None = None
    calibrated: bool = False  # probabilities come from a fitted temperature
    cached: int = 0
    generated: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # source -> why it could not be scored
    # source -> why generating its resyntheses of this description failed, for a source scored anyway (on the
    # stored neighbours of combined mode, or on the part of its seeds that was made): its score rests on less
    degraded: dict[str, str] = field(default_factory=dict)
    # "known" (calibrated, above the source's threshold), "unknown" (below it), "real" (calibrated with
    # real images, and nearer them than any generated image by the fitted rule: evidence["real"], the
    # known/unknown decision kept in evidence["open_set_verdict"]), "uncalibrated" (no fitted threshold
    # for that source: no claim either way), or "none" (nothing could be scored)
    verdict: str = "uncalibrated"
    # score, threshold, references, why uncalibrated; "provenance" ({claims, enrolled, by, agrees}) when
    # the file's metadata names a model: stated beside the ranking, never overriding it
    evidence: dict = field(default_factory=dict)
    provenance: dict | None = None  # engine.provenance's Provenance.to_dict() of the query's file
    # per scored source, its up to CLOSEST references best first: [{"image_id", "similarity"}]; the
    # image ids are the store's (engine.compare.reference_file gives their files)
    closest: dict = field(default_factory=dict)

    @property
    def verdict_text(self) -> str:
        """The one-line answer a person reads (CLI, page)."""
        if self.verdict == "none" or self.predicted is None:
            return "no source could be scored"
        if self.verdict == "unknown":
            return f"unknown source (closest: {self.predicted})"
        if self.verdict == "known":
            return f"{self.predicted} (known source)"
        if self.verdict == "real":
            return f"real: no sign of generation (nearer the real references; closest source: {self.predicted})"
        return f"{self.predicted} (uncalibrated: {self.evidence.get('why', 'no acceptance threshold')})"

    @property
    def notes(self) -> list[str]:
        """What the ranking cannot show by itself, for the person reading it. One wording for every reader:
        the text answer prints them as `note:` lines, the JSON answer carries them, the web page shows them."""
        notes = []
        scores = self.scores
        if len(scores) == 1:
            notes.append(f"one source was scored ({scores[0].source}), so it is named whatever made the image: "
                         "score the other candidate generators too"
                         + ("; its p is 1 by construction, only the verdict's threshold tests it" if self.calibrated
                            else ", and calibrate for an unknown-source verdict"))
        elif self.calibrated and self.verdict == "unknown":
            notes.append("p is shared among the enrolled sources only: it ranks them, and says nothing of a "
                         "generator nobody enrolled, which the verdict suggests made this image"
                         # the real rule ran and did not say real, or its file is unread (a note of its own says so)
                         + ("" if "real" in self.evidence or self.evidence.get("unread") else
                            " (or no generator: calibrated without real photographs, rows of role `real`, the "
                            "store cannot tell a camera image from an outside generator's)"))
        elif (self.calibrated and self.verdict == "known" and scores[0].probability < CLOSE_CALL
              and scores[1].probability >= scores[0].probability / 2):
            best, second = scores[0], scores[1]
            notes.append(f"close call: {second.source} is nearly as likely as {best.source} (p "
                         f"{second.probability:.3f} against {best.probability:.3f}): the image is like an enrolled "
                         "source's, but which one is uncertain")
        for name, why in self.degraded.items():
            notes.append(f"{name} was scored without its resyntheses of this description, or only some of them "
                         f"(generating them failed: {why}): its score rests on fewer or other references")
        for unread in self.evidence.get("unread", ()):
            notes.append(f"a calibration file is missing, damaged or unreadable: {unread}; `resynth verify` "
                         "names it, `resynth calibrate` writes it again")
        if self.description_from == "caption":
            notes.append("the description is the captioner's (no prompt was given, embedded or stored): the "
                         "answer is only as good as the caption; give the prompt when it is known")
        return notes

    def to_dict(self) -> dict:
        return {**asdict(self), "notes": self.notes}


# A calibrated best source with p below this, and a runner-up at least half as likely: "known" accepts an
# enrolled source, but which one is uncertain (the demo's captioned queries read "known" at p 0.52 against 0.41).
CLOSE_CALL = 0.8


@dataclass
class Report:
    """What `attribute` returns: the CLI prints `to_dict()` as its JSON, the service answers it."""

    results: list[Attribution]
    cached: int = 0
    generated: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    cost: dict | None = None  # with API sources: images bought, USD spent, USD the cache saved

    def to_dict(self) -> dict:
        out = {"results": [r.to_dict() for r in self.results],
               "cache": {"cached": self.cached, "generated": self.generated},
               "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}
        if self.cost is not None:
            out["cost"] = self.cost
        return out


@dataclass(frozen=True)
class Plan:
    """One option set resolved against the store's sources: which sources, which seeds, which keys."""

    options: Options
    sources: tuple[Source, ...]
    params_hash: dict[int, str | None]
    embedder: str

    @property
    def seeds(self) -> list[int]:
        return list(range(self.options.seed, self.options.seed + self.options.per_source))

    @property
    def pipelines(self) -> list[Source]:
        """The sources that generate (the others' references come from a dataset)."""
        return [s for s in self.sources if kind_of(s).generates]

    def key(self, source: Source, description_hash: str, seed: int) -> str:
        # a kind without a recipe hash gives None, which the key encodes as null, as it always has
        return cache_key(description_hash, source.fingerprint, seed, self.params_hash[source.id], self.embedder)

    def task_key(self, source: Source, description_hash: str, seed: int) -> str:
        """A paid task's record (engine.api_tasks): the cache key without the embedder. A task bought for one
        description, recipe and seed is the same task after `reembed` re-keys the stored images."""
        return cache_key(description_hash, source.fingerprint, seed, self.params_hash[source.id], "")

    def wanted(self, description_hash: str) -> dict[str, tuple[Source, int]]:
        """Cache key -> (source, seed) of every resynthesis this plan asks for."""
        return {self.key(s, description_hash, seed): (s, seed) for s in self.pipelines for seed in self.seeds}

    def select(self, rows: list[StoredReference], description_hash: str) -> dict[str, list[StoredReference]]:
        """The stored resyntheses that may count, per source: for a pipeline source every one made with
        its current recipe (this plan's seeds first, then other stored seeds), for a replay source every
        one stored. `references` caps them per query."""
        kinds = {s.name: s for s in self.sources}
        own_seeds = set(self.seeds)
        out: dict[str, list[StoredReference]] = defaultdict(list)
        for row in rows:
            source = kinds.get(row.source)
            if source is None:
                continue
            if kind_of(source).generates and (row.seed is None
                                               or row.key != self.key(source, description_hash, row.seed)):
                continue  # another recipe (parameters, embedder): not comparable
            out[row.source].append(row)
        for name, found in out.items():
            if kind_of(kinds[name]).generates:
                found.sort(key=lambda r: (r.seed not in own_seeds, r.seed))
        return out

    def references(self, candidates: "Candidates", file_hash: str) -> dict[str, list[StoredReference]]:
        """What one query is compared with: up to `references` resyntheses per source, then the labelled originals;
        never an image with the query's own bytes (no image is evidence for itself)."""
        out: dict[str, list[StoredReference]] = {}
        for name in [s.name for s in self.sources]:
            own = [r for r in candidates.resyntheses.get(name, ()) if r.file_hash != file_hash]
            extra = [r for r in candidates.originals.get(name, ()) if r.file_hash != file_hash]
            extra = extra[:self.options.original_refs]
            if own or extra:
                out[name] = own[:self.options.references] + extra
        return out


@dataclass
class Candidates:
    """The stored references of one description under one plan, shared by every query with that text."""

    resyntheses: dict[str, list[StoredReference]]
    originals: dict[str, list[StoredReference]] = field(default_factory=dict)

    def count(self) -> int:
        return sum(len(v) for v in self.resyntheses.values())


def rank(similarities: dict[str, np.ndarray], counts: dict[str, int], aggregation: str,
         calibration: Calibration) -> tuple[list[SourceScore], bool]:
    """Per-source scores, best first, with probabilities; and whether the best is below its threshold.
    `calibration` is the one that applies to this query (Calibration.applying): a stale one, or one fitted
    in another mode, gives the default temperature's softmax, never its old temperature's."""
    scores = [SourceScore(name, aggregate(values, aggregation), counts[name])
              for name, values in similarities.items() if len(values)]
    scores.sort(key=lambda s: -s.score)
    probabilities = calibration.probabilities({s.source: s.score for s in scores})
    for s in scores:
        s.probability = probabilities[s.source]
    best = scores[0] if scores else None
    unknown = calibration.is_unknown(best.source if best else None, best.score if best else None)
    return scores, unknown


UNCALIBRATED_P = (f"a softmax of the scores at the default temperature {DEFAULT_TEMPERATURE:g}, not calibrated "
                  "probabilities")


def verdict(scores: list[SourceScore], calibration: Calibration, stale: str | None,
            open_set: float | None = None) -> tuple[str, dict]:
    """Never a "known source" claim without a fitted threshold behind it. With a calibrated feature-based
    open-set score (`open_set`: the query's value of it), that decides; else the best score's threshold."""
    if not scores:
        return "none", {}
    best = scores[0]
    evidence: dict[str, Any] = {"score": round(best.score, 6), "references": best.resyntheses}
    decided = calibration.is_unknown_value(open_set) if open_set is not None and not stale else None
    if decided is not None and open_set is not None:  # decided only when open_set is given
        evidence.update(open_set_score=calibration.open_set["score"], value=round(float(open_set), 6),
                        threshold=round(float(calibration.open_set["threshold"]), 6))
        return ("unknown" if decided else "known"), evidence
    threshold = calibration.thresholds.get(best.source) if calibration.fitted and not stale else None
    if threshold is None:
        evidence["why"] = stale or calibration.why_not or (
            "no calibration: run `resynth calibrate`" if not calibration.fitted
            else f"no acceptance threshold was fitted for {best.source}")
        if not calibration.fitted or stale:
            evidence["probabilities"] = UNCALIBRATED_P
        return "uncalibrated", evidence
    evidence["threshold"] = round(threshold, 6)
    return ("known" if best.score >= threshold else "unknown"), evidence
