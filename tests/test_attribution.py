"""The method end to end on the tiny zoo: accuracy, cache hits counted, describers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.attribute import Attributor, Query
from engine.errors import UserError
from engine.workspace import load_captioner, load_embedder, load_generators
from index.store import Store
from tests.conftest import run_cli


def _attributor(store: Store, **kwargs) -> Attributor:
    return Attributor(store, load_embedder(store), load_generators(store), progress=False, **kwargs)


def test_attribution_accuracy_well_above_chance(store_dir, originals, models):
    n = len(models["pipelines"])
    with Store.open(store_dir) as store:
        results = _attributor(store).attribute([Query.from_path(o["image"], o["prompt"]) for o in originals])
    correct = sum(r.predicted == o["source"] for r, o in zip(results, originals))
    accuracy = correct / len(originals)
    assert accuracy >= 0.75, f"accuracy {accuracy:.2f} (chance {1 / n:.2f})"
    for r in results:
        assert [s.score for s in r.scores] == sorted((s.score for s in r.scores), reverse=True)
        assert len(r.scores) == n and r.margin == pytest.approx(r.scores[0].score - r.scores[1].score)


def test_repeated_prompt_costs_no_generation(store_dir, originals, models):
    n = len(models["pipelines"])
    query = originals[0]
    with Store.open(store_dir) as store:
        attributor = _attributor(store, per_source=2)
        first = attributor.attribute([Query.from_path(query["image"], query["prompt"])])[0]
        calls = {name: g.calls for name, g in attributor.generators.items()}
        assert calls == {name: 2 for name in calls}  # K=2 per source, generated once
        assert (first.cached, first.generated) == (0, 2 * n)
        embedded = attributor.embedder.images_embedded
        again = attributor.attribute([Query.from_path(query["image"], query["prompt"])])[0]
        assert {name: g.calls for name, g in attributor.generators.items()} == calls
        assert attributor.embedder.images_embedded == embedded + 1  # the query only, no resynthesis
        assert (again.cached, again.generated) == (2 * n, 0)
        assert again.scores == first.scores
    # A new process (reopened store, fresh generators): still nothing generated, same answer.
    with Store.open(store_dir) as store:
        attributor = _attributor(store, per_source=2)
        third = attributor.attribute([Query.from_path(query["image"], " " + query["prompt"] + "  ")])[0]
        assert sum(g.calls for g in attributor.generators.values()) == 0
        assert third.predicted == first.predicted and third.generated == 0
        # Asking for more resyntheses per source generates only the missing seed.
        bigger = _attributor(store, per_source=3)
        bigger.attribute([Query.from_path(query["image"], query["prompt"])])
        assert {g.calls for g in bigger.generators.values()} == {1}


def test_one_batch_shares_generation_across_queries(store_dir, originals, models):
    same_prompt = [o for o in originals if o["prompt"] == originals[1]["prompt"]]
    with Store.open(store_dir) as store:
        attributor = _attributor(store, per_source=1, max_loaded=1)
        attributor.attribute([Query.from_path(o["image"], o["prompt"]) for o in same_prompt])
        assert sum(g.calls for g in attributor.generators.values()) == len(models["pipelines"])  # one per source, not per query
        assert sum(g._pipe is not None for g in attributor.generators.values()) == 1  # the rest unloaded


def test_cli_attribute_json(store_dir, originals, models, capsys, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"image": str(o["image"]), "prompt": o["prompt"]}) + "\n"
                               for o in originals[:3]))
    capsys.readouterr()
    assert run_cli("attribute", "--queries", queries, "--store", store_dir, "--json", "--quiet",
                   "--per-source", 1) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["results"]) == 3
    assert data["cache"]["generated"] == len(models["pipelines"]) * 3 and data["cache"]["cached"] == 0
    assert set(data["results"][0]["scores"][0]) == {"source", "score", "resyntheses", "probability"}
    assert abs(sum(s["probability"] for s in data["results"][0]["scores"]) - 1) < 1e-6
    assert data["results"][0]["unknown"] is False and data["results"][0]["calibrated"] is False
    # Restricting the candidates
    assert run_cli("attribute", originals[0]["image"], "--prompt", originals[0]["prompt"], "--store", store_dir,
                   "--sources", "tiny-sd-ddim,tiny-sdxl-dpm", "--json", "--quiet", "--per-source", 1) == 0
    data = json.loads(capsys.readouterr().out)
    assert {s["source"] for s in data["results"][0]["scores"]} == {"tiny-sd-ddim", "tiny-sdxl-dpm"}


def test_description_from_store_metadata_then_captioner(store_dir, originals, models, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,source,description,role\n" +
                        f"{originals[0]['image']},{originals[0]['source']},{originals[0]['prompt']},original\n")
    assert run_cli("ingest", manifest, "--store", store_dir, "--quiet") == 0
    with Store.open(store_dir) as store:
        attributor = _attributor(store, per_source=1)
        stored = attributor.attribute([Query.from_path(originals[0]["image"])])[0]
        assert (stored.description_from, stored.description) == ("store", originals[0]["prompt"])
        with pytest.raises(UserError, match="no description"):
            attributor.attribute([Query.from_path(originals[1]["image"])])
        captioning = Attributor(store, load_embedder(store), load_generators(store),
                                load_captioner(store, str(models["captioner"])), per_source=1, progress=False)
        captioned = captioning.attribute([Query.from_path(originals[1]["image"])])[0]
        assert captioned.description_from == "caption" and captioned.description
        assert captioning.captioner.calls == 1 and captioned.generated == len(models["pipelines"])


def test_replay_sources_need_no_generation(models, originals, tmp_path):
    """A published dataset's resyntheses, ingested as replay sources, attribute with zero generation."""
    from engine.generate import DiffusersGenerator, GenerationParams
    from engine.images import save_png_atomic

    rows = ["image,source,description,role,seed"]
    for name, folder in models["pipelines"].items():
        generator = DiffusersGenerator(name, folder, GenerationParams(steps=2))
        for o in originals[:10]:
            for seed, image in enumerate(generator.generate(o["prompt"], [0, 1])):
                path = tmp_path / "data" / f"{name}-{Path(o['image']).stem}-{o['source']}-{seed}.png"
                if not path.exists():
                    save_png_atomic(image, path)
                    rows.append(f"data/{path.name},published-{name},{o['prompt']},resynthesis,{seed}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    store = tmp_path / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"]) == 0
    assert run_cli("ingest", tmp_path / "m.csv", "--store", store, "--quiet") == 0
    with Store.open(store) as opened:
        assert all(s.kind == "replay" for s in opened.sources())
        attributor = Attributor(opened, load_embedder(opened), {}, progress=False)
        queries = [o for o in originals if o["prompt"] in {x["prompt"] for x in originals[:10]}]
        results = attributor.attribute([Query.from_path(o["image"], o["prompt"]) for o in queries])
        new = attributor.attribute([Query.from_path(originals[0]["image"], "a description nobody resynthesized")])
    correct = sum(r.predicted == "published-" + o["source"] for r, o in zip(results, queries))
    assert correct / len(queries) >= 0.75
    assert attributor.stats.generated == 0
    assert new[0].predicted is None and len(new[0].missing) == len(models["pipelines"])


