"""Re-score scripts/bench_lora.py's set with other features, so the choice of mode for LoRAs of one base
does not rest on the tiny random CLIP alone.

Reads what `bench_lora.py --cache DIR` left: the 24 query images (DIR/originals) and the store it filled
(DIR/store-clip-middle: 8 resyntheses per source and description, seeds 0..7). Embeds both with
  clip-mid     the vectors that store already holds for the resyntheses, the same zoo CLIP for the queries
  dinov2       DINOv2-small with real trained weights, final class token (scripts/bench_modes.py's reader)
  dinov2-mid   the same model's class token after block 6 of 12
and scores each with the engine's own scoring (engine.scoring): resynthesis mode (the description's first
3 and all 8 resyntheses per source), dataset mode (32 nearest of any description) and combined mode (all 8 stored
resyntheses of the description and the 32 nearest, as the engine would use them).
No image is generated; DINOv2's weights come from bench_modes' cache (built on its first run).

    python scripts/bench_lora_features.py --cache /tmp/bench-lora --modes-cache /tmp/bench-modes
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SOURCES = ("base", "lora-1", "lora-2", "lora-3")  # bench_lora.py's order
QUERY_DESCRIPTIONS = 6


def load_set(cache: Path):
    """Query files with (source, description) and the stored resyntheses: vector ids, files, source, description."""
    import engine
    from engine import zoo

    texts = zoo.DESCRIPTIONS[:QUERY_DESCRIPTIONS]
    queries = [(cache / "originals" / name / f"{i}.png", c, i)
               for c, name in enumerate(SOURCES) for i in range(len(texts))]
    rows = []
    with engine.open(cache / "store-clip-middle") as ws:
        store = ws.store
        for i, text in enumerate(texts):
            for ref in store.resyntheses(store.find_description_id(text)):
                rows.append((ref.vector_id, SOURCES.index(ref.source), i, ref.seed))
        image_of = store.image_ids_of_vectors([r[0] for r in rows])
        files = [store.image_file(image_of[r[0]]) for r in rows]
        vectors = store.vectors(np.array([r[0] for r in rows], np.int64))
        from PIL import Image
        clip_queries = ws.embed([Image.open(path).convert("RGB") for path, _, _ in queries])
    return queries, rows, files, vectors, clip_queries


def accuracy(queries, rows, orig: np.ndarray, res: np.ndarray) -> dict[str, int]:
    from engine.scoring import Variant, neighbour_score_matrix, score_matrix

    truth = np.array([c for _, c, _ in queries])
    res_source = np.array([r[1] for r in rows])
    order = np.lexsort((np.array([r[3] for r in rows]),))  # seed order within each (source, description)

    def refs(k: int) -> list[list[np.ndarray]]:
        return [[np.array([j for j in order if rows[j][1] == c and rows[j][2] == d][:k], np.int64)
                 for c in range(len(SOURCES))] for _, _, d in queries]

    orig_hash, res_hash = [f"q{i}" for i in range(len(queries))], [f"r{j}" for j in range(len(rows))]
    matrices = {"resynthesis K=3": score_matrix(orig, res, refs(3), Variant("x", "cosine", "knn", 3)),
                "resynthesis K=8": score_matrix(orig, res, refs(8), Variant("x", "cosine", "knn", 8)),
                "dataset (32 neighbours)": neighbour_score_matrix(orig, res, res_source, orig_hash, res_hash,
                                                                  len(SOURCES), 32, "knn"),
                "combined (all 8 stored + 32 neighbours; default)": neighbour_score_matrix(
                    orig, res, res_source, orig_hash, res_hash, len(SOURCES), 32, "knn", refs(8), per_source=8)}
    return {mode: int((scores.argmax(axis=1) == truth).sum()) for mode, scores in matrices.items()}


def embed(model, paths) -> np.ndarray:
    from PIL import Image

    return np.concatenate([model.embed([Image.open(p) for p in paths[i:i + 32]]) for i in range(0, len(paths), 32)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/bench-lora"), help="bench_lora.py's --cache")
    parser.add_argument("--modes-cache", type=Path, default=Path("/tmp/bench-modes"), help="bench_modes.py's --cache")
    args = parser.parse_args(argv)
    from bench_modes import DinoEmbedder, dinov2_weights

    queries, rows, files, clip_res, clip_q = load_set(args.cache)
    features = {"clip-mid (tiny random)": (clip_q, clip_res)}
    weights = dinov2_weights(args.modes_cache)
    for label, layer in (("dinov2 (final)", None), ("dinov2-mid (block 6)", 6)):
        model = DinoEmbedder(weights, layer=layer)
        features[label] = (embed(model, [p for p, _, _ in queries]), embed(model, files))
    table = {label: accuracy(queries, rows, q, r) for label, (q, r) in features.items()}
    modes = list(next(iter(table.values())))
    print(f"LoRAs of one base: correct of {len(queries)} (chance {len(queries) // len(SOURCES)})\n")
    print("| features | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for label, row in table.items():
        print(f"| {label} | " + " | ".join(str(row[m]) for m in modes) + " |")
    print("| **sum** | " + " | ".join(str(sum(row[m] for row in table.values())) for m in modes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
