"""Provider protocols (`engine.providers`) against loopback stand-ins of each service
(`tests.fake_images_api.FakeProviderApi`, real HTTP): the requests they receive (path, auth header,
body shape), the images returned, retries on 429/5xx at submission and polling, the services'
refusals as one line, hostile answers refused, budgets, and the key never echoed."""
from __future__ import annotations

import base64
import logging

import numpy as np
import pytest

from engine import api_exchange, api_http, api_source, providers
from engine.api_source import ApiGenerator, ApiParams, Budget, PartialResult
from engine.errors import SourceError, UserError
from engine.providers import firefly
from tests.fake_images_api import FakeProviderApi, default_make, png_bytes

KEY = "sk-proto-5a4b3c2d1e0f99887766"
ENV = "RESYNTH_TEST_PROTO_KEY"
CLIENT = FakeProviderApi.FIREFLY_CLIENT_ID
CLIENT_ENV = "RESYNTH_TEST_PROTO_CLIENT"

# protocol, model, size, submission path, auth header, its value, expected image size
CASES = {
    "bfl": ("flux-pro-1.1", "16x16", "/v1/flux-pro-1.1", "x-key", KEY, (16, 16)),
    "replicate": ("black-forest-labs/flux-schnell", "16x16",
                  "/v1/models/black-forest-labs/flux-schnell/predictions", "authorization", f"Bearer {KEY}",
                  (16, 16)),
    "stability": ("core", "512x512", "/v2beta/stable-image/generate/core", "authorization", f"Bearer {KEY}",
                  (8, 8)),
    "imagen": ("imagen-4.0-generate-001", "1024x768", "/v1beta/models/imagen-4.0-generate-001:predict",
               "x-goog-api-key", KEY, (32, 24)),
    "gemini": ("gemini-2.5-flash-image", "768x1024",
               "/v1beta/models/gemini-2.5-flash-image:generateContent", "x-goog-api-key", KEY, (24, 32)),
    "fal": ("fal-ai/flux/dev", "16x16", "/fal-ai/flux/dev", "authorization", f"Key {KEY}", (16, 16)),
    "ideogram": ("ideogram-v3", "16x16", "/v1/ideogram-v3/generate", "api-key", KEY, (16, 16)),
    "firefly": ("image4_standard", "16x16", "/v3/images/generate-async", "x-api-key", CLIENT, (16, 16)),
}
ASYNC = ("bfl", "replicate", "fal", "firefly")
POLLS = {"bfl": 2, "replicate": 2, "fal": 3, "firefly": 2}  # per image: pending, ready (fal: then the result)


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    monkeypatch.setenv(CLIENT_ENV, CLIENT)
    monkeypatch.setattr(api_exchange, "POLL_FIRST", 0.02)
    firefly.PROTOCOLS[0].forget_tokens()
    with FakeProviderApi(key=KEY, retry_after="0.2") as fake:
        yield fake
    firefly.PROTOCOLS[0].forget_tokens()


def oauth(api, protocol: str) -> dict:
    """Firefly's client id variable and the stand-in's token endpoint."""
    return {"client_id_env": CLIENT_ENV, "token_url": f"{api.url}/ims/token/v3"} if protocol == "firefly" else {}


def generator(api, protocol: str, retries: int = 4, budget=None, **params) -> ApiGenerator:
    model, size = CASES[protocol][:2]
    model = params.pop("model", model)
    params = {"size": size, "api_key_env": ENV, "timeout": 5, **oauth(api, protocol), **params}
    return ApiGenerator("remote", ApiParams(api.url, model, protocol=protocol, **params), retries=retries,
                        backoff_base=0.01, budget=budget)


