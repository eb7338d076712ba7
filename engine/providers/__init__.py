"""Provider protocols of API sources: how one image is asked for and read back, per service.

An API source (`engine.api_source.ApiGenerator`) owns everything that does not depend on the service:
the key (read from the environment at run time, never stored), the total deadline of every network
call (`engine.api_http`), retries with backoff on 429/5xx honouring Retry-After, the shared rate and
concurrency limit, the budget, size caps, the private-address checks on URLs the server hands out,
image decoding and the one-line errors. A protocol only says:

- `endpoint(url, model)`: the submission URL for the provider's base URL and model name;
- `auth(key)`: the header that carries the key;
- `settings`: the optional `ApiParams` fields it reads (`client_id_env`, `token_url`: refused elsewhere);
- `reserved_for(model)`: request fields `extra` may not set (the prompt, the image count);
- `validate(params)`: protocol-specific checks of the parameters (model form, size), as `UserError`;
- `generate(call, prompt, seed)`: the image file's bytes, using the `Call` it is given to submit,
  poll and fetch, and raising `call.refused(...)`/`call.fail(...)` for the service's refusals;
- for a service that bills a task before it is ready (submit, then poll): `resumable = True`,
  `call.accepted(state)` right after the submission is accepted (a small JSON dict, never a secret:
  its strings are the URLs to poll, checked as status URLs), and `resume(call, state)`, which finishes
  such a task from its state in a later run (`engine.api_tasks`: a task is paid for once) and raises
  `call.gone(...)` for a state it cannot use.

Protocols (the `protocol` parameter of an API source; `openai` is the default):

| name (module)     | request                                               | answer                               |
|-------------------|-------------------------------------------------------|--------------------------------------|
| `openai`          | `POST /v1/images/generations`, Bearer                 | `data[0].b64_json` or `.url`         |
| `bfl`             | `POST /v1/{model}`, `x-key`; poll `polling_url`       | `Ready` -> `result.sample` URL       |
| `replicate`       | `POST /v1/models/{owner}/{name}/predictions`, Bearer  | `succeeded` -> `output` URL(s)       |
| `stability`       | multipart `POST /v2beta/stable-image/generate/{m}`    | image bytes (`Accept: image/*`)      |
| `imagen` (google) | `POST /v1beta/models/{model}:predict`, x-goog-api-key | `predictions[0].bytesBase64Encoded`  |
| `gemini` (google) | `POST /v1beta/models/{model}:generateContent`         | `candidates[0]...parts[].inlineData` |
| `google`          | `gemini` for a model named gemini-*, else `imagen`    |                                      |
| `fal`             | `POST /{model}` (queue.fal.run), `Key`; poll status   | `COMPLETED` -> `images[0].url`       |
| `ideogram`        | `POST /v1/ideogram-v3/generate` (multipart), ...      | `data[0].url`                        |
| `firefly` (Adobe) | OAuth token, then `POST /v3/images/generate-async`    | `succeeded` -> `outputs[0].image.url`|

The registry maps names to protocol objects; adding a protocol is one module and one line in
`_MODULES` below. Nothing outside this package branches on protocol names.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from math import gcd
from typing import Any, Callable, Mapping, Protocol as _Typing
from urllib.parse import urlsplit

from engine.errors import SourceError, UserError

DEFAULT = "openai"
# each defines PROTOCOLS: a tuple of objects
_MODULES = ("openai", "bfl", "replicate", "stability", "google", "fal", "ideogram", "firefly")


@dataclass(frozen=True)
class Reply:
    """An HTTP answer read whole (within the size cap and the deadline)."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return (self.headers.get("content-type") or "").split(";")[0].strip().lower()


