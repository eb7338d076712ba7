"""How often a real photograph is taken for a generated image, and a generated one for a photograph:
the "real" rule (engine.calibration) on real camera photographs that ship inside PyPI packages and on
held-out generated images, with the tiny zoo's random CLIP and with trained DINOv2-small features.

Photographs (no download; each package installed from PyPI): scikit-image's `skimage.data` (astronaut,
coffee, chelsea, rocket, camera, coins, moon, text, hubble_deep_field, immunohistochemistry, retina,
brick, grass, gravel, clock, page), scikit-learn's sample images (china, flower) and matplotlib's
grace_hopper: 19 photographs. Each gives 3 images (the whole frame and two crops), resized to the
generated set's side. Photographs are split, not images: the reference photographs' crops never meet
the held-out ones.

Generated sets: the tiny zoo (engine.zoo, 5 random-weight pipelines, 6 descriptions, 2 resyntheses each)
and, with --gan-manifest, scripts/heldout_gans.py's real-weight GANs (its `labels` layout). Originals are
split in two (alternately per source): one half fits the threshold and joins the stored
references, the other is held out.

    python scripts/dinov2_openclip.py --out /tmp/realbench/dinov2 --cache ~/.cache/resynth-bench-modes
    python scripts/heldout_gans.py --out /tmp/realbench/gan-labels --layout labels
    python scripts/bench_real.py --out /tmp/realbench/run --dinov2 /tmp/realbench/dinov2 \\
        --gan-manifest /tmp/realbench/gan-labels/manifest.csv
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SKIMAGE = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "text", "hubble_deep_field",
           "immunohistochemistry", "retina", "brick", "grass", "gravel", "clock", "page")
FALSE_REJECT = 0.05


def photographs() -> dict[str, Image.Image]:
    """name -> RGB photograph, from the installed packages."""
    import matplotlib
    import skimage.data
    import sklearn.datasets

    out = {}
    for name in SKIMAGE:
        array = getattr(skimage.data, name)()
        out[name] = Image.fromarray(array).convert("RGB")
    shipped = Path(sklearn.datasets.__file__).parent / "images"
    for name in ("china", "flower"):
        out[name] = Image.open(shipped / f"{name}.jpg").convert("RGB")
    out["grace_hopper"] = Image.open(Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"
                                     / "grace_hopper.jpg").convert("RGB")
    return out


def views(photo: Image.Image, side: int) -> list[Image.Image]:
    """The whole frame (centre square) and two corner crops at 60%, each resized to `side`."""
    w, h = photo.size
    s = min(w, h)
    c = int(s * 0.6)
    boxes = [((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s), (0, 0, c, c), (w - c, h - c, w, h)]
    return [photo.crop(b).resize((side, side), Image.Resampling.LANCZOS) for b in boxes]


def embed(embedder, images: list[Image.Image]) -> np.ndarray:
    out = [embedder.embed(images[i:i + 32]) for i in range(0, len(images), 32)]
    return np.concatenate(out) if out else np.zeros((0, embedder.dim), np.float32)


def generated_set(manifest: Path) -> tuple[list[Path], list[tuple[str, str]], list[Path]]:
    """(original paths, their (source, description), resynthesis paths) of a manifest."""
    from engine.manifest import read_manifest

    rows = read_manifest(manifest)
    originals = [r for r in rows if r.role == "original"]
    return ([r.image for r in originals], [(r.source, r.description) for r in originals],
            [r.image for r in rows if r.role == "resynthesis"])


def measure(embedder, manifest: Path, photos: dict[str, Image.Image]) -> dict:
    from engine.calibration import fit_real_threshold, real_values
    from engine.evaluation.realimages import real_image_figures

    orig_paths, groups, res_paths = generated_set(manifest)
    with Image.open(orig_paths[0]) as first:
        side = first.size[0]
    names = sorted(photos)
    ref_names, held_names = names[0::2], names[1::2]
    ref_imgs = [v for n in ref_names for v in views(photos[n], side)]
    held_imgs = [v for n in held_names for v in views(photos[n], side)]
    originals = embed(embedder, [Image.open(p).convert("RGB") for p in orig_paths])
    resyntheses = embed(embedder, [Image.open(p).convert("RGB") for p in res_paths])
    real_refs, real_held = embed(embedder, ref_imgs), embed(embedder, held_imgs)
    seen: dict[str, int] = {}
    fit = []
    for source, _ in groups:  # alternately per source: its first, third ... originals fit
        fit.append(seen.get(source, 0) % 2 == 0)
        seen[source] = seen.get(source, 0) + 1
    fit_half = np.array(fit)
    stored = np.concatenate([resyntheses, originals[fit_half]])  # what a calibrated store holds
    fitted = fit_real_threshold(real_values(originals[fit_half], real_refs, stored),
                                real_values(real_refs, real_refs, stored), FALSE_REJECT)
    t = fitted["threshold"]
    held_real = real_values(real_held, real_refs, stored)
    held_gen = real_values(originals[~fit_half], real_refs, stored)
    return {"side": side, "reference_photographs": ref_names, "held_out_photographs": held_names,
            "real_references": len(ref_imgs), "held_out_real": len(held_imgs),
            "generated_fit": int(fit_half.sum()), "held_out_generated": int((~fit_half).sum()),
            "threshold": t, "fit": fitted["measured"],
            "held_out_real_called_real": float(np.mean(held_real > t)),
            "real_photo_false_positive_rate": float(np.mean(held_real <= t)),
            "held_out_generated_accepted": float(np.mean(held_gen <= t)),
            "held_out_generated_called_real": float(np.mean(held_gen > t)),
            "missed_photographs": sorted({held_names[i // 3] for i in np.flatnonzero(held_real <= t)}),
            "evaluate_cross_fitted": real_image_figures(originals, resyntheses,
                                                        np.concatenate([real_refs, real_held]), FALSE_REJECT)}


def main(argv: list[str] | None = None) -> None:
    from engine.embed import Embedder, EmbedderSpec, parse_layer
    from engine.evaluation.synthetic import write_dataset
    from engine.zoo import DESCRIPTIONS, write_zoo

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dinov2", type=Path, help="folder scripts/dinov2_openclip.py wrote")
    parser.add_argument("--gan-manifest", type=Path, help="scripts/heldout_gans.py's manifest.csv (labels layout)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    zoo = write_zoo(args.out / "zoo")
    zoo_manifest = args.out / "zoo-set" / "manifest.jsonl"
    if not zoo_manifest.is_file():
        zoo_manifest = write_dataset(zoo["pipelines"], args.out / "zoo-set", list(DESCRIPTIONS[:6]), seeds=(0, 1))
    features = {"zoo-clip-middle": EmbedderSpec(arch="tiny-clip", checkpoint=str(zoo["clip_checkpoint"]),
                                                config=str(zoo["clip_config"]), layer=parse_layer("middle"))}
    if args.dinov2:
        features["dinov2-small-middle"] = EmbedderSpec(
            arch="dinov2-small", checkpoint=str(args.dinov2 / "open_clip_pytorch_model.bin"),
            config=str(args.dinov2 / "dinov2-small.json"), layer=parse_layer("middle"))
    sets = {"tiny-zoo": zoo_manifest, **({"real-weight-gans": args.gan_manifest} if args.gan_manifest else {})}
    photos = photographs()
    results = {}
    for feature, spec in features.items():
        embedder = Embedder(spec)
        for name, manifest in sets.items():
            results[f"{name} / {feature}"] = got = measure(embedder, manifest, photos)
            print(f"{name:18} {feature:20} real photos called real {got['held_out_real_called_real']:.0%} "
                  f"(FPR {got['real_photo_false_positive_rate']:.0%}, {got['held_out_real']} images), held-out "
                  f"generated accepted {got['held_out_generated_accepted']:.0%} ({got['held_out_generated']}); "
                  f"cross-fitted FPR {got['evaluate_cross_fitted']['false_positive_rate']:.0%}, "
                  f"AUROC {got['evaluate_cross_fitted']['auroc']:.3f}; missed {got['missed_photographs']}",
                  flush=True)
    (args.out / "bench_real.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
