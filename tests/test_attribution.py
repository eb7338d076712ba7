"""The method end to end on the tiny zoo through the library API: accuracy, cache hits counted, describers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import engine
from engine import Options
from engine.errors import UserError
from tests.helpers import run_cli


def _paths(rows) -> list:
    return [o["image"] for o in rows]


def _prompts(rows) -> list:
    return [o["prompt"] for o in rows]


def test_attribution_accuracy_well_above_chance(store_dir, originals, models):
    n = len(models["pipelines"])
    with engine.open(store_dir) as ws:
        results = ws.attribute(_paths(originals), _prompts(originals)).results
    correct = sum(r.predicted == o["source"] for r, o in zip(results, originals))
    accuracy = correct / len(originals)
    assert accuracy >= 0.75, f"accuracy {accuracy:.2f} (chance {1 / n:.2f})"
    for r in results:
        assert [s.score for s in r.scores] == sorted((s.score for s in r.scores), reverse=True)
        assert len(r.scores) == n and r.margin == pytest.approx(r.scores[0].score - r.scores[1].score)


def test_repeated_prompt_costs_no_generation(store_dir, originals, models):
    n = len(models["pipelines"])
    query = originals[0]
    two = Options(per_source=2, adaptive=False)  # a fixed K, so generations can be counted exactly
    with engine.open(store_dir) as ws:
        first = ws.attribute(query["image"], query["prompt"], two)
        calls = ws.generator_calls
        assert calls == {name: 2 for name in models["pipelines"]}  # K=2 per source, generated once
        assert (first.cached, first.generated) == (0, 2 * n)
        embedded = ws.embedder.images_embedded
        again = ws.attribute(query["image"], query["prompt"], two)
        assert ws.generator_calls == calls
        assert ws.embedder.images_embedded == embedded + 1  # the query only, no resynthesis
        assert (again.cached, again.generated) == (2 * n, 0)
        assert again.results[0].scores == first.results[0].scores
    # A new process (reopened store, fresh generators): still nothing generated, same answer.
    with engine.open(store_dir) as ws:
        third = ws.attribute(query["image"], " " + query["prompt"] + "  ", two)
        assert sum(ws.generator_calls.values()) == 0
        assert third.results[0].predicted == first.results[0].predicted and third.generated == 0
        # Asking for more resyntheses per source generates only the missing seed.
        ws.attribute(query["image"], query["prompt"], Options(per_source=3, adaptive=False))
        assert set(ws.generator_calls.values()) == {1}


def test_one_batch_shares_generation_across_queries(store_dir, originals, models):
    same_prompt = [o for o in originals if o["prompt"] == originals[1]["prompt"]]
    with engine.open(store_dir) as ws:
        ws.max_loaded = 1
        ws.attribute(_paths(same_prompt), _prompts(same_prompt), Options(per_source=1))
        assert sum(ws.generator_calls.values()) == len(models["pipelines"])  # one per source, not per query
        assert len(ws.loaded_pipelines()) == 1  # the rest unloaded


def test_inputs_as_path_bytes_and_pil_give_one_answer(store_dir, originals):
    from PIL import Image

    query = originals[2]
    with engine.open(store_dir) as ws:
        one = Options(per_source=1)
        by_path = ws.attribute(query["image"], query["prompt"], one).results[0]
        by_bytes = ws.attribute(Path(query["image"]).read_bytes(), query["prompt"], one).results[0]
        by_pil = ws.attribute(Image.open(query["image"]), query["prompt"], one).results[0]
    for other in (by_bytes, by_pil):
        assert [(s.source, round(s.score, 5)) for s in other.scores] == \
            [(s.source, round(s.score, 5)) for s in by_path.scores]


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
    assert data["results"][0]["calibrated"] is False
    # an uncalibrated store never claims "known source": it says so, and why; and no field contradicts it
    # (`unknown` is null, not false, when no claim is made either way)
    assert data["results"][0]["verdict"] == "uncalibrated" and "calibrate" in data["results"][0]["evidence"]["why"]
    assert all(r["unknown"] is None and r["verdict"] == "uncalibrated" for r in data["results"])
    assert all(r["evidence"]["mode"] == "combined" for r in data["results"])  # the default, as run
    # the new fields are always there: the file's provenance (stable shape) and each source's closest references
    assert all(set(r["provenance"]) >= {"schema", "metadata", "c2pa", "watermark"} for r in data["results"])
    assert all(set(r["closest"]) == {s["source"] for s in r["scores"]} for r in data["results"])
    assert run_cli("attribute", originals[0]["image"], "--prompt", originals[0]["prompt"], "--store", store_dir,
                   "--quiet", "--per-source", 1) == 0
    text = capsys.readouterr().out
    assert "(uncalibrated: no calibration" in text and "known source" not in text
    # Restricting the candidates
    assert run_cli("attribute", originals[0]["image"], "--prompt", originals[0]["prompt"], "--store", store_dir,
                   "--sources", "tiny-sd-ddim,tiny-sdxl-dpm", "--json", "--quiet", "--per-source", 1) == 0
    data = json.loads(capsys.readouterr().out)
    assert {s["source"] for s in data["results"][0]["scores"]} == {"tiny-sd-ddim", "tiny-sdxl-dpm"}


def test_description_from_store_metadata_then_captioner(store_dir, originals, models, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,source,description,role\n" +
                        f"{originals[0]['image']},{originals[0]['source']},{originals[0]['prompt']},original\n")
    assert run_cli("ingest", manifest, "--store", store_dir, "--quiet", "--allow-outside") == 0
    one = Options(per_source=1)
    with engine.open(store_dir) as ws:
        stored = ws.attribute(originals[0]["image"], options=one).results[0]
        assert (stored.description_from, stored.description) == ("store", originals[0]["prompt"])
        with pytest.raises(UserError, match="no description"):
            ws.attribute(originals[1]["image"], options=one)
    import transformers

    transformers.utils.logging.enable_progress_bar()  # as in a fresh process (building the zoo turned it off)
    with engine.open(store_dir, captioner=models["captioner"]) as ws:
        captioned = ws.attribute(originals[1]["image"], options=one).results[0]
        assert captioned.description_from == "caption" and captioned.description
        assert ws.captioner.calls == 1 and captioned.generated == len(models["pipelines"])
    assert "Loading weights" not in capsys.readouterr().err  # transformers' bar, though progress=False


def test_replay_sources_need_no_generation(models, originals, tmp_path):
    """A published dataset's resyntheses, ingested as replay sources, attribute with zero generation."""
    from engine.generate import DiffusersGenerator, GenerationParams
    from engine.images import save_png_atomic

    rows = ["image,source,description,role,seed"]
    prompts = list(dict.fromkeys(o["prompt"] for o in originals[:10]))  # each description once
    for name, folder in models["pipelines"].items():
        generator = DiffusersGenerator(name, folder, GenerationParams(steps=2))
        for i, prompt in enumerate(prompts):
            for seed, image in enumerate(generator.generate(prompt, [0, 1])):
                path = tmp_path / "data" / f"{name}-{i}-{seed}.png"
                save_png_atomic(image, path)
                rows.append(f"data/{path.name},published-{name},{prompt},resynthesis,{seed}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    store = tmp_path / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"]) == 0
    assert run_cli("ingest", tmp_path / "m.csv", "--store", store, "--quiet") == 0
    with engine.open(store) as ws:
        assert all(s.kind == "replay" for s in ws.sources())
        queries = [o for o in originals if o["prompt"] in prompts]
        report = ws.attribute(_paths(queries), _prompts(queries))
        unseen = "a description nobody resynthesized"
        new = ws.attribute(originals[0]["image"], unseen, Options(mode="resynthesis"))
        searched = ws.attribute(originals[0]["image"], unseen)  # default: combined with the dataset search
    correct = sum(r.predicted == "published-" + o["source"] for r, o in zip(report.results, queries))
    assert correct / len(queries) >= 0.75
    assert report.generated == new.generated == searched.generated == 0
    assert new.results[0].predicted is None and len(new.results[0].missing) == len(models["pipelines"])
    assert searched.results[0].predicted == "published-" + originals[0]["source"]  # found by its neighbours


