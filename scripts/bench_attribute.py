"""Cold versus warm attribution on the tiny model zoo, with the time of every stage.

Everything goes through the library API: `engine.init` makes the store, `Workspace.add_source`
registers the zoo's pipelines, `Workspace.attribute` answers, and the stage seconds are the ones its
Report carries.

Cold: a fresh store, every resynthesis generated (the first query of a new description).
Warm: the same queries again, everything cached, models already loaded.
Reopened: `engine.open` again (a new process, models not loaded): cached, and the generators are
never even loaded. Captioned: queries without a prompt, described by the captioner.

Model loading is timed apart from the stages (the Workspace loads models lazily, pipelines inside
`generate`, so here they are loaded up front, and it is allowed to keep them all resident: by
default it keeps 2 and reloads the others when they are needed). "lookup" is the cache-key and
candidates SQL; "untimed" is wall time that no stage counts (plan, Python glue). Query images are
decoded before the clock starts.
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

import engine  # noqa: E402
from engine import zoo  # noqa: E402
from engine.attribute import Query, Report  # noqa: E402
from engine.images import save_png_atomic  # noqa: E402
from engine.options import Options  # noqa: E402
from engine.workspace import Workspace  # noqa: E402

TEXTS = ["portrait of an old man with a grey beard", "a young woman with red hair, studio light",
         "a smiling child wearing a blue hat", "a man with glasses in a dark room",
         "an elderly woman smiling at the camera", "a young man with long hair in a park",
         "painting of a woman wearing a green scarf", "a bald man with a moustache"]
STAGES = ("describe", "lookup", "generate", "embed", "search")
STEPS = 2


def make_originals(ws: Workspace, folder: Path, count: int) -> list[tuple[Path, str, str]]:
    """One image per (source, description) with seeds no resynthesis uses, made by the store's own
    generators (not stored): the queries."""
    out = []
    for source in ws.sources():
        generator = ws.generator(source.name)
        for i, text in enumerate(TEXTS[:count]):
            path = folder / source.name / f"{i}.png"
            save_png_atomic(generator.generate(text, [1000 + i])[0], path)
            out.append((path, text, source.name))
        generator.unload()
    return out


def figures(reports: list[Report], wall: float, truth: list[str] | None) -> dict:
    stages = {k: sum(r.seconds.get(k, 0.0) for r in reports) for k in STAGES}
    results = [a for r in reports for a in r.results]
    return {"wall": wall, "stages": stages, "untimed": wall - sum(stages.values()), "queries": len(results),
            "cached": sum(r.cached for r in reports), "generated": sum(r.generated for r in reports),
            "accuracy": (sum(a.predicted == t for a, t in zip(results, truth)) / len(results)
                         if truth is not None else None)}


def timed_pass(ws: Workspace, queries: list[Query], truth: list[str], options: Options) -> dict:
    started = time.perf_counter()
    report = ws.attribute(queries, options=options)
    return figures([report], time.perf_counter() - started, truth)


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
    store_dir = workdir / "store"
    with engine.init(store_dir, clip_config=models["clip_config"], clip_checkpoint=models["clip_checkpoint"],
                     captioner=models["captioner"]) as ws:
        for name, folder in models["pipelines"].items():
            ws.add_source(name, folder, steps=STEPS)
        originals = make_originals(ws, workdir / "originals", min(args.descriptions, len(TEXTS)))
    options = Options(per_source=args.per_source)

    def queries(prompted: bool = True) -> list[Query]:  # decoded before the clock starts
        return [Query.read(path, text if prompted else None) for path, text, _ in originals]

    truth = [source for _, _, source in originals]
    passes = {}
    with engine.open(store_dir) as ws:
        clock = time.perf_counter()
        _ = ws.embedder  # loads it
        loads["load CLIP embedder"] = time.perf_counter() - clock
        names = [s.name for s in ws.sources()]
        ws.max_loaded = len(names)  # keep every pipeline resident: their loads stay out of `generate`
        clock = time.perf_counter()
        for name in names:
            ws.generator(name).load()
        loads[f"load {len(names)} pipelines"] = time.perf_counter() - clock
        clock = time.perf_counter()
        ws.captioner._load()  # noqa: SLF001 - timed apart from the describe stage
        loads["load captioner"] = time.perf_counter() - clock
        passes["cold (all generated)"] = timed_pass(ws, queries(), truth, options)
        passes["warm (all cached)"] = timed_pass(ws, queries(), truth, options)
        reports, clock = [], time.perf_counter()
        for q in queries():
            reports.append(ws.attribute(q, options=options))  # one query per call, as a service answers them
        passes["warm, one query per call"] = figures(reports, time.perf_counter() - clock, None)
        captioned = queries(prompted=False)[:: max(1, len(originals) // args.captioned)][:args.captioned]
        captioned_truth = truth[:: max(1, len(originals) // args.captioned)][:args.captioned]
        passes["captioned (cold)"] = timed_pass(ws, captioned, captioned_truth, options)
        passes["captioned (warm)"] = timed_pass(ws, captioned, captioned_truth, options)
    clock = time.perf_counter()
    with engine.open(store_dir) as fresh:
        _ = fresh.embedder
        loads["reopen: engine.open + embedder"] = time.perf_counter() - clock
        passes["reopened store (cached)"] = timed_pass(fresh, queries(), truth, options)
        assert sum(fresh.generator_calls.values()) == 0, fresh.generator_calls

    print(f"tiny zoo: {len(models['pipelines'])} sources, {len(originals)} queries, K={args.per_source}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("\n## one-off loads (s)")
    for name, seconds in loads.items():
        print(f"  {name:44} {seconds:7.2f}")
    print("\n## per query (ms): stages from the Workspace's Report.seconds")
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
