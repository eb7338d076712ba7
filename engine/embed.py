"""CLIP image embedder: an open_clip model from a local checkpoint, final or intermediate layer."""
from __future__ import annotations

import os
import threading
from typing import Any
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from engine.errors import UserError, first_line
from engine.paths import expand_path
from index.keys import sha256_file

_POOL_LOCK = threading.Lock()  # guards the lazy creation of an Embedder's preprocessing pool


@dataclass(frozen=True)
class EmbedderSpec:
    """How a user holds CLIP weights: architecture name (or config JSON) + checkpoint file.

    `layer` None means the final projected embedding; an integer L means the class token of
    transformer block L (1-based), and "middle" the middle block (resolved when the model loads),
    which published work on this task (block 12 of 24) and our measurements found stronger.
    """

    arch: str
    checkpoint: str
    config: str | None = None
    layer: int | str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "EmbedderSpec":
        return cls(data["arch"], data["checkpoint"], data.get("config"), data.get("layer"))


MIDDLE = "middle"


def parse_layer(text: str | int | None) -> int | str | None:
    """--clip-layer: "middle", "final" (None) or a block number."""
    if text is None or isinstance(text, int):
        return text
    text = str(text).strip().lower()
    if text in ("final", "last"):
        return None
    if text in (MIDDLE, "mid"):
        return MIDDLE
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--clip-layer must be middle, final or a block number, not {text!r}") from None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    """Refuse a --device this machine does not have, in those words (open_clip's own error read as a
    checkpoint that does not match its architecture)."""
    import torch

    kind, _, number = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (number.isdigit() and int(number) >= count):
            have = f"{count} CUDA device{'s' * (count != 1)}" if count else "no CUDA device (or no driver)"
            raise UserError(f"--device {device}: this machine has {have}; use --device cpu", code="bad_device")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: this machine has no Apple GPU (MPS); use --device cpu",
                        code="bad_device")


def checkpoint_hash(path: Path, known: dict | None = None) -> str:
    """sha256 of the checkpoint, reusing `known` (hash, size, mtime) when the file is unchanged."""
    stat = path.stat()
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return known["sha256"]
    return sha256_file(path)


class Embedder:
    """Batched, L2-normalised float32 image features; `identity` names model, weights and layer.

    On CPU the features are computed exactly as open_clip's reference path does (its PIL preprocess,
    float32), so vectors stay comparable with every store made before. On CUDA the model runs under
    bf16 autocast (fp16 where bf16 is unsupported) and preprocessing runs as tensor ops on the device
    (`DeviceTransform`: the same resize, centre crop and normalisation), with no sync between
    batches; if the preprocess is not one `DeviceTransform` can reproduce, PIL preprocessing runs
    in a thread pool instead.
    """

    def __init__(self, spec: EmbedderSpec, device: str | None = None, known_hash: dict | None = None,
                 batch_size: int = 32):
        import open_clip

        checkpoint = expand_path(spec.checkpoint)
        if checkpoint.is_dir():
            raise UserError(f"--clip-checkpoint {checkpoint} is a folder: give the checkpoint file in it "
                            "(e.g. open_clip_pytorch_model.bin)")
        if not checkpoint.is_file():
            raise UserError(f"CLIP checkpoint not found: {checkpoint}")
        if not _checkpoint_format(checkpoint):
            raise UserError(f"cannot load CLIP checkpoint {checkpoint}: not a readable checkpoint (expected a "
                            "PyTorch state dict or safetensors file)")
        arch = spec.arch
        if spec.config:
            config = expand_path(spec.config)
            if not config.is_file():
                raise UserError(f"CLIP model config not found: {config}")
            try:
                open_clip.add_model_config(config)
            except Exception as exc:  # open_clip raises bare exceptions for bad JSON
                raise UserError(f"malformed CLIP model config {config}: {first_line(exc)}") from None
            arch = config.stem
        if arch not in open_clip.list_models():
            import difflib

            close = difflib.get_close_matches(arch, open_clip.list_models(), n=1, cutoff=0.8)
            meant = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"unknown CLIP architecture {arch!r} ({meant}pass --clip-config for a custom one)")
        device = device or default_device()
        check_device(device)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=str(checkpoint), device=device, require_pretrained=True)
        except Exception as exc:
            if _unreadable(exc):
                raise UserError(f"cannot load CLIP checkpoint {checkpoint} as {arch}: {_load_reason(exc)}") from exc
            # The file reads, but its tensors are not this architecture's (open_clip says so with a
            # state-dict error or a bare assertion, e.g. "text pos_embed width changed!").
            how = ("pass the config it was trained with as --clip-config FILE" if spec.config else
                   "pass the architecture it was trained with as --clip-model ARCH, or for an architecture "
                   "open_clip does not list its open_clip config JSON as --clip-config FILE")
            raise UserError(f"CLIP checkpoint {checkpoint} does not match the architecture {arch} ({_short(exc)}): "
                            f"{how}", code="clip_mismatch") from exc
        stat = checkpoint.stat()
        sha256 = checkpoint_hash(checkpoint, known_hash)
        self.hash_record = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        self._setup(spec, arch, model, preprocess, device, batch_size, sha256)

    @classmethod
    def from_model(cls, model, preprocess, arch: str = "custom", layer: int | str | None = None,
                   device: str | None = None, batch_size: int = 32) -> "Embedder":
        """An Embedder around an open_clip model already in memory (benchmarks, tests); no checkpoint
        file, so its identity carries no weight hash."""
        self = cls.__new__(cls)
        device = device or default_device()
        self.hash_record = {}
        self._setup(EmbedderSpec(arch, "", None, layer), arch, model.to(device), preprocess, device, batch_size,
                    "0" * 16)
        return self

    def _setup(self, spec: EmbedderSpec, arch: str, model, preprocess, device: str, batch_size: int,
               sha256: str) -> None:
        import torch

        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        self.model = model.eval()
        self.preprocess = preprocess
        blocks = len(self.model.visual.transformer.resblocks) if hasattr(self.model.visual, "transformer") else None
        if spec.layer == MIDDLE:
            if not blocks:
                raise UserError(f"{arch} has no transformer blocks: use --clip-layer final")
            spec = self.spec = replace(spec, layer=max(1, blocks // 2))
        if isinstance(spec.layer, int) and (blocks is None or not 1 <= spec.layer <= blocks):
            raise UserError(f"--clip-layer {spec.layer} is out of range for {arch} ({blocks or 0} "
                            f"block{'s' * ((blocks or 0) != 1)})")
        self.checkpoint_sha256 = sha256
        layer = "final" if spec.layer is None else f"block{spec.layer}"
        self.identity = f"{arch}@{sha256[:16]}/{layer}"
        self.cuda = torch.device(device).type == "cuda"
        self.autocast_dtype = None
        self.device_transform: DeviceTransform | None = None
        if self.cuda:
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.device_transform = DeviceTransform.from_preprocess(preprocess)
        self._pool: Any = None  # a ThreadPoolExecutor, made on first use
        self.dim = int(self.embed([Image.new("RGB", (8, 8))]).shape[1])
        self.images_embedded = 0  # counted so tests can prove a cache hit embeds no resynthesis

    def describe(self) -> dict:
        """What the store records about this embedder."""
        return {**asdict(self.spec), "identity": self.identity, "checkpoint_hash": self.hash_record}

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            if not self.cuda:
                out = self._embed_exact(images)
            elif self.device_transform is not None:
                out = self._embed_device(images)
            else:
                out = self._embed_pooled(images)
        self.images_embedded = getattr(self, "images_embedded", 0) + len(images)
        return out

    def _features(self, batch):
        """The class token of block `layer`, or the final projected embedding, as float32, L2-normalised."""
        import torch

        if self.spec.layer is None:
            features = self.model.encode_image(batch)
        else:
            result = self.model.visual.forward_intermediates(
                batch, indices=[self.spec.layer - 1], stop_early=True, intermediates_only=True,
                output_extra_tokens=True)
            features = result["image_intermediates_prefix"][0][:, 0]
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def _embed_exact(self, images: list[Image.Image]) -> np.ndarray:
        """open_clip's reference path: its PIL preprocess one image at a time, float32 on any device."""
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start:start + self.batch_size]]).to(self.device)
            out.append(self._features(batch).cpu().numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def _autocast(self):
        import contextlib

        import torch

        if not self.cuda or self.autocast_dtype is None:  # the CPU stays float32
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    def _embed_device(self, images: list[Image.Image]) -> np.ndarray:
        """CUDA: pixels go to the device as uint8 (pinned, asynchronous), are preprocessed there and
        embedded under autocast; results stay on the device until the end, so the host prepares the
        next batch while the device runs this one."""
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            batch = self._device_batch(images[start:start + self.batch_size])
            with self._autocast():
                out.append(self._features(batch))
        if not out:
            return np.zeros((0, 0), np.float32)
        return torch.cat(out).cpu().numpy().astype(np.float32)

    def _device_batch(self, chunk: list[Image.Image]):
        """The preprocessed batch on the device: RGB images by `device_transform`, any other mode by
        open_clip's PIL preprocess (PIL resizes RGBA premultiplied and palettes by nearest)."""
        import torch

        transform = self.device_transform
        assert transform is not None, "only called when the preprocess has a device form"
        rgb = [i for i, im in enumerate(chunk) if im.mode == "RGB"]
        if len(rgb) == len(chunk):
            return transform(_pixels_to_device(chunk, self.device))
        other = [i for i, im in enumerate(chunk) if im.mode != "RGB"]
        exact = torch.stack([self.preprocess(chunk[i]) for i in other]).to(self.device)
        batch = torch.empty((len(chunk), *exact.shape[1:]), dtype=exact.dtype, device=self.device)
        batch[other] = exact
        if rgb:
            batch[rgb] = transform(_pixels_to_device([chunk[i] for i in rgb], self.device))
        return batch

    def _embed_pooled(self, images: list[Image.Image]) -> np.ndarray:
        """CUDA with a preprocess DeviceTransform cannot reproduce: open_clip's PIL preprocess in a
        thread pool (PIL releases the GIL while resizing) ahead of the autocast forward passes."""
        import torch

        with _POOL_LOCK:  # the service's batcher and a generation (or a chunk read ahead) may embed at once
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="clip-pre")
        tensors = self._pool.map(self.preprocess, images)  # lazy, in order, computed ahead
        out = []
        for start in range(0, len(images), self.batch_size):
            count = min(self.batch_size, len(images) - start)
            batch = torch.stack([next(tensors) for _ in range(count)])
            batch = (batch.pin_memory() if self.cuda else batch).to(self.device, non_blocking=self.cuda)
            with self._autocast():
                out.append(self._features(batch))
        if not out:
            return np.zeros((0, 0), np.float32)
        return torch.cat(out).cpu().numpy().astype(np.float32)


