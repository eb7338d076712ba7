"""ApiGenerator against a local fake images API: order, retries, refusals, caps, SSRF, limits, key, budget."""
from __future__ import annotations

import logging
import threading
from dataclasses import replace
import time
from email.utils import formatdate

import httpx
import numpy as np
import pytest
from PIL import Image

from engine import api_answers, api_source
from engine.api_source import ApiGenerator, ApiParams, Budget, BudgetExceeded, PartialResult, endpoint_url
from engine.errors import SourceError, UserError
from tests.fake_images_api import FakeImagesApi, default_make

KEY = "sk-test-9f8e7d6c5b4a39281706"
ENV = "RESYNTH_TEST_API_KEY"


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with FakeImagesApi(key=KEY) as fake:
        yield fake


def generator(api, model="tiny", retries=4, budget=None, **params) -> ApiGenerator:
    params = {"size": "16x16", "api_key_env": ENV, "timeout": 0.5, **params}
    return ApiGenerator("remote", ApiParams(api.url, model, **params), retries=retries, backoff_base=0.01,
                        budget=budget)


def statuses(api) -> list[int]:
    return [entry["status"] for entry in api.generation_log()]


def test_images_come_back_in_job_order_with_the_documented_request(api):
    gen = generator(api, concurrency=3)
    jobs = [(f"prompt {i}", i) for i in range(5)]
    images = gen.generate_many(jobs)
    for (prompt, _), image in zip(jobs, images):
        assert image.mode == "RGB" and image.size == (16, 16)
        assert np.array_equal(np.asarray(image), np.asarray(default_make(prompt, 0, (16, 16))))
    assert gen.calls == 5 and gen.load() is gen
    assert gen.default_batch_size() == 3
    log = api.generation_log()
    assert sorted(entry["body"]["prompt"] for entry in log) == [prompt for prompt, _ in jobs]
    assert all(entry["body"] == {"model": "tiny", "prompt": entry["body"]["prompt"], "n": 1, "size": "16x16",
                                 "response_format": "b64_json"} for entry in log)  # no seed sent
    assert all(entry["authorization"] == f"Bearer {KEY}" for entry in log)


def test_any_image_callable_and_v1_base_url_and_seed_only_when_extra_asks(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    with FakeImagesApi(make=lambda prompt, i: Image.new("L", (8, 8), 200), key=KEY) as api:
        gen = ApiGenerator("remote", ApiParams(api.url + "/v1/", "m", api_key_env=ENV,
                                               extra={"seed": "{seed}", "quality": "low"}))
        assert [im.getpixel((0, 0)) for im in gen.generate("a cat", [7, 8])] == [(200, 200, 200)] * 2
        log = api.generation_log()
        assert {entry["path"] for entry in log} == {"/v1/images/generations"}
        assert sorted(entry["body"]["seed"] for entry in log) == [7, 8]
        assert all(entry["body"]["quality"] == "low" and "size" not in entry["body"] for entry in log)
    assert endpoint_url("HTTPS://Api.Example.com/") == "https://api.example.com/v1/images/generations"
    assert endpoint_url("https://x.org/openai/v1") == "https://x.org/openai/v1/images/generations"


def test_retries_429_honouring_retry_after_then_500_then_succeeds(api):
    gen = generator(api)
    api.queue("429", "500")
    start = time.monotonic()
    assert len(gen.generate("p", [0])) == 1
    assert time.monotonic() - start >= 0.95  # Retry-After: 1, not the 0.01 s backoff
    assert statuses(api) == [429, 500, 200]
    assert gen.calls == 1


def test_retry_after_forms():
    parse = api_source._retry_after
    assert parse(httpx.Headers({"Retry-After": "3"})) == 3
    assert parse(httpx.Headers({"Retry-After": "100000"})) == api_source.RETRY_AFTER_CAP
    assert 5 <= parse(httpx.Headers({"Retry-After": formatdate(time.time() + 8, usegmt=True)})) <= 8
    assert parse(httpx.Headers({"Retry-After": formatdate(time.time() - 50, usegmt=True)})) == 0
    assert parse(httpx.Headers({"retry-after-ms": "250", "Retry-After": "9"})) == 0.25
    assert parse(httpx.Headers({"Retry-After": "soon"})) is None
    assert parse(httpx.Headers({})) is None


def test_gives_up_after_max_retries(api):
    api.mode = "500"
    with pytest.raises(SourceError, match=r"gave up after 3 attempts: HTTP 500: The server had an error"):
        generator(api, retries=2).generate("p", [0])
    assert statuses(api) == [500, 500, 500]


def test_bad_key_is_refused_at_once_with_the_servers_message_and_never_the_key(api, monkeypatch):
    wrong = "sk-wrong-0123456789abcdef"
    monkeypatch.setenv(ENV, wrong)
    with pytest.raises(SourceError) as info:
        generator(api).generate("p", [0])
    message = str(info.value)
    assert "HTTP 401" in message and "Incorrect API key provided" in message and ENV in message
    assert wrong not in message and "\n" not in message
    assert statuses(api) == [401]  # no retry of a refusal


def test_content_policy_refusal_is_not_retried(api):
    api.queue("content-policy")
    with pytest.raises(SourceError, match=r"HTTP 400: Your request was rejected .*safety system"):
        generator(api).generate("p", [0])
    assert statuses(api) == [400]


def test_an_error_under_200_and_a_moved_endpoint_say_what_the_server_said(api):
    """Both were 'malformed answer: no data[0]' and 'HTTP 301', with nothing of what the server said."""
    api.queue("error-200")
    with pytest.raises(SourceError, match=r"the API answered an error: Billing hard limit reached for Bearer \*\*\*$"):
        generator(api).generate("p", [0])
    api.queue("moved")
    with pytest.raises(SourceError, match=r"HTTP 301 \(redirected to https://api\.example\.com/v1/images/generations: "
                                          r"submissions do not follow redirects; if the API moved, add the source "
                                          r"again with its new URL\)"):
        generator(api).generate("p", [0])
    assert statuses(api) == [200, 301]  # neither retried nor followed


def test_missing_key_variable_sends_nothing(api, monkeypatch):
    monkeypatch.delenv(ENV)
    with pytest.raises(SourceError, match=f"environment variable {ENV} is not set"):
        generator(api).generate("p", [0])
    assert api.log == []


def test_hang_times_out_retries_then_fails(api):
    api.mode = "hang"
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"gave up after 2 attempts: ReadTimeout"):
        generator(api, retries=1, timeout=0.3).generate("p", [0])
    assert 0.55 <= time.monotonic() - start < 2.5
    assert len(api.generation_log()) == 2


