"""What a recipe mismatch costs: sources enrolled with other settings than the queries were made with.

Issue 21: a newcomer registered the demo's pipelines with the default 30 steps while the demo's images
were made with 2, and got confident wrong answers. This measures how much each one-setting mismatch
costs, on the tiny zoo (engine/zoo.py, built as `resynth demo` builds it):

  originals   each zoo pipeline with its TRUE recipe (the demo's: 2 steps, guidance 7, the pipeline's own
              scheduler and size), ORIGINALS seeds per description from 1000 up (seeds no resynthesis uses)
  conditions  for each, a fresh store (engine.init, the zoo's CLIP) whose sources are the same pipelines
              enrolled (ws.add_source) with a recipe differing from the true one in ONE setting:
                matched     the true recipe (the control)
                steps-8     2 -> 8 steps          steps-30   2 -> 30 steps (the `source add` default)
                guidance-3  7 -> 3                scheduler  another diffusers scheduler class than its own
                size-32     64 -> 32 px (the pipelines' own side is 64)
              and "sweeps": each source enrolled twice, NAME@a and NAME@b, a query counted right when
              either name of its true source wins (a rough proxy for one source holding several recipes):
                sweep-2+30  the true recipe and the default    sweep-8+30  two recipes, neither the true one
  modes       every original attributed with its prompt (ws.attribute) in resynthesis mode with K
              resyntheses per source (the paper's setting; Options(mode="resynthesis", per_source=K,
              adaptive=False)) and with the engine's default Options() (combined, adaptive, its own K).
              The store holds no dataset beyond what the queries generate.

Accuracy is top-1 over every original; chance is 1 / number of true sources. Times are wall seconds per
condition (generation dominates: the 30-step conditions cost ~15x the 2-step ones). PyTorch runs on one
thread, as the demo does (engine/demo.py: its threads spin on a busy machine).

    .venv/bin/python scripts/bench_recipe.py [--workdir DIR] [--json] [--quick]

Everything (zoo, originals, stores) is written under --workdir (default: a new temp folder), never in
the repository. --quick keeps 2 descriptions and the 2-step conditions, for a smoke test; --sources all
--descriptions 8 is the larger set (5 pipelines, 80 originals; 4.5-6 minutes on a busy 2-core CPU,
the default set 1.7).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import engine  # noqa: E402
from engine import zoo  # noqa: E402
from engine.demo import STEPS as TRUE_STEPS  # noqa: E402  the recipe the demo's images are made with

PIPELINES = ("tiny-sd-ddim", "tiny-sd-euler", "tiny-sdxl-dpm")  # incl. the hard pair: same weights, 2 samplers
DESCRIPTIONS = 4  # the first this many of the zoo's descriptions
ORIGINALS = 2  # per (source, description)
ORIGINAL_SEED = 1000
K = 2  # resyntheses per source in resynthesis mode
TRUE_GUIDANCE = 7.0  # GenerationParams' default, which the demo keeps
# another scheduler per pipeline, none of them one the chosen pipelines use (so a mismatched source never
# becomes another source's true recipe), all distinct
OTHER_SCHEDULER = {"DDIMScheduler": "LMSDiscreteScheduler", "EulerDiscreteScheduler": "HeunDiscreteScheduler",
                   "EulerAncestralDiscreteScheduler": "DDPMScheduler",
                   "DPMSolverMultistepScheduler": "UniPCMultistepScheduler"}


@dataclass
class Condition:
    name: str
    what: str
    recipes: list[dict] = field(default_factory=list)  # one or more recipes per source (a sweep: several)
    slow: bool = False  # has a 30-step recipe


def conditions(specs: dict[str, zoo.TinyGenerator], quick: bool) -> list[Condition]:
    true = {"steps": TRUE_STEPS, "guidance": TRUE_GUIDANCE}
    out = [Condition("matched", "the true recipe (control)", [true]),
           Condition("steps-8", f"steps {TRUE_STEPS} -> 8", [{**true, "steps": 8}]),
           Condition("steps-30", f"steps {TRUE_STEPS} -> 30 (the default)", [{**true, "steps": 30}], slow=True),
           Condition("guidance-3", f"guidance {TRUE_GUIDANCE:g} -> 3", [{**true, "guidance": 3.0}]),
           Condition("scheduler", "another scheduler class", [{**true, "scheduler": "OTHER"}]),
           Condition("size-32", "64 -> 32 px", [{**true, "size": 32}]),
           Condition("sweep-2+30", "two recipes: true + default", [true, {**true, "steps": 30}], slow=True),
           Condition("sweep-8+30", "two recipes, neither true", [{**true, "steps": 8}, {**true, "steps": 30}],
                     slow=True)]
    return [c for c in out if not (quick and c.slow)]


def make_originals(models: dict, specs: dict, descriptions: list[str], root: Path) -> list[dict]:
    """The queries: each pipeline with its true recipe, seeds ORIGINAL_SEED.. per description."""
    from engine.generate import DiffusersGenerator, GenerationParams  # as engine.evaluation.synthetic does
    from engine.images import save_png_atomic

    queries = []
    for name in specs:
        generator = DiffusersGenerator(name, models["pipelines"][name],
                                       GenerationParams(steps=TRUE_STEPS, guidance=TRUE_GUIDANCE), device="cpu")
        for i, text in enumerate(descriptions):
            seeds = [ORIGINAL_SEED + ORIGINALS * i + j for j in range(ORIGINALS)]
            for seed, image in zip(seeds, generator.generate(text, seeds)):
                path = root / name / f"{i:03d}-{seed}.png"
                save_png_atomic(image, path)
                queries.append({"image": str(path), "prompt": text, "source": name})
        generator.unload()
    return queries


def run_condition(cond: Condition, models: dict, specs: dict, queries: list[dict], store_dir: Path) -> dict:
    started = time.perf_counter()
    shutil.rmtree(store_dir, ignore_errors=True)  # a fresh store per condition, also when --workdir is reused
    names: dict[str, str] = {}  # enrolled name -> true source
    with engine.init(store_dir, clip_config=models["clip_config"], clip_checkpoint=models["clip_checkpoint"],
                     device="cpu") as ws:
        for source, spec in specs.items():
            for j, recipe in enumerate(cond.recipes):
                recipe = dict(recipe)
                if recipe.get("scheduler") == "OTHER":
                    recipe["scheduler"] = OTHER_SCHEDULER[spec.scheduler]
                name = source if len(cond.recipes) == 1 else f"{source}@{'abcdefgh'[j]}"
                ws.add_source(name, models["pipelines"][source], **recipe)
                names[name] = source
        images, prompts = [q["image"] for q in queries], [q["prompt"] for q in queries]
        out: dict = {"condition": cond.name, "what": cond.what, "recipes": ws.list_sources()}
        for mode, options in (("resynthesis", engine.Options(mode="resynthesis", per_source=K, adaptive=False)),
                              ("default", engine.Options())):
            clock = time.perf_counter()
            report = ws.attribute(images, prompts, options=options)
            hits = sum(names.get(r.predicted or "") == q["source"] for q, r in zip(queries, report.results))
            out[mode] = {"accuracy": hits / len(queries), "correct": hits, "queries": len(queries),
                         "generated": report.generated, "cached": report.cached,
                         "seconds": time.perf_counter() - clock,
                         "predicted": [names.get(r.predicted or "", r.predicted) for r in report.results]}
    out["seconds"] = time.perf_counter() - started
    out["chance"] = 1 / len(specs)
    return out


def worst_source(predicted: list[str | None], queries: list[dict]) -> tuple[str, float]:
    """The true source with the lowest recall, and that recall (a mismatch's cost is rarely spread evenly)."""
    sources = sorted({q["source"] for q in queries})
    recall = {s: sum(p == s for q, p in zip(queries, predicted) if q["source"] == s)
              / sum(q["source"] == s for q in queries) for s in sources}
    name = min(sources, key=lambda s: recall[s])
    return name, recall[name]


def table(rows: list[dict], queries: list[dict]) -> str:
    lines = [f"{'condition':12} {'mismatch':30} {'resynthesis':>11} {'default':>8} {'chance':>7} {'seconds':>8}"
             "   worst source recall (resynthesis / default)"]
    for r in rows:
        worst = [worst_source(r[mode]["predicted"], queries) for mode in ("resynthesis", "default")]
        lines.append(f"{r['condition']:12} {r['what']:30} {r['resynthesis']['accuracy']:>11.0%} "
                     f"{r['default']['accuracy']:>8.0%} {r['chance']:>7.0%} {r['seconds']:>8.1f}   "
                     + " / ".join(f"{name} {recall:.0%}" for name, recall in worst))
    return "\n".join(lines)


def confusions(rows: list[dict], queries: list[dict]) -> str:
    """Per condition and mode, which true source went to which (only the wrong ones)."""
    from collections import Counter

    lines = []
    for r in rows:
        for mode in ("resynthesis", "default"):
            wrong = Counter((q["source"], p) for q, p in zip(queries, r[mode]["predicted"]) if p != q["source"])
            if wrong:
                lines.append(f"  {r['condition']:12} {mode:11} "
                             + ", ".join(f"{t} -> {p} x{n}" for (t, p), n in sorted(wrong.items())))
    return "\n".join(lines) or "  none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where everything is written (default: temp)")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    parser.add_argument("--quick", action="store_true", help="2 descriptions, no 30-step conditions (smoke test)")
    parser.add_argument("--sources", default=",".join(PIPELINES),
                        help=f"comma-separated zoo pipelines, or 'all' (default {','.join(PIPELINES)})")
    parser.add_argument("--descriptions", type=int, default=DESCRIPTIONS,
                        help=f"how many of the zoo's descriptions (default {DESCRIPTIONS})")
    args = parser.parse_args()
    descriptions = zoo.DESCRIPTIONS[:2 if args.quick else max(1, args.descriptions)]
    all_specs = {g.name: g for g in zoo.DEFAULT_GENERATORS}
    wanted = list(all_specs) if args.sources == "all" else [s.strip() for s in args.sources.split(",") if s.strip()]
    if unknown := [s for s in wanted if s not in all_specs]:
        parser.error(f"unknown zoo pipeline(s) {', '.join(unknown)}; the zoo has {', '.join(all_specs)}")
    specs = {name: all_specs[name] for name in wanted}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-recipe-")).resolve()
    if workdir.is_relative_to(ROOT):
        parser.error("--workdir must be outside the repository")
    workdir.mkdir(parents=True, exist_ok=True)

    import torch

    torch.set_num_threads(1)
    clock = time.perf_counter()
    models = zoo.write_zoo(workdir / "models", tuple(specs.values()))
    setup = {"zoo": time.perf_counter() - clock}
    clock = time.perf_counter()
    queries = make_originals(models, specs, descriptions, workdir / "originals")
    setup["originals"] = time.perf_counter() - clock

    rows = []
    for cond in conditions(specs, args.quick):
        rows.append(run_condition(cond, models, specs, queries, workdir / "stores" / cond.name))
        if not args.json:
            print(f"[{cond.name}: {rows[-1]['seconds']:.0f}s]", file=sys.stderr, flush=True)
    load = os.getloadavg()
    machine = (f"{os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end; "
               f"torch threads 1")
    if args.json:
        print(json.dumps({"workdir": str(workdir), "pipelines": list(specs), "descriptions": len(descriptions),
                          "originals_per_description": ORIGINALS, "k": K, "machine": machine, "setup_seconds": setup,
                          "queries": queries, "conditions": rows}, indent=1, default=str))
        return
    print(f"{len(queries)} originals: {len(specs)} sources ({', '.join(specs)}) x {len(descriptions)} descriptions "
          f"x {ORIGINALS} seeds, true recipe steps {TRUE_STEPS}, guidance {TRUE_GUIDANCE:g}, own scheduler and size")
    print(f"resynthesis mode: K={K}, not adaptive; default: engine.Options() "
          f"(mode {engine.Options().mode}, K={engine.Options().per_source}, adaptive {engine.Options().adaptive})")
    print(table(rows, queries))
    print("wrong answers (true -> predicted):")
    print(confusions(rows, queries))
    print(f"setup: zoo {setup['zoo']:.0f}s, originals {setup['originals']:.0f}s; {machine}; work in {workdir}")


if __name__ == "__main__":
    main()
