"""The parameters of an API source (`ApiParams`): what is stored, what keys the cache, and their checks.

Owns the parameter dataclass, its JSON form, its cache hash and its validation (one-line `UserError`s);
nothing here touches the network. Re-exported by `engine.api_source`.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from engine import providers
from engine.errors import UserError, first_line
from index.keys import canonical_json, sha256_text

SEED_PLACEHOLDER = "{seed}"        # an `extra` value equal to this is replaced by the slot's seed

_SIZE = re.compile(r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ApiParams:
    """How to reach one model behind an images API; `cache_hash` covers only what changes an image."""

    url: str
    model: str
    size: str | None = None        # "WxH"; None leaves it to the server
    api_key_env: str | None = None  # the *name* of the environment variable holding the key
    price: float = 0.0              # USD per image, for --max-cost
    rate: float | None = None       # requests per minute, shared by every generator of (url, model)
    concurrency: int = 2
    extra: dict = field(default_factory=dict)  # merged into the request body
    timeout: float = 120.0          # seconds: total deadline of each network call, and of each polling loop
    protocol: str = providers.DEFAULT  # engine.providers: openai (the default), bfl, replicate, fal, ...
    client_id_env: str | None = None  # OAuth protocols (firefly): the NAME of the variable holding the client id
    token_url: str | None = None      # OAuth protocols (firefly): the token endpoint (default: the provider's)
    public_only: bool = False         # added over HTTP under the public-only policy: every connection checked

    def to_json(self) -> str:
        return canonical_json(self.stored())

    def stored(self) -> dict:
        """The fields as stored: the OAuth settings only when set (sources of other protocols keep the
        stored form they had before those existed)."""
        fields = asdict(self)
        for name in ("client_id_env", "token_url"):
            if fields[name] is None:
                del fields[name]
        if not fields["public_only"]:  # stored only when set, like the OAuth settings
            del fields["public_only"]
        return fields

    @classmethod
    def from_json(cls, text: str) -> "ApiParams":
        try:
            params = cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise UserError(f"malformed API source parameters: {first_line(exc)}") from None
        params.validate()
        return params

    def cache_hash(self) -> str:
        """Endpoint, model, size, extra, and the protocol unless it is the default (so that sources stored
        before protocols existed keep their keys): not the key, price, rate, concurrency or timeout."""
        fields = {"url": self.endpoint(), "model": self.model, "size": self.size, "extra": self.extra}
        if self.protocol != providers.DEFAULT:
            fields["protocol"] = self.protocol
        return sha256_text(canonical_json(fields))

    def endpoint(self) -> str:
        """The protocol's submission URL (for `openai`, `endpoint_url(url)`)."""
        return providers.get(self.protocol).endpoint(self.url, self.model)

    def validate(self) -> "ApiParams":
        protocol = providers.get(self.protocol)  # an unknown name is a one-line UserError
        parts = _split(self.url)
        if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise UserError(f"API URL must be http:// or https:// with a host, not {self.url!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise UserError("API model must be a non-empty string")
        if self.size is not None and not (isinstance(self.size, str) and _SIZE.match(self.size)):
            raise UserError(f"API image size must look like 1024x1024, not {self.size!r}")
        env = self.api_key_env
        if env is not None and not (isinstance(env, str) and _ENV_NAME.match(env)):
            raise UserError("--api-key-env takes the NAME of an environment variable (letters, digits, _), "
                            "not the key itself")
        if not _number(self.price) or not 0 <= self.price < 1e6:
            raise UserError(f"API price must be a number >= 0 USD per image, not {self.price!r}")
        if self.rate is not None and (not _number(self.rate) or self.rate <= 0):
            raise UserError(f"API rate must be a number > 0 requests per minute, not {self.rate!r}")
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise UserError(f"API concurrency must be an integer >= 1, not {self.concurrency!r}")
        if not _number(self.timeout) or self.timeout <= 0:
            raise UserError(f"API timeout must be a number > 0 seconds, not {self.timeout!r}")
        if not isinstance(self.extra, dict):
            raise UserError("API extra parameters must be a JSON object")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UserError(f"API extra parameters are not JSON: {first_line(exc)}") from None
        for name in ("client_id_env", "token_url"):
            if getattr(self, name) is not None and name not in protocol.settings:
                raise UserError(f"--{name.replace('_', '-')} is for OAuth protocols (firefly), not {self.protocol}")
        if self.client_id_env is not None and not (isinstance(self.client_id_env, str)
                                                   and _ENV_NAME.match(self.client_id_env)):
            raise UserError("--client-id-env takes the NAME of an environment variable (letters, digits, _)")
        if self.token_url is not None:
            token = _split(self.token_url)
            if token is None or token.scheme.lower() not in ("http", "https") or not token.hostname:
                raise UserError(f"--token-url must be http:// or https:// with a host, not {self.token_url!r}")
        if not isinstance(self.public_only, bool):
            raise UserError("API public_only must be true or false")
        reserved = protocol.reserved_for(self.model) & set(self.extra)
        if reserved:
            raise UserError(f"API extra parameters may not set {sorted(reserved)}")
        protocol.validate(self)
        return self

    def check_new(self) -> "ApiParams":
        """`validate`, and what only a source being added is refused for (a stored one keeps loading and fails,
        if it must, at its requests): URLs that could never be reached or that hold a password, a timeout past
        what the clock takes."""
        self.validate()
        for flag, url in (("API URL", self.url), ("--token-url", self.token_url)):
            if url is not None:
                _check_reachable(flag, url)
        if not self.model.isprintable():
            raise UserError(f"API model {self.model!r} holds a control character (a newline?)")
        endpoint = self.endpoint()
        if self.model in endpoint and (any(c.isspace() or c in "?#%\\" for c in self.model)
                                       or ".." in self.model.split("/")):  # bfl, stability, google: a path part
            raise UserError(f"API model {self.model!r} goes into the request's URL ({endpoint}), where it would "
                            "not name the model: no spaces, ?, #, %, \\ or .. parts")
        if self.timeout > MAX_TIMEOUT:
            raise UserError(f"API timeout must be at most {MAX_TIMEOUT} seconds (a day), not {self.timeout!r}")
        return self


MAX_TIMEOUT = 86_400  # a request or polling loop longer than a day is a typo (1e300 failed every request)


def _split(url: Any):
    """urlsplit of a URL string, or None (`http://[::1` made urlsplit raise, a traceback at `source add`)."""
    try:
        return urlsplit(url.strip()) if isinstance(url, str) else None
    except ValueError:
        return None


def _check_reachable(flag: str, url: str) -> None:
    """Refuse what was stored and then failed at every request (a port out of range, a space or control
    character, retried as an unknown host), and a user name or password in the URL, which would be stored
    and shown by `source list`, where keys never are."""
    given = url.strip()
    parts = urlsplit(given)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise UserError(f"{flag} {given!r}: its port is not a number from 1 to 65535")
    if any(c.isspace() or not c.isprintable() for c in given):
        raise UserError(f"{flag} {given!r} holds a space or control character: give the URL alone")
    if parts.username is not None or parts.password is not None:
        raise UserError(f"{flag} must not hold a user name or password (user:pass@), which would be stored with "
                        "the source and shown by `source list`: give the key with --api-key-env VAR")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