@pytest.mark.parametrize("behaviour, message", [
    ("malformed", "malformed answer: not JSON"),
    ("empty", "malformed answer: no data"),
    ("bad-b64", "not base64"),
    ("undecodable", "cannot be decoded"),
    ("oversized", "5000x5000, over the"),
])
def test_bad_answers_are_source_errors(api, behaviour, message):
    api.queue(behaviour)
    budget = Budget()
    with pytest.raises(SourceError, match=message):
        generator(api, price=0.03, budget=budget).generate("p", [0])
    assert len(api.generation_log()) == 1
    # an image that came back was billed, usable or not: counted (a malformed answer had no image)
    billed = behaviour in ("undecodable", "oversized")
    assert budget.to_dict().get("maybe_charged_usd", 0) == (0.03 if billed else 0)


@pytest.mark.parametrize("behaviour", ["ok", "url"])
def test_byte_cap(api, monkeypatch, behaviour):
    monkeypatch.setattr(api_answers, "MAX_IMAGE_BYTES", 500)  # a 16x16 noise PNG is ~800 bytes
    api.queue(behaviour)
    with pytest.raises(SourceError, match="cap"):
        generator(api).generate("p", [0])


def test_url_answer_is_fetched_without_the_key(api):
    api.mode = "url"
    [image] = generator(api).generate("by url", [0])
    assert np.array_equal(np.asarray(image), np.asarray(default_make("by url", 0, (16, 16))))
    [fetch] = [entry for entry in api.log if entry["path"].startswith("/files/")]
    assert fetch["status"] == 200 and fetch["authorization"] is None


@pytest.mark.parametrize("behaviour, message", [
    ("redirect-private", r"non-public address \(169\.254\.169\.254"),
    ("url-private", r"non-public address \(10\.0\.0\.1"),
    ("redirect-loop", "redirects more than 3 times"),
])
def test_image_urls_into_private_networks_are_refused(api, behaviour, message):
    api.queue(behaviour)
    with pytest.raises(SourceError, match=message):
        generator(api).generate("p", [0])


def test_only_the_apis_own_host_may_be_local(api):
    gen = generator(api)
    gen._check_host(f"{api.url}/files/x.png")
    for url in (f"http://localhost:{api.port}/files/x.png", "http://[::1]/x", "http://0.0.0.0/x",
                "http://[::ffff:10.0.0.1]/x", "http://192.168.1.1/x", "http://224.0.0.1/x"):
        with pytest.raises(SourceError, match="non-public"):
            gen._check_host(url)
    with pytest.raises(SourceError, match="scheme"):
        gen._check_host("file:///etc/passwd")