def assert_request_shape(protocol: str, entry: dict, prompt: str, api) -> None:
    body = entry["body"]
    if protocol == "bfl":
        assert body == {"prompt": prompt, "width": 16, "height": 16}
    elif protocol == "replicate":
        assert body == {"input": {"prompt": prompt, "width": 16, "height": 16}}
        assert entry["headers"]["prefer"] == "wait=2"
    elif protocol == "stability":
        assert entry["headers"]["accept"] == "image/*"
        assert entry["headers"]["content-type"].startswith("multipart/form-data; boundary=")
        assert body is None  # a form, not JSON
    elif protocol == "imagen":
        assert body == {"instances": [{"prompt": prompt}], "parameters": {"sampleCount": 1, "aspectRatio": "4:3"}}
    elif protocol == "gemini":
        assert body == {"contents": [{"parts": [{"text": prompt}]}],
                        "generationConfig": {"responseModalities": ["TEXT", "IMAGE"],
                                             "imageConfig": {"aspectRatio": "3:4"}}}
    elif protocol == "fal":
        assert body == {"prompt": prompt, "num_images": 1, "image_size": {"width": 16, "height": 16}}
    elif protocol == "ideogram":
        assert entry["headers"]["content-type"].startswith("multipart/form-data; boundary=")
        assert body is None and entry["headers"].get("authorization") is None
    elif protocol == "firefly":
        assert body == {"prompt": prompt, "numVariations": 1, "size": {"width": 16, "height": 16}}
        assert entry["headers"]["x-model-version"] == "image4_standard"
        assert entry["headers"]["authorization"] in (f"Bearer {t}" for t in api.issued)
        assert KEY not in entry["raw"].decode() and KEY not in str(entry["headers"])  # the secret: IMS only


@pytest.mark.parametrize("protocol", list(CASES))
def test_images_come_back_in_order_from_the_documented_requests(api, protocol):
    model, size, path, header, value, dims = CASES[protocol]
    gen = generator(api, protocol, concurrency=2)
    jobs = [(f"a {protocol} prompt {i}", i) for i in range(3)]
    images = gen.generate_many(jobs)
    for (prompt, _), image in zip(jobs, images):
        assert image.mode == "RGB" and image.size == dims
        assert np.array_equal(np.asarray(image), np.asarray(default_make(prompt, 0, dims)))
    assert gen.calls == 3
    submissions = api.submissions()
    assert [e["path"] for e in submissions] == [path] * 3
    assert all(e["headers"].get(header) == value for e in submissions)
    assert all(e["status"] in (200, 201, 202) for e in submissions)
    for entry in submissions:
        prompt = next(p for p, _ in jobs if p in entry["raw"].decode())
        assert_request_shape(protocol, entry, prompt, api)
    if protocol == "stability":
        assert sorted(f["prompt"] for f in api.form_log) == sorted(p for p, _ in jobs)
        assert all(f == {"route": "core", "prompt": f["prompt"], "output_format": "png", "aspect_ratio": "1:1"}
                   for f in api.form_log)
    if protocol == "ideogram":
        assert sorted(f["prompt"] for f in api.form_log) == sorted(p for p, _ in jobs)
        assert all(f == {"route": "ideogram-v3", "prompt": f["prompt"], "num_images": "1", "resolution": "16x16"}
                   for f in api.form_log)
        assert len(api.downloads()) == 3
    if protocol == "firefly":  # one token for the three images, asked for with the secret in a form
        [token] = api.token_requests()
        assert token["headers"]["content-type"] == "application/x-www-form-urlencoded"
        assert f"client_id={CLIENT}" in token["raw"].decode() and len(api.issued) == 1
    if protocol in ASYNC:
        polls = api.polls()
        assert len(polls) == POLLS[protocol] * 3
        assert all(e["headers"].get(header) == value for e in polls)  # polling needs the key too
        assert all(e["headers"].get(header) is None and e["authorization"] is None for e in api.downloads())
        assert len(api.downloads()) == 3


def test_replicate_may_answer_at_once_and_takes_versions_and_list_or_string_outputs(api):
    api.replicate_sync = True
    gen = generator(api, "replicate")
    [image] = gen.generate("at once", [0])
    assert np.array_equal(np.asarray(image), np.asarray(default_make("at once", 0, (16, 16))))
    assert api.polls() == []  # the prediction came back succeeded: nothing to poll
    api.replicate_sync = False
    version = "owner/name:5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
    versioned = ApiGenerator("v", ApiParams(api.url, version, protocol="replicate", api_key_env=ENV, timeout=5))
    assert len(versioned.generate("versioned", [0])) == 1
    entry = api.submissions()[-1]
    assert entry["path"] == "/v1/predictions"
    assert entry["body"] == {"input": {"prompt": "versioned"},
                             "version": "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"}


