"""Vision-language captioners: any transformers image-text-to-text model folder, with an instruction.

LLaVA, Qwen-VL, Idefics, Gemma 3, SmolVLM ... whatever `AutoModelForImageTextToText` and `AutoProcessor`
load from a local folder (never fetched). The model is asked `instruction` about each image, through the
processor's chat template where it has one, else as "<image token>\\n<instruction>"; only the answer's
new tokens are decoded (greedy, so a caption is deterministic), then normalised like every description.

It offers what `engine.describe.Captioner` offers (`folder`, `device`, `calls`, `caption(images)`), so the
describer can hand a folder to it when its config is not one of the classic captioners (BLIP and GIT
are image-text-to-text types too: describe.py's own handling of them, without an instruction, comes first):

    if model_type not in _CAPTIONERS and is_vision_language(folder):
        return VisionLanguageCaptioner(folder, device, instruction=...)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from engine.errors import UserError, first_line
from index.keys import normalise_description

DEFAULT_INSTRUCTION = ("Describe this image in one sentence, as a prompt for a text-to-image model: "
                       "the subject, its appearance, the setting, the style and the lighting.")


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_vision_language(folder) -> bool:
    """Whether transformers maps this folder's model type to an image-text-to-text model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return _model_type(Path(folder).expanduser()) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


class VisionLanguageCaptioner:
    """A local image-text-to-text model asked to describe each image; loaded lazily."""

    def __init__(self, folder, device: str | None = None, instruction: str = DEFAULT_INSTRUCTION,
                 max_new_tokens: int = 60):
        from engine.embed import default_device

        self.folder = Path(folder).expanduser().resolve()
        self.device = device or default_device()
        self.instruction = " ".join(str(instruction).split())
        if not self.instruction:
            raise UserError("a vision-language captioner needs a non-empty instruction")
        self.max_new_tokens = max_new_tokens
        if not (self.folder / "config.json").is_file():
            raise UserError(f"captioner folder not found or has no config.json: {self.folder}")
        if not is_vision_language(self.folder):
            raise UserError(f"{self.folder}: model type {_model_type(self.folder)!r} is not an image-text-to-text "
                            "model transformers knows")
        self.model_type = _model_type(self.folder)
        self._model = None
        self._processor: Any = None
        self.calls = 0

    def _load(self):
        if self._model is None:
            import transformers

            transformers.utils.logging.disable_progress_bar()
            try:
                self._processor = transformers.AutoProcessor.from_pretrained(self.folder, local_files_only=True)
                model = transformers.AutoModelForImageTextToText.from_pretrained(self.folder, local_files_only=True)
            except Exception as exc:
                raise UserError(f"cannot load captioner {self.folder}: {first_line(exc)}") from None
            self._model = model.to(self.device).eval()
        return self._model

    def prompt(self) -> str:
        """The text given with each image: the chat template's user turn, or the image token and instruction."""
        self._load()
        processor = self._processor
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.instruction}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        token = getattr(processor, "image_token", None) or "<image>"
        return f"{token}\n{self.instruction}"

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        with torch.inference_mode():
            return [self._one(image) for image in images]  # one at a time: no padding side to get wrong

    def _one(self, image: Image.Image) -> str:
        model = self._load()
        inputs = self._processor(images=[image.convert("RGB")], text=[self.prompt()], return_tensors="pt")
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        try:
            tokens = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        except Exception as exc:
            raise UserError(f"captioner {self.folder.name} failed: {first_line(exc)}") from exc
        self.calls += 1
        answer = tokens[0, inputs["input_ids"].shape[1]:]
        text = self._processor.batch_decode(answer[None], skip_special_tokens=True)[0]
        return normalise_description(text) or "an image"


def write_tiny_llava(folder, seed: int = 0) -> Path:
    """A tiny random LLaVA folder (CLIP vision tower + 2-layer Llama, hidden 32) with its processor, built
    from configs as transformers' own tests build it, for tests and demos: nothing is downloaded."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    from engine.zoo import CAPTION_WORDS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>"] + [w for w in CAPTION_WORDS if not w.startswith("[")] + \
        "describe this image in one sentence as prompt for text to model subject its appearance setting style " \
        "and lighting : , . user assistant".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                           unk_token="<unk>", pad_token="<pad>",
                                           additional_special_tokens=["<image>"])
    image_size, patch = 32, 8
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=image_size, patch_size=patch, projection_dim=32)
    text = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=2, eos_token_id=3, pad_token_id=0)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                            vision_feature_select_strategy="default", vision_feature_layer=-1,
                            projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(config).eval()
    processor = tf.LlavaProcessor(
        image_processor=tf.CLIPImageProcessor(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1,  # the vision tower's class token (dropped by "default")
        chat_template="{% for m in messages %}user : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                      "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
                      "{% if add_generation_prompt %}assistant :{% endif %}")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
