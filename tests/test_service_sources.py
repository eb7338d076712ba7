"""POST and DELETE /v1/sources on the real service: the CLI's kinds, checks and one-line errors (422), and
the policy that keeps an HTTP client from making the server read its files, send its secrets or call
into its network (403): paths only under the sources folder (symlinks followed), no `~`/`$VAR`, API key
variables only from the operator's list, API URLs only on public addresses."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from engine.service.app import create_app
from engine.service.core import Service
from engine.service.sources import SourcePolicy
from tests.fake_images_api import default_make, png_bytes
from tests.helpers import run_cli

PUBLIC = "https://93.184.216.34"  # a public address literal: no name lookup in the tests


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    """A store with one pipeline registered by the CLI, a copy of another pipeline inside the store's folder,
    and one running Service shared by apps of different policies."""
    root = tmp_path_factory.mktemp("sources")
    store = root / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--quiet") == 0
    (first, first_dir), (second, second_dir), *_ = models["pipelines"].items()
    assert run_cli("source", "add", first, first_dir, "--store", store, "--steps", 2, "--quiet") == 0
    shutil.copytree(second_dir, store / "pipelines" / "second")
    (store / "escape").symlink_to(Path(second_dir).resolve(), target_is_directory=True)
    service = Service.open(store)
    try:
        yield {"store": store, "service": service, "outside": str(second_dir), "first": first}
    finally:
        service.close()


def client(served, **policy) -> TestClient:
    app = create_app(served["service"], source_policy=SourcePolicy(**policy))
    return TestClient(app, raise_server_exceptions=False)


def error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    payload = response.json()
    assert set(payload) == {"error"} and payload["error"]["code"] == code, payload
    message = payload["error"]["message"]
    assert message and "\n" not in message and "Traceback" not in message
    return message


def cli_error(capsys, store, *args) -> str:
    capsys.readouterr()
    assert run_cli("source", "add", *args, "--store", store) == 2
    return capsys.readouterr().err.strip().removeprefix("resynth: error: ")


def test_add_list_and_remove_like_the_cli(served, capsys):
    api = client(served)
    added = api.post("/v1/sources", json={"name": "http-second", "params": {"path": "pipelines/second", "steps": 2}})
    assert added.status_code == 201, added.text
    info = added.json()
    assert info["name"] == "http-second" and info["kind"] == "diffusers" and "path" not in info
    listed = {s["name"]: s for s in api.get("/v1/sources").json()["sources"]}
    assert listed["http-second"]["params"]["steps"] == 2 and served["first"] in listed
    capsys.readouterr()
    assert run_cli("source", "list", "--store", served["store"], "--json") == 0  # the store the CLI reads
    stored = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert stored["http-second"]["path"] == str((served["store"] / "pipelines" / "second").resolve())
    query = png_bytes(default_make("q", 0, (64, 64)))
    answer = api.post("/v1/attribute", files={"image": ("q.png", query, "image/png")},
                      data={"prompt": "a red house", "per_source": "1", "adaptive": "false"})
    assert answer.status_code == 200, answer.text  # the running service attributes to it at once
    assert {s["source"] for s in answer.json()["results"][0]["scores"]} == {served["first"], "http-second"}
    # the same recipe under another name is the CLI's twin refusal, in one line
    twin = api.post("/v1/sources", json={"name": "again", "path": "pipelines/second", "steps": 2})
    assert "'http-second' already" in error(twin, 422, "invalid_source")
    removed = api.delete("/v1/sources/http-second")
    assert removed.status_code == 200 and removed.json() == {"removed": "http-second", "vectors": 1}  # its one
    assert "http-second" not in {s["name"] for s in api.get("/v1/sources").json()["sources"]}
    error(api.delete("/v1/sources/http-second"), 404, "unknown_source")


def test_mistakes_get_the_clis_one_line_message(served, capsys):
    api = client(served)
    for fields, args in (
            ({"kind": "api", "params": {"url": PUBLIC}}, ["x", "--api", PUBLIC]),
            ({"params": {"url": PUBLIC, "model": "m", "protocol": "replicate"}},
             ["x", "--api", PUBLIC, "--model", "m", "--protocol", "replicate"]),
            ({"params": {"url": PUBLIC, "model": "m", "price": "cheap"}},
             ["x", "--api", PUBLIC, "--model", "m", "--price", "cheap"]),
            ({"kind": "replay", "params": {"steps": 2}}, ["x", "--kind", "replay", "--steps", "2"])):
        message = error(api.post("/v1/sources", json={"name": "x", **fields}), 422, "invalid_source")
        assert message == cli_error(capsys, served["store"], *args), fields
    api_fields = {"url": PUBLIC, "model": "m", "protocol": "midjourney"}
    assert "--protocol of an api source must be one of bfl, fal, firefly" in error(
        api.post("/v1/sources", json={"name": "x", **api_fields}), 422, "invalid_source")
    assert "unknown field 'colour'" in error(api.post("/v1/sources", json={"name": "x", "colour": 1}), 422,
                                             "invalid_source")
    assert "steps of a diffusers source must be an integer" in error(
        api.post("/v1/sources", json={"name": "x", "path": "pipelines/second", "steps": [2]}), 422, "invalid_source")
    error(api.post("/v1/sources", json={"params": {}}), 422, "bad_request")
    error(api.post("/v1/sources", content=b"{not json", headers={"content-type": "application/json"}), 400,
          "bad_request")
    error(api.post("/v1/sources", content=b"name=x", headers={"content-type": "text/plain"}), 415,
          "unsupported_media_type")
    error(api.post("/v1/sources", json={"name": "x", "extra": "y" * 70_000}), 413, "body_too_large")


def test_paths_stay_inside_the_sources_folder(served):
    api = client(served)
    for path in (served["outside"], "../../", "escape", "pipelines/../../"):
        message = error(api.post("/v1/sources", json={"name": "sneak", "path": path}), 403, "path_not_allowed")
        assert served["outside"] not in message and str(served["store"]) not in message
    lora = {"name": "sneak", "kind": "lora", "path": "pipelines/second"}
    for files in ("/etc/passwd", "pipelines/../../x.safetensors:0.5", ["ok.safetensors", "/etc/hostname:1"]):
        error(api.post("/v1/sources", json={**lora, "lora": files}), 403, "path_not_allowed")
    for path in ("$HOME/models", "~/models", "${RESYNTH_STORE}"):
        assert "not expanded over HTTP" in error(api.post("/v1/sources", json={"name": "sneak", "path": path}),
                                                 422, "invalid_source")
    assert "sneak" not in {s["name"] for s in api.get("/v1/sources").json()["sources"]}
    # another root named by the operator, or none at all
    other = client(served, roots=(Path(served["outside"]).parent,))
    assert other.post("/v1/sources", json={"name": "outside", "path": served["outside"], "steps": 3}).status_code == 201
    assert other.delete("/v1/sources/outside").status_code == 200
    trusting = client(served, anywhere=True)
    assert trusting.post("/v1/sources", json={"name": "anywhere", "path": served["outside"],
                                              "steps": 4}).status_code == 201
    assert trusting.delete("/v1/sources/anywhere").status_code == 200


def test_api_sources_name_only_listed_variables_and_public_addresses(served, monkeypatch):
    monkeypatch.setenv("RESYNTH_TEST_SECRET", "s3cr3t-never-sent")
    api = client(served, key_envs=frozenset({"RESYNTH_OK_KEY"}))
    flux = {"url": PUBLIC, "model": "flux-dev", "protocol": "bfl"}
    message = error(api.post("/v1/sources", json={"name": "leak", **flux, "api_key_env": "RESYNTH_TEST_SECRET"}),
                    403, "env_not_allowed")
    assert "--sources-key-env" in message and "s3cr3t" not in message
    for url in ("http://127.0.0.1:9", "http://169.254.169.254", "http://10.1.2.3", "http://[::1]:8080",
                "http://localhost:8750"):
        error(api.post("/v1/sources", json={"name": "ssrf", **flux, "url": url}), 403, "address_not_allowed")
    # a URL no parser reads was a 500; a password in it would have been stored and listed
    assert "with a host, not 'http://[::1'" in error(api.post("/v1/sources", json={"name": "v6", **flux,
                                                                                 "url": "http://[::1"}),
                                                      422, "invalid_source")
    password = error(api.post("/v1/sources", json={"name": "pw", **flux, "url": "https://user:hunter2@93.184.216.34"}),
                     422, "invalid_source")  # it said: shown by `source list`: give the key with --api-key-env VAR
    assert "shown by GET /v1/sources: give the key with api_key_env" in password and "--" not in password
    firefly = {"url": PUBLIC, "model": "image4_standard", "protocol": "firefly", "api_key_env": "RESYNTH_OK_KEY"}
    error(api.post("/v1/sources", json={"name": "ff", **firefly, "client_id_env": "RESYNTH_TEST_SECRET"}), 403,
          "env_not_allowed")
    error(api.post("/v1/sources", json={"name": "ff", **firefly, "client_id_env": "RESYNTH_OK_KEY",
                                        "token_url": "http://127.0.0.1:1/ims"}), 403, "address_not_allowed")
    for fields, said in (({"client_id_env": "RESYNTH_OK_KEY", "token_url": "https://93.184.216.34:0/ims"},
                          "token_url 'https://93.184.216.34:0/ims': its port is not a number"),
                         ({"client_id_env": "RESYNTH_OK_KEY", "token_url": "ftp://93.184.216.34"},
                          "token_url must be http:// or https://"),
                         ({"api_key_env": None}, "the firefly protocol needs client_id_env (the variable holding")):
        message = error(api.post("/v1/sources", json={"name": "ff", **firefly, **fields}), 422, "invalid_source")
        assert said in message and "--" not in message, message  # the CLI's flags were named
    added = api.post("/v1/sources", json={"name": "flux", **flux, "api_key_env": "RESYNTH_OK_KEY", "price": 0.04})
    assert added.status_code == 201, added.text
    assert "RESYNTH_OK_KEY is not set" in added.json()["warnings"][0]
    assert api.delete("/v1/sources/flux").status_code == 200
    read_only = client(served, read_only=True)
    error(read_only.post("/v1/sources", json={"name": "flux", **flux}), 403, "read_only")
    error(read_only.delete(f"/v1/sources/{served['first']}"), 403, "read_only")


def test_serve_flags_set_the_policy_and_the_token_guards_the_routes(served, tmp_path, capsys):
    from engine.cli import build_parser
    from engine.errors import UserError
    from engine.service.commands import sources_from_args

    extra = tmp_path / "more-models"
    shutil.copytree(served["outside"], extra / "p")
    args = build_parser().parse_args(["serve", "--sources-root", str(extra), "--sources-key-env", "RESYNTH_OK_KEY"])
    policy = sources_from_args(args, served["store"])
    assert policy == SourcePolicy(roots=(extra,), key_envs=frozenset({"RESYNTH_OK_KEY"}))
    for bad, message in ((["--sources-root", str(tmp_path / "none")], "not a folder"),
                         (["--sources-key-env", "sk-the-key-itself"], "NAME of an environment variable")):
        with pytest.raises(UserError, match=message):
            sources_from_args(build_parser().parse_args(["serve", *bad]), served["store"])
    api = TestClient(create_app(served["service"], "tok-7", source_policy=policy), raise_server_exceptions=False)
    auth = {"Authorization": "Bearer tok-7"}
    error(api.post("/v1/sources", json={"name": "p", "path": "p"}), 401, "unauthorized")
    error(api.delete(f"/v1/sources/{served['first']}"), 401, "unauthorized")
    added = api.post("/v1/sources", json={"name": "p", "path": "p", "steps": 2}, headers=auth)
    assert added.status_code == 201, added.text
    inside_store = api.post("/v1/sources", headers=auth, json={"name": "q", "path": str(served["store"] / "pipelines")})
    error(inside_store, 403, "path_not_allowed")  # the roots given replace the default
    assert api.delete("/v1/sources/p", headers=auth).json() == {"removed": "p", "vectors": 0}


def test_names_over_http_are_plain_ascii_and_never_a_case_twin(served):
    """Look-alike, invisible, right-to-left and dot names would read as another source in every answer."""
    api = client(served)
    for name in (".", "..", "-rf", "ѕource", "ｓｏｕｒｃｅ", "a\u202eb", "src\u200b", "💥", "a b", "n" * 65):
        assert "ASCII letters" in error(api.post("/v1/sources", json={"name": name, "kind": "replay"}), 422,
                                        "invalid_source"), name
    twin = served["first"].upper()
    assert "only by case" in error(api.post("/v1/sources", json={"name": twin, "kind": "replay"}), 422,
                                   "invalid_source")
    raw = {"content-type": "application/json"}
    error(api.post("/v1/sources", content=b'{"name": "\\ud800", "kind": "replay"}', headers=raw), 400, "bad_request")
    error(api.post("/v1/sources", content=b"[" * 30_000 + b"]" * 30_000, headers=raw), 400, "bad_request")
    assert {s["name"] for s in api.get("/v1/sources").json()["sources"]}.isdisjoint({twin, ".", ".."})
    # a name taken by another recipe is a conflict (it was a 400 bad_request)
    assert api.post("/v1/sources", json={"name": "clash", "kind": "replay"}).status_code == 201
    assert "already exists" in error(api.post("/v1/sources", json={"name": "clash", "path": "pipelines/second",
                                                                  "steps": 5}), 409, "source_exists")
    assert api.delete("/v1/sources/clash").status_code == 200


def test_numbers_and_paths_from_http_are_bounded_and_errors_hide_the_servers_folders(served):
    api = client(served)
    second = {"name": "big", "path": "pipelines/second"}
    for fields in ({"steps": 10**30}, {"steps": 10**400}, {"size": 10**9}, {"guidance": 1e308}):
        assert "over HTTP" in error(api.post("/v1/sources", json={**second, **fields}), 422, "invalid_source")
    nan = b'{"name": "big", "path": "pipelines/second", "guidance": NaN}'
    error(api.post("/v1/sources", content=nan, headers={"content-type": "application/json"}), 422, "invalid_source")
    for path in ("a" * 300, "a/" * 600):  # the OS's ENAMETOOLONG was a 500
        assert "too long" in error(api.post("/v1/sources", json={"name": "big", "path": path}), 422, "invalid_source")
    missing = error(api.post("/v1/sources", json={"name": "big", "path": "no-such-folder"}), 422, "invalid_source")
    assert "no-such-folder" in missing and str(served["store"]) not in missing
    assert str(served["store"]) not in api.get("/v1/stats").text


def test_an_add_and_a_remove_of_one_name_at_once_are_two_changes(served):
    """They shared one single-flight key: the add was answered with the remove's vector count (a 500) or
    its unknown-source error (a 404), and the remove with the add's source."""
    import asyncio

    from engine.service import sources as changes

    policy, body = SourcePolicy(), json.dumps({"name": "race", "kind": "replay"}).encode()

    async def both():
        return await asyncio.gather(changes.add(served["service"], policy, body),
                                    changes.remove(served["service"], policy, "race"), return_exceptions=True)

    for _ in range(3):
        added, removed = asyncio.run(both())
        assert isinstance(added, dict) and added["name"] == "race", added
        assert removed == {"removed": "race", "vectors": 0} or "unknown source 'race'" in str(removed), removed
    assert client(served).delete("/v1/sources/race").status_code in (200, 404)


