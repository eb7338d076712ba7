"""A model behind an images API (engine.api_source; the service's protocol from engine.providers): no GPU,
each image bought."""
from __future__ import annotations

import os

from engine import providers
from engine.sources import Param, Recipe, SourceKind, fingerprint

PROTOCOL_HELP = ("the API's protocol: openai (OpenAI-compatible images API, the default), bfl (Black Forest Labs), "
                 "replicate (MODEL is owner/name[:version]), stability (MODEL is core, ultra, sd3 or an sd3 "
                 "variant), imagen, gemini, google (gemini for gemini-* models, else imagen), fal (MODEL is a "
                 "fal endpoint id such as fal-ai/flux/dev), ideogram (MODEL ideogram-v3, V_2, ...) or firefly "
                 "(Adobe Firefly Services: MODEL is the x-model-version, the key is the OAuth client secret, "
                 "--client-id-env names the client id); URL is the provider's base URL")


class Api(SourceKind):
    name = "api"
    summary = ("a model behind an images API (--api URL --model MODEL, --protocol for non-OpenAI services): images "
               "are bought once per (description, slot) and stored like any resynthesis; the key is read from "
               "--api-key-env at run time, never stored")
    examples = ("resynth source add dalle3 --api https://api.openai.com --model dall-e-3 --size 1024x1024 "
                "--api-key-env OPENAI_API_KEY --price 0.04 --rate 5",
                "resynth source add flux-pro --api https://api.bfl.ai --protocol bfl --model flux-pro-1.1 "
                "--api-key-env BFL_API_KEY --price 0.04")
    needs_gpu = False  # holds no device memory: no pipeline is unloaded for it
    costs_money = True
    params = (
        Param("url", str, None, "the provider's base URL (an OpenAI-compatible images API unless --protocol "
                                "says otherwise)", required=True, metavar="URL", flag="--api"),
        Param("model", str, None, "model name the API expects", required=True),
        Param("protocol", str, providers.DEFAULT, PROTOCOL_HELP, choices=providers.names),
        Param("size", str, None, "image size WxH the API accepts (default: the server's)", metavar="WxH"),
        Param("api_key_env", str, None, "environment variable holding the API key", metavar="VAR"),
        Param("price", float, 0.0, "price per image, for cost reports and --max-cost (default 0)", metavar="USD"),
        Param("rate", float, None, "most requests per minute, shared by this process", metavar="N[/min]"),
        Param("concurrency", int, 2, "most requests in flight (default 2)"),
        Param("extra", dict, None, "more request fields, e.g. '{\"quality\": \"hd\"}' (a value \"{seed}\" is "
                                   "replaced by the slot number)", metavar="JSON"),
        Param("timeout", float, 120.0, "seconds per request (default 120)", metavar="S"),
        Param("client_id_env", str, None, "OAuth protocols (firefly): environment variable holding the client id",
              metavar="VAR"),
        Param("token_url", str, None, "OAuth protocols (firefly): the token endpoint (default: Adobe IMS)",
              metavar="URL"),
    )

    def prepare(self, name: str, url: str, model: str, size: str | None = None, api_key_env: str | None = None,
                price: float = 0.0, rate: float | None = None, concurrency: int = 2, extra: dict | None = None,
                timeout: float = 120.0, protocol: str = providers.DEFAULT, client_id_env: str | None = None,
                token_url: str | None = None, public_only: bool = False) -> Recipe:
        """Only the *name* of the environment variable holding the key is stored; the key is read at
        each run and never written anywhere. `public_only` is no Param (no flag, no HTTP field): the
        HTTP sources policy sets it, so that every connection the source makes goes to public addresses."""
        from engine.api_source import ApiParams

        params = ApiParams(url=url, model=model, size=size, api_key_env=api_key_env, price=price, rate=rate,
                           concurrency=concurrency, extra=dict(extra or {}), timeout=timeout,
                           protocol=protocol, client_id_env=client_id_env, token_url=token_url,
                           public_only=public_only).check_new()
        warning = None
        unset = [env for env in (api_key_env, client_id_env) if env and not os.environ.get(env)]
        if unset:
            names, are, it = (unset[0], "is", "it") if len(unset) == 1 else (" and ".join(unset), "are", "them")
            warning = (f"environment variable{'s' if len(unset) > 1 else ''} {names} {are} not set here: set {it} "
                       "where resynth runs")
        return Recipe(path=params.endpoint(), params=params.stored(), fingerprint=api_fingerprint(params.cache_hash()),
                      twin="already calls this endpoint and model with the same parameters", warning=warning)

    def params_hash(self, source) -> str:
        from engine.api_source import ApiParams

        return ApiParams.from_json(source.params_json).cache_hash()

    def load(self, source, device: str | None):
        from engine.api_source import ApiGenerator, ApiParams

        return ApiGenerator(source.name, ApiParams.from_json(source.params_json), source.fingerprint)

    def describe_recipe(self, params: dict, path: str | None) -> str:
        """The stored fields; the protocol only when it is not the default (as in the cache key); the rate
        with its unit (stored in requests per minute, as `--rate` reads N and N/min)."""
        if params.get("protocol") == providers.DEFAULT:
            params = {k: v for k, v in params.items() if k != "protocol"}
        if isinstance(params.get("rate"), (int, float)):
            params = {**params, "rate": f"{params['rate']:g}/min"}
        return super().describe_recipe(params, path)


def api_fingerprint(cache_hash: str | None) -> str:
    """An API source's fingerprint: the API parameters' cache hash (endpoint, model, size, extra)."""
    return fingerprint("api", cache_hash)
