"""`resynth serve`: API contract, single flight, bounded generation queue, limits, token, crash safety."""
from __future__ import annotations

import io
import sqlite3
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index import vectors as vx
from index.store import Store
from tests.helpers import run_cli
from tests.procs import resynth

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from engine import zoo  # noqa: E402
from engine.aggregate import DEFAULT_PER_SOURCE  # noqa: E402
from engine.casereport import Evidence  # noqa: E402
from engine.service.app import _label, create_app  # noqa: E402
from engine.service.batching import MicroBatcher  # noqa: E402
from engine.service.config import Limits  # noqa: E402
from engine.service.core import Service  # noqa: E402
from engine.service.process import ServerProcess  # noqa: E402

REPO = Path(__file__).parents[1]
CACHED_PROMPT = "portrait of an old man with a beard"
SOURCES = len(zoo.DEFAULT_GENERATORS)  # every tiny pipeline is registered in the served store
K = DEFAULT_PER_SOURCE


# ----- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served_store(models, tmp_path_factory) -> Path:
    """A store with every tiny pipeline registered; tests add resyntheses as they go."""
    path = tmp_path_factory.mktemp("served") / "store"
    assert run_cli("init", "--store", path, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"]) == 0
    for name, folder in models["pipelines"].items():
        assert run_cli("source", "add", name, folder, "--store", path, "--steps", 2, "--quiet") == 0
    return path


@pytest.fixture(scope="module")
def query_png(originals) -> bytes:
    return Path(originals[0]["image"]).read_bytes()


def _client(store: Path, token: str | None = None, **limits) -> TestClient:
    service = Service.open(store, Limits(**limits))
    return TestClient(create_app(service, token), raise_server_exceptions=False)


def _post(client, png: bytes, prompt: str | None = CACHED_PROMPT, headers=None, **fields):
    fields.setdefault("adaptive", "false")  # a fixed K, so these tests can count generations exactly
    data = {k: str(v) for k, v in fields.items()}
    if prompt is not None:
        data["prompt"] = prompt
    return client.post("/v1/attribute", files={"image": ("query.png", png, "image/png")}, data=data,
                       headers=headers or {})


def _gate(service: Service) -> threading.Event:
    """Hold every generation until the returned event is set (the generator's own count still runs)."""
    gate = threading.Event()
    workspace = service.ws
    real_generator = workspace.generator

    def gated(name):
        generator = real_generator(name)
        if not getattr(generator, "gated", False):
            real = generator.generate

            def held(prompt, seeds, _real=real):
                assert gate.wait(60), "test gate never opened"
                return _real(prompt, seeds)
            generator.generate, generator.gated = held, True
        return generator
    workspace.generator = gated
    return gate


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) == {"error"} and payload["error"]["code"] == code
    message = payload["error"]["message"]
    assert message and "\n" not in message and "Traceback" not in message


def _ranking(body: dict) -> tuple:
    """Sources in rank order with scores to 5 decimals: equal answers, whatever the batch size."""
    return tuple((s["source"], round(s["score"], 5)) for s in body["results"][0]["scores"])


def _calls(service: Service) -> int:
    return sum(service.ws.generator_calls.values())