def test_api_sources_added_over_http_are_checked_again_at_each_connection(served, monkeypatch):
    """DNS rebinding: the name is public when the source is added, loopback when the server connects. The
    source is stored public_only and the address actually connected to is checked: that source fails for the
    request in one line and nothing reaches the loopback API; one added with --sources-anywhere reaches it."""
    from engine import api_http
    from tests.fake_images_api import FakeImagesApi

    real = api_http.socket.getaddrinfo
    answers = ["93.184.216.34"]  # the first lookup (the policy's, at registration), then loopback for ever

    def rebinding(host, port, *args, **kwargs):
        if host != "api.rebind.test":
            return real(host, port, *args, **kwargs)
        address = answers.pop(0) if answers else "127.0.0.1"
        return real(address, port, *args, **kwargs)

    monkeypatch.setattr(api_http.socket, "getaddrinfo", rebinding)
    query = {"image": ("q.png", png_bytes(default_make("q", 0, (64, 64))), "image/png")}
    form = {"prompt": "a red house", "per_source": "1", "adaptive": "false"}
    with FakeImagesApi() as fake:
        api, trusting = client(served), client(served, anywhere=True)
        fields = {"url": f"http://api.rebind.test:{fake.port}", "model": "m", "size": "64x64"}
        assert "unknown field 'public_only'" in error(api.post("/v1/sources", json={
            "name": "rebind", **fields, "public_only": False}), 422, "invalid_source")  # not the client's to say
        assert api.post("/v1/sources", json={"name": "rebind", **fields}).status_code == 201, answers
        assert trusting.post("/v1/sources", json={"name": "local", "url": fake.url, "model": "m",
                                                  "size": "64x64"}).status_code == 201
        stored = {s["name"]: s["params"] for s in api.get("/v1/sources").json()["sources"]}
        assert stored["rebind"]["public_only"] is True and "public_only" not in stored["local"]
        try:
            answer = api.post("/v1/attribute", files=query, data={**form, "sources": f"{served['first']},rebind"})
            assert answer.status_code == 200, answer.text
            result = answer.json()["results"][0]
            assert result["failed"] == {"rebind": "source 'rebind': refused: api.rebind.test resolves to a "
                                                  "non-public address 127.0.0.1"}, result
            assert fake.generation_log() == []  # refused before connecting: the loopback API saw nothing
            answer = api.post("/v1/attribute", files=query, data={**form, "sources": f"{served['first']},local"})
            assert {s["source"] for s in answer.json()["results"][0]["scores"]} == {served["first"], "local"}
            assert len(fake.generation_log()) == 1
        finally:
            for name in ("rebind", "local"):
                assert api.delete(f"/v1/sources/{name}").status_code == 200
