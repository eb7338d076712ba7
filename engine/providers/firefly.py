"""Adobe Firefly Services (firefly-api.adobe.io), v3 asynchronous image generation, OAuth server-to-server.

Credentials: the source's `api_key_env` names the variable holding the OAuth *client secret*, and
`client_id_env` the one holding the client id (both read at run time, never stored). An access token
comes from the token endpoint (`token_url`, default Adobe IMS `https://ims-na1.adobelogin.com/ims/
token/v3`): `POST` a form `grant_type=client_credentials, client_id, client_secret, scope`, answer
`{"access_token", "expires_in"}`. The token is kept in this process's memory only (keyed by a hash of
the credentials, dropped a minute before it expires): never stored, logged or shown.

Request: `POST {base}/v3/images/generate-async` with headers `x-api-key: CLIENT_ID`, `Authorization:
Bearer TOKEN`, `x-model-version: MODEL` (e.g. `image4_standard`, `image3`) and JSON `{"prompt",
"numVariations": 1, "size"?: {"width", "height"}, **extra}`; an `extra` `seed` (e.g. `"{seed}"`) is
sent as Firefly's `"seeds": [seed]`. Answer: `{"jobId", "statusUrl"}`; the status URL is polled (with
both headers, on the endpoint's own site only) until `status` is `succeeded`, then the image is
`result.outputs[0].image.url`, a pre-signed URL fetched without credentials. `failed` and `cancelled`
are the source's one-line refusal. A synchronous answer (`outputs` at once) is read too. The status URL
(no credential) is recorded once the job is accepted, so a later run resumes it with a token of its own.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from typing import Callable

from engine.errors import SourceError, UserError
from engine.providers import ImageProtocol, first_text, join_versioned, size_of

TOKEN_URL = "https://ims-na1.adobelogin.com/ims/token/v3"
SCOPE = "openid,AdobeID,session,additional_info,read_organizations,firefly_api,ff_apis"
FAILED = {"failed", "cancelled", "canceled"}
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Firefly(ImageProtocol):
    name = "firefly"
    reserved = frozenset({"prompt", "numVariations", "seeds"})
    settings = frozenset({"client_id_env", "token_url"})
    resumable = True

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[str, float]] = {}  # credentials' hash -> (token, good until)
        self._lock = threading.Lock()
        self._fetching = threading.Lock()  # one token request at a time: concurrent jobs share its answer

    def auth(self, key: str | None) -> dict[str, str]:
        return {}  # the key is the client secret: it goes to the token endpoint only

    def validate(self, params) -> None:
        if not _MODEL.match(params.model):
            raise UserError(f"a firefly model is an x-model-version such as image4_standard, not {params.model!r}")
        if not params.client_id_env:
            raise UserError("the firefly protocol needs --client-id-env VAR (the variable holding the OAuth "
                            "client id) beside --api-key-env (the one holding the client secret)")
        if not params.api_key_env:
            raise UserError("the firefly protocol needs --api-key-env VAR (the variable holding the OAuth "
                            "client secret)")

    def endpoint(self, url: str, model: str) -> str:
        return join_versioned(url, "v3", "images/generate-async")

    def generate(self, call, prompt: str, seed: int) -> bytes:
        return self._authorised(call, lambda credentials: self._generate(call, prompt, seed, credentials))

    def resume(self, call, state: dict) -> bytes:
        status_url = state.get("poll")
        if not isinstance(status_url, str):
            raise call.gone("the recorded job has no statusUrl")
        return self._authorised(call, lambda credentials: call.fetch(
            call.poll(status_url, lambda job: self._check(call, job), headers=credentials)))

    def _authorised(self, call, run: Callable[[dict[str, str]], bytes]) -> bytes:
        """`run(credentials)` with a token for this process (fresh credentials each run: none is recorded)."""
        client_id = (os.environ.get(call.params.client_id_env or "") or "").strip()
        if not client_id or any(ord(c) < 32 or ord(c) == 127 for c in client_id):
            raise call.fail(f"environment variable {call.params.client_id_env} is not set (or holds control "
                            "characters): it must hold the OAuth client id")
        token = self._token(call, client_id)
        try:
            return run({"x-api-key": client_id, "Authorization": f"Bearer {token}"})
        except SourceError as exc:  # a server that echoes the token must not put it in a message
            if "HTTP 401" in str(exc):  # revoked or expired early: the next run asks for a new one
                self._drop(token)
            if token in str(exc):
                raise SourceError(call.name, str(exc).split(": ", 1)[-1].replace(token, "***")) from None
            raise

    def _generate(self, call, prompt: str, seed: int, credentials: dict[str, str]) -> bytes:
        body: dict = {"prompt": prompt, "numVariations": 1}
        dims = size_of(call.params.size)
        if dims:
            body["size"] = {"width": dims[0], "height": dims[1]}
        extra = call.extra(seed)
        if "seed" in extra:
            body["seeds"] = [extra.pop("seed")]
        body.update(extra)
        answer = call.json(call.submit(json=body, headers={**credentials, "x-model-version": call.params.model}))
        status_url = answer.get("statusUrl") if isinstance(answer, dict) else None
        if isinstance(status_url, str):
            call.accepted({"poll": status_url})
        url = self._check(call, answer)
        if url is None:
            if not isinstance(status_url, str):
                raise call.fail("malformed answer: a job without statusUrl")
            url = call.poll(status_url, lambda job: self._check(call, job), headers=credentials)
        return call.fetch(url)

    @staticmethod
    def _check(call, job):
        if not isinstance(job, dict):
            raise call.fail("malformed answer: a job is a JSON object")
        status = job.get("status")
        outputs = (job.get("result") or {}).get("outputs") if isinstance(job.get("result"), dict) \
            else job.get("outputs")
        if status == "succeeded" or (status is None and outputs is not None):
            first = outputs[0] if isinstance(outputs, list) and outputs else None
            image = first.get("image") if isinstance(first, dict) else None
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str):
                raise call.fail("malformed answer: no outputs[0].image.url")
            return url
        if isinstance(status, str) and status.lower() in FAILED:
            reason = first_text(job.get("message")) or _first_error(job.get("errors"))
            raise call.refused(f"job {status}{': ' + reason if reason else ''}")
        return None

    def _token(self, call, client_id: str) -> str:
        """An access token for (token URL, client id, secret), from this process's memory or the endpoint."""
        url = call.params.token_url or TOKEN_URL
        slot = hashlib.sha256("\0".join((url, client_id, call.key or "")).encode()).hexdigest()
        with self._fetching:
            with self._lock:
                token, until = self._tokens.get(slot, ("", 0.0))
            if token and time.monotonic() < until:
                return token
            return self._fetch_token(call, url, client_id, slot)

    def _fetch_token(self, call, url: str, client_id: str, slot: str) -> str:
        reply = call.post_form(url, {"grant_type": "client_credentials", "client_id": client_id,
                                     "client_secret": call.key or "", "scope": SCOPE}, "token")
        answer = call.json(reply)
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token or any(ord(c) < 33 or ord(c) == 127 for c in token):
            raise call.fail("token: malformed answer: no usable access_token")
        lifetime = answer.get("expires_in")
        lifetime = float(lifetime) if isinstance(lifetime, (int, float)) and not isinstance(lifetime, bool) else 3600.0
        with self._lock:
            self._tokens[slot] = (token, time.monotonic() + max(0.0, min(lifetime, 86400.0) - 60.0))
        return token

    def _drop(self, token: str) -> None:
        with self._lock:
            for slot, (held, _) in list(self._tokens.items()):
                if held == token:
                    del self._tokens[slot]

    def forget_tokens(self) -> None:
        """Drop every token held (tests; a process that wants to re-authenticate)."""
        with self._lock:
            self._tokens.clear()


def _first_error(errors) -> str:
    first = errors[0] if isinstance(errors, list) and errors else None
    return first_text(first.get("message")) if isinstance(first, dict) else first_text(first)


PROTOCOLS = (Firefly(),)
