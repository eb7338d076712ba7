"""How well resynth tells apart LoRAs of one base (issue 22's hard case), measured on a held-out set.

Set (written under --cache, reused by a second run):
  base       the tiny zoo's tiny-sd-ddim pipeline folder (engine.zoo), a "diffusers" source
  lora-1..3  random LoRAs on its UNet attention (engine.sources.lora.write_random_lora: peft,
             init_lora_weights=False), seeds 11/12/13, ranks 4/8/2, scale 1: "lora" sources sharing the base
  originals  one image per (source, description) for the first --descriptions of engine.zoo.DESCRIPTIONS,
             seed 1000 + index (the engine's resynthesis seeds start at 0 and never reach these)
  labelled   for dataset mode: each source's images of the *other* descriptions, seeds 2000..2003,
             ingested as labelled resyntheses into a fresh store (never the queries' descriptions)
Every image is made by the engine's own generators (the sources' `load`), --steps inference steps.

Modes (engine.Workspace.attribute, library API, every query with its true description as prompt):
  resynthesis K=3   Options(mode="resynthesis"): the defaults (K=3, adaptive, knn)
  resynthesis K=8   Options(mode="resynthesis", per_source=8) (adaptive), then with adaptive=False
  combined K=3      Options(): the engine's default mode, in the store the runs above filled
  dataset           Options(mode="dataset") in a fresh store holding only the ingested labelled set
Features: the zoo's tiny random CLIP unless --clip-config/--clip-checkpoint name another (e.g. the
DINOv2-small tower scripts/dinov2_openclip.py writes).

    python scripts/bench_lora.py --cache /tmp/bench-lora [--descriptions 6] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LORAS = (("lora-1", 11, 4), ("lora-2", 12, 8), ("lora-3", 13, 2))  # name, weight seed, rank
ORIGINAL_SEED, LABELLED_SEEDS = 1000, (2000, 2001, 2002, 2003)


def build(cache: Path, descriptions: int, steps: int) -> dict:
    """The zoo, the LoRAs, the originals and the labelled set (each written once)."""
    from engine import sources, zoo
    from engine.images import save_png_atomic
    from engine.sources.lora import write_random_lora

    zoo_dir = cache / "zoo"
    if not (zoo_dir / "done").exists():
        models = zoo.write_zoo(zoo_dir, generators=zoo.DEFAULT_GENERATORS[:1])
        (zoo_dir / "done").write_text(json.dumps({k: str(v) for k, v in models.items() if k != "pipelines"}))
    models = {k: Path(v) for k, v in json.loads((zoo_dir / "done").read_text()).items()}
    base = zoo_dir / "pipelines" / zoo.DEFAULT_GENERATORS[0].name
    specs = {"base": {"kind": "diffusers", "path": base, "steps": steps}}
    for name, seed, rank in LORAS:
        file = cache / "loras" / f"{name}.safetensors"
        if not file.exists():
            write_random_lora(base, file, seed=seed, rank=rank)
        specs[name] = {"kind": "lora", "path": base, "lora": str(file), "steps": steps}
    queries = zoo.DESCRIPTIONS[:descriptions]
    others = [d for d in zoo.DESCRIPTIONS if d not in queries]
    originals, labelled = [], []
    for name, spec in specs.items():
        kind = sources.get(spec["kind"])
        params = {k: v for k, v in spec.items() if k != "kind"}
        recipe = kind.prepare(name, **params)

        class Row:  # what a stored source row offers load()
            pass

        row = Row()
        row.name, row.path, row.fingerprint = name, recipe.path, recipe.fingerprint
        row.params_json = json.dumps(recipe.params)
        generator = None
        jobs = [(cache / "originals" / name / f"{i}.png", text, ORIGINAL_SEED + i, "original")
                for i, text in enumerate(queries)]
        jobs += [(cache / "labelled" / name / f"{i}-{seed}.png", text, seed, "resynthesis")
                 for i, text in enumerate(others) for seed in LABELLED_SEEDS]
        for path, text, seed, _ in jobs:
            if not path.exists():
                generator = generator or kind.load(row, "cpu")
                save_png_atomic(generator.generate(text, [seed])[0], path)
        if generator is not None:
            generator.unload()
        originals += [{"image": p, "source": name, "description": t} for p, t, _, role in jobs if role == "original"]
        labelled += [{"image": p.relative_to(cache).as_posix(), "source": name, "description": t, "role": role,
                      "seed": s} for p, t, s, role in jobs if role == "resynthesis"]
    manifest = cache / "labelled.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in labelled))
    return {"models": models, "specs": specs, "originals": originals, "manifest": manifest}


def score(report, truth: list[str]) -> dict:
    predicted = [r.predicted for r in report.results]
    right = sum(p == t for p, t in zip(predicted, truth))
    per_source = {s: f"{sum(p == t for p, t in zip(predicted, truth) if t == s)}/{truth.count(s)}"
                  for s in dict.fromkeys(truth)}
    return {"right": right, "total": len(truth), "per_source": per_source, "generated": report.generated}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/bench-lora"))
    parser.add_argument("--descriptions", type=int, default=6, help="query descriptions (default 6: 24 queries)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--clip-config", type=Path)
    parser.add_argument("--clip-checkpoint", type=Path)
    parser.add_argument("--clip-layer", default="middle")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import torch

    import engine
    from engine import sources
    from engine.options import Options
    from engine.sources.lora import Lora
    from engine.sources.single_file import SingleFile

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    sources.get("diffusers")
    if "lora" not in {k.name for k in sources.kinds()}:  # until engine.sources._builtin lists them
        sources.register(Lora())
        sources.register(SingleFile())
    started = time.perf_counter()
    built = build(args.cache, args.descriptions, args.steps)
    clip_config = args.clip_config or built["models"]["clip_config"]
    clip_checkpoint = args.clip_checkpoint or built["models"]["clip_checkpoint"]
    features = "tiny random CLIP (zoo)" if args.clip_config is None else f"{clip_config.name} ({args.clip_layer})"
    print(f"set ready in {time.perf_counter() - started:.0f} s: {len(built['specs'])} sources (base + "
          f"{len(LORAS)} LoRAs), {len(built['originals'])} queries; features: {features}", flush=True)
    images = [r["image"] for r in built["originals"]]
    prompts = [r["description"] for r in built["originals"]]
    truth = [r["source"] for r in built["originals"]]
    tag = (clip_checkpoint.parent.name + "-" + args.clip_layer).replace("/", "_")
    results = {}

    store = args.cache / f"store-{tag}"
    shutil.rmtree(store, ignore_errors=True)  # resyntheses are regenerated: the timing is part of the answer
    with engine.init(store, clip_config=clip_config, clip_checkpoint=clip_checkpoint,
                     clip_layer=args.clip_layer) as ws:
        for name, spec in built["specs"].items():
            ws.add_source(name, kind=spec["kind"], **{k: v for k, v in spec.items() if k != "kind"})
        for label, options in (("resynthesis K=3 (defaults)", Options(mode="resynthesis")),
                               ("resynthesis K=8", Options(mode="resynthesis", per_source=8)),
                               ("resynthesis K=8, adaptive off", Options(mode="resynthesis", per_source=8,
                                                                           adaptive=False)),
                               ("combined K=3 (engine default)", Options())):
            t0 = time.perf_counter()
            results[label] = score(ws.attribute(images, prompt=prompts, options=options), truth)
            results[label]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"  {label}: {results[label]}", flush=True)

    store = args.cache / f"store-dataset-{tag}"
    shutil.rmtree(store, ignore_errors=True)
    with engine.init(store, clip_config=clip_config, clip_checkpoint=clip_checkpoint,
                     clip_layer=args.clip_layer) as ws:
        report = ws.ingest(built["manifest"])  # labelled resyntheses of the other descriptions only
        label = f"dataset ({report.added} labelled resyntheses, other descriptions)"
        t0 = time.perf_counter()
        results[label] = score(ws.attribute(images, prompt=prompts, options=Options(mode="dataset")), truth)
        results[label]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"  {label}: {results[label]}", flush=True)

    n, k = len(truth), len(built["specs"])
    print(f"\nLoRAs of one base ({features}; {args.steps} steps; chance {n // k}/{n} = {1 / k:.0%})")
    print(f"{'mode':<60} {'right':>7} {'accuracy':>9} {'generated':>10} {'seconds':>8}")
    for label, row in results.items():
        print(f"{label:<60} {row['right']:>3}/{row['total']:<3} {row['right'] / row['total']:>9.0%} "
              f"{row['generated']:>10} {row['seconds']:>8}")
    if args.json:
        args.json.write_text(json.dumps({"features": features, "chance": 1 / k, "queries": n, "results": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
