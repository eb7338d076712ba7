"""The method: describe -> resynthesize what is missing -> embed -> compare in CLIP space -> rank."""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from engine.aggregate import AGGREGATIONS, DEFAULT_AGGREGATION, DEFAULT_PER_SOURCE, aggregate
from engine.calibration import Calibration
from engine.describe import Captioner, clean_prompt
from engine.embed import Embedder
from engine.errors import UserError
from engine.generate import DiffusersGenerator, source_params_hash
from engine.images import read_image, save_png_atomic
from index.keys import cache_key, normalise_description, sha256_text
from index.schema import Source
from index.store import NewImage, Store


@dataclass
class Query:
    image: Image.Image
    file_hash: str
    label: str
    prompt: str | None = None

    @classmethod
    def from_path(cls, path: Path, prompt: str | None = None) -> "Query":
        image, file_hash = read_image(path)
        return cls(image, file_hash, str(path), clean_prompt(prompt))


@dataclass
class SourceScore:
    source: str
    score: float
    resyntheses: int
    probability: float = 0.0


@dataclass
class Attribution:
    query: str
    description: str
    description_from: str  # "prompt", "store" (metadata of an identical image) or "caption"
    predicted: str | None
    margin: float | None
    scores: list[SourceScore]
    missing: list[str]  # sources with no resynthesis of this description (e.g. replay sources)
    unknown: bool = False  # best score below that source's calibrated acceptance threshold
    calibrated: bool = False  # probabilities come from a fitted temperature
    cached: int = 0
    generated: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Stats:
    """Counters and per-stage seconds, accumulated over an Attributor's life."""

    cached: int = 0
    generated: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class Attributor:
    """Attributes query images to the store's sources; generates only resyntheses not yet cached."""

    def __init__(self, store: Store, embedder: Embedder, generators: dict[str, DiffusersGenerator],
                 captioner: Captioner | None = None, per_source: int = DEFAULT_PER_SOURCE,
                 aggregation: str = DEFAULT_AGGREGATION,
                 base_seed: int = 0, sources: list[str] | None = None, progress: bool = True,
                 max_loaded: int = 2, original_refs: int = 0):
        if per_source < 1:
            raise UserError("--per-source must be at least 1")
        if aggregation not in AGGREGATIONS:
            raise UserError(f"unknown aggregation {aggregation!r} (choose from {', '.join(AGGREGATIONS)})")
        self.store = store
        self.embedder = embedder
        self.generators = generators
        self.captioner = captioner
        self.per_source = per_source
        self.aggregation = aggregation
        self.seeds = list(range(base_seed, base_seed + per_source))
        self.progress = progress
        self.max_loaded = max(1, max_loaded)  # pipelines kept in memory at once (real ones take GBs)
        # Labelled originals per source used as extra references (few-shot + resynthesis, which
        # measured best when labelled originals exist); 0 = resynthesis only, the paper's setting.
        self.original_refs = max(0, original_refs)
        known = {s.name: s for s in store.sources()}
        if not known:
            raise UserError("the store has no sources: add some with `resynth source add` or `resynth ingest`")
        for name in sources or []:
            if name not in known:
                raise UserError(f"unknown source {name!r} (known: {', '.join(sorted(known))})")
        self.sources: list[Source] = [known[n] for n in (sources or sorted(known))]
        self._params_hash = {s.id: source_params_hash(s) for s in self.sources}  # parsed once, not per key
        self.stats = Stats()

    @property
    def calibration(self) -> Calibration:
        """Read from the store's config each time, so a `resynth calibrate` picked up by refresh() applies."""
        return Calibration.from_dict(self.store.config.get("calibration"))

    # ----- step 1: describe --------------------------------------------------------------------
    def describe(self, queries: list[Query]) -> list[tuple[str, str]]:
        started = time.perf_counter()
        out: list[tuple[str, str] | None] = []
        need_caption = []
        for i, q in enumerate(queries):
            if q.prompt:
                out.append((q.prompt, "prompt"))
            elif (stored := self.store.description_for_file(q.file_hash)) is not None:
                out.append((stored, "store"))
            else:
                out.append(None)
                need_caption.append(i)
        if need_caption:
            if self.captioner is None:
                first = queries[need_caption[0]].label
                raise UserError(f"no description for {first}: pass --prompt, or configure a captioner "
                                "(`resynth init --captioner DIR` or `--captioner DIR`)")
            captions = self.captioner.caption([queries[i].image for i in need_caption])
            for i, text in zip(need_caption, captions):
                out[i] = (text, "caption")
        self.stats.seconds["describe"] += time.perf_counter() - started
        return out  # type: ignore[return-value]

    # ----- step 2: resynthesize what is missing ---------------------------------------------
    def _key(self, source: Source, description_hash: str, seed: int) -> str:
        return cache_key(description_hash, source.fingerprint, seed, self._params_hash[source.id],
                         self.embedder.identity)

    def ensure_resyntheses(self, descriptions: list[str]) -> dict[str, tuple[int, int]]:
        """Generate and store every missing (description, source, seed); returns (cached, generated) per text."""
        counts: dict[str, tuple[int, int]] = {}
        tasks = []
        started = time.perf_counter()
        for text in dict.fromkeys(descriptions):
            digest = sha256_text(normalise_description(text))
            wanted = {self._key(s, digest, seed): (s, seed) for s in self.sources if s.kind != "replay"
                      for seed in self.seeds}
            have = self.store.existing_keys(list(wanted))
            missing = [(key, *wanted[key]) for key in wanted if key not in have]
            counts[text] = (len(have), len(missing))
            by_source: dict[str, list] = defaultdict(list)
            for key, source, seed in missing:
                by_source[source.name].append((key, source, seed))
            tasks += [(text, items) for items in by_source.values()]
        self.stats.seconds["lookup"] += time.perf_counter() - started
        # Source by source, so each pipeline loads once and at most `max_loaded` stay in memory.
        tasks.sort(key=lambda task: task[1][0][1].name)
        bar = tqdm(tasks, desc="generating", unit="batch", disable=not self.progress or not tasks, leave=False)
        for text, items in bar:
            bar.set_postfix_str(items[0][1].name, refresh=False)
            self._generate_and_store(text, items)
        for text, (cached, generated) in counts.items():
            self.stats.cached += cached
            self.stats.generated += generated
        return counts

    def _generate_and_store(self, text: str, items: list) -> None:
        source = items[0][1]
        generator = self.generators.get(source.name)
        if generator is None:
            raise UserError(f"source {source.name!r} has no pipeline loaded")
        self._make_room_for(generator)
        started = time.perf_counter()
        images = generator.generate(text, [seed for _, _, seed in items])
        self.stats.seconds["generate"] += time.perf_counter() - started
        started = time.perf_counter()
        vectors = self.embedder.embed(images)
        self.stats.seconds["embed"] += time.perf_counter() - started
        description_id = self.store.description_id(text)
        rows = []
        for (key, _, seed), image, vector in zip(items, images, vectors):
            relative = Path("images") / source.fingerprint[:16] / key[:2] / f"{key}.png"
            file_hash = save_png_atomic(image, self.store.root / relative)
            rows.append(NewImage(key=key, role="resynthesis", source_id=source.id, description_id=description_id,
                                 file_hash=file_hash, path=relative.as_posix(), vector=vector, seed=seed,
                                 params_hash=self._params_hash[source.id]))
        self.store.add_images(rows)

    def _make_room_for(self, generator: DiffusersGenerator) -> None:
        """Unload the least recently used pipelines so that at most `max_loaded` are resident."""
        self._recent = [g for g in getattr(self, "_recent", []) if g is not generator] + [generator]
        for stale in self._recent[:-self.max_loaded]:
            stale.unload()
        self._recent = self._recent[-self.max_loaded:]

    # ----- steps 3 and 4: embed the queries, compare, rank --------------------------------------
    def candidates(self, text: str) -> dict[str, list]:
        """Per source, the stored resyntheses of `text` that count (up to K each)."""
        started = time.perf_counter()
        digest = sha256_text(normalise_description(text))
        per_source: dict[str, list] = defaultdict(list)
        description_id = self.store.find_description_id(text)
        by_name = {s.name: s for s in self.sources}
        rows = self.store.resyntheses(description_id, [s.id for s in self.sources]) if description_id else []
        expected = {self._key(s, digest, seed) for s in self.sources if s.kind != "replay" for seed in self.seeds}
        for row in rows:
            if by_name[row.source].kind != "replay" and row.key not in expected:
                continue  # a stored resynthesis with another seed: not part of this request
            if len(per_source[row.source]) < self.per_source:
                per_source[row.source].append(row)
        if self.original_refs:
            for row in self.store.originals([s.id for s in self.sources], self.original_refs):
                per_source[row.source].append(row)
        self.stats.seconds["lookup"] += time.perf_counter() - started
        return per_source

    def embed_queries(self, queries: list[Query]) -> np.ndarray:
        started = time.perf_counter()
        vectors = self.embedder.embed([q.image for q in queries])
        self.stats.seconds["embed"] += time.perf_counter() - started
        return vectors

    def score(self, query: Query, text: str, origin: str, vector: np.ndarray,
              counts: tuple[int, int] = (0, 0), candidates: dict[str, list] | None = None) -> Attribution:
        """Rank the sources for one embedded query whose resyntheses are already stored."""
        started = time.perf_counter()
        per_source = {name: [r for r in rows if r.file_hash != query.file_hash]  # no image is evidence for itself
                      for name, rows in (candidates if candidates is not None else self.candidates(text)).items()}
        ids = np.array([r.vector_id for rows in per_source.values() for r in rows], np.int64)
        sims, found = self.store.search(vector[None, :], ids)
        similarity = dict(zip(found[0].tolist(), sims[0].tolist()))
        scores = [SourceScore(name, aggregate(np.array([similarity[r.vector_id] for r in rows]), self.aggregation),
                              len(rows))
                  for name, rows in per_source.items() if rows]
        scores.sort(key=lambda s: -s.score)
        calibration = self.calibration
        probabilities = calibration.probabilities({s.source: s.score for s in scores})
        for s in scores:
            s.probability = probabilities[s.source]
        best = scores[0] if scores else None
        self.stats.seconds["search"] += time.perf_counter() - started
        return Attribution(
            query=query.label, description=text, description_from=origin,
            predicted=best.source if best else None,
            margin=(scores[0].score - scores[1].score) if len(scores) > 1 else None,
            scores=scores, missing=sorted({s.name for s in self.sources} - {x.source for x in scores}),
            unknown=calibration.is_unknown(best.source if best else None, best.score if best else None),
            calibrated=calibration.fitted, cached=counts[0], generated=counts[1])

    def attribute(self, queries: list[Query]) -> list[Attribution]:
        """All four steps for a batch: queries sharing a description share its resyntheses."""
        described = self.describe(queries)
        counts = self.ensure_resyntheses([text for text, _ in described])
        vectors = self.embed_queries(queries)
        candidates = {text: self.candidates(text) for text in counts}
        return [self.score(q, text, origin, vector, counts[text], candidates[text])
                for q, (text, origin), vector in zip(queries, described, vectors)]