def _stand_in(host: str, port: int, answer: tuple[int, dict]) -> tuple:
    """A plain HTTP server on `host:port` in a thread answering every request `answer` (status, headers);
    `hits` records the paths asked for."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            status, headers = answer
            self.send_response(status)
            for name, value in {"Content-Length": "0", **headers}.items():
                self.send_header(name, value)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, hits


def test_addresses_are_checked_on_the_connection_itself_rebinding_and_redirects(api, monkeypatch):
    """127.0.0.1 stands in for the public internet (the fake API), 127.0.0.2 for the server's own network (an
    "internal" service on the fake's port). Names first resolve to the former, then to the latter (rebinding):
    a public_only source (added over HTTP) is refused at the connection, on the address it would connect to,
    without retries; so are image URLs on other hosts of any source, after a redirect too; the API's own
    host, named by the CLI's operator, stays unrestricted."""
    from engine import api_http

    monkeypatch.setattr(api_http, "is_public", lambda address: address == "127.0.0.1")
    real, answers = api_http.socket.getaddrinfo, {}

    def rebinding(host, port, *args, **kwargs):  # each name: its list of answers, the last one for ever
        given = answers.get(host)
        address = (given.pop(0) if len(given) > 1 else given[0]) if given else host
        return real(address, port, *args, **kwargs)

    monkeypatch.setattr(api_http.socket, "getaddrinfo", rebinding)
    internal, reached = _stand_in("127.0.0.2", api.port, (200, {}))
    inside = f"http://meta.rebind.test:{api.port}/latest/meta-data/"
    redirector, _ = _stand_in("127.0.0.1", 0, (307, {"Location": inside}))
    elsewhere = f"http://127.0.0.1:{redirector.server_address[1]}"
    try:
        answers["api.rebind.test"] = ["127.0.0.1", "127.0.0.2"]
        params = ApiParams(f"http://api.rebind.test:{api.port}", "tiny", size="16x16", api_key_env=ENV, timeout=0.5,
                           public_only=True)
        remote = ApiGenerator("remote", params, backoff_base=0.01)
        assert len(remote.generate("p", [0])) == 1  # connected to the address it checked, under the name
        assert api.generation_log()[-1]["headers"]["host"] == f"api.rebind.test:{api.port}"
        start = time.monotonic()
        with pytest.raises(SourceError, match=r"^source 'remote': refused: api.rebind.test resolves to a "
                                              r"non-public address 127\.0\.0\.2$"):
            remote.generate("p", [1])
        assert time.monotonic() - start < 0.5 and len(api.generation_log()) == 1 and reached == []  # no retry
        local = ApiGenerator("local", replace(remote.params, public_only=False), backoff_base=0.01)
        with pytest.raises(SourceError, match="malformed"):  # the operator's: it reached the "internal" service
            local.generate("p", [0])
        assert reached == ["/v1/images/generations"]
        # a submission's redirect is never followed; an image URL's is, to public addresses only
        with pytest.raises(SourceError, match="refused the request: HTTP 307"):
            ApiGenerator("remote", replace(remote.params, url=elsewhere)).generate("p", [0])
        for gen in (remote, local):
            answers["meta.rebind.test"] = ["127.0.0.1", "127.0.0.2"]  # public for the hop's check, not after
            with api_http.client(1.0, restricted=gen._restricted) as client, \
                    pytest.raises(SourceError, match=r"image URL: refused: meta.rebind.test resolves to a "
                                                     r"non-public address 127\.0\.0\.2$"):
                gen._fetch(client, f"{elsewhere}/image.png")
        assert reached == ["/v1/images/generations"]
    finally:
        for server in (internal, redirector):
            server.shutdown()
            server.server_close()


def test_rate_limit_is_shared_by_every_generator_of_an_endpoint_and_model(api):
    first, second = generator(api, rate=120), generator(api, rate=120)  # one request per 0.5 s
    start = time.monotonic()
    other = threading.Thread(target=second.generate, args=("b", [0, 1]))
    other.start()
    first.generate("a", [0, 1, 2])
    other.join()
    assert first.calls + second.calls == 5
    assert time.monotonic() - start >= 1.95
    starts = sorted(entry["time"] for entry in api.generation_log())
    assert min(b - a for a, b in zip(starts, starts[1:])) >= 0.35  # 0.5 s apart, less server-side jitter