def test_original_references_join_resyntheses(store_dir, originals, models, tmp_path):
    """Labelled originals in the store become extra references; the query itself never counts."""
    manifest = tmp_path / "refs.csv"
    rows = ["image,source,description,role"] + [f"{o['image']},{o['source']},{o['prompt']},original"
                                                for o in originals if o["prompt"] != originals[0]["prompt"]]
    manifest.write_text("\n".join(rows) + "\n")
    assert run_cli("ingest", manifest, "--store", store_dir, "--quiet") == 0
    queries = [o for o in originals if o["prompt"] == originals[0]["prompt"]]
    with Store.open(store_dir) as store:
        plain = _attributor(store, per_source=1).attribute([Query.from_path(o["image"], o["prompt"]) for o in queries])
        mixed = _attributor(store, per_source=1, original_refs=2)
        results = mixed.attribute([Query.from_path(o["image"], o["prompt"]) for o in queries])
        assert mixed.stats.generated == 0  # the resyntheses were cached by the first pass
        # Not a query's own file: an ingested original used as a query is not its own reference.
        stored = mixed.attribute([Query.from_path(originals[1]["image"], originals[1]["prompt"])])[0]
    assert all(s.resyntheses == 3 for r in results for s in r.scores)  # 1 resynthesis + 2 originals
    assert all(s.resyntheses == (2 if s.source == originals[1]["source"] else 3) for s in stored.scores)
    assert sum(r.predicted == o["source"] for r, o in zip(results, queries)) >= \
        sum(r.predicted == o["source"] for r, o in zip(plain, queries)) - 1
