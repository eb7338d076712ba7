"""Which open-set score: every score `resynth evaluate` compares, on every (set, features) cell.

The sets and features are scripts/bench_modes.py's (tiny random zoo; four real-weight GANs with one
description or 8 labels; the zoo's tiny CLIP, and a trained DINOv2-small at its final and middle
block). Each cell runs exactly what `evaluate` reports as `open_set`: the engine's default variant,
each source left out in turn, cross-fitted (engine.crossfit.leave_one_source_out with the
protocol's feature context). Printed: AUROC / unknowns rejected at 5% false reject per score, the
mean over each set's cells and over sets, and which score is best per cell.

    python scripts/bench_openset.py --cache /tmp/bench-modes [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.crossfit import leave_one_source_out  # noqa: E402
from engine.evaluation.protocol import default_variant, open_set_context  # noqa: E402
from engine.labelled import from_manifest  # noqa: E402
from engine.openset import DEFAULT_OPEN_SET_SCORE, OPEN_SET_SCORES  # noqa: E402
from engine.scoring import score_matrix  # noqa: E402


def _bench_modes():
    spec = importlib.util.spec_from_file_location("bench_modes", ROOT / "scripts" / "bench_modes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell_figures(evalset, originals: np.ndarray, resyntheses: np.ndarray, label: str) -> dict:
    """evaluate's open_set section for one cell, plus the default variant's closed-set accuracy."""
    references = evalset.references()
    variant = default_variant(label, evalset.max_per_source())
    scores = score_matrix(originals, resyntheses, references, variant)
    context = open_set_context(evalset, originals, resyntheses, references, variant.per_source)
    result = leave_one_source_out(scores, evalset.orig_source, evalset.orig_desc, evalset.sources,
                                  context=context, headline=DEFAULT_OPEN_SET_SCORE)
    result["accuracy"] = float((scores.argmax(1) == evalset.orig_source).mean())
    return result


def _figure(f: dict) -> str:
    if f.get("auroc") is None:
        return "not measured"
    return f"{f['auroc']:.3f} / {100 * (f.get('unknown_rejected_at_frr') or 0):.0f}%"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "resynth-bench-modes")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--zoo-descriptions", type=int, default=12)
    parser.add_argument("--sets", default="zoo,gan-one,gan-labels")
    parser.add_argument("--features", default="clip-mid,clip-final,dinov2,dinov2-mid")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    bm = _bench_modes()
    cache = args.cache.resolve()
    manifests, models = bm.datasets(cache, args.zoo_descriptions)
    makers = bm.extractors(cache, models)
    cells: dict[str, dict] = {}
    for set_name in args.sets.split(","):
        evalset = from_manifest(manifests[set_name])
        for feat in args.features.split(","):
            originals, resyntheses = bm.features(evalset, makers[feat], cache, feat)
            cells[f"{set_name}/{feat}"] = cell_figures(evalset, originals, resyntheses, feat)
            print(f"{set_name}/{feat} done", file=sys.stderr)
    names = list(OPEN_SET_SCORES)
    print("# bench_openset: unknown-source AUROC / unknowns rejected at 5% false reject "
          f"(default score: {DEFAULT_OPEN_SET_SCORE})\n")
    print("| set / features | folds | accuracy | " + " | ".join(names) + " | best |")
    print("|---|---|---|" + "---|" * (len(names) + 1))
    for cell, result in cells.items():
        print(f"| {cell} | {result['folds']['by']} | {100 * result['accuracy']:.1f}% | "
              + " | ".join(_figure(result["scores"][n]) for n in names) + f" | {result['best_measured_score']} |")

    def mean(selected: list[str], name: str, key: str) -> float:
        return float(np.mean([cells[c]["scores"][name].get(key) or 0.0 for c in selected]))

    sets = list(dict.fromkeys(c.split("/")[0] for c in cells))
    for set_name in sets:
        picked = [c for c in cells if c.startswith(set_name + "/")]
        print(f"| mean {set_name} | | | " + " | ".join(
            f"{mean(picked, n, 'auroc'):.3f} / {100 * mean(picked, n, 'unknown_rejected_at_frr'):.0f}%"
            for n in names) + " | |")
    print("| mean over sets | | | " + " | ".join(
        f"{np.mean([mean([c for c in cells if c.startswith(s + '/')], n, 'auroc') for s in sets]):.3f}"
        for n in names) + " | |")
    if args.json:
        args.json.write_text(json.dumps(cells, indent=1, default=float))


if __name__ == "__main__":
    main()