def test_concurrency_limit_per_endpoint_and_model(api):
    api.delay = 0.15
    gens = [generator(api, model="c2", concurrency=2), generator(api, model="c2", concurrency=2)]
    threads = [threading.Thread(target=g.generate, args=("p", list(range(4)))) for g in gens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(g.calls for g in gens) == 8
    assert api.max_in_flight == 2  # parallel, but never beyond the shared limit
    api.max_in_flight = 0
    generator(api, model="c1", concurrency=1).generate("p", [0, 1, 2])
    assert api.max_in_flight == 1


def test_key_never_in_repr_messages_or_logs(api, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    gen = generator(api)
    api.queue("500", "ok", "401", "hang")
    gen.generate("p", [0])
    errors = []
    for _ in range(2):
        with pytest.raises(SourceError) as info:
            generator(api, retries=0, timeout=0.2).generate("p", [0])
        errors.append(str(info.value))
    assert "retry 1/4" in caplog.text  # the debug log did run
    for text in [repr(gen), repr(gen.params), gen.params.to_json(), caplog.text, *errors]:
        assert KEY not in text and KEY[3:15] not in text
    assert not any(KEY in repr(value) for value in vars(gen).values())


def test_budget_buys_what_fits_then_stops_and_refunds_on_failure(api):
    budget = Budget(limit_usd=0.05)
    gen = generator(api, price=0.02, budget=budget, concurrency=1)
    with pytest.raises(PartialResult, match=r"spending 0\.0200 USD more would exceed --max-cost 0\.0500 USD "
                                            r"\(spent 0\.0400 so far\)") as partial:
        gen.generate("p", [0, 1, 2])  # two fit: bought and returned, the third is not sent
    assert [image is not None for image in partial.value.images] == [True, True, False]
    assert len(api.generation_log()) == 2 and budget.spent == pytest.approx(0.04) and budget.images == 2
    with pytest.raises(BudgetExceeded):  # nothing fits any more: nothing is sent
        gen.generate("p", [2])
    assert len(api.generation_log()) == 2
    budget.limit_usd = 1.0
    api.queue("ok", "401")  # second job refused: the first is paid, the rest refunded
    with pytest.raises(SourceError, match="401"):
        gen.generate("p", [3, 4, 5])
    assert gen.calls == 3 and budget.spent == pytest.approx(0.06) and gen.spent == pytest.approx(0.06)
    assert budget.images == 3


def test_a_key_with_a_line_break_is_refused_before_sending_and_never_echoed(api, monkeypatch):
    monkeypatch.setenv(ENV, KEY + "\nX")
    with pytest.raises(SourceError) as failure:
        generator(api).generate("p", [0])
    assert "control characters" in str(failure.value) and KEY not in str(failure.value)
    assert api.log == []
    monkeypatch.setenv(ENV, KEY + "\n")  # a trailing newline (a key file read whole) is stripped
    assert len(generator(api).generate("p", [0])) == 1
    assert api.generation_log()[-1]["authorization"] == f"Bearer {KEY}"


def test_an_unforeseen_error_in_one_answer_is_that_sources_failure(api):
    api.queue("ok", "url-bad-port")
    gen = generator(api, concurrency=1)
    with pytest.raises(PartialResult) as partial:  # the first image is kept, the second job failed cleanly
        gen.generate("p", [0, 1])
    assert partial.value.images[0] is not None and partial.value.images[1] is None


def test_cache_hash_covers_only_what_changes_the_image():
    base = ApiParams("https://api.example.com", "img-1", size="512x512", extra={"quality": "high"})
    same = ApiParams("HTTPS://api.example.com/v1/", "img-1", size="512x512", extra={"quality": "high"},
                     api_key_env="OTHER_KEY", price=0.5, rate=10, concurrency=7, timeout=3)
    assert base.cache_hash() == same.cache_hash()
    for changed in (ApiParams("https://other.example.com", "img-1", "512x512", extra={"quality": "high"}),
                    ApiParams("https://api.example.com", "img-2", "512x512", extra={"quality": "high"}),
                    ApiParams("https://api.example.com", "img-1", "256x256", extra={"quality": "high"}),
                    ApiParams("https://api.example.com", "img-1", "512x512", extra={"quality": "low"})):
        assert changed.cache_hash() != base.cache_hash()
    assert ApiParams.from_json(same.to_json()) == same


@pytest.mark.parametrize("bad", [
    {"url": "ftp://x.org"}, {"url": "http://"}, {"model": ""}, {"size": "512"}, {"size": "0x5"},
    {"api_key_env": "not a name"}, {"price": -1}, {"price": True}, {"rate": 0}, {"concurrency": 0},
    {"concurrency": 1.5}, {"timeout": 0}, {"extra": []}, {"extra": {"x": object()}},
    {"extra": {"x": float("nan")}}, {"extra": {"n": 4}},
])
def test_validation_is_one_line_user_errors(bad):
    fields = {"url": "https://api.example.com", "model": "m", **bad}
    with pytest.raises(UserError) as info:
        ApiParams(**fields).validate()
    assert "\n" not in str(info.value)
    with pytest.raises(UserError):
        ApiParams.from_json('{"url": "https://x.org", "model": "m", "colour": 1}')