def _pixels_to_device(images: list[Image.Image], device: str) -> list:
    """RGB uint8 pixels of each image on `device`, as (1, H, W, 3) tensors, in order.

    Images of one size share one pinned host buffer and one asynchronous copy."""
    import torch

    arrays = [np.asarray(im.convert("RGB") if im.mode != "RGB" else im) for im in images]
    groups: dict[tuple, list[int]] = {}
    for i, array in enumerate(arrays):
        groups.setdefault(array.shape, []).append(i)
    out: list[Any] = [None] * len(arrays)
    pin = torch.device(device).type == "cuda"
    for shape, members in groups.items():
        host = torch.empty((len(members), *shape), dtype=torch.uint8, pin_memory=pin)
        view = host.numpy()
        for row, i in enumerate(members):
            view[row] = arrays[i]
        moved = host.to(device, non_blocking=pin)
        for row, i in enumerate(members):
            out[i] = moved[row:row + 1]
    return out


class DeviceTransform:
    """open_clip's eval preprocess (resize shortest side or to a fixed size, centre crop, to RGB, to
    tensor, normalise) as torch ops on uint8 pixels on any device.

    The resize is antialiased bicubic (or bilinear) as PIL's, in PIL's two passes (horizontal, then
    vertical), each rounded back to whole pixel levels as PIL's uint8 passes are, so the result
    matches the PIL path to within a pixel level or so (PIL's fixed-point weights differ slightly).
    RGB images only: PIL resizes other modes differently (premultiplied alpha, nearest for palettes).
    """

    def __init__(self, resize: tuple[int, ...], interpolation: str, crop: tuple[int, ...], mean, std):
        self.resize = resize  # (short side,) or (height, width)
        self.interpolation = interpolation
        self.crop = crop
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._constants: dict[Any, Any] = {}

    @classmethod
    def from_preprocess(cls, preprocess) -> "DeviceTransform | None":
        """The transform for an open_clip eval Compose, or None if it is anything else."""
        from torchvision import transforms as T

        steps = list(getattr(preprocess, "transforms", []))
        if len(steps) != 5:
            return None
        resize, crop, convert, to_tensor, normalize = steps
        names = {"bicubic": "bicubic", "bilinear": "bilinear"}
        if not (isinstance(resize, T.Resize) and isinstance(crop, T.CenterCrop)
                and isinstance(to_tensor, T.ToTensor) and isinstance(normalize, T.Normalize)):
            return None
        if getattr(resize, "max_size", None) is not None or resize.interpolation.value not in names:
            return None
        converts = type(convert).__name__ == "MaybeConvertMode" or getattr(convert, "__name__", "") == "_convert_to_rgb"
        if not converts or getattr(convert, "mode", "RGB") != "RGB":
            return None
        size = resize.size
        size = (size,) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(size) not in (1, 2):
            return None
        return cls(size, names[resize.interpolation.value], tuple(int(c) for c in crop.size), normalize.mean,
                   normalize.std)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """torchvision's Resize output size for a (height, width) image."""
        if len(self.resize) == 2:
            return self.resize
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize[0], int(self.resize[0] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, pixels: list):
        """A list of (1, H, W, 3) uint8 tensors (sizes may differ) -> a normalised float32 batch."""
        import torch
        import torch.nn.functional as F

        groups: dict[tuple, list[int]] = {}
        for i, tensor in enumerate(pixels):
            groups.setdefault(tuple(tensor.shape[1:3]), []).append(i)
        out: list[Any] = [None] * len(pixels)
        for (height, width), members in groups.items():
            x = torch.cat([pixels[i] for i in members]).permute(0, 3, 1, 2).float()
            size = self.output_size(height, width)
            # PIL resamples in two passes, horizontal first, each rounded to uint8: so do we.
            for step in ((height, size[1]), size):
                if step != tuple(x.shape[-2:]):
                    x = F.interpolate(x, size=step, mode=self.interpolation, align_corners=False, antialias=True)
                    x = x.round_().clamp_(0, 255)
            x = self._center_crop(x)
            scale, shift = self._affine(x.device)
            x = x * scale - shift
            if len(members) == len(pixels):  # one size: already in order
                return x
            for row, i in enumerate(members):
                out[i] = x[row]
        return torch.stack(out)

    def _center_crop(self, x):
        import torch.nn.functional as F

        crop_h, crop_w = self.crop
        height, width = x.shape[-2:]
        if crop_w > width or crop_h > height:
            pad_w, pad_h = max(0, crop_w - width), max(0, crop_h - height)
            x = F.pad(x, [pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2])
            height, width = x.shape[-2:]
        top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
        return x[:, :, top:top + crop_h, left:left + crop_w]

    def _affine(self, device):
        """(pixel / 255 - mean) / std as pixel * scale - shift, per channel."""
        import torch

        if device not in self._constants:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
            self._constants[device] = ((1.0 / (255.0 * std)).to(device), (mean / std).to(device))
        return self._constants[device]


def _checkpoint_format(path: Path) -> bool:
    """The file starts as a PyTorch zip, a pickle or a safetensors file does (nothing else loads)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as exc:
        raise UserError(f"cannot read CLIP checkpoint {path}: {exc.strerror or type(exc).__name__}") from None
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or (len(head) == 9 and head[8:9] == b"{")


def _unreadable(exc: BaseException) -> bool:
    """The checkpoint file itself cannot be read (not a state dict), as opposed to one of another model."""
    text = str(exc)
    return (isinstance(exc, (OSError, EOFError)) or "weights_only" in text or "unpickl" in text.lower()
            or "safetensors" in type(exc).__module__ or "invalid load key" in text or "zip archive" in text)


def _short(exc: BaseException, limit: int = 120) -> str:
    text = first_line(exc).rstrip(":! ")
    if "state_dict" in text:
        text = "its tensors have other shapes or names"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_reason(exc: BaseException) -> str:
    """A checkpoint error in one line, without PyTorch's advice to disable safe loading."""
    text = first_line(exc)
    if "weights_only" in str(exc) or "unpickl" in text.lower():
        return "not a readable checkpoint (expected a PyTorch state dict or safetensors file)"
    return text
