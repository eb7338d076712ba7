"""Replicate predictions (api.replicate.com).

Request: `POST {base}/v1/models/{owner}/{name}/predictions` for a model `owner/name` (its latest
version), or `POST {base}/v1/predictions` with `"version"` for `owner/name:VERSION`, with
`Authorization: Bearer KEY`, `Prefer: wait=N` (the server may answer the finished prediction at once;
N is half the source's timeout, 1 to 60 s) and JSON `{"input": {"prompt", "width"?, "height"?,
**extra}}`. Answer: a prediction; unless it has already `succeeded`, its `urls.get` is polled (with
the key, on the endpoint's own site only) until `status` is `succeeded`; `failed` and `canceled` end in
the source's one-line failure with the prediction's `error`. `output` is a URL or a list of URLs (the
first is taken), or a `data:` URI; URLs are fetched without the key. `urls.get` is recorded once the
prediction is accepted, so a later run resumes it (`resume`) rather than pays again.
"""
from __future__ import annotations

import re

from engine.errors import UserError
from engine.providers import ImageProtocol, first_text, join_versioned, size_of

_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(:[0-9a-f]{8,128})?$")
FAILED = {"failed", "canceled", "aborted"}


class Replicate(ImageProtocol):
    name = "replicate"
    resumable = True

    def validate(self, params) -> None:
        if not _MODEL.match(params.model):
            raise UserError(f"a replicate model is owner/name or owner/name:version, not {params.model!r}")

    def endpoint(self, url: str, model: str) -> str:
        if ":" in model:
            return join_versioned(url, "v1", "predictions")
        return join_versioned(url, "v1", f"models/{model}/predictions")

    def generate(self, call, prompt: str, seed: int) -> bytes:
        inputs: dict = {"prompt": prompt}
        dims = size_of(call.params.size)
        if dims:
            inputs["width"], inputs["height"] = dims
        inputs.update(call.extra(seed))
        body: dict = {"input": inputs}
        if ":" in call.params.model:
            body["version"] = call.params.model.split(":", 1)[1]
        wait = max(1, min(60, int(call.params.timeout // 2)))
        prediction = call.json(call.submit(json=body, headers={"Prefer": f"wait={wait}"}))
        urls = prediction.get("urls") if isinstance(prediction, dict) else None
        poll = urls.get("get") if isinstance(urls, dict) else None
        if isinstance(poll, str):
            call.accepted({"poll": poll})
        output = self._check(call, prediction)
        if output is None:
            if not isinstance(poll, str):
                raise call.fail("malformed answer: a pending prediction without urls.get")
            output = call.poll(poll, lambda answer: self._check(call, answer))
        return call.fetch(output)

    def resume(self, call, state: dict) -> bytes:
        poll = state.get("poll")
        if not isinstance(poll, str):
            raise call.gone("the recorded prediction has no urls.get")
        return call.fetch(call.poll(poll, lambda answer: self._check(call, answer)))

    @staticmethod
    def _check(call, answer):
        if not isinstance(answer, dict):
            raise call.fail("malformed answer: a prediction is a JSON object")
        status = answer.get("status")
        if status == "succeeded":
            output = answer.get("output")
            if isinstance(output, list):
                output = next((item for item in output if isinstance(item, str)), None)
            if not isinstance(output, str):
                raise call.fail("malformed answer: a succeeded prediction without an output URL")
            return output
        if status in FAILED:
            error = first_text(answer.get("error"))
            raise call.refused(f"prediction {status}{': ' + error if error else ''}")
        return None


PROTOCOLS = (Replicate(),)
