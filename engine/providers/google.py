"""Google's image models through the Gemini API (generativelanguage.googleapis.com), key in
`x-goog-api-key`.

- `imagen`: `POST {base}/v1beta/models/{model}:predict` with `{"instances": [{"prompt"}],
  "parameters": {"sampleCount": 1, "aspectRatio"?, **extra}}`; the image is
  `predictions[0].bytesBase64Encoded`. No prediction (or one with `raiFilteredReason`) is a refusal.
- `gemini`: `POST {base}/v1beta/models/{model}:generateContent` with `{"contents": [{"parts":
  [{"text": prompt}]}], "generationConfig": {"responseModalities": ["TEXT", "IMAGE"],
  "imageConfig"?: {"aspectRatio"}, **extra}}`; the image is the first `inlineData` part of
  `candidates[0].content.parts`. A `promptFeedback.blockReason` or a candidate that ends without an
  image (`finishReason` other than STOP, e.g. IMAGE_SAFETY) is a refusal.
- `google`: `gemini` for a model whose name starts with `gemini`, else `imagen`.

The size becomes an aspect ratio (1:1, 3:4, 4:3, 9:16, 16:9 for Imagen; Gemini takes a few more).
Vertex AI's endpoints (OAuth tokens, not API keys) are not covered.
"""
from __future__ import annotations

from engine.providers import ImageProtocol, aspect_ratio, first_text, join_versioned

IMAGEN_RATIOS = ("1:1", "3:4", "4:3", "9:16", "16:9")
GEMINI_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")


class _Google(ImageProtocol):
    method = ""
    ratios: tuple[str, ...] = ()

    def auth(self, key: str | None) -> dict[str, str]:
        return {"x-goog-api-key": key} if key else {}

    def validate(self, params) -> None:
        aspect_ratio(params.size, self.ratios, self.name)

    def endpoint(self, url: str, model: str) -> str:
        model = model.removeprefix("models/")
        return join_versioned(url, "v1beta", f"models/{model}:{self.method}")


class Imagen(_Google):
    name = "imagen"
    method = "predict"
    ratios = IMAGEN_RATIOS
    reserved = frozenset({"prompt", "sampleCount"})

    def generate(self, call, prompt: str, seed: int) -> bytes:
        parameters: dict = {"sampleCount": 1}
        ratio = aspect_ratio(call.params.size, self.ratios, self.name)
        if ratio:
            parameters["aspectRatio"] = ratio
        parameters.update(call.extra(seed))
        answer = call.json(call.submit(json={"instances": [{"prompt": prompt}], "parameters": parameters}))
        if not isinstance(answer, dict):
            raise call.fail("malformed answer: not a JSON object")
        predictions = answer.get("predictions")
        if predictions is not None and not isinstance(predictions, list):
            raise call.fail("malformed answer: predictions is not a list")
        for item in predictions or []:
            if isinstance(item, dict) and isinstance(item.get("bytesBase64Encoded"), str):
                return call.b64(item["bytesBase64Encoded"], "bytesBase64Encoded")
        reason = next((first_text(item.get("raiFilteredReason")) for item in predictions or []
                       if isinstance(item, dict) and item.get("raiFilteredReason")), "")
        raise call.refused(reason or "no image in the answer (filtered by the provider's safety system?)")


class Gemini(_Google):
    name = "gemini"
    method = "generateContent"
    ratios = GEMINI_RATIOS
    reserved = frozenset({"responseModalities", "candidateCount"})

    def generate(self, call, prompt: str, seed: int) -> bytes:
        config: dict = {"responseModalities": ["TEXT", "IMAGE"]}
        ratio = aspect_ratio(call.params.size, self.ratios, self.name)
        if ratio:
            config["imageConfig"] = {"aspectRatio": ratio}
        config.update(call.extra(seed))
        answer = call.json(call.submit(json={"contents": [{"parts": [{"text": prompt}]}],
                                             "generationConfig": config}))
        if not isinstance(answer, dict):
            raise call.fail("malformed answer: not a JSON object")
        feedback = answer.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            raise call.refused(f"prompt blocked: {first_text(str(feedback['blockReason']))}")
        candidates = answer.get("candidates")
        candidate = candidates[0] if isinstance(candidates, list) and candidates else None
        if not isinstance(candidate, dict):
            raise call.fail("malformed answer: no candidates[0]")
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        text = ""
        for part in parts if isinstance(parts, list) else []:
            if not isinstance(part, dict):
                continue
            inline = part.get("inlineData") or part.get("inline_data")
            if isinstance(inline, dict) and isinstance(inline.get("data"), str):
                return call.b64(inline["data"], "inlineData")
            text = text or first_text(part.get("text"))
        finish = candidate.get("finishReason")
        if isinstance(finish, str) and finish != "STOP":
            raise call.refused(f"finish reason {first_text(finish)}{': ' + text if text else ''}")
        raise call.refused(f"no image in the answer{': ' + text if text else ''}")


class GoogleAuto(ImageProtocol):
    """`gemini` for gemini-* models, else `imagen`."""

    name = "google"

    def __init__(self) -> None:
        self.imagen, self.gemini = Imagen(), Gemini()

    def pick(self, model: str) -> _Google:
        return self.gemini if model.removeprefix("models/").startswith("gemini") else self.imagen

    def auth(self, key: str | None) -> dict[str, str]:
        return self.imagen.auth(key)

    def validate(self, params) -> None:
        self.pick(params.model).validate(params)

    def reserved_for(self, model: str) -> frozenset[str]:
        return self.pick(model).reserved

    def endpoint(self, url: str, model: str) -> str:
        return self.pick(model).endpoint(url, model)

    def generate(self, call, prompt: str, seed: int) -> bytes:
        return self.pick(call.params.model).generate(call, prompt, seed)


PROTOCOLS = (Imagen(), Gemini(), GoogleAuto())
