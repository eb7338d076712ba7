"""Sources behind non-OpenAI protocols (Black Forest Labs' submit-and-poll, Stability's multipart
bytes, Gemini's generateContent, fal.ai's queue, Ideogram's URLs, Adobe Firefly's OAuth and jobs), end to
end: a loopback stand-in serves a tiny pipeline's images;
attribution beside a local pipeline wins that pipeline's originals, a repeat costs 0 submissions, a
moderated prompt leaves the other sources' answer, and the key never reaches the store or the output."""
from __future__ import annotations

import inspect
import itertools
import json
from dataclasses import asdict

import pytest

import engine
import engine.api_exchange
import engine.api_source
from engine.api_source import ApiParams
from engine.generate import DiffusersGenerator, GenerationParams, source_fingerprint
from tests.conftest import PROMPTS
from engine.providers import firefly
from tests.fake_images_api import FakeProviderApi
from tests.helpers import run_cli

KEY = "bfl-test-0a1b2c3d4e5f-NEVER-STORED"
ENV = "RESYNTH_TEST_BFL_KEY"
CLIENT_ENV = "RESYNTH_TEST_FIREFLY_CLIENT"
PRICE = 0.04
OPTIONS = ["--per-source", "2", "--no-adaptive", "--mode", "resynthesis"]


def add_protocol_source(store, name: str, params: ApiParams) -> None:
    """`resynth source add NAME --api URL --protocol P ...` (through the workspace when it takes a
    protocol, else the way it stores an API source; the OAuth protocol through the CLI itself)."""
    if params.protocol == "firefly":
        assert run_cli("source", "add", name, "--api", params.url, "--protocol", "firefly", "--model", params.model,
                       "--api-key-env", params.api_key_env, "--client-id-env", params.client_id_env,
                       "--token-url", params.token_url, "--price", params.price, "--rate", params.rate,
                       "--concurrency", params.concurrency, "--timeout", params.timeout,
                       "--store", store, "--quiet") == 0
        return
    with engine.open(store) as ws:
        if "protocol" in inspect.signature(ws.add_api_source).parameters:
            ws.add_api_source(name, params.url, params.model, size=params.size, api_key_env=params.api_key_env,
                              price=params.price, rate=params.rate, concurrency=params.concurrency,
                              extra=params.extra, timeout=params.timeout, protocol=params.protocol)
            return
        fingerprint = source_fingerprint("api", name, params.cache_hash(), None)
        ws.store.add_source(name, "api", fingerprint, path=params.endpoint(), params=asdict(params.validate()))


PROTOCOLS = {  # protocol: (model, submission path, key header, key value, moderation message)
    "bfl": ("flux-dev", "/v1/flux-dev", "x-key", KEY, "Content Moderated"),
    "stability": ("core", "/v2beta/stable-image/generate/core", "authorization", f"Bearer {KEY}",
                  "CONTENT_FILTERED"),
    "gemini": ("gemini-2.5-flash-image", "/v1beta/models/gemini-2.5-flash-image:generateContent",
               "x-goog-api-key", KEY, "PROHIBITED_CONTENT"),
    "fal": ("fal-ai/flux/dev", "/fal-ai/flux/dev", "authorization", f"Key {KEY}", "has_nsfw_concepts"),
    "ideogram": ("ideogram-v3", "/v1/ideogram-v3/generate", "api-key", KEY, "is_image_safe is false"),
    "firefly": ("image4_standard", "/v3/images/generate-async", "x-api-key", FakeProviderApi.FIREFLY_CLIENT_ID,
                "The input text contains content which is not allowed"),
}
URL_ANSWERS = {"bfl", "fal", "ideogram", "firefly"}  # the image is fetched from a URL the answer names