def test_stability_json_answers_and_sd3_variants(api):
    gen = ApiGenerator("s", ApiParams(api.url, "sd3.5-large", protocol="stability", api_key_env=ENV, timeout=5,
                                      extra={"seed": "{seed}", "negative_prompt": "blur", "cfg_scale": 4}))
    api.queue("json")
    assert len(gen.generate("json answer", [11])) == 1
    form = api.form_log[-1]
    assert form == {"route": "sd3", "prompt": "json answer", "output_format": "png", "model": "sd3.5-large",
                    "seed": "11", "negative_prompt": "blur", "cfg_scale": "4"}


def test_extra_fields_and_seeds_go_where_each_protocol_takes_them(api):
    extra = {"seed": "{seed}", "safety_tolerance": 2}
    for protocol in ("bfl", "replicate", "imagen"):
        generator(api, protocol, extra=extra).generate("p", [42])
    bfl, replicate, imagen = (e["body"] for e in api.submissions())
    assert bfl["seed"] == 42 and bfl["safety_tolerance"] == 2
    assert replicate["input"]["seed"] == 42 and "seed" not in replicate
    assert imagen["parameters"]["seed"] == 42 and imagen["parameters"]["sampleCount"] == 1
    generator(api, "gemini", extra={"temperature": 0.5}).generate("p", [0])
    assert api.submissions()[-1]["body"]["generationConfig"]["temperature"] == 0.5


@pytest.mark.parametrize("protocol", list(CASES))
def test_429_and_500_on_submission_are_retried(api, protocol):
    api.queue("429", "500")
    assert len(generator(api, protocol).generate("p", [0])) == 1
    submissions = api.submissions()
    assert [e["status"] for e in submissions][:2] == [429, 500]
    assert submissions[-1]["status"] in (200, 201, 202)
    assert submissions[1]["time"] - submissions[0]["end"] >= 0.19  # Retry-After: 0.2 honoured


@pytest.mark.parametrize("protocol", ASYNC)
def test_429_and_500_on_polls_are_retried(api, protocol):
    api.poll_queue.extend(["500", "429"])
    gen = generator(api, protocol)
    assert len(gen.generate("p", [0])) == 1
    assert [e["status"] for e in api.polls()][:2] == [500, 429]
    assert len(api.submissions()) == 1  # a failed poll does not buy the image again


@pytest.mark.parametrize("protocol, message", [
    ("bfl", r"the API refused the request: Content Moderated$"),
    ("replicate", r"the API refused the request: prediction failed: NSFW content detected\. Try running it again\.$"),
    ("stability", r"the API refused the request: finish reason CONTENT_FILTERED$"),
    ("imagen", r"the API refused the request: It may violate our policies\.$"),
    ("gemini", r"the API refused the request: prompt blocked: PROHIBITED_CONTENT$"),
    ("fal", r"the API refused the request: has_nsfw_concepts: the provider's safety checker flagged the image$"),
    ("ideogram", r"the API refused the request: is_image_safe is false: .* withheld the image$"),
    ("firefly", r"the API refused the request: job failed: The input text contains content which is not "
                r"allowed\.$"),
])
def test_moderation_is_the_sources_one_line_failure(api, protocol, message):
    api.queue("moderated")
    with pytest.raises(SourceError, match=message) as failure:
        generator(api, protocol).generate("p", [0])
    assert "\n" not in str(failure.value) and str(failure.value).startswith("source 'remote': ")
    assert len(api.submissions()) == 1


