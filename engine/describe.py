"""Describers: where a query's text description comes from.

Order of preference for each query: the prompt the caller gave, a description stored for an
image with the same bytes, then a captioning model loaded from a local folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from PIL import Image

from engine.errors import UserError, first_line
from engine.paths import expand_path
from index.keys import normalise_description

# transformers model_type -> class that generates text from pixels
_CAPTIONERS = {
    "blip": "BlipForConditionalGeneration",
    "git": "GitForCausalLM",
    "vision-encoder-decoder": "VisionEncoderDecoderModel",
}


def clean_prompt(text: str | None) -> str | None:
    """A caller's prompt, normalised; an empty one is a mistake, not "no prompt"."""
    if text is None:
        return None
    normal = normalise_description(text)
    if not normal:
        raise UserError("empty prompt: give a description with words in it, or leave the prompt out",
                        code="empty_prompt")  # the same code and words from the CLI, Python and HTTP
    return normal


class Describer(Protocol):
    """What the request asks of a captioner: its folder, and a description per image."""

    folder: Path

    def caption(self, images: list[Image.Image]) -> list[str]: ...


def make_captioner(folder: str | Path, device: str | None = None, instruction: str | None = None) -> Describer:
    """The captioner a folder holds: BLIP, GIT or VisionEncoderDecoder as an image-to-text model, else
    any image-text-to-text (vision-language) model asked for a description. A vision-language model's
    instruction: $RESYNTH_CAPTION_INSTRUCTION when set (a per-run override), else `instruction` (the
    store's, from `init --caption-instruction`), else engine.captioners.DEFAULT_INSTRUCTION; a classic
    captioner takes none, and refuses one given explicitly."""
    import os

    from engine.captioners import DEFAULT_INSTRUCTION, VisionLanguageCaptioner, is_vision_language

    path = expand_path(folder)
    config = path / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (ValueError, OSError, AttributeError):
        model_type = None
    if model_type not in _CAPTIONERS and is_vision_language(path):
        chosen = os.environ.get("RESYNTH_CAPTION_INSTRUCTION") or instruction or DEFAULT_INSTRUCTION
        return VisionLanguageCaptioner(path, device, instruction=chosen)
    if instruction:
        raise UserError(f"--caption-instruction applies to vision-language captioners; {path} holds a "
                        f"{model_type or 'non-captioner'} model, which takes no instruction")
    return Captioner(path, device)


class Captioner:
    """An image-to-text model (BLIP, GIT or VisionEncoderDecoder) from a local folder, loaded lazily."""

    def __init__(self, folder: Path, device: str | None = None, max_new_tokens: int = 40):
        from engine.embed import default_device

        self.folder = expand_path(folder)
        self.device = device or default_device()
        self.max_new_tokens = max_new_tokens
        config_file = self.folder / "config.json"
        if not config_file.is_file():
            raise UserError(f"captioner folder not found or has no config.json: {self.folder}")
        try:
            self.model_type = json.loads(config_file.read_text())["model_type"]
        except (ValueError, KeyError):
            raise UserError(f"malformed captioner config: {config_file}") from None
        if self.model_type not in _CAPTIONERS:
            raise UserError(f"captioner type {self.model_type!r} is not supported (supported: "
                            f"{', '.join(sorted(_CAPTIONERS))}, or an image-text-to-text model such as LLaVA)")
        self._model = None
        self.calls = 0

    def _load(self):
        if self._model is None:
            import transformers

            transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar, even for progress=False
            try:
                model_class = getattr(transformers, _CAPTIONERS[self.model_type])
                self._model = model_class.from_pretrained(self.folder, local_files_only=True).to(self.device).eval()
                if self.model_type == "vision-encoder-decoder":
                    self._images = transformers.AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
                    self._tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
                else:
                    processor = transformers.AutoProcessor.from_pretrained(self.folder, local_files_only=True)
                    self._images, self._tokenizer = processor.image_processor, processor.tokenizer
            except Exception as exc:
                raise UserError(f"cannot load captioner {self.folder}: {first_line(exc)}") from None
        return self._model

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        with torch.inference_mode():
            return self._caption(images)

    def _caption(self, images: list[Image.Image]) -> list[str]:
        model = self._load()
        pixels = self._images(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        tokens = model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, do_sample=False)
        self.calls += len(images)
        texts = self._tokenizer.batch_decode(tokens, skip_special_tokens=True)
        # A caption that decodes to nothing still has to be a usable description.
        return [normalise_description(t) or "an image" for t in texts]
