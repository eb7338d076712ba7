"""Total deadlines of API sources against real servers that drip: the status line and headers one byte
at a time, or the body; on a submission, a status poll and an image download. Each call must end
within its deadline plus a small margin, with the source's one-line failure naming the deadline."""
from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import pytest

from engine import api_exchange, api_http, api_source
from engine.api_source import ApiGenerator, ApiParams
from engine.errors import SourceError
from tests.fake_images_api import DripServer, FakeProviderApi, default_make, png_bytes

DEADLINE = 1.0
MARGIN = 1.0  # scheduling on 2 shared, busy cores (a dripped answer would take minutes)
JSON = {"content-type": "application/json"}


def openai_answer(url: str | None = None) -> bytes:
    if url:
        return json.dumps({"data": [{"url": url}]}).encode()
    return json.dumps({"data": [{"b64_json": base64.b64encode(png_bytes(default_make("p", 0, (16, 16)))).decode()}]
                      }).encode()


def generator(url: str, protocol: str = "openai", model: str = "m", retries: int = 4, **params) -> ApiGenerator:
    params = {"timeout": DEADLINE, **params}
    return ApiGenerator("dripped", ApiParams(url, model, protocol=protocol, **params),
                        retries=retries, backoff_base=0.01)


def timed_failure(gen: ApiGenerator) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(SourceError) as failure:
        gen.generate("p", [0])
    elapsed = time.monotonic() - start
    message = str(failure.value)
    assert "\n" not in message
    return message, elapsed


@pytest.mark.parametrize("drip", ["headers", "body"])
def test_a_dripped_submission_ends_at_the_deadline_and_is_not_retried(drip):
    path = "/v1/images/generations"
    with DripServer({path: (200, JSON, openai_answer())}, drip={path: drip}) as server:
        message, elapsed = timed_failure(generator(server.url))
        assert elapsed < DEADLINE + MARGIN, elapsed
        assert f"submission: no complete answer within the {DEADLINE:g} s deadline" in message
        assert "the server had sent" in message
        assert len(server.log) == 1  # a server that drips is not asked again


@pytest.mark.parametrize("drip", ["headers", "body"])
def test_a_dripped_image_download_ends_at_the_deadline(drip):
    with DripServer({}, drip={"/files/x.png": drip}) as server:
        server.routes["/v1/images/generations"] = (200, JSON, openai_answer(f"{server.url}/files/x.png"))
        server.routes["/files/x.png"] = (200, {"content-type": "image/png"}, png_bytes(default_make("p", 0)))
        message, elapsed = timed_failure(generator(server.url))
        assert elapsed < DEADLINE + MARGIN, elapsed
        assert f"image download: no complete answer within the {DEADLINE:g} s deadline" in message
        assert [entry["path"] for entry in server.log] == ["/v1/images/generations", "/files/x.png"]


@pytest.mark.parametrize("drip", ["headers", "body"])
def test_a_dripped_status_poll_ends_at_the_deadline(drip):
    with DripServer({}, drip={"/v1/get_result": drip}) as server:
        server.routes["/v1/flux-dev"] = (200, JSON, json.dumps(
            {"id": "t1", "polling_url": f"{server.url}/v1/get_result?id=t1"}).encode())
        server.routes["/v1/get_result"] = (200, JSON, json.dumps({"status": "Pending"}).encode())
        message, elapsed = timed_failure(generator(server.url, protocol="bfl", model="flux-dev"))
        assert elapsed < DEADLINE + MARGIN, elapsed
        assert f"status poll: no complete answer within the {DEADLINE:g} s deadline" in message


@pytest.mark.parametrize("protocol, model", [("bfl", "flux-dev"), ("replicate", "owner/model")])
def test_a_result_that_never_gets_ready_ends_the_polling_loop_at_the_deadline(monkeypatch, protocol, model):
    monkeypatch.setattr(api_exchange, "POLL_FIRST", 0.05)
    with FakeProviderApi(pending_polls=10 ** 6) as api:
        message, elapsed = timed_failure(generator(api.url, protocol=protocol, model=model))
        assert elapsed < DEADLINE + MARGIN, elapsed
        assert f"the result was not ready within the {DEADLINE:g} s deadline (last status" in message
        assert len(api.submissions()) == 1 and len(api.polls()) >= 3


