"""Cold versus warm attribution on the tiny model zoo, with the time of every stage.

Cold: a fresh store, every resynthesis generated (the first query of a new description).
Warm: the same queries again, everything cached, models already loaded.
Reopened: a new store handle and Attributor (a new process, models not loaded): cached, and the
generators are never even loaded. Captioned: queries without a prompt, described by the captioner.

Model loading is timed apart from the stages (the Attributor loads pipelines lazily inside
`generate`, so here they are loaded up front). "untimed" is wall time that no stage counts: the
cache-key lookup and the candidates query (SQL), and Python glue.
The tiny models are random and small, so absolute numbers say little about real generators (a real
SDXL step costs seconds); the split between stages, and cold versus warm, is the point.

    python scripts/bench_attribute.py [--descriptions 6] [--per-source 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine import zoo  # noqa: E402
from engine.attribute import Attributor, Query  # noqa: E402
from engine.embed import EmbedderSpec  # noqa: E402
from engine.generate import DiffusersGenerator, GenerationParams  # noqa: E402
from engine.images import save_png_atomic  # noqa: E402
from engine.workspace import (add_pipeline_source, init_store, load_captioner, load_embedder,  # noqa: E402
                              load_generators)
from index.store import Store  # noqa: E402

TEXTS = ["portrait of an old man with a grey beard", "a young woman with red hair, studio light",
         "a smiling child wearing a blue hat", "a man with glasses in a dark room",
         "an elderly woman smiling at the camera", "a young man with long hair in a park",
         "painting of a woman wearing a green scarf", "a bald man with a moustache"]
STAGES = ("describe", "generate", "embed", "search")


def make_originals(models: dict, folder: Path, count: int) -> list[tuple[Path, str, str]]:
    """One image per (source, description) with seeds no resynthesis uses: the queries."""
    out = []
    for name, pipeline in models["pipelines"].items():
        generator = DiffusersGenerator(name, pipeline, GenerationParams(steps=2))
        for i, text in enumerate(TEXTS[:count]):
            path = folder / name / f"{i}.png"
            save_png_atomic(generator.generate(text, [1000 + i])[0], path)
            out.append((path, text, name))
    return out


def timed_pass(attributor: Attributor, queries: list[Query], truth: list[str]) -> dict:
    attributor.stats = type(attributor.stats)()
    started = time.perf_counter()
    results = attributor.attribute(queries)
    wall = time.perf_counter() - started
    stages = {k: attributor.stats.seconds.get(k, 0.0) for k in STAGES}
    return {"wall": wall, "stages": stages, "untimed": wall - sum(stages.values()), "queries": len(queries),
            "cached": attributor.stats.cached, "generated": attributor.stats.generated,
            "accuracy": sum(r.predicted == t for r, t in zip(results, truth)) / len(queries)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--descriptions", type=int, default=6, help=f"descriptions per source (max {len(TEXTS)})")
    parser.add_argument("--per-source", type=int, default=2, help="resyntheses per source (K)")
    parser.add_argument("--captioned", type=int, default=4, help="queries attributed without a prompt")
    parser.add_argument("--workdir", help="default: a temporary folder, deleted afterwards")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-attribute-"))
    loads: dict[str, float] = {}

    clock = time.perf_counter()
    models = zoo.write_zoo(workdir / "zoo")
    loads["build tiny zoo (not part of attribution)"] = time.perf_counter() - clock
    originals = make_originals(models, workdir / "originals", min(args.descriptions, len(TEXTS)))
    spec = EmbedderSpec(arch=Path(models["clip_config"]).stem, checkpoint=str(models["clip_checkpoint"]),
                        config=str(models["clip_config"]))
    with init_store(workdir / "store", spec, str(models["captioner"])) as store:
        for name, folder in models["pipelines"].items():
            add_pipeline_source(store, name, folder, GenerationParams(steps=2))

    def queries(prompted: bool = True) -> list[Query]:
        return [Query.from_path(path, text if prompted else None) for path, text, _ in originals]

    truth = [source for _, _, source in originals]
    passes = {}
    with Store.open(workdir / "store") as store:
        clock = time.perf_counter()
        embedder = load_embedder(store)
        loads["load CLIP embedder"] = time.perf_counter() - clock
        generators = load_generators(store)
        clock = time.perf_counter()
        for generator in generators.values():
            generator.load()
        loads[f"load {len(generators)} pipelines"] = time.perf_counter() - clock
        captioner = load_captioner(store)
        clock = time.perf_counter()
        captioner._load()  # noqa: SLF001 - timed apart from the describe stage
        loads["load captioner"] = time.perf_counter() - clock
        attributor = Attributor(store, embedder, generators, captioner, per_source=args.per_source, progress=False)
        passes["cold (all generated)"] = timed_pass(attributor, queries(), truth)
        passes["warm (all cached)"] = timed_pass(attributor, queries(), truth)
        single = Attributor(store, embedder, generators, per_source=args.per_source, progress=False)
        clock = time.perf_counter()
        for q in queries():
            single.attribute([q])  # one query per call, as a service answers them
        wall = time.perf_counter() - clock
        stages = {k: single.stats.seconds.get(k, 0.0) for k in STAGES}
        passes["warm, one query per call"] = {"wall": wall, "stages": stages, "untimed": wall - sum(stages.values()),
                                              "queries": len(originals), "cached": single.stats.cached,
                                              "generated": single.stats.generated, "accuracy": None}
        captioned = queries(prompted=False)[:: max(1, len(originals) // args.captioned)][:args.captioned]
        captioned_truth = truth[:: max(1, len(originals) // args.captioned)][:args.captioned]
        passes["captioned (cold)"] = timed_pass(attributor, captioned, captioned_truth)
        passes["captioned (warm)"] = timed_pass(attributor, captioned, captioned_truth)
    with Store.open(workdir / "store") as store:
        clock = time.perf_counter()
        fresh = Attributor(store, load_embedder(store), load_generators(store), per_source=args.per_source,
                           progress=False)
        reopen = time.perf_counter() - clock
        passes["reopened store (cached)"] = timed_pass(fresh, queries(), truth)
        assert sum(g.calls for g in fresh.generators.values()) == 0
    loads["reopen: store + embedder + Attributor"] = reopen

    print(f"tiny zoo: {len(models['pipelines'])} sources, {len(originals)} queries, K={args.per_source}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("\n## one-off loads (s)")
    for name, seconds in loads.items():
        print(f"  {name:44} {seconds:7.2f}")
    print("\n## per query (ms): stages from Attributor.stats.seconds")
    print(f"{'pass':28} {'queries':>7} {'wall':>8} " + " ".join(f"{s:>9}" for s in STAGES)
          + f" {'untimed':>8} {'cached':>7} {'generated':>9} {'accuracy':>9}")
    for name, p in passes.items():
        per = 1e3 / p["queries"]
        print(f"{name:28} {p['queries']:>7} {p['wall'] * per:>8.1f} "
              + " ".join(f"{p['stages'][s] * per:>9.1f}" for s in STAGES)
              + f" {p['untimed'] * per:>8.1f} {p['cached']:>7} {p['generated']:>9} "
              + (f"{p['accuracy']:>9.0%}" if p["accuracy"] is not None else f"{'-':>9}"))
    cold, warm = passes["cold (all generated)"], passes["warm (all cached)"]
    print(f"\ncold / warm per query: {cold['wall'] / warm['wall']:.0f}x "
          f"({cold['wall'] / cold['queries'] * 1e3:.0f} ms vs {warm['wall'] / warm['queries'] * 1e3:.1f} ms)")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
