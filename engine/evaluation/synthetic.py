"""A small labelled evaluation set made with the tiny zoo: originals plus linked resyntheses.

Tests and experiments need a manifest in exactly the format a user brings (engine/manifest.py);
this writes one from any set of diffusers pipeline folders, so the protocol runs on the same path.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from engine.zoo import DESCRIPTIONS
from engine.generate import DiffusersGenerator, GenerationParams
from engine.images import save_png_atomic

ORIGINAL_SEED = 1000  # originals use seeds no resynthesis uses, as in the demo


def write_dataset(pipelines: dict[str, Path], root: Path, descriptions: list[str] | None = None,
                  seeds: tuple[int, ...] = (0, 1), steps: int = 2, progress: bool = False,
                  resynthesized: int | None = None) -> Path:
    """Generate one original per (source, description) and `seeds` resyntheses per (source, description).

    Resyntheses are linked to their description only (each description has one original per
    source, so none of them is "the" original). Only the first `resynthesized` descriptions get
    resyntheses when given (the demo keeps the rest for generation on demand). Returns the manifest path.
    """
    descriptions = list(descriptions or DESCRIPTIONS[:8])
    root = Path(root)
    rows: list[dict] = []
    for name, folder in tqdm(pipelines.items(), desc="dataset", unit="source", disable=not progress):
        generator = DiffusersGenerator(name, Path(folder), GenerationParams(steps=steps))
        for i, text in enumerate(descriptions):
            original = Path("originals") / name / f"{i:03d}.png"
            save_png_atomic(generator.generate(text, [ORIGINAL_SEED + i])[0], root / original)
            rows.append({"image": original.as_posix(), "source": name, "description": text, "role": "original"})
            if resynthesized is not None and i >= resynthesized:
                continue
            for seed, image in zip(seeds, generator.generate(text, list(seeds))):
                rel = Path("resyntheses") / name / f"{i:03d}-{seed}.png"
                save_png_atomic(image, root / rel)
                rows.append({"image": rel.as_posix(), "source": name, "description": text,
                             "role": "resynthesis", "seed": seed})
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
