"""OpenAI images API, and every server that copies it (Azure's `?api-version=` query kept).

Request: `POST {base}/v1/images/generations` (a base ending in `/v1`, or the endpoint itself, is
used as given) with `Authorization: Bearer KEY` and JSON `{"model", "prompt", "n": 1,
"response_format": "b64_json", "size"?, **extra}`. Answer: `{"data": [{"b64_json": ...}]}` or
`{"data": [{"url": ...}]}` (fetched without the key, hosts checked).
"""
from __future__ import annotations

from engine.providers import ImageProtocol, base_url, first_text


def endpoint_url(url: str) -> str:
    """The generations endpoint for a base URL (scheme and host lower-cased, no trailing slash)."""
    base, query = base_url(url)
    if base.endswith("/images/generations"):  # the endpoint itself was given
        return base + query
    return base + ("/images/generations" if base.endswith("/v1") else "/v1/images/generations") + query


class OpenAIImages(ImageProtocol):
    name = "openai"
    reserved = frozenset({"prompt", "n"})  # one image per request is what `calls`, budget and order rely on

    def endpoint(self, url: str, model: str) -> str:
        return endpoint_url(url)

    def generate(self, call, prompt: str, seed: int) -> bytes:
        body = {"model": call.params.model, "prompt": prompt, "n": 1, "response_format": "b64_json"}
        if call.params.size:
            body["size"] = call.params.size
        body.update(call.extra(seed))
        answer = call.json(call.submit(json=body))
        try:
            item = answer["data"][0]
            b64, url = item.get("b64_json"), item.get("url")
        except (KeyError, IndexError, TypeError, AttributeError):
            error = answer.get("error") if isinstance(answer, dict) else None  # a 200 carrying an error (proxies)
            said = first_text(error.get("message") if isinstance(error, dict) else error)
            raise call.fail(f"the API answered an error: {said}" if said else "malformed answer: no data[0]") from None
        if isinstance(b64, str):
            return call.b64(b64, "b64_json")
        if isinstance(url, str):
            return call.fetch(url)
        raise call.fail("malformed answer: data[0] has neither b64_json nor url")


PROTOCOLS = (OpenAIImages(),)
