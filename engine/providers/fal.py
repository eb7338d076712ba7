"""fal.ai's queue API (queue.fal.run): submit, poll the status, then read the result.

Request: `POST {base}/{model}` (for example `fal-ai/flux/dev`, `fal-ai/flux-pro/v1.1`) with header
`Authorization: Key KEY` and the model's JSON input `{"prompt", "image_size"?: {"width", "height"},
"num_images": 1, **extra}` (a seed only when `extra` asks for it with `{"seed": "{seed}"}`). Answer:
`{"request_id", "status_url", "response_url"}`. The `status_url` (on the endpoint's own host: the key
goes with it) is polled while `status` is `IN_QUEUE` or `IN_PROGRESS`; at `COMPLETED` the
`response_url` is read once, and the image is `images[0].url`, fetched without the key (a `data:` URI
when the model was asked for `sync_mode`). A completed request with an `error`, or a result whose
`has_nsfw_concepts[0]` is true (fal then sends a black image), is the source's one-line refusal. An
answer without URLs is polled at `{base}/{owner}/{app}/requests/{id}/status` (fal drops a model's
sub-path, such as `/dev`, from its queue URLs). Both URLs are recorded once the request is accepted, so
a later run resumes it (`resume`) rather than pays again.
"""
from __future__ import annotations

import re

from engine.errors import UserError
from engine.providers import ImageProtocol, base_url, first_text, size_of

_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)+$")
WAITING = {"IN_QUEUE", "IN_PROGRESS"}


class Fal(ImageProtocol):
    name = "fal"
    resumable = True
    reserved = frozenset({"prompt", "num_images"})  # one image per request: calls, budget and order rely on it

    def auth(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Key {key}"} if key else {}

    def validate(self, params) -> None:
        if not _MODEL.match(params.model):
            raise UserError(f"a fal model is an endpoint id such as fal-ai/flux/dev, not {params.model!r}")

    def endpoint(self, url: str, model: str) -> str:
        base, query = base_url(url)
        return f"{base}/{model.strip('/')}{query}"

    def generate(self, call, prompt: str, seed: int) -> bytes:
        body: dict = {"prompt": prompt, "num_images": 1}
        dims = size_of(call.params.size)
        if dims:
            body["image_size"] = {"width": dims[0], "height": dims[1]}
        body.update(call.extra(seed))
        answer = call.json(call.submit(json=body))
        if not isinstance(answer, dict):
            raise call.fail("malformed answer: not a JSON object")
        status_url, response_url = answer.get("status_url"), answer.get("response_url")
        if not isinstance(status_url, str) or not isinstance(response_url, str):
            request = answer.get("request_id")
            if not isinstance(request, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", request):
                raise call.fail("malformed answer: neither status_url nor request_id")
            app = "/".join(call.params.model.strip("/").split("/")[:2])
            base = base_url(call.endpoint)[0].removesuffix("/" + call.params.model.strip("/"))
            response_url = f"{base}/{app}/requests/{request}"
            status_url = f"{response_url}/status"

        call.accepted({"status": status_url, "response": response_url})
        return self._finish(call, status_url, response_url)

    def resume(self, call, state: dict) -> bytes:
        status_url, response_url = state.get("status"), state.get("response")
        if not isinstance(status_url, str) or not isinstance(response_url, str):
            raise call.gone("the recorded request has no status or response URL")
        return self._finish(call, status_url, response_url)

    def _finish(self, call, status_url: str, response_url: str) -> bytes:
        def waited(status):
            if not isinstance(status, dict):
                raise call.fail("malformed status answer: not a JSON object")
            state = status.get("status")
            if state == "COMPLETED":
                error = first_text(status.get("error"))
                if error:
                    raise call.refused(f"request failed: {error}")
                return True
            if state in WAITING or not isinstance(state, str):
                return None
            raise call.refused(f"request {first_text(state, 40)}")

        call.poll(status_url, waited)
        return call.fetch(call.poll(response_url, lambda result: self._image_url(call, result)))

    @staticmethod
    def _image_url(call, result) -> str:
        if not isinstance(result, dict):
            raise call.fail("malformed result: not a JSON object")
        flagged = result.get("has_nsfw_concepts")
        if isinstance(flagged, list) and flagged and flagged[0] is True:
            raise call.refused("has_nsfw_concepts: the provider's safety checker flagged the image")
        images = result.get("images")
        first = images[0] if isinstance(images, list) and images else None
        url = first.get("url") if isinstance(first, dict) else None
        if not isinstance(url, str):
            detail = first_text(result.get("detail"))
            raise call.fail(f"malformed result: no images[0].url{': ' + detail if detail else ''}")
        return url


PROTOCOLS = (Fal(),)