class Call(_Typing):
    """What a protocol may do for one image (implemented by `engine.api_exchange._Call`)."""

    name: str       # the source's name, for messages
    params: Any     # the source's `ApiParams`
    endpoint: str   # this protocol's submission URL
    key: str | None

    def extra(self, seed: int) -> dict:
        """The source's `extra` fields, with "{seed}" values replaced by the slot's seed."""

    def submit(self, *, json: Any = None, content: bytes | None = None,
               headers: Mapping[str, str] | None = None) -> Reply:
        """POST to the endpoint with the key: paced by the rate limit, retried on 429/5xx/connection loss,
        each attempt under the total deadline; a 2xx `Reply`, or a one-line SourceError."""

    def json(self, reply: Reply) -> Any:
        """The reply's JSON, or 'malformed answer: not JSON'."""

    def poll(self, url: str, check: Callable[[Any], Any], headers: Mapping[str, str] | None = None) -> Any:
        """GET `url` (the key, and `headers`, sent only to the endpoint's own site) until `check(answer)`
        returns something other than None, backing off between polls; the whole loop under one total
        deadline."""

    def accepted(self, state: Mapping[str, Any]) -> None:
        """The submission was accepted (and billed): record `state` (JSON, no secret) durably, so a later run
        resumes the task with `resume(call, state)` rather than buying it again."""

    def post_form(self, url: str, fields: Mapping[str, str], what: str) -> Reply:
        """POST a urlencoded form to a URL the source was configured with (an OAuth token endpoint),
        without the key's header: retried like a submission but not paced by the rate; `what`
        prefixes its messages."""

    def fetch(self, url: str) -> bytes:
        """An image URL's bytes (no key; redirects re-checked; private addresses refused) or a data: URI's."""

    def b64(self, text: Any, what: str) -> bytes:
        """Base64 text decoded, or 'malformed answer: {what} is not base64'."""

    def fail(self, message: str) -> SourceError:
        """This source's one-line failure (to raise)."""

    def refused(self, reason: str) -> SourceError:
        """'the API refused the request: {reason}' (moderation, a failed prediction)."""

    def gone(self, reason: str) -> SourceError:
        """The task is no longer to be had (an unusable recorded state): a resumed task is bought again."""


class ImageProtocol:
    """Base of the protocols: defaults for what most of them share."""

    name = ""
    reserved: frozenset[str] = frozenset({"prompt"})
    settings: frozenset[str] = frozenset()  # optional ApiParams fields it reads (client_id_env, token_url)
    resumable = False  # submit-then-poll: `generate` records its task (`call.accepted`), `resume` finishes it

    def auth(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def reserved_for(self, model: str) -> frozenset[str]:
        return self.reserved

    def endpoint(self, url: str, model: str) -> str:
        raise NotImplementedError

    def validate(self, params: Any) -> None:
        pass

    def generate(self, call: Call, prompt: str, seed: int) -> bytes:
        raise NotImplementedError

    def resume(self, call: Call, state: dict) -> bytes:
        """The image of a task an earlier run submitted, from the state it recorded (`resumable` only)."""
        raise call.gone("this protocol keeps no task to resume")


def names() -> list[str]:
    return sorted(_registry())


def get(name: Any) -> ImageProtocol:
    """The protocol called `name`, or a one-line UserError listing the known ones."""
    protocol = _registry().get(name) if isinstance(name, str) else None
    if protocol is None:
        raise UserError(f"unknown API protocol {name!r}: use one of {', '.join(names())}")
    return protocol


_REGISTRY: dict[str, ImageProtocol] = {}


def _registry() -> dict[str, ImageProtocol]:
    if not _REGISTRY:
        found: dict[str, ImageProtocol] = {}
        for module in _MODULES:
            for protocol in importlib.import_module(f"{__name__}.{module}").PROTOCOLS:
                assert protocol.name and protocol.name not in found, protocol.name
                found[protocol.name] = protocol
        _REGISTRY.update(found)
    return _REGISTRY


# -- helpers the protocol modules share ---------------------------------------------------------------

def base_url(url: str) -> tuple[str, str]:
    """(scheme://host[:port]/path without a trailing slash, '?query' or ''), scheme and host lower-cased."""
    parts = urlsplit(url.strip())
    base = f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path}".rstrip("/")
    return base, (f"?{parts.query}" if parts.query else "")


def join_versioned(url: str, version: str, rest: str) -> str:
    """`{base}/{version}/{rest}`, without doubling a version the base URL already ends with."""
    base, query = base_url(url)
    if re.search(r"/v\d+(alpha|beta)?\d*$", base):
        return f"{base}/{rest}{query}"
    return f"{base}/{version}/{rest}{query}"


def size_of(size: str | None) -> tuple[int, int] | None:
    if not size:
        return None
    width, height = size.split("x")
    return int(width), int(height)


def aspect_ratio(size: str | None, allowed: tuple[str, ...], protocol: str) -> str | None:
    """'W:H' in lowest terms for a size 'WxH', which must be one of `allowed` (UserError otherwise)."""
    dims = size_of(size)
    if dims is None:
        return None
    divisor = gcd(*dims)
    ratio = f"{dims[0] // divisor}:{dims[1] // divisor}"
    if ratio not in allowed:
        raise UserError(f"the {protocol} protocol takes an aspect ratio, and {size} is {ratio}: use a size of "
                        f"ratio {', '.join(allowed)}")
    return ratio


def first_text(value: Any, limit: int = 200) -> str:
    """A server-provided string cut to one short line (empty for anything else)."""
    if not isinstance(value, str):
        return ""
    lines = value.strip().splitlines()
    return lines[0][:limit] if lines else ""