# ----- the API contract ----------------------------------------------------------------------------
def test_attribute_matches_cli_json_and_caches(served_store, originals, query_png, capsys):
    with _client(served_store) as client:
        first = _post(client, query_png)
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["cache"]["generated"] in (0, SOURCES * K)  # another test may have generated it first
        again = _post(client, query_png).json()
        assert again["cache"] == {"cached": SOURCES * K, "generated": 0}
        result = again["results"][0]
        assert result["query"] == "query.png" and result["description_from"] == "prompt"
        assert len(result["scores"]) == SOURCES and result["predicted"] == result["scores"][0]["source"]
        assert result["margin"] == pytest.approx(result["scores"][0]["score"] - result["scores"][1]["score"])
        assert abs(sum(s["probability"] for s in result["scores"]) - 1) < 1e-6
        assert {"unknown", "calibrated", "cached", "generated", "missing"} <= set(result)

        sources = client.get("/v1/sources").json()["sources"]
        assert len(sources) == SOURCES and all("path" not in s for s in sources)
        stats = client.get("/v1/stats").json()
        assert stats["store"]["vectors"] >= SOURCES * K and stats["service"]["requests"] >= 2
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        schema = client.get("/openapi.json").json()
        assert "multipart/form-data" in schema["paths"]["/v1/attribute"]["post"]["requestBody"]["content"]
        # two images, one prompt each, a source subset and another aggregation
        two = client.post("/v1/attribute", files=[("image", ("a.png", query_png, "image/png")),
                                                  ("image", ("b.png", query_png, "image/png"))],
                          data={"prompt": [CACHED_PROMPT, CACHED_PROMPT], "aggregation": "mean",
                                "sources": "tiny-sd-ddim,tiny-sdxl-dpm"})
        assert two.status_code == 200, two.text
        assert [r["query"] for r in two.json()["results"]] == ["a.png", "b.png"]
        assert {s["source"] for s in two.json()["results"][0]["scores"]} == {"tiny-sd-ddim", "tiny-sdxl-dpm"}

    capsys.readouterr()
    assert run_cli("attribute", originals[0]["image"], "--prompt", CACHED_PROMPT, "--store", served_store,
                   "--json", "--quiet") == 0
    cli = json.loads(capsys.readouterr().out)["results"][0]
    assert _ranking({"results": [cli]}) == _ranking(again)
    assert set(cli) == set(result)


def test_concurrent_identical_requests_generate_once(served_store, query_png):
    prompt, clients = "a lighthouse on a cliff at dusk", 6
    with _client(served_store) as client:
        service = _service_of(client)
        gate = _gate(service)
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(_post, client, query_png, prompt) for _ in range(clients)]
            _wait_for(lambda: service.generation.stats()["joined"] == clients - 1)
            gate.set()
            responses = [f.result(timeout=60) for f in futures]
        assert [r.status_code for r in responses] == [200] * clients
        assert _calls(service) == SOURCES * K  # K per source, generated exactly once
        assert service.generation.stats()["jobs"] == 1
        # one answer for all (up to float noise: batched CLIP forward passes round differently)
        assert len({_ranking(r.json()) for r in responses}) == 1
        # a later request for the same description is a pure cache hit: no job at all
        later = _post(client, query_png, prompt).json()
        assert later["cache"] == {"cached": SOURCES * K, "generated": 0}
        assert service.generation.stats()["jobs"] == 1 and _calls(service) == SOURCES * K


def test_resident_pipelines_are_bounded_across_option_sets(served_store, query_png):
    with _client(served_store, max_loaded=2) as client:
        service = _service_of(client)
        for sources in ("tiny-sd-ddim,tiny-sd-euler-a", "tiny-sdxl-euler,tiny-sdxl-dpm"):  # two option sets
            reply = _post(client, query_png, "a green door in a stone wall", per_source=1, sources=sources)
            assert reply.status_code == 200 and reply.json()["cache"]["generated"] == 2
        resident = service.ws.loaded_pipelines()
        assert sorted(resident) == ["tiny-sdxl-dpm", "tiny-sdxl-euler"]  # the first two were unloaded


def test_cached_lookups_do_not_wait_behind_generation(served_store, query_png):
    with _client(served_store) as client:
        service = _service_of(client)
        assert _post(client, query_png).status_code == 200  # make sure CACHED_PROMPT is stored
        gate = _gate(service)
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(_post, client, query_png, "a red bicycle leaning on a wall")
            _wait_for(lambda: service.generation.stats()["running"] == 1)
            started = time.perf_counter()
            fast = _post(client, query_png)
            elapsed = time.perf_counter() - started
            assert fast.status_code == 200 and fast.json()["cache"]["generated"] == 0
            assert not slow.done(), "the generation should still be held"
            assert elapsed < 5
            gate.set()
            assert slow.result(timeout=60).status_code == 200


