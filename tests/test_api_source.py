"""A source behind an OpenAI-compatible images API, end to end against a local fake server that serves a
tiny diffusers pipeline's images: registration in one command, attribution beside local pipelines,
one purchase per (description, slot), failures and budgets that leave the other sources' answer, and a
key that never reaches the store, the output or the logs."""
from __future__ import annotations

import itertools
import json
import logging

import pytest

import engine
import engine.api_exchange
import engine.api_source
from engine import Options
from engine.generate import DiffusersGenerator, GenerationParams
from tests.conftest import PROMPTS
from tests.fake_images_api import FakeImagesApi
from tests.helpers import run_cli

KEY = "sk-test-9f8e7d6c5b4a-NEVER-STORED"
ENV = "RESYNTH_TEST_API_KEY"
PRICE = 0.02
OPTIONS = ["--per-source", "2", "--no-adaptive", "--mode", "resynthesis"]


@pytest.fixture
def api_store(models, tmp_path, monkeypatch):
    """A store with every tiny pipeline but the first as local sources, and the first behind a fake API."""
    monkeypatch.setenv(ENV, KEY)
    monkeypatch.setattr(engine.api_exchange, "BACKOFF_BASE", 0.01)
    (hidden, folder), *local = models["pipelines"].items()
    pipeline = DiffusersGenerator(hidden, folder, GenerationParams(steps=2))
    seeds = itertools.count(7000)  # an API draws a fresh image per call; it takes no seed
    store = tmp_path / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--quiet") == 0
    for name, path in local:
        assert run_cli("source", "add", name, path, "--store", store, "--steps", 2, "--quiet") == 0
    with FakeImagesApi(make=lambda prompt, _: pipeline.generate(prompt, [next(seeds)])[0], key=KEY) as api:
        assert run_cli("source", "add", "remote", "--api", api.url, "--model", "tiny", "--api-key-env", ENV,
                       "--price", PRICE, "--rate", "600/min", "--concurrency", 2, "--timeout", 5,
                       "--store", store, "--quiet") == 0
        yield store, api, hidden


def _attribute(store, queries_file, capsys, *extra) -> dict:
    capsys.readouterr()
    assert run_cli("attribute", "--queries", queries_file, "--store", store, "--json", "--quiet",
                   *OPTIONS, *extra) == 0
    out, err = capsys.readouterr()
    assert KEY not in out and KEY not in err
    return json.loads(out)


def _queries(originals, tmp_path, sources: set[str], prompts=None):
    path = tmp_path / f"q{len(list(tmp_path.iterdir()))}.jsonl"
    rows = [o for o in originals if o["source"] in sources]
    path.write_text("".join(json.dumps({"image": str(o["image"]),
                                        "prompt": (prompts or {}).get(o["prompt"], o["prompt"])}) + "\n"
                            for o in rows))
    return path, rows


def test_api_source_attributes_beside_pipelines_and_pays_once(api_store, originals, tmp_path, capsys, caplog):
    store, api, hidden = api_store
    other = next(o["source"] for o in originals if o["source"] != hidden)
    queries, rows = _queries(originals, tmp_path, {hidden, other})
    caplog.set_level(logging.DEBUG)
    first = _attribute(store, queries, capsys)
    truth = {hidden: "remote", other: other}
    right = sum(r["predicted"] == truth[row["source"]] for r, row in zip(first["results"], rows))
    assert right >= len(rows) - 1, [r["predicted"] for r in first["results"]]
    bought = len(PROMPTS) * 2  # every (description, slot) once, for both sources' queries
    assert len(api.generation_log()) == bought
    assert first["cost"]["images_bought"] == bought and first["cost"]["spent_usd"] == pytest.approx(bought * PRICE)
    assert all(e["authorization"] == f"Bearer {KEY}" for e in api.generation_log())

    again = _attribute(store, queries, capsys)  # a repeated prompt costs nothing
    assert len(api.generation_log()) == bought
    assert again["cost"]["images_bought"] == 0 and again["cost"]["saved_by_cache_usd"] == pytest.approx(
        bought * PRICE)
    assert [r["predicted"] for r in again["results"]] == [r["predicted"] for r in first["results"]]

    assert run_cli("stats", "--store", store, "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["sources"]["remote"]["api"] == {"price_usd": PRICE, "images_bought": bought,
                                                 "spent_usd": pytest.approx(bought * PRICE), "tasks_pending": 0}
    everything = b"".join(p.read_bytes() for p in store.rglob("*") if p.is_file())
    assert KEY.encode() not in everything and ENV.encode() in everything  # the variable's name only
    assert KEY not in caplog.text


