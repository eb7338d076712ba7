"""Dataset search on realistic vectors: measure trained features' neighbour structure, draw vectors with
it at scale (scripts/realistic_vectors.py), and compare exact, IVF-Flat, IVF-PQ and HNSW on them.

Three steps (each writes JSON under --out, default /tmp/bench-realistic):

    python scripts/bench_realistic.py measure   # DINOv2-small features of the held-out sets -> structure.json
    python scripts/bench_realistic.py check     # the generator on a replica of each set's layout -> check.json
    python scripts/bench_realistic.py bench --sizes 100000,1000000 --dim 1024   # -> bench-<n>.json

* measure: the held-out sets of scripts/bench_modes.py (gan-one, gan-labels: real-weight GAN images;
  zoo-set-12: tiny zoo pipelines) under --modes-cache, and the LoRA set (/tmp/bench-lora/labelled.jsonl,
  a tiny base pipeline and three LoRAs), embedded by DINOv2-small with real trained weights (bench_modes'
  DinoEmbedder; the weights file must already be in --modes-cache), at the final layer and at block 6
  (the engine's "middle"). Per set: mean cosine within a (source, description) group, within a source
  across descriptions, within a description across sources and unrelated; effective dimension; the
  composition of each vector's 5 nearest neighbours; group sizes. The generator's parameters are fitted
  to the real-weight GAN sets at block 6 (the tiny zoo and LoRA pipelines have random weights).
* bench: the store's layout (20 sources x 4 seeds per description) at each size, queries half new seeds
  of stored descriptions, half new descriptions; every index answers the same queries. recall@32 is
  against the exact answer; ms per query one at a time (single-threaded caller, FAISS on 2 threads) and
  batched (64 per call). Memory is what each index holds (FAISS's own accounting: codes, ids, graph).
  The machine is shared: everything runs under one process at a time (`nice`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import realistic_vectors as rv  # noqa: E402

SETS = {"gan-one": "gan-one/manifest.csv", "gan-labels": "gan-labels/manifest.csv",
        "zoo-set-12": "zoo-set-12/manifest.jsonl"}
LORA = Path("/tmp/bench-lora/labelled.jsonl")
FIT_SETS = ("gan-one", "gan-labels")  # real trained generators: the generator's statistics come from these
K = 32


# ------------------------------------------------------------------------------------------ measure

def manifests(modes_cache: Path) -> dict[str, Path]:
    found = {name: modes_cache / rel for name, rel in SETS.items() if (modes_cache / rel).is_file()}
    if LORA.is_file():
        found["lora"] = LORA
    return found


def labelled_images(manifest: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Every image of a manifest (originals and resyntheses) with integer source and description labels."""
    from engine.manifest import read_manifest

    rows = read_manifest(manifest)
    paths = [Path(r.image) if Path(r.image).is_absolute() else manifest.parent / r.image for r in rows]
    sources = {name: i for i, name in enumerate(sorted({r.source for r in rows}))}
    descriptions = {text: i for i, text in enumerate(sorted({r.description for r in rows}))}
    return (paths, np.array([sources[r.source] for r in rows]),
            np.array([descriptions[r.description] for r in rows]))


def embed_set(paths: list[Path], embedder, cache: Path) -> np.ndarray:
    if cache.is_file():
        with np.load(cache) as data:
            if list(data["paths"]) == [str(p) for p in paths]:
                return data["vectors"]
    from PIL import Image

    out = []
    for start in range(0, len(paths), 16):
        images = [Image.open(p) for p in paths[start:start + 16]]
        out.append(embedder.embed(images))
    vectors = np.concatenate(out)
    np.savez(cache, paths=np.array([str(p) for p in paths]), vectors=vectors)
    return vectors


def measure(args) -> dict:
    from bench_modes import DinoEmbedder

    weights = args.modes_cache / "dinov2-small-imgfocus.npz"
    if not weights.is_file():
        raise SystemExit(f"{weights} is missing: run scripts/bench_modes.py --cache {args.modes_cache} first")
    out: dict = {"features": {}}
    for layer_name, layer in (("final", None), ("block6", 6)):
        embedder = DinoEmbedder(weights, layer=layer)
        per_set = {}
        for name, manifest in manifests(args.modes_cache).items():
            paths, source, description = labelled_images(manifest)
            vectors = embed_set(paths, embedder, args.out / f"features-{name}-{layer_name}.npz")
            per_set[name] = rv.structure(vectors, source, description)
            print(f"{layer_name} {name}: {json.dumps(per_set[name]['cosines'])}", file=sys.stderr)
        out["features"][layer_name] = per_set
    (args.out / "structure.json").write_text(json.dumps(out, indent=1))
    return out