def test_burst_beyond_the_queue_is_refused_not_crashed(served_store, query_png):
    prompts = [f"a burst prompt number {word}" for word in ("one", "two", "three", "four", "five", "six")]
    with _client(served_store, queue_size=1) as client:
        service = _service_of(client)
        gate = _gate(service)
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(_post, client, query_png, p, per_source=1) for p in prompts]
            _wait_for(lambda: service.generation.stats()["refused"] == len(prompts) - 2)
            gate.set()
            responses = [f.result(timeout=60) for f in futures]
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200] + [503] * (len(prompts) - 2)
        for refused in (r for r in responses if r.status_code == 503):
            _assert_error(refused, 503, "queue_full")
            assert refused.headers["retry-after"]
        assert client.get("/readyz").status_code == 200
        assert _post(client, query_png, prompts[-1], per_source=1).status_code == 200  # serves again


def _service_of(client: TestClient) -> Service:
    return client.app.state.service


# ----- bad input and limits ------------------------------------------------------------------------
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size but holds no pixel data: only the header may ever be read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def _encoded(fmt: str, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 30, 200)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_memory_the_machine_refuses_is_answered_not_raised_to_the_server(served_store, query_png):
    """MemoryError was answered 503 by the catch-all, then re-raised to uvicorn: a traceback in the log."""
    service = Service.open(served_store, Limits())

    async def out_of_memory(*_args, **_kwargs):
        raise MemoryError()

    service.attribute = out_of_memory  # type: ignore[method-assign]
    with TestClient(create_app(service), raise_server_exceptions=True) as client:
        _assert_error(_post(client, query_png), 503, "out_of_memory")