@pytest.fixture(params=list(PROTOCOLS))
def protocol_store(models, originals, tmp_path, monkeypatch, request):
    monkeypatch.setenv(ENV, KEY)
    monkeypatch.setenv(CLIENT_ENV, FakeProviderApi.FIREFLY_CLIENT_ID)
    firefly.PROTOCOLS[0].forget_tokens()
    monkeypatch.setattr(engine.api_exchange, "BACKOFF_BASE", 0.01)
    monkeypatch.setattr(engine.api_exchange, "POLL_FIRST", 0.02)
    (hidden, folder), *local = models["pipelines"].items()
    pipeline = DiffusersGenerator(hidden, folder, GenerationParams(steps=2))
    seeds = itertools.count(9000)
    store = tmp_path / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--quiet") == 0
    other = next(o["source"] for o in originals if o["source"] != hidden)  # the one local rival (cheaper than all)
    for name, path in local:
        if name == other:
            assert run_cli("source", "add", name, path, "--store", store, "--steps", 2, "--quiet") == 0
    with FakeProviderApi(make=lambda prompt, _: pipeline.generate(prompt, [next(seeds)])[0], key=KEY) as api:
        oauth = {"client_id_env": CLIENT_ENV, "token_url": f"{api.url}/ims/token/v3"} \
            if request.param == "firefly" else {}
        add_protocol_source(store, "flux-api", ApiParams(api.url, PROTOCOLS[request.param][0], api_key_env=ENV,
                                                         price=PRICE, rate=600, concurrency=2, timeout=10,
                                                         protocol=request.param, **oauth))
        yield store, api, hidden, request.param


def attribute(store, queries, capsys, *extra) -> dict:
    capsys.readouterr()
    assert run_cli("attribute", "--queries", queries, "--store", store, "--json", "--quiet", *OPTIONS, *extra) == 0
    out, err = capsys.readouterr()
    assert KEY not in out and KEY not in err
    return json.loads(out)


def test_protocol_source_attributes_pays_once_and_reports_moderation(protocol_store, originals, tmp_path, capsys):
    store, api, hidden, protocol = protocol_store
    model, path, header, value, moderation = PROTOCOLS[protocol]
    other = next(o["source"] for o in originals if o["source"] != hidden)
    rows = [o for o in originals if o["source"] in (hidden, other)]
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"image": str(o["image"]), "prompt": o["prompt"]}) + "\n" for o in rows))

    first = attribute(store, queries, capsys)
    truth = {hidden: "flux-api", other: other}
    right = sum(r["predicted"] == truth[row["source"]] for r, row in zip(first["results"], rows))
    assert right >= len(rows) - 1, [r["predicted"] for r in first["results"]]
    bought = len(PROMPTS) * 2
    assert len(api.submissions()) == bought
    assert len(api.downloads()) == (bought if protocol in URL_ANSWERS else 0)
    assert all(e["path"] == path and e["headers"][header] == value for e in api.submissions())
    assert first["cost"]["images_bought"] == bought and first["cost"]["spent_usd"] == pytest.approx(bought * PRICE)

    # the cache is the engine's, not the protocol's: a repeat is shown once per answer shape (bfl: a URL to
    # fetch; stability, gemini: the image in the answer), to keep the suite's time
    if protocol in ("bfl", "stability", "gemini"):
        again = attribute(store, queries, capsys)  # a repeated prompt costs nothing
        assert len(api.submissions()) == bought and again["cost"]["images_bought"] == 0
        assert [r["predicted"] for r in again["results"]] == [r["predicted"] for r in first["results"]]

    night = tmp_path / "night.jsonl"
    row = next(o for o in originals if o["source"] == hidden)
    night.write_text(json.dumps({"image": str(row["image"]), "prompt": row["prompt"] + ", at night"}) + "\n")
    api.queue("moderated", "moderated")
    refused = attribute(store, night, capsys)["results"][0]
    assert moderation in refused["failed"]["flux-api"] and refused["scores"]
    everything = b"".join(p.read_bytes() for p in store.rglob("*") if p.is_file())
    assert KEY.encode() not in everything
    assert not any(token.encode() in everything for token in api.issued)  # firefly's tokens: memory only
    if protocol == "firefly":
        assert FakeProviderApi.FIREFLY_CLIENT_ID.encode() not in everything and len(api.issued) == 1