def test_failing_api_or_budget_leaves_the_other_sources_answer(api_store, originals, tmp_path, capsys):
    store, api, hidden = api_store
    night = {p: p + ", at night" for p in PROMPTS[:2]}  # new descriptions: nothing cached
    queries, rows = _queries([o for o in originals if o["prompt"] in night], tmp_path, {hidden}, prompts=night)
    with engine.open(store, writable=False) as ws:
        local = next(s.name for s in ws.sources() if s.kind == "diffusers")
    scope = ["--sources", f"remote,{local}"]

    def attribute(*extra) -> dict:
        return _attribute(store, queries, capsys, *scope, *extra)

    api.mode = "500"  # down for good: retried, then reported
    down = attribute()
    for result in down["results"]:
        assert "remote" in result["failed"] and "500" in result["failed"]["remote"]
        assert [s["source"] for s in result["scores"]] == [local] and result["predicted"] == local
    api.mode = "401"
    refused = attribute()
    assert all("401" in r["failed"]["remote"] for r in refused["results"])
    api.mode = None

    calls = len(api.generation_log())
    capped = attribute("--max-cost", "0.01")  # one image costs 0.02
    assert len(api.generation_log()) == calls  # stopped before sending anything
    assert all("--max-cost" in r["failed"]["remote"] for r in capped["results"])
    assert capped["cost"]["spent_usd"] == 0
    # the API source alone, and the limit pays for none of its images: the user's own limit stopped the query
    # (budget_exceeded, exit 2; HTTP 400), not a failing source (exit 3; HTTP 502)
    capsys.readouterr()
    assert run_cli("attribute", "--queries", queries, "--store", store, "--json", "--quiet", *OPTIONS,
                   "--sources", "remote", "--max-cost", "0.01") == 2
    refusal = json.loads(capsys.readouterr().err)
    assert refusal["kind"] == "budget_exceeded" and "within --max-cost" in refusal["error"], refusal
    assert len(api.generation_log()) == calls

    api.queue("429", "500")  # transient: retried (Retry-After honoured) and answered
    fine = attribute()
    assert not any(r["failed"] for r in fine["results"])
    statuses = [e["status"] for e in api.generation_log()[calls:]]
    assert statuses[:2] == [429, 500] and statuses.count(200) == len(rows) * 2
    assert fine["cost"]["maybe_charged_usd"] == pytest.approx(PRICE)  # the 500 may have been charged: counted

    def fresh(suffix: str, *extra) -> dict:
        fresh_queries, _ = _queries([o for o in originals if o["prompt"] in night], tmp_path, {hidden},
                                    prompts={p: p + suffix for p in night})
        return _attribute(store, fresh_queries, capsys, *scope, *extra)

    # one prompt refused (moderation, HTTP 400) fails that job only: the source goes on with the others
    calls = len(api.generation_log())
    api.queue("content-policy")
    moderated = fresh(", in rain")
    assert len(api.generation_log()) - calls == len(rows) * 2  # every job sent, the refused one too
    assert all(r["scores"][0]["source"] in ("remote", local) and len(r["scores"]) == 2 for r in moderated["results"])
    hit = [r for r in moderated["results"] if "remote" in r["degraded"]]
    assert len(hit) == 1 and "safety system" in hit[0]["degraded"]["remote"] and hit[0]["notes"]
    # a 500 after the request was sent may have been charged: its retry must fit the limit beside it
    limit = len(night) * 2 * PRICE + PRICE / 2  # pays for every job, not for a second try of one
    api.queue("500")
    tight = fresh(", in snow", "--max-cost", str(limit))
    why = [{**r["failed"], **r["degraded"]}.get("remote", "") for r in tight["results"]]
    assert any("not retried" in w and "--max-cost" in w for w in why), why
    assert tight["cost"]["maybe_charged_usd"] == pytest.approx(PRICE) and tight["cost"]["spent_usd"] <= limit
    # an image URL that fails once after the image was bought is fetched again, never bought again
    api.mode, api.download_failures = "url", 1
    calls = len(api.generation_log())
    fetched = fresh(", in fog")
    api.mode = None
    assert not any(r["failed"] or r["degraded"] for r in fetched["results"])
    assert len(api.generation_log()) - calls == len(rows) * 2 and api.download_failures == 0


def test_api_source_over_http_and_in_resynthesize(api_store, originals, tmp_path, capsys, monkeypatch):
    from fastapi.testclient import TestClient

    from engine.service.app import create_app
    from engine.service.config import Limits
    from engine.service.core import Service

    store, api, hidden = api_store
    listing = tmp_path / "descriptions.txt"
    listing.write_text("a harbour at dawn\na red bicycle\n")
    assert run_cli("resynthesize", listing, "--store", store, "--per-source", 1, "--sources", "remote",
                   "--max-cost", "0.03", "--json", "--quiet") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["generated"] == 1 and "--max-cost" in report["failed"]["remote"]
    assert report["cost"]["images_bought"] == 1 and len(api.generation_log()) == 1

    image = next(o for o in originals if o["source"] == hidden)["image"]
    with TestClient(create_app(Service.open(store, Limits(max_cost=1.0)))) as client:
        def post(prompt: str, **fields) -> dict:
            reply = client.post("/v1/attribute", files={"image": ("q.png", image.read_bytes(), "image/png")},
                                data={"prompt": prompt, "per_source": "1", "adaptive": "false",
                                      "mode": "resynthesis", **fields})
            assert reply.status_code == 200, reply.text
            return reply.json()

        paid = post("a harbour at dawn")  # bought by resynthesize above: cached
        assert paid["cost"]["images_bought"] == 0 and paid["cost"]["saved_by_cache_usd"] == pytest.approx(PRICE)
        capped = post("a red bicycle", max_cost="0")
        assert "--max-cost" in capped["results"][0]["failed"]["remote"] and capped["results"][0]["scores"]
        bought = post("a red bicycle")
        assert bought["cost"]["images_bought"] == 1 and not bought["results"][0]["failed"]
    assert len(api.generation_log()) == 2

    # a paid source commits in small batches (PAID_CHUNK; 1 here): a kill loses at most one batch bought
    import engine.resynthesis
    from index.store import Store

    commits = []
    monkeypatch.setattr(engine.resynthesis, "PAID_CHUNK", 1)
    real = Store.add_images
    monkeypatch.setattr(Store, "add_images", lambda self, rows: commits.append(len(rows)) or real(self, rows))
    listing.write_text("a kite over dunes\na lamp in fog\n")
    assert run_cli("resynthesize", listing, "--store", store, "--per-source", 1, "--sources", "remote",
                   "--json", "--quiet") == 0
    assert json.loads(capsys.readouterr().out)["generated"] == 2 and commits == [1, 1]
    assert Options().max_cost is None