def test_polls_back_off_between_answers(monkeypatch):
    monkeypatch.setattr(api_exchange, "POLL_FIRST", 0.05)
    monkeypatch.setattr(api_exchange, "POLL_GROWTH", 2.0)
    with FakeProviderApi(pending_polls=3) as api:
        generator(api.url, protocol="bfl", model="flux-dev", timeout=5).generate("p", [0])
        times = [entry["time"] for entry in api.polls()]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(times) == 4 and gaps[-1] > gaps[0] * 2.5, gaps


def test_a_silent_server_is_still_retried_each_attempt_bounded():
    path = "/v1/images/generations"

    def never(server, method, target, body):  # answers only after the client has gone
        time.sleep(DEADLINE * 1.5)
        return 200, JSON, openai_answer()

    with DripServer({path: never}) as server:
        start = time.monotonic()
        with pytest.raises(SourceError, match=rf"gave up after 2 attempts: ReadTimeout: no complete answer within "
                                              rf"the {DEADLINE:g} s deadline"):
            generator(server.url, retries=1).generate("p", [0])
        assert time.monotonic() - start < 2 * DEADLINE + MARGIN
        assert len(server.log) == 2


def test_the_deadline_covers_the_header_phase_of_a_plain_httpx_request():
    """The mechanism itself: a 0.5 s deadline on a client whose per-read timeout is 30 s."""
    path = "/x"
    with DripServer({path: (200, JSON, b"{}")}, drip={path: "headers"}, interval=0.02) as server, \
            api_http.client(30) as client:
        start = time.monotonic()
        with api_http.deadline(0.5) as state, pytest.raises(httpx.ReadTimeout, match="0.5 s deadline"):
            client.get(server.url + path)
        assert time.monotonic() - start < 0.5 + MARGIN
        assert state.expired and state.received > 0
        with pytest.raises(httpx.TimeoutException, match="0 s deadline"):  # nothing starts once the time is up
            with api_http.deadline(0.0):
                client.get(server.url + path)
    with DripServer({path: (200, JSON, b"{}")}) as server, api_http.client(30) as client:
        with api_http.deadline(5) as state:  # a prompt answer is not touched
            assert client.get(server.url + path).json() == {}
        assert not state.expired


def test_name_lookups_are_bounded(monkeypatch):
    release = threading.Event()

    def slow(*args, **kwargs):
        release.wait(10)
        raise OSError("no such host")

    monkeypatch.setattr(api_http.socket, "getaddrinfo", slow)
    start = time.monotonic()
    with pytest.raises(OSError, match="took longer"):
        api_http.resolve("slow.example.com", 443, 0.3)
    assert time.monotonic() - start < 0.3 + MARGIN
    release.set()


def test_ctrl_c_stops_a_polling_job_at_once(monkeypatch):
    monkeypatch.setattr(api_exchange, "POLL_FIRST", 0.05)
    with FakeProviderApi(pending_polls=10 ** 6) as api:
        gen = generator(api.url, protocol="bfl", model="flux-dev", timeout=30)
        abort = threading.Event()
        threading.Timer(0.4, abort.set).start()
        start = time.monotonic()
        with api_http.client(30) as client, pytest.raises(api_source._Interrupted):
            gen._one(client, None, "p", 0, abort)
        assert time.monotonic() - start < 0.4 + MARGIN


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    """A self-signed certificate for `localhost` (openssl), as server and client TLS contexts."""
    import shutil
    import ssl
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


def test_the_deadline_holds_over_tls_with_the_name_verified(tls_pair):
    """Names are resolved by the backend itself: TLS must still verify the host name, not the address."""
    server_tls, client_tls = tls_pair
    path = "/x"
    with DripServer({path: (200, JSON, b'{"ok": 1}')}, tls=server_tls, drip={"/drip": "headers"}) as server, \
            api_http.client(30, verify=client_tls) as client:
        server.routes["/drip"] = (200, JSON, b"{}")
        base = f"https://localhost:{server.port}"
        with api_http.deadline(5):
            assert client.get(base + path).json() == {"ok": 1}
        with pytest.raises(httpx.ConnectError, match="certificate|hostname|match"):  # the name is checked
            with api_http.deadline(5):
                client.get(f"https://127.0.0.1:{server.port}{path}")
        start = time.monotonic()
        with api_http.deadline(DEADLINE), pytest.raises(httpx.ReadTimeout, match="deadline"):
            client.get(base + "/drip")
        assert time.monotonic() - start < DEADLINE + MARGIN
