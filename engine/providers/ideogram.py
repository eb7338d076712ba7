"""Ideogram's API (api.ideogram.ai), header `Api-Key: KEY`; one synchronous request per image.

The model picks the documented route:

- `ideogram-v3` (or `V_3`): `POST {base}/v1/ideogram-v3/generate` as a multipart form (`prompt`,
  `num_images=1`, `resolution` "WxH"? from the source's size, then `extra`'s fields such as
  `rendering_speed`, `seed`);
- a legacy model `V_1`, `V_1_TURBO`, `V_2`, `V_2_TURBO`, `V_2A`, `V_2A_TURBO`: `POST {base}/generate`
  with JSON `{"image_request": {"prompt", "model", "num_images": 1, "resolution"?: "RESOLUTION_W_H",
  **extra}}`;
- any other name (the current API, e.g. `ideogram-4-5`): `POST {base}/v2/image/generate/{model}` with
  JSON `{"prompt", "num_images": 1, "resolution"?: "WxH", **extra}`.

Every route answers `{"data": [{"url", "seed", "prompt", "resolution", "is_image_safe"}]}`; the image
is fetched from `url` without the key. An item with `is_image_safe: false` (Ideogram then sends no
URL) is the source's one-line refusal, as is a 4xx answer (a prompt that fails the safety check).
"""
from __future__ import annotations

import json
import re

from engine.errors import UserError
from engine.providers import ImageProtocol, base_url, first_text, join_versioned, size_of
from engine.providers.stability import multipart

_LEGACY = re.compile(r"^V_[12][A-Z0-9_]*$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
V3 = ("ideogram-v3", "V_3")


class Ideogram(ImageProtocol):
    name = "ideogram"
    reserved = frozenset({"prompt", "num_images", "image_request"})

    def auth(self, key: str | None) -> dict[str, str]:
        return {"Api-Key": key} if key else {}

    def validate(self, params) -> None:
        if not _MODEL.match(params.model):
            raise UserError(f"an ideogram model is a name such as ideogram-v3, ideogram-4-5 or V_2, "
                            f"not {params.model!r}")

    def endpoint(self, url: str, model: str) -> str:
        if model in V3:
            return join_versioned(url, "v1", "ideogram-v3/generate")
        if _LEGACY.match(model):
            base, query = base_url(url)
            return f"{base}/generate{query}"
        return join_versioned(url, "v2", f"image/generate/{model}")

    def generate(self, call, prompt: str, seed: int) -> bytes:
        model = call.params.model
        dims = size_of(call.params.size)
        if model in V3:
            fields = {"prompt": prompt, "num_images": "1"}
            if dims:
                fields["resolution"] = f"{dims[0]}x{dims[1]}"
            for name, value in call.extra(seed).items():
                fields[name] = value if isinstance(value, str) else json.dumps(value)
            body, content_type = multipart(fields)
            reply = call.submit(content=body, headers={"Content-Type": content_type})
        else:
            request: dict = {"prompt": prompt, "num_images": 1}
            if _LEGACY.match(model):
                request["model"] = model
                if dims:
                    request["resolution"] = f"RESOLUTION_{dims[0]}_{dims[1]}"
            elif dims:
                request["resolution"] = f"{dims[0]}x{dims[1]}"
            request.update(call.extra(seed))
            reply = call.submit(json={"image_request": request} if _LEGACY.match(model) else request)
        answer = call.json(reply)
        data = answer.get("data") if isinstance(answer, dict) else None
        item = data[0] if isinstance(data, list) and data else None
        if not isinstance(item, dict):
            raise call.fail("malformed answer: no data[0]")
        if item.get("is_image_safe") is False:
            raise call.refused("is_image_safe is false: the provider's safety check withheld the image")
        url = item.get("url")
        if not isinstance(url, str):
            detail = first_text(answer.get("detail") if isinstance(answer, dict) else None)
            raise call.fail(f"malformed answer: data[0] has no url{': ' + detail if detail else ''}")
        return call.fetch(url)


PROTOCOLS = (Ideogram(),)