def fitted(measured: dict, layer: str = "block6") -> tuple[rv.Structure, dict]:
    """The generator's parameters: the four level cosines averaged over FIT_SETS (pairs weighted equally
    per set; a level a set lacks, e.g. gan-one's single description, comes from the others)."""
    sets = measured["features"][layer]
    levels = {}
    for level in ("unrelated", "same_description", "same_source", "same_group"):
        values = [sets[s]["cosines"][level]["mean"] for s in FIT_SETS if s in sets
                  and sets[s]["cosines"][level]["mean"] is not None]
        levels[level] = float(np.mean(values))
    eff = float(np.mean([sets[s]["within_source_effective_dimension"] for s in FIT_SETS if s in sets]))
    return rv.Structure.from_cosines(**levels), {"levels": levels, "effective_dimension": eff}


# ------------------------------------------------------------------------------------------ check

def replica(structure: rv.Structure, stats: dict, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The generator's vectors on a measured set's layout (its sources x descriptions x group size)."""
    sizes = stats["sizes"]
    seeds = max(1, round(sizes["group_size_mean"]))
    n = sizes["sources"] * sizes["descriptions"] * seeds
    vectors, _, _ = rv.generate(n, dim, structure, sources=sizes["sources"], seeds=seeds, seed=seed)
    description, source = rv.labels_of(n, sizes["sources"], seeds)
    return vectors, source, description


def check(args) -> dict:
    measured = json.loads((args.out / "structure.json").read_text())
    base, target = fitted(measured)
    sets = measured["features"]["block6"]
    best = None
    for alpha in np.arange(0.5, 2.51, 0.125):  # the spectrum's decay: matched on the within-source effective
        trial = rv.Structure(**{**base.to_dict(), "alpha": float(alpha)})  # dimension, at 384-d like DINOv2's
        effs = [rv.structure(*replica(trial, sets[s], 384, 0))["within_source_effective_dimension"]
                for s in FIT_SETS if s in sets]
        gap = abs(float(np.mean(effs)) - target["effective_dimension"])
        if best is None or gap < best[0]:
            best = (gap, trial)
    assert best is not None
    chosen = best[1]
    report = {"structure": chosen.to_dict(), "target": target, "sets": {}}
    for name, stats in sets.items():
        got = rv.structure(*replica(chosen, stats, 384, 1))
        report["sets"][name] = {"measured": stats, "generated": got}
    (args.out / "check.json").write_text(json.dumps(report, indent=1))
    print(check_table(report))
    return report


def check_table(report: dict) -> str:
    lines = ["| set | | group | same source | same description | unrelated | eff. dim | within source | "
             "5-NN: group / source only |", "|---|---|---|---|---|---|---|---|---|"]
    for name, pair in report["sets"].items():
        for kind in ("measured", "generated"):
            s = pair[kind]
            c = s["cosines"]
            cell = [f"{c[k]['mean']:.3f}" if c[k]["mean"] is not None else "-"
                    for k in ("same_group", "same_source", "same_description", "unrelated")]
            lines.append(f"| {name} | {kind} | " + " | ".join(cell)
                         + f" | {s['effective_dimension']:.1f} | {s['within_source_effective_dimension']:.1f}"
                         f" | {s['neighbours']['group']:.2f} / {s['neighbours']['source_only']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("measure", "check", "bench"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-realistic"))
    parser.add_argument("--modes-cache", type=Path, default=Path("/tmp/bench-modes"))
    parser.add_argument("--sizes", default="100000")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--hnsw-max", type=int, default=300_000, help="largest size HNSW is built at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store-only", action="store_true", help="exact and the store's default index only")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "measure":
        measure(args)
    elif args.step == "check":
        check(args)
    else:
        from bench_search import bench

        bench(args)


if __name__ == "__main__":
    main()
