"""Black Forest Labs' Flux API (api.bfl.ai): submit, then poll.

Request: `POST {base}/v1/{model}` (for example `flux-pro-1.1`, `flux-dev`, `flux-kontext-pro`) with
header `x-key: KEY` and JSON `{"prompt", "width"?, "height"?, **extra}` (seed only when `extra` asks
for it with `{"seed": "{seed}"}`). Answer: `{"id", "polling_url"}`; the `polling_url` (on a regional
host such as api.us1.bfl.ai: the key is sent there only when it is the endpoint's host or a
subdomain of the endpoint's parent domain) is polled until `status` is `Ready`, then the image is
`result.sample`, a short-lived URL fetched without the key. `Content Moderated`, `Request Moderated`,
`Error`, `Failed` and `Task not found` end in the source's one-line failure; other statuses
(`Pending`, ...) are waited on under the polling deadline. An answer without a `polling_url` is polled
at `{base}/v1/get_result?id=ID`. The polling URL is recorded once the task is accepted, so a later run
resumes it (`resume`) rather than pays again.
"""
from __future__ import annotations

from engine.providers import ImageProtocol, first_text, join_versioned, size_of

FAILED = {"Error", "Failed", "Content Moderated", "Request Moderated", "Task not found"}


class BlackForestLabs(ImageProtocol):
    name = "bfl"
    resumable = True

    def auth(self, key: str | None) -> dict[str, str]:
        return {"x-key": key} if key else {}

    def endpoint(self, url: str, model: str) -> str:
        return join_versioned(url, "v1", model.strip("/"))

    def generate(self, call, prompt: str, seed: int) -> bytes:
        body: dict = {"prompt": prompt}
        dims = size_of(call.params.size)
        if dims:
            body["width"], body["height"] = dims
        body.update(call.extra(seed))
        answer = call.json(call.submit(json=body))
        if not isinstance(answer, dict):
            raise call.fail("malformed answer: not a JSON object")
        polling_url, task = answer.get("polling_url"), answer.get("id")
        if not isinstance(polling_url, str):
            if not isinstance(task, str) or not task:
                raise call.fail("malformed answer: neither polling_url nor id")
            polling_url = call.endpoint.rsplit("/", 1)[0] + f"/get_result?id={task}"
        call.accepted({"poll": polling_url})
        return self._finish(call, polling_url)

    def resume(self, call, state: dict) -> bytes:
        if not isinstance(state.get("poll"), str):
            raise call.gone("the recorded task has no polling URL")
        return self._finish(call, state["poll"])

    def _finish(self, call, polling_url: str) -> bytes:
        def check(result):
            if not isinstance(result, dict):
                raise call.fail("malformed poll answer: not a JSON object")
            status = result.get("status")
            if status == "Ready":
                sample = (result.get("result") or {}).get("sample") if isinstance(result.get("result"), dict) \
                    else None
                if not isinstance(sample, str):
                    raise call.fail("malformed poll answer: Ready without result.sample")
                return sample
            if status in FAILED:
                details = first_text(result.get("details") if isinstance(result.get("details"), str)
                                     else result.get("error"))
                raise call.refused(f"{status}{': ' + details if details else ''}")
            return None

        return call.fetch(call.poll(polling_url, check))


PROTOCOLS = (BlackForestLabs(),)