@pytest.mark.parametrize("protocol", list(CASES))
def test_a_bad_key_is_refused_at_once_and_never_echoed(api, protocol, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-fedcba9876543210"
    monkeypatch.setenv(ENV, wrong)
    with pytest.raises(SourceError) as failure:
        generator(api, protocol).generate("p", [0])
    message = str(failure.value)
    assert "HTTP 401" in message and f"${ENV}" in message
    assert wrong not in message and "\n" not in message and wrong not in caplog.text
    if protocol == "firefly":  # the secret goes to the token endpoint only, which refuses it
        assert "token: the API refused the request: HTTP 401: invalid_client" in message
        assert len(api.token_requests()) == 1 and api.submissions() == []
    else:
        assert "Invalid API key" in message and len(api.submissions()) == 1


@pytest.mark.parametrize("protocol", list(CASES))
def test_malformed_answers_are_refused(api, protocol):
    api.queue("malformed")
    with pytest.raises(SourceError, match="malformed answer: not JSON|not an image"):
        generator(api, protocol).generate("p", [0])


@pytest.mark.parametrize("protocol", ASYNC)
@pytest.mark.parametrize("behaviour, message", [
    ("url-private", r"refused image URL on a non-public address \(10\.0\.0\.1"),
    ("poll-private", r"refused status URL on a non-public address \(10\.0\.0\.1"),
])
def test_urls_into_private_networks_are_refused(api, protocol, behaviour, message):
    api.queue(behaviour)
    with pytest.raises(SourceError, match=message):
        generator(api, protocol).generate("p", [0])
    if behaviour == "poll-private":
        assert api.polls() == []  # refused before any request


def test_the_key_goes_only_to_the_endpoints_own_site():
    gen = ApiGenerator("b", ApiParams("https://api.bfl.ai", "flux-pro-1.1", protocol="bfl"))
    assert gen._endpoint == "https://api.bfl.ai/v1/flux-pro-1.1"
    allowed = gen._key_allowed
    assert allowed("https://api.bfl.ai/v1/get_result?id=1") and allowed("https://api.us1.bfl.ai/v1/get_result?id=1")
    for url in ("http://api.us1.bfl.ai/x", "https://evil.example.com/x", "https://bfl.ai.evil.com/x",
                "https://notbfl.ai/x", "http://api.bfl.ai/x"):
        assert not allowed(url), url
    local = ApiGenerator("l", ApiParams("http://127.0.0.1:8080", "m", protocol="bfl"))
    assert local._key_allowed("http://127.0.0.1:9999/poll") and not local._key_allowed("http://127.0.0.2/poll")


def test_budget_stops_async_protocols_before_submitting(api):
    budget = Budget(limit_usd=0.05)
    gen = generator(api, "bfl", price=0.02, budget=budget, concurrency=1)
    with pytest.raises(PartialResult, match="--max-cost") as partial:
        gen.generate("p", [0, 1, 2])
    assert [image is not None for image in partial.value.images] == [True, True, False]
    assert len(api.submissions()) == 2 and budget.images == 2 and budget.spent == pytest.approx(0.04)
    api.queue("ok", "moderated")
    budget.limit_usd = 1.0
    with pytest.raises(PartialResult, match="Content Moderated"):
        gen.generate("p", [3, 4])  # the refused one is refunded
    assert budget.images == 3 and budget.spent == pytest.approx(0.06)


def test_key_never_in_logs_reprs_or_stored_parameters(api, caplog):
    caplog.set_level(logging.DEBUG)
    for protocol in CASES:
        api.queue("500")
        gen = generator(api, protocol)
        gen.generate("p", [0])
        for text in (repr(gen), gen.params.to_json()):
            assert KEY not in text and CLIENT not in text
    assert "retry 1/4" in caplog.text and KEY not in caplog.text
    assert api.issued and not any(token in caplog.text for token in api.issued)


def test_endpoints_of_each_protocol():
    def endpoint(url, model, protocol):
        return ApiParams(url, model, protocol=protocol).endpoint()

    assert endpoint("https://API.bfl.ai/", "flux-dev", "bfl") == "https://api.bfl.ai/v1/flux-dev"
    assert endpoint("https://api.bfl.ai/v1", "flux-dev", "bfl") == "https://api.bfl.ai/v1/flux-dev"
    assert endpoint("https://api.replicate.com", "o/n", "replicate") == \
        "https://api.replicate.com/v1/models/o/n/predictions"
    assert endpoint("https://api.replicate.com/v1/", "o/n:abcdef0123", "replicate") == \
        "https://api.replicate.com/v1/predictions"
    assert endpoint("https://api.stability.ai", "ultra", "stability") == \
        "https://api.stability.ai/v2beta/stable-image/generate/ultra"
    assert endpoint("https://api.stability.ai", "sd3.5-medium", "stability") == \
        "https://api.stability.ai/v2beta/stable-image/generate/sd3"
    google = "https://generativelanguage.googleapis.com"
    assert endpoint(google, "imagen-4.0-generate-001", "google") == \
        f"{google}/v1beta/models/imagen-4.0-generate-001:predict"
    assert endpoint(google + "/v1beta", "models/gemini-2.5-flash-image", "google") == \
        f"{google}/v1beta/models/gemini-2.5-flash-image:generateContent"
    assert endpoint("https://api.openai.com", "dall-e-3", "openai") == "https://api.openai.com/v1/images/generations"
    assert endpoint("https://queue.fal.run/", "fal-ai/flux-pro/v1.1", "fal") == "https://queue.fal.run/fal-ai/flux-pro/v1.1"
    ideogram = "https://api.ideogram.ai"
    assert endpoint(ideogram, "ideogram-v3", "ideogram") == f"{ideogram}/v1/ideogram-v3/generate"
    assert endpoint(ideogram, "V_2_TURBO", "ideogram") == f"{ideogram}/generate"
    assert endpoint(ideogram, "ideogram-4-5", "ideogram") == f"{ideogram}/v2/image/generate/ideogram-4-5"
    assert ApiParams("https://firefly-api.adobe.io", "image4_standard", protocol="firefly", api_key_env="S",
                     client_id_env="C").endpoint() == "https://firefly-api.adobe.io/v3/images/generate-async"


def test_protocol_parameters_are_validated_in_one_line():
    for fields, message in (
            ({"protocol": "midjourney"}, "unknown API protocol 'midjourney': use one of bfl, fal, firefly, gemini, "
                                         "google, ideogram, imagen, openai, replicate, stability"),
            ({"protocol": "fal", "model": "flux"}, "endpoint id such as fal-ai/flux/dev"),
            ({"protocol": "fal", "model": "fal-ai/flux/dev", "extra": {"num_images": 4}}, "may not set"),
            ({"protocol": "ideogram", "model": "ideogram-v3", "extra": {"num_images": 2}}, "may not set"),
            ({"protocol": "firefly", "model": "image4_standard", "api_key_env": "S"}, "needs --client-id-env"),
            ({"protocol": "firefly", "model": "image4_standard", "client_id_env": "C"}, "needs --api-key-env"),
            ({"protocol": "firefly", "model": "image4", "api_key_env": "S", "client_id_env": "C",
              "token_url": "ftp://x"}, "--token-url must be http"),
            ({"protocol": "firefly", "model": "image4", "api_key_env": "S", "client_id_env": "the id itself"},
             "NAME of an environment variable"),
            ({"protocol": "openai", "model": "m", "token_url": "https://ims.example.com/t"},
             "--token-url is for OAuth protocols"),
            ({"protocol": "replicate", "model": "flux"}, "owner/name"),
            ({"protocol": "stability", "model": "core", "size": "1000x700"}, "ratio"),
            ({"protocol": "imagen", "model": "imagen-4", "size": "512x1024"}, "ratio"),
            ({"protocol": "stability", "model": "core", "extra": {"output_format": "jpeg"}}, "may not set"),
            ({"protocol": "imagen", "model": "imagen-4", "extra": {"sampleCount": 4}}, "may not set"),
            ({"protocol": "google", "model": "gemini-2.5-flash-image", "extra": {"responseModalities": ["TEXT"]}},
             "may not set"),
            ({"protocol": "openai", "model": "m", "extra": {"n": 2}}, "may not set"),
            ({"protocol": None}, "unknown API protocol")):
        with pytest.raises(UserError, match=message) as failure:
            ApiParams(**{"url": "https://api.example.com", "model": "m", **fields}).validate()
        assert "\n" not in str(failure.value)
    assert providers.names() == ["bfl", "fal", "firefly", "gemini", "google", "ideogram", "imagen", "openai",
                                 "replicate", "stability"]


def test_cache_keys_of_stored_openai_sources_are_unchanged_and_protocols_have_their_own():
    base = ApiParams("https://api.example.com", "img-1", size="512x512", extra={"quality": "high"})
    # the hash as it was before protocols existed (endpoint, model, size, extra)
    assert base.cache_hash() == "fc6579abd744d2fbf4930400f88ad3574915c5dcb32edc370362112e80a04107"
    stored_before = '{"api_key_env": null, "concurrency": 2, "extra": {"quality": "high"}, "model": "img-1", ' \
                    '"price": 0.0, "rate": null, "size": "512x512", "timeout": 120.0, "url": "https://api.example.com"}'
    assert ApiParams.from_json(stored_before) == base and ApiParams.from_json(stored_before).protocol == "openai"
    assert ApiParams.from_json(base.to_json()) == base
    hashes = {ApiParams("https://api.example.com", "img-1", size="512x512", protocol=p).cache_hash()
              for p in ("openai", "bfl", "imagen", "gemini")}
    assert len(hashes) == 4
    bfl = ApiParams("https://api.bfl.ai", "flux-dev", protocol="bfl")
    assert ApiParams.from_json(bfl.to_json()) == bfl


def test_data_uris_and_hostile_output_urls(api):
    gen = generator(api, "replicate")
    data = png_bytes(default_make("inline", 0, (4, 4)))
    with api_http.client(5) as client:
        assert gen._fetch_any(client, "data:image/png;base64," + base64.b64encode(data).decode()) == data
        for bad, message in ((42, "not a string"), ("data:image/png;base64,!!!", "not base64"),
                             ("file:///etc/passwd", "scheme 'file'"), ("gopher://x.org/", "scheme 'gopher'")):
            with pytest.raises(SourceError, match=message):
                gen._fetch_any(client, bad)


def test_error_messages_of_each_service_are_read():
    read = api_source._error_message
    assert read(b'{"error": {"code": 400, "message": "API key not valid."}}', None) == ": API key not valid."
    assert read(b'{"detail": "Invalid authentication token"}', None) == ": Invalid authentication token"
    assert read(b'{"name": "bad_request", "errors": ["prompt: is required"]}', None) == ": prompt: is required"
    assert read(b'{"title": "x", "detail": "key sk-abc is wrong\\nmore"}', "sk-abc") == ": key *** is wrong"
    assert read(b"<html>", None) == ""


def test_ideogram_routes_by_model_and_refuses_private_urls(api):
    for model, path, body in (
            ("ideogram-4-5", "/v2/image/generate/ideogram-4-5",
             {"prompt": "p", "num_images": 1, "resolution": "16x16", "seed": 9}),
            ("V_2_TURBO", "/generate", {"image_request": {"prompt": "p", "num_images": 1, "model": "V_2_TURBO",
                                                          "resolution": "RESOLUTION_16_16", "seed": 9}})):
        [image] = generator(api, "ideogram", model=model, extra={"seed": "{seed}"}).generate("p", [9])
        assert image.size == (16, 16)
        assert api.submissions()[-1]["path"] == path and api.submissions()[-1]["body"] == body
    api.queue("url-private")
    with pytest.raises(SourceError, match=r"refused image URL on a non-public address \(10\.0\.0\.1"):
        generator(api, "ideogram").generate("p", [0])


def test_firefly_token_is_reused_retried_and_never_shown(api, caplog):
    caplog.set_level(logging.DEBUG)
    api.token_queue.extend(["429", "500"])
    gen = generator(api, "firefly", extra={"seed": "{seed}", "contentClass": "photo"})
    gen.generate("p", [5])
    generator(api, "firefly").generate("q", [6])  # another generator, same credentials: the same token
    assert [e["status"] for e in api.token_requests()] == [429, 500, 200] and len(api.issued) == 1
    first = api.submissions()[0]["body"]
    assert first["seeds"] == [5] and first["contentClass"] == "photo" and "seed" not in first
    polls = api.polls()
    assert all(e["headers"]["authorization"] == f"Bearer {api.issued[0]}" for e in polls)
    assert all(e["headers"].get("authorization") is None for e in api.downloads())  # pre-signed: no credentials
    api.issued.clear()  # the service revokes the token: the held one is refused in one line, then dropped
    with pytest.raises(SourceError, match=r"HTTP 401: Oauth token is not valid") as refused:
        generator(api, "firefly").generate("r", [0])
    assert "\n" not in str(refused.value)
    generator(api, "firefly").generate("r", [0])  # a fresh token is asked for
    assert len(api.token_requests()) == 4 and len(api.issued) == 1
    assert not any(token in caplog.text for token in api.issued) and KEY not in caplog.text