def test_every_bad_input_gets_its_status(served_store, query_png):
    with _client(served_store, max_body_bytes=400_000, max_image_bytes=200_000) as client:
        _assert_error(_post(client, b"this is not an image"), 400, "undecodable_image")
        _assert_error(_post(client, query_png[: len(query_png) // 2]), 400, "undecodable_image")  # truncated
        _assert_error(_post(client, _encoded("ICO")), 415, "unsupported_image")  # a format not on the list
        _assert_error(_post(client, b""), 400, "empty_image")
        _assert_error(_post(client, _png_header_only(100_000, 100_000)), 413, "image_too_large")  # bomb
        _assert_error(_post(client, b"\0" * 250_000), 413, "image_too_large")  # bytes over the image limit
        _assert_error(_post(client, query_png, " \t \n "), 400, "empty_prompt")
        _assert_error(_post(client, query_png, sources="tiny-sd-ddim,no-such-source"), 404, "unknown_source")
        _assert_error(_post(client, query_png, per_source="many"), 400, "bad_option")
        _assert_error(_post(client, query_png, per_source=0), 400, "bad_option")
        _assert_error(_post(client, query_png, aggregation="median"), 400, "bad_option")
        _assert_error(client.post("/v1/attribute", data={"prompt": "x"},
                                  files={"other": ("a.txt", b"x")}), 400, "no_image")
        _assert_error(client.post("/v1/attribute", json={"image": "a.png"}), 415, "unsupported_media_type")
        _assert_error(client.post("/v1/attribute", files=[("image", ("a.png", query_png, "image/png"))] * 2,
                                  data={"prompt": ["one", "two", "three"]}), 400, "bad_request")
        # a body over the limit, declared (Content-Length) and undeclared (chunked)
        _assert_error(_post(client, b"\0" * 500_000), 413, "body_too_large")

        def chunks():
            for _ in range(10):
                yield b"\0" * 100_000
        chunked = client.post("/v1/attribute", content=chunks(),
                              headers={"content-type": "multipart/form-data; boundary=xyz"})
        _assert_error(chunked, 413, "body_too_large")
        _assert_error(client.get("/v1/nothing-here"), 404, "not_found")
        _assert_error(client.delete("/v1/sources"), 405, "method_not_allowed")
        # no client-supplied name reaches the filesystem: it is only echoed back as a label
        named = client.post("/v1/attribute", data={"prompt": CACHED_PROMPT},
                            files={"image": ("../../etc/passwd.png", query_png, "image/png")})
        assert named.status_code == 200 and named.json()["results"][0]["query"] == "passwd.png"
        import httpx  # a media type's name is case-insensitive (RFC 9110)

        form = httpx.Request("POST", "http://x/", files={"image": ("q.png", query_png, "image/png")},
                             data={"prompt": CACHED_PROMPT})
        shouted = client.post("/v1/attribute", content=form.read(), headers={
            "content-type": form.headers["content-type"].replace("multipart/form-data", "Multipart/Form-Data")})
        assert shouted.status_code == 200, shouted.text
        assert _label("..\\..\\win\\x\x00y\x1b.png", 0) == "xy.png" and _label(None, 2) == "image-3"
        assert _label("say %22hi%22%0A.png", 0) == 'say "hi".png'  # as a browser sends `say "hi"\n.png`
        assert client.get("/readyz").status_code == 200


def test_a_library_failure_is_a_json_500_without_traceback(served_store, query_png):
    with _client(served_store) as client:
        service = _service_of(client)

        async def broken(queries, options):
            raise RuntimeError("boom\nTraceback (most recent call last): secret internals")
        service.attribute = broken
        response = _post(client, query_png)
        _assert_error(response, 500, "internal_error")
        assert "boom" not in response.text and "secret" not in response.text


def test_token_is_required_except_for_health(served_store, query_png, monkeypatch):
    token = "correct horse battery staple"
    with _client(served_store, token=token) as client:
        good = {"Authorization": f"Bearer {token}"}
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            _assert_error(client.get("/v1/sources", headers=headers), 401, "unauthorized")
            _assert_error(client.get("/v1/stats", headers=headers), 401, "unauthorized")
            _assert_error(_post(client, query_png, headers=headers), 401, "unauthorized")
        assert client.get("/v1/sources", headers=good).status_code == 200
        assert _post(client, query_png, headers=good).status_code == 200
        # the API's documentation opens in a browser (which cannot add the header to a page it navigates
        # to); it declares the bearer scheme, so its "Authorize" button sends the token the calls still need
        page = client.get("/docs")
        assert page.status_code == 200 and "openapi.json" in page.text
        schema = client.get("/openapi.json").json()
        bearer = schema["components"]["securitySchemes"]["bearer"]
        assert bearer == {"type": "http", "scheme": "bearer", "description": bearer["description"]}
        assert schema["security"] == [{"bearer": []}] and schema["paths"]["/healthz"]["get"]["security"] == []
        _assert_error(client.get("/v1/sources", params={"token": token}), 401, "unauthorized")  # no token in URLs
    from engine.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.token is None


def test_evidence_thumbnails_by_id_only_cached_and_behind_the_token(served_store, query_png):
    token = "thumbs need the token too"
    good = {"Authorization": f"Bearer {token}"}
    with _client(served_store, token=token) as client:
        result = _post(client, query_png, headers=good).json()["results"][0]
        closest = result["closest"]
        assert set(closest) == {s["source"] for s in result["scores"]}
        image_id = closest[result["predicted"]][0]["image_id"]
        url = f"/v1/images/{image_id}/thumb"
        _assert_error(client.get(url), 401, "unauthorized")
        first = client.get(url, headers=good)
        assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
        picture = Image.open(io.BytesIO(first.content))
        assert picture.format == "JPEG" and max(picture.size) <= 256
        etag = first.headers["etag"]
        assert "max-age" in first.headers["cache-control"] and "private" in first.headers["cache-control"]
        again = client.get(url, headers={**good, "If-None-Match": etag})
        assert again.status_code == 304 and not again.content
        assert client.get(url, headers=good).content == first.content
        for bad in ("../../metadata.sqlite", "1.5", "%2e%2e%2fstore.json", "-1"):
            response = client.get(f"/v1/images/{bad}/thumb", headers=good)
            assert response.status_code in (400, 404), (bad, response.status_code)
            assert response.headers["content-type"].startswith("application/json")
        for missing in (0, 10 ** 9, 2 ** 70):
            _assert_error(client.get(f"/v1/images/{missing}/thumb", headers=good), 404, "not_found")
        # the stored file altered (even one byte, same size), then gone: the store's damage, said as such (a 503
        # naming the image), never the altered picture shown as evidence nor "no such image"
        with sqlite3.connect(served_store / "metadata.sqlite") as db:
            stored = served_store / db.execute("SELECT path FROM images WHERE id = ?", (image_id,)).fetchone()[0]
        original = stored.read_bytes()
        with Store.open(served_store) as store:
            assert (Evidence(store).uri(image_id) or "").startswith("data:image/")
        try:
            stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
            for gone in (False, True):
                if gone:
                    stored.unlink()
                response = client.get(url, headers={**good, "If-None-Match": etag})
                _assert_error(response, 503, "store_damaged")
                assert f"stored image {image_id}" in response.json()["error"]["message"]
                with Store.open(served_store) as store:  # a case report shows it as missing, not as evidence
                    assert Evidence(store).uri(image_id) is None
        finally:
            stored.write_bytes(original)
        assert client.get(url, headers=good).content == first.content


def test_case_report_download_is_self_contained(served_store, query_png):
    hostile = "<img src=x onerror=alert(1)>.png"
    with _client(served_store) as client:
        response = client.post("/v1/report", files={"image": (hostile, query_png, "image/png")},
                               data={"prompt": CACHED_PROMPT + " <b>bold</b>", "adaptive": "false"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/html")
        assert "attachment" in response.headers["content-disposition"]
        page = response.text
        assert "<script" not in page and "<img src=x" not in page and "&lt;img src=x onerror" in page
        assert "&lt;b&gt;bold" in page
        assert page.count("alt='query ") == 1 and page.count("resynthesis'>") >= SOURCES
        assert str(served_store) not in page  # the server's paths stay on the server
        for source in client.get("/v1/sources").json()["sources"]:
            assert source["fingerprint"] in page
        _assert_error(client.post("/v1/report", data={"prompt": "x"}), 415, "unsupported_media_type")


def test_serve_command_refuses_bad_setup(tmp_path, capsys):
    assert run_cli("serve", "--store", tmp_path / "missing") == 2
    assert capsys.readouterr().err.strip().startswith("resynth: error: no store at")
    assert run_cli("serve", "--store", tmp_path / "missing", "--queue-size", 0) == 2
    assert "--queue-size must be positive" in capsys.readouterr().err


def test_micro_batcher_shares_forward_passes_and_never_waits_alone():
    calls: list[int] = []

    def embed(images):
        calls.append(len(images))
        return np.array([[float(im.width)] for im in images], np.float32)

    batcher = MicroBatcher(embed, window=2.0, max_images=64)
    try:
        started = time.perf_counter()
        assert batcher.submit([Image.new("RGB", (5, 1))]).result(10).tolist() == [[5.0]]
        assert time.perf_counter() - started < 1.0  # nobody else announced: no window to wait out
        calls.clear()
        barrier = threading.Barrier(8)

        def one(i: int) -> np.ndarray:
            with batcher.expect():
                barrier.wait()
                future = batcher.submit([Image.new("RGB", (i + 1, 1)), Image.new("RGB", (i + 1, 2))])
            return future.result(10)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        assert all(r[:, 0].tolist() == [i + 1, i + 1] for i, r in enumerate(results))  # each gets its own rows
        assert calls == [16]  # one forward pass for all eight requests
    finally:
        batcher.close()


def test_index_rebuilt_by_another_process_is_swapped_in_without_failures(served_store, query_png):
    with _client(served_store, refresh_seconds=0.05) as client:
        service = _service_of(client)
        assert _post(client, query_png).status_code == 200
        statuses: list[int] = []
        stop = threading.Event()

        def hammer():
            while not stop.is_set():
                statuses.append(_post(client, query_png).status_code)
        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            for _ in range(2):
                assert resynth("rebuild", "--store", served_store, "--quiet").returncode == 0
                time.sleep(0.2)
            _wait_for(lambda: service.counters["index_swaps"] >= 1, timeout=10)
        finally:
            stop.set()
            worker.join()
        assert statuses and set(statuses) == {200}


def test_a_source_removed_by_the_cli_leaves_the_running_server(served_store, query_png, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(served_store, store)
    with _client(store, refresh_seconds=0.05) as client:
        _service_of(client)
        assert len(_post(client, query_png).json()["results"][0]["scores"]) == SOURCES
        assert run_cli("source", "remove", "tiny-sdxl-dpm", "--store", store, "--quiet") == 0
        def removed() -> bool:
            body = _post(client, query_png).json()
            assert "results" in body, body
            return len(body["results"][0]["scores"]) == SOURCES - 1
        _wait_for(removed, timeout=10)
        after = _post(client, query_png).json()["results"][0]
        assert {s["source"] for s in after["scores"]} == {g.name for g in zoo.DEFAULT_GENERATORS} - {"tiny-sdxl-dpm"}
        _assert_error(_post(client, query_png, sources="tiny-sdxl-dpm"), 404, "unknown_source")


# ----- a real server process: kill -9 during generation, restart -----------------------------------
def _vectors(store: Path) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{store / 'metadata.sqlite'}?mode=ro", uri=True, timeout=30) as db:
        return db.execute("SELECT count(*) FROM vectors").fetchone()[0]


def test_kill_during_generation_then_restart_keeps_store_consistent(served_store, query_png, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(served_store, store)
    acknowledged = "a sailing boat on a calm lake"
    server = ServerProcess(store, "--refresh-seconds", "0.2")
    try:
        done = httpx.post(server.url + "/v1/attribute", files={"image": ("q.png", query_png, "image/png")},
                          data={"prompt": acknowledged, "adaptive": "false", "mode": "resynthesis"}, timeout=60)
        assert done.status_code == 200 and done.json()["cache"]["generated"] == SOURCES * K
        before = _vectors(store)
        prompts = [f"an unfinished prompt number {w}" for w in ("one", "two", "three", "four")]

        def slow_request():
            try:
                httpx.post(server.url + "/v1/attribute", timeout=60, data={"prompt": prompts, "adaptive": "false"},
                           files=[("image", (f"{i}.png", query_png, "image/png")) for i in range(len(prompts))])
            except httpx.HTTPError:
                pass  # the server dies under it
        requester = threading.Thread(target=slow_request)
        requester.start()
        _wait_for(lambda: _vectors(store) > before, timeout=60)  # some of it is committed ...
        os.kill(server.proc.pid, signal.SIGKILL)  # ... and the rest never will be
        server.proc.wait()
        requester.join()
    finally:
        server.stop()
    partial = _vectors(store)
    assert before < partial < before + len(prompts) * SOURCES * K, "kill landed outside the generation"
    with Store.open(store) as opened:
        assert np.array_equal(np.sort(vx.index_ids(opened.index)), opened.vector_ids())
        assert opened.stats()["vectors"] == partial
        kept = opened.resyntheses(opened.description_id(acknowledged))
        assert len(kept) == SOURCES * K  # the acknowledged answer's resyntheses survived the kill

    server = ServerProcess(store)
    try:
        again = httpx.post(server.url + "/v1/attribute", files={"image": ("q.png", query_png, "image/png")},
                           data={"prompt": acknowledged, "adaptive": "false", "mode": "resynthesis"}, timeout=60).json()
        assert again["cache"] == {"cached": SOURCES * K, "generated": 0}
        assert _ranking(again) == _ranking(done.json())
    finally:
        server.stop()
    with Store.open(store) as opened:
        assert np.array_equal(np.sort(vx.index_ids(opened.index)), opened.vector_ids())


def test_workers_share_the_port_are_restarted_and_stop_together(tmp_path, monkeypatch):
    """`serve --workers 2`: both workers answer on the one port (stats name which), a worker killed with
    SIGKILL is restarted while the other keeps answering, and SIGTERM to the supervisor stops them all.
    A worker slow to start is named once (the limit set near zero here, so every start counts as slow)."""
    import httpx

    monkeypatch.setenv("RESYNTH_WORKER_SLOW_START_S", "0.01")

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_serve

    queries = bench_serve.build(tmp_path / "bench", "tiny", "cpu", 2, 2)
    with ServerProcess(tmp_path / "bench" / "store", "--workers", "2", "--device", "cpu") as server:
        def worker_seen() -> str:
            with httpx.Client(base_url=server.url, timeout=30) as http:  # a new connection each time
                return http.get("/v1/stats").json()["service"]["worker"]

        assert {worker_seen() for _ in range(40)} == {"1/2", "2/2"}
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        assert len(children) == 2
        os.kill(children[0], signal.SIGKILL)
        for data, prompt in queries:  # the other worker answers meanwhile
            reply = httpx.post(server.url + "/v1/attribute", files={"image": ("q.png", data, "image/png")},
                               data={"prompt": prompt}, timeout=60)
            assert reply.status_code == 200 and reply.json()["cache"]["generated"] == 0
        deadline = time.monotonic() + 60
        while "restarting it" not in server.log and time.monotonic() < deadline:
            time.sleep(0.2)
        while {worker_seen() for _ in range(20)} != {"1/2", "2/2"} and time.monotonic() < deadline:
            time.sleep(0.5)
        assert {worker_seen() for _ in range(40)} == {"1/2", "2/2"}, server.log[-2000:]
        idle = _cpu_ticks(server.pid)
        time.sleep(1.0)
        assert _cpu_ticks(server.pid) - idle <= 5  # the supervisor waits, it does not spin
        survivors = [int(p) for p in subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True,
                                                    text=True).stdout.split()]
    assert server.proc.returncode == 0, server.log[-2000:]
    assert not [p for p in survivors if Path(f"/proc/{p}").exists() and "Z" not in _proc_state(p)]
    assert "worker 1 of 2 exited with code -9: restarting it" in server.log
    assert server.log.count("worker 2 of 2 is not serving") == 1  # once, not at every poll
    assert "Traceback" not in server.log


def test_readiness_probes_of_a_hung_database_share_one_thread(served_store, monkeypatch):
    """A database that hangs held one executor thread per /readyz call (threads the app's other background
    calls need); probes now join the one in flight, and a store error reads as not reachable."""
    import engine.service.app as service_app
    from index.errors import StoreError

    monkeypatch.setattr(service_app, "READY_DB_SECONDS", 0.2)
    release, calls = threading.Event(), []

    def hung() -> bool:
        calls.append(1)
        release.wait(10)
        raise StoreError("cannot reach the database")

    with _client(served_store) as client:
        monkeypatch.setattr(client.app.state.service.store, "reachable", hung)
        for _ in range(3):
            reply = client.get("/readyz")
            assert reply.status_code == 503 and reply.json()["error"]["code"] == "database_unreachable"
        assert len(calls) == 1  # the later probes joined the first
        release.set()
        time.sleep(0.1)
        assert client.app.state.service.probe_store().result(5) is False  # a new probe: the error is False
        assert len(calls) == 2


def test_workers_that_cannot_start_exit_with_their_code(models, tmp_path):
    """A store that cannot be opened stops `serve --workers 2` with the exit code `serve` alone gives (4 for a
    damaged database; it was 2, a usage error, whatever the cause)."""
    from engine.service.process import free_port

    store = tmp_path / "s"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--quiet") == 0
    (store / "metadata.sqlite").write_bytes(b"\x00garbage" * 400)
    out = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--store", str(store), "--workers", "2",
                          "--port", str(free_port())], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 4, out.stderr[-2000:]
    assert "not a SQLite database" in out.stderr and "before it was serving: stopping" in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # once, by the supervisor: not once per worker


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
