"""Stability AI's Stable Image API (api.stability.ai).

Request: `POST {base}/v2beta/stable-image/generate/{core|ultra|sd3}` as a multipart form (fields
`prompt`, `output_format=png`, `aspect_ratio`? from the source's size, `model` for an sd3 variant such
as `sd3.5-large`, then `extra`'s fields, e.g. `{"seed": "{seed}"}`), `Authorization: Bearer KEY` and
`Accept: image/*`. Answer: the image bytes, with a `finish-reason` header; `CONTENT_FILTERED` (the
service blurs what it refuses) ends in the source's one-line failure. A JSON answer (`image` in
base64, `finish_reason`) is read too.
"""
from __future__ import annotations

import json
import secrets

from engine.providers import ImageProtocol, aspect_ratio, join_versioned

RATIOS = ("16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")
FILTERED = {"CONTENT_FILTERED", "FILTERED"}


def _route(model: str) -> tuple[str, str | None]:
    """(path segment, `model` form field): sd3 variants share the sd3 route."""
    if model.startswith("sd3") and model != "sd3":
        return "sd3", model
    return model, None


def multipart(fields: dict[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body of text fields, and its Content-Type."""
    boundary = "resynth-" + secrets.token_hex(12)
    parts = []
    for name, value in fields.items():
        safe = name.replace('"', "%22").replace("\r", "").replace("\n", "")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{safe}"\r\n\r\n'.encode()
                     + value.encode() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Stability(ImageProtocol):
    name = "stability"
    reserved = frozenset({"prompt", "output_format"})  # the answer must be a PNG/JPEG/WebP image we read

    def validate(self, params) -> None:
        aspect_ratio(params.size, RATIOS, self.name)

    def endpoint(self, url: str, model: str) -> str:
        return join_versioned(url, "v2beta", f"stable-image/generate/{_route(model)[0]}")

    def generate(self, call, prompt: str, seed: int) -> bytes:
        fields = {"prompt": prompt, "output_format": "png"}
        ratio = aspect_ratio(call.params.size, RATIOS, self.name)
        if ratio:
            fields["aspect_ratio"] = ratio
        variant = _route(call.params.model)[1]
        if variant:
            fields["model"] = variant
        for name, value in call.extra(seed).items():
            fields[name] = value if isinstance(value, str) else json.dumps(value)
        body, content_type = multipart(fields)
        reply = call.submit(content=body, headers={"Content-Type": content_type, "Accept": "image/*"})
        finish = (reply.headers.get("finish-reason") or "").upper()
        if reply.content_type == "application/json":
            answer = call.json(reply)
            if not isinstance(answer, dict):
                raise call.fail("malformed answer: not a JSON object")
            finish = str(answer.get("finish_reason") or finish).upper()
            if finish in FILTERED:
                raise call.refused(f"finish reason {finish}")
            return call.b64(answer.get("image"), "image")
        if finish in FILTERED:
            raise call.refused(f"finish reason {finish}")
        if not reply.content_type.startswith("image/"):
            raise call.fail(f"malformed answer: {reply.content_type or 'no content type'}, not an image")
        return reply.body


PROTOCOLS = (Stability(),)