def test_original_references_join_resyntheses(store_dir, originals, models, tmp_path):
    """Labelled originals in the store become extra references; the query itself never counts."""
    manifest = tmp_path / "refs.csv"
    rows = ["image,source,description,role"] + [f"{o['image']},{o['source']},{o['prompt']},original"
                                                for o in originals if o["prompt"] != originals[0]["prompt"]]
    manifest.write_text("\n".join(rows) + "\n")
    assert run_cli("ingest", manifest, "--store", store_dir, "--quiet", "--allow-outside") == 0
    queries = [o for o in originals if o["prompt"] == originals[0]["prompt"]]
    with engine.open(store_dir) as ws:
        plain = ws.attribute(_paths(queries), _prompts(queries), Options(per_source=1, mode="resynthesis")).results
        mixed = Options(per_source=1, original_refs=2, mode="resynthesis")  # counted references, no search
        report = ws.attribute(_paths(queries), _prompts(queries), mixed)
        assert report.generated == 0  # the resyntheses were cached by the first pass
        # Not a query's own file: an ingested original used as a query is not its own reference.
        stored = ws.attribute(originals[1]["image"], originals[1]["prompt"], mixed).results[0]
    assert all(s.resyntheses == 3 for r in report.results for s in r.scores)  # 1 resynthesis + 2 originals
    assert all(s.resyntheses == 3 for s in stored.scores)  # its own file skipped, the next original used
    assert sum(r.predicted == o["source"] for r, o in zip(report.results, queries)) >= \
        sum(r.predicted == o["source"] for r, o in zip(plain, queries)) - 1


