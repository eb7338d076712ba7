"""A model behind an OpenAI-compatible images API (engine.api_source): no GPU, each image bought."""
from __future__ import annotations

import os
from dataclasses import asdict

from engine.sources import Param, Recipe, SourceKind, fingerprint


class Api(SourceKind):
    name = "api"
    needs_gpu = False  # holds no device memory: no pipeline is unloaded for it
    costs_money = True
    params = (
        Param("url", str, None, "base URL of an OpenAI-compatible images API", required=True, metavar="URL"),
        Param("model", str, None, "model name the API expects", required=True),
        Param("size", str, None, "image size WxH the API accepts (default: the API's)", metavar="WxH"),
        Param("api_key_env", str, None, "environment variable holding the API key", metavar="VAR"),
        Param("price", float, 0.0, "price per image, for cost reports", metavar="USD"),
        Param("rate", float, None, "most requests per minute, shared by this process", metavar="N"),
        Param("concurrency", int, 2, "most requests in flight (default 2)"),
        Param("extra", dict, None, "more request fields (a JSON object)", metavar="JSON"),
        Param("timeout", float, 120.0, "seconds per request (default 120)", metavar="S"),
    )

    def prepare(self, name: str, url: str, model: str, size: str | None = None, api_key_env: str | None = None,
                price: float = 0.0, rate: float | None = None, concurrency: int = 2, extra: dict | None = None,
                timeout: float = 120.0) -> Recipe:
        """Only the *name* of the environment variable holding the key is stored; the key is read at
        each run and never written anywhere."""
        from engine.api_source import ApiParams, endpoint_url

        params = ApiParams(url=url, model=model, size=size, api_key_env=api_key_env, price=price, rate=rate,
                           concurrency=concurrency, extra=dict(extra or {}), timeout=timeout).validate()
        warning = None
        if api_key_env and not os.environ.get(api_key_env):
            warning = f"environment variable {api_key_env} is not set here: set it where resynth runs"
        return Recipe(path=endpoint_url(url), params=asdict(params), fingerprint=api_fingerprint(params.cache_hash()),
                      twin="already calls this endpoint and model with the same parameters", warning=warning)

    def params_hash(self, source) -> str:
        from engine.api_source import ApiParams

        return ApiParams.from_json(source.params_json).cache_hash()

    def load(self, source, device: str | None):
        from engine.api_source import ApiGenerator, ApiParams

        return ApiGenerator(source.name, ApiParams.from_json(source.params_json), source.fingerprint)


def api_fingerprint(cache_hash: str | None) -> str:
    """An API source's fingerprint: the API parameters' cache hash (endpoint, model, size, extra)."""
    return fingerprint("api", cache_hash)