def test_adaptive_generates_less_for_the_same_answers(store_dir, models, originals, tmp_path):
    """Adaptive: one seed per source, then more only for the sources still in contention."""
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(store_dir, twin)
    queries = [o for o in originals if o["prompt"] in {originals[0]["prompt"], originals[1]["prompt"]}]
    n, k = len(models["pipelines"]), 3  # two descriptions: every source's originals of them
    with engine.open(store_dir) as ws:
        fixed = ws.attribute(_paths(queries), [q["prompt"] + ", adaptive test" for q in queries],
                             Options(per_source=k, mode="resynthesis", adaptive=False))
    with engine.open(twin) as ws:
        adaptive = ws.attribute(_paths(queries), [q["prompt"] + ", adaptive test" for q in queries],
                                Options(per_source=k, mode="resynthesis", adaptive=True))
        again = ws.attribute(_paths(queries), [q["prompt"] + ", adaptive test" for q in queries],
                             Options(per_source=k, mode="resynthesis", adaptive=True))
    descriptions = len({q["prompt"] for q in queries})
    assert fixed.generated == descriptions * n * k
    assert descriptions * n <= adaptive.generated < fixed.generated  # at least one seed each, fewer in all
    assert again.generated == 0  # decisions depend on the query and its seeds only: a repeat is all cached
    agree = sum(a.predicted == b.predicted for a, b in zip(fixed.results, adaptive.results))
    assert agree >= len(queries) - 1


def test_ingest_of_a_cut_image_writes_nothing(store_dir, originals, tmp_path, capsys):
    """Issue 20: a late image with a valid header and a cut body fails the whole manifest before any
    write: no row, no vector and no new source are left behind, and the error names the manifest line."""
    cut = tmp_path / "cut.png"
    data = Path(originals[0]["image"]).read_bytes()
    cut.write_bytes(data[:len(data) // 2])  # the header (size, mode) intact, half the pixel data gone
    rows = ["image,source,description,role"]
    rows += [f"{o['image']},new-source,{o['prompt']},original" for o in originals[:3]]
    rows.append(f"{cut},new-source,{originals[0]['prompt']},original")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    with engine.open(store_dir) as ws:
        before = ws.stats()
    assert run_cli("ingest", manifest, "--store", store_dir, "--quiet", "--allow-outside") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"resynth: error: {manifest}:5: ") and "\n" not in error, error
    with engine.open(store_dir) as ws:
        assert "new-source" not in {s.name for s in ws.sources()}
        after = ws.stats()
    assert (after["sources"], after["descriptions"], after["vectors"]) == \
        (before["sources"], before["descriptions"], before["vectors"])
