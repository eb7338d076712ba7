"""`resynth evaluate` and `resynth calibrate` end to end on a small tiny-zoo dataset, and their errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.calibration import DEFAULT_TEMPERATURE
from engine.embed import Embedder, EmbedderSpec
from engine.evaluation.baselines import BASELINES, available_shots, run_fewshot
from engine.labelled import from_manifest
from engine.evaluation.runner import embed_evalset
from engine.scoring import Variant
from tests.helpers import dataset_subset, run_cli

UNREGISTERED = "tiny-sdxl-euler"  # left out of the calibrated store: its originals must come out unknown


@pytest.fixture(scope="module")
def dataset(zoo_dataset, tmp_path_factory) -> Path:
    """Every zoo source x 8 descriptions: one original and 2 resyntheses (seeds 0, 1) per pair."""
    return dataset_subset(zoo_dataset, tmp_path_factory.mktemp("evalset"), 8)


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _clip(models) -> list[str]:
    return ["--clip-config", str(models["clip_config"]), "--clip-checkpoint", str(models["clip_checkpoint"])]


def test_evaluate_end_to_end(models, dataset, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    argv = ["evaluate", str(dataset), "--out", str(out), *_clip(models), "--layers", "final,mid",
            "--perturb", "jpeg=50,resize=0.5", "--draws", "2", "--quiet"]
    assert run_cli(*argv) == 0
    printed = capsys.readouterr().out
    assert "resynthesis mode, same aggregation and K (block2/cosine/knn/K=2" in printed  # middle of 4 blocks
    assert printed.count("engine default") == 1 and "report.md" in printed
    report = json.loads((out / "report.json").read_text())
    data = report["dataset"]
    n = len(models["pipelines"])
    assert (data["originals"], data["resyntheses"], data["max_per_source"]) == (8 * n, 16 * n, 2)
    assert sorted(data["layers"]) == ["block2", "final"]
    default = report["resynthesis_default"]
    assert default["accuracy"] >= 0.75  # chance is 0.25
    assert sum(map(sum, default["confusion"]["matrix"])) == 8 * n
    assert default["top3_accuracy"] >= default["accuracy"] and 0.5 < default["macro_auroc"] <= 1
    # every distance x aggregation x K per layer, plus resynthesis with original references
    assert len(report["variants"]) == 2 * (2 * 4 * 2 + 4)
    assert report["best_variant"]["accuracy"] == max(v["accuracy"] for v in report["variants"])
    fewshot = report["fewshot"]
    assert fewshot["shots"] == [1, 2, 5] and fewshot["draws"] == 2
    assert set(fewshot["methods"]) == {"resynthesis", "resynthesis+refs", *BASELINES}
    assert all(0 <= v["mean"] <= 1 and v["runs"] == 2 for per_k in fewshot["methods"].values()
               for v in per_k.values())
    assert 0 <= report["open_set"]["auroc"] <= 1 and set(report["open_set"]["per_source"]) == set(data["sources"])
    assert report["calibration"]["ece_calibrated"] is not None
    conditions = report["robustness"]["conditions"]
    assert set(conditions) == {"clean", "jpeg-50", "resize-0.5"}
    assert conditions["clean"]["resynthesis_all"] == default["accuracy"]
    for name in ("confusion", "accuracy_vs_shots", "score_distributions", "reliability", "robustness"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "| nearest-centroid |" in markdown and "**default**" in markdown and "jpeg-50" in markdown

    # Second run: every feature comes from the cache in --out (only the embedder's 1-image probe runs).
    embedded = []
    original_embed = Embedder.embed
    monkeypatch.setattr(Embedder, "embed", lambda self, images: embedded.append(len(images)) or
                        original_embed(self, images))
    assert run_cli(*argv, "--json") == 0
    assert set(embedded) == {1}
    again = json.loads(capsys.readouterr().out)
    assert (again["engine_default"], again["resynthesis_default"]) == (report["engine_default"],
                                                                       report["resynthesis_default"])


def test_baselines_beside_resynthesis(models, dataset):
    evalset = from_manifest(dataset)
    embedder = Embedder(EmbedderSpec("tiny-clip", str(models["clip_checkpoint"]), str(models["clip_config"])))
    originals, resyntheses = embed_evalset(evalset, {"final": embedder}, None, progress=False)["final"]
    labels = evalset.orig_source
    assert available_shots(labels, 4) == [1, 2, 5]
    result = run_fewshot(originals, resyntheses, evalset.references(), labels, 4, Variant(), draws=3,
                         shots=[1, 5], progress=False)["clean"]
    methods = result["methods"]
    for name in BASELINES:
        assert methods[name]["5"]["mean"] > 0.4  # real learners on real features beat chance (0.25)
        assert methods[name]["5"]["runs"] == 3
    # resynthesis needs no labelled originals: it is measured on the same test queries at every k
    assert methods["resynthesis"]["1"]["mean"] >= 0.75
    assert methods["nearest-centroid"]["1"]["std"] >= 0.0


def test_calibrate_then_attribute_reports_probabilities_and_unknown(models, dataset, tmp_path, capsys):
    store = tmp_path / "store"
    assert run_cli("init", "--store", store, *_clip(models)) == 0
    for name, folder in models["pipelines"].items():
        if name != UNREGISTERED:
            assert run_cli("source", "add", name, folder, "--store", store, "--steps", 2) == 0
    rows = _rows(dataset)
    known = _write(dataset.parent / "known.jsonl", [r for r in rows if r["source"] != UNREGISTERED])
    assert run_cli("ingest", known, "--store", store, "--quiet") == 0
    capsys.readouterr()
    assert run_cli("calibrate", "--store", store, "--json", "--per-source", 2) == 0
    calibration = json.loads(capsys.readouterr().out)
    assert calibration["fitted"] and set(calibration["thresholds"]) == {
        n for n in models["pipelines"] if n != UNREGISTERED}
    assert 0 < calibration["temperature"] < 10
    assert calibration["notes"]["originals"] == 8 * (len(models["pipelines"]) - 1)

    def attribute(source: str, generated: int = 0, *flags) -> list[dict]:
        queries = [{"image": str(dataset.parent / r["image"]), "prompt": r["description"]}
                   for r in rows if r["source"] == source and r["role"] == "original"]
        path = _write(tmp_path / f"{source}.jsonl", queries)
        assert run_cli("attribute", "--queries", path, "--store", store, "--json", "--quiet", "--per-source", 2,
                       *flags) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["cache"]["generated"] == generated  # the ingested resyntheses are the cache
        return data["results"]

    unknown_source = attribute(UNREGISTERED)
    for result in unknown_source:
        assert result["calibrated"] is True
        probabilities = [s["probability"] for s in result["scores"]]
        assert sum(probabilities) == pytest.approx(1.0) and max(probabilities) < 1.0
    assert sum(r["unknown"] for r in unknown_source) >= len(unknown_source) / 2
    enrolled = attribute("tiny-sd-ddim")
    assert sum(r["unknown"] for r in enrolled) <= 2 and all(r["calibrated"] for r in enrolled)

    assert {r["verdict"] for r in unknown_source + enrolled} <= {"known", "unknown"}
    assert all("threshold" in r["evidence"] for r in enrolled)
    # the default open-set score decides, from the precision matrix the calibration stored beside store.json
    assert all(r["evidence"]["open_set_score"] == "mahalanobis" for r in unknown_source + enrolled)
    precision = store / calibration["open_set"]["precision_file"]
    assert precision.is_file() and calibration["notes"]["open_set_score"] == "mahalanobis"
    precision.write_bytes(precision.read_bytes()[:-8] + b"\0" * 8)  # altered: not trusted, the fallback decides
    fallback = attribute("tiny-sd-ddim")
    assert all("open_set_score" not in r["evidence"] and r["verdict"] in {"known", "unknown"} for r in fallback)
    said = f"a calibration file is missing, damaged or unreadable: {precision.name} (the open-set rule"
    assert all(any(n.startswith(said) for n in r["notes"]) for r in fallback)  # said, not silent

    def uncalibrated_p(result: dict) -> bool:  # the default temperature's softmax, never the fitted one's
        scores = np.array([s["score"] for s in result["scores"]]) / DEFAULT_TEMPERATURE
        expected = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        return np.allclose([s["probability"] for s in result["scores"]], expected) and \
            "not calibrated" in result["evidence"]["probabilities"]

    # Fitted in combined mode, asked in dataset mode: another scale of scores, so no claim either way.
    other_mode = attribute("tiny-sd-ddim", 0, "--mode", "dataset")
    assert all(r["verdict"] == "uncalibrated" and not r["calibrated"] and r["unknown"] is None
               and "calibrated in combined mode; this query ran in dataset mode" in r["evidence"]["why"]
               and "--mode dataset" in r["evidence"]["why"] and uncalibrated_p(r) for r in other_mode)

    # A source added after calibration makes the calibration stale: no claim either way until refit.
    assert run_cli("source", "add", UNREGISTERED, models["pipelines"][UNREGISTERED], "--store", store,
                   "--steps", 2, "--quiet") == 0
    capsys.readouterr()
    stale = attribute("tiny-sd-ddim", generated=8 * 2)  # the new source resynthesizes each description
    assert all(r["verdict"] == "uncalibrated" and "stale" in r["evidence"]["why"] and not r["calibrated"]
               and not r["unknown"] and uncalibrated_p(r) for r in stale)
    assert run_cli("source", "remove", UNREGISTERED, "--store", store, "--quiet") == 0
    capsys.readouterr()

    # Fitting on a manifest (embedded with the store's embedder) works the same way.
    assert run_cli("calibrate", known, "--store", store, "--aggregation", "mean", "--quiet") == 0
    saved = json.loads((store / "store.json").read_text())["calibration"]
    assert saved["notes"]["aggregation"] == "mean" and saved["notes"]["fitted_on"] == str(known)


def test_evaluate_with_store_embedder_and_save_calibration(models, dataset, store_dir, tmp_path, capsys):
    assert run_cli("evaluate", dataset, "--store", store_dir, "--out", tmp_path / "e", "--layers", "base",
                   "--draws", "1", "--save-calibration", "--quiet") == 0
    assert "calibration saved" in capsys.readouterr().out
    saved = json.loads((store_dir / "store.json").read_text())["calibration"]
    assert saved["fitted"] and len(saved["thresholds"]) == len(models["pipelines"])


def _error(capsys, *argv) -> str:
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resynth: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_manifests_are_one_line_errors(models, dataset, tmp_path, capsys):
    rows = _rows(dataset)
    clip = _clip(models)
    folder = dataset.parent
    missing = folder / "missing.csv"
    missing.write_text("image,source,role\nx.png,a,original\n")
    assert "missing column(s) description" in _error(capsys, "evaluate", missing, *clip)
    # an original of a source with no resyntheses: no method could predict it
    stray = _write(folder / "stray.jsonl", [r for r in rows if not (r["source"] == UNREGISTERED
                                                                     and r["role"] == "resynthesis")])
    assert UNREGISTERED in _error(capsys, "evaluate", stray, *clip)
    # an original whose description no resynthesis covers: skipped by default (tests/test_calibrate_manifest.py),
    # refused with --strict
    first = next(r for r in rows if r["role"] == "original")
    lonely = _write(folder / "lonely.jsonl", [r for r in rows if r["role"] == "original"
                                              or r["description"] != first["description"]])
    assert "has no resyntheses" in _error(capsys, "evaluate", lonely, *clip, "--strict")
    # nothing scorable at all is refused whatever the flag
    none = _write(folder / "none.jsonl", [r if r["role"] == "original" else dict(r, description="another")
                                          for r in rows])
    assert "no original has resyntheses" in _error(capsys, "evaluate", none, *clip)
    only_originals = _write(folder / "only.jsonl", [r for r in rows if r["role"] == "original"])
    assert "no resynthesis rows" in _error(capsys, "evaluate", only_originals, *clip)
    assert "no store at" in _error(capsys, "evaluate", dataset, "--store", tmp_path / "nowhere")
    assert "--layers" in _error(capsys, "evaluate", dataset, *clip, "--layers", "penultimate", "--out", tmp_path)
    assert "--perturb" in _error(capsys, "evaluate", dataset, *clip, "--perturb", "sharpen", "--out", tmp_path)
    assert "--clip-checkpoint" in _error(capsys, "evaluate", dataset, "--clip-model", "ViT-B-32")


def test_references_follow_the_description_as_the_engine_does(dataset, tmp_path):
    """A link from a resynthesis to its original is provenance only: like the engine, the evaluation
    compares an original with every resynthesis of its description (the engine cannot know the link)."""
    rows = _rows(dataset)
    first = next(r for r in rows if r["role"] == "original")
    linked = [dict(r, original=first["image"]) if r["role"] == "resynthesis" and r["description"] ==
              first["description"] and r["source"] == first["source"] else r for r in rows]
    evalset = from_manifest(_write(dataset.parent / "linked.jsonl", linked))
    refs = evalset.references()
    i = evalset.orig_path.index(str((dataset.parent / first["image"]).resolve()))
    assert all(len(r) == 2 for r in refs[i])  # every source's two seeds, linked or not
    assert sum(evalset.res_original >= 0) == 2 and np.all(evalset.res_seed >= 0)


def test_calibrate_needs_labelled_originals(store_dir, capsys):
    assert "holds no originals" in _error(capsys, "calibrate", "--store", store_dir)
    assert "no store at" in _error(capsys, "calibrate", "--store", store_dir / "absent")


def test_evaluation_reproduces_the_workspace_prediction_by_prediction(models, dataset, tmp_path):
    """The evaluation's vectorised scoring is the engine's rule: for the default and every variant the
    engine can run (aggregation x K, with and without original references), each prediction over the
    whole dataset equals what `Workspace.attribute` returns for that original."""
    import engine
    from engine import Options
    from engine.labelled import from_store
    from engine.scoring import dataset_score_matrix, neighbour_score_matrix, score_matrix

    store = tmp_path / "store"
    with engine.init(store, clip_config=models["clip_config"], clip_checkpoint=models["clip_checkpoint"]) as ws:
        ws.ingest(dataset)  # unknown sources: replay sources holding seeds 0 and 1
        evalset = from_store(ws.store)
        originals, resyntheses = evalset.vectors[ws.store.embedder_identity]
        references = evalset.references()
        paths, prompts = evalset.orig_path, [evalset.descriptions[d] for d in evalset.orig_desc]
        with ws.store.session() as s:  # the engine is asked with each original's stored description
            from index.schema import Description
            text = {str(d.id): d.text for d in s.query(Description)}
        prompts = [text[p] for p in prompts]
        plain = "resynthesis"
        variants = [(Variant("store", "cosine", a, k), Options(per_source=k, references=k, aggregation=a, mode=plain))
                    for a in ("max", "mean", "knn", "softmax") for k in (1, 2)]
        variants.append((Variant("store", "cosine", "knn", 2, fewshot=True),
                         Options(references=2, aggregation="knn", original_refs=10_000, mode=plain)))
        variants.append((Variant("store", "cosine", Options().aggregation), Options(mode=plain)))
        defaults = Options()  # combined: the description's resyntheses joined with the dataset's neighbours
        variants.append((neighbour_score_matrix(originals, resyntheses, evalset.res_source, evalset.orig_hash,
                                                evalset.res_hash, len(evalset.sources), defaults.neighbours,
                                                defaults.aggregation, references, defaults.references), defaults))
        for neighbours in (4, 12):  # dataset mode: a nearest-neighbour search over every stored resynthesis
            scores = dataset_score_matrix(originals, resyntheses, evalset.res_source, evalset.orig_hash,
                                          evalset.res_hash, len(evalset.sources), neighbours, "knn")
            variants.append((scores, Options(mode="dataset", neighbours=neighbours)))
        for variant, options in variants:
            scores = variant if isinstance(variant, np.ndarray) else \
                score_matrix(originals, resyntheses, references, variant, orig_source=evalset.orig_source)
            expected = [evalset.sources[c] for c in scores.argmax(1)]
            report = ws.attribute(paths, prompts, options)
            assert report.generated == 0
            got = [r.predicted for r in report.results]
            assert got == expected, (options, sum(a != b for a, b in zip(got, expected)))


def test_the_report_counts_the_sources_that_had_originals():
    """report.md's "N originals of M sources" counts sources with originals, naming the candidates apart."""
    from engine.evaluation.report import _sources_text

    assert _sources_text({"sources": ["a", "b", "c"], "originals_per_source": {"a": 3, "b": 0, "c": 2}}) == \
        "2 sources (of 3 candidate sources)"
    assert _sources_text({"sources": ["a", "b"], "originals_per_source": {"a": 3, "b": 1}}) == "2 sources"


def test_from_store_leaves_out_what_attribute_never_compares(tmp_path):
    """A pipeline source's resynthesis stored without a seed is never a reference of `attribute` (its plan
    keeps the current recipe's seeds only): calibrate fitted on scores the engine never computes."""
    import dataclasses

    from sqlalchemy import update

    from engine.labelled import STORED_TWICE, TWO_SOURCES, from_store
    from index.schema import Image
    from index.store import NewImage, Store

    def unit(i: int) -> np.ndarray:
        v = np.random.default_rng(i).normal(size=8).astype(np.float32)
        return v / np.linalg.norm(v)

    with Store.create(tmp_path / "s", {"identity": "e", "arch": "x", "checkpoint": "x"}, 8) as store:
        pipe, replay = store.ensure_source("pipe", "diffusers", "fp-p"), store.ensure_source("old", "replay", "fp-r")
        desc = store.description_id("a prompt")
        rows = [NewImage(f"o{i}", "original", src.id, desc, f"ho{i}", f"o{i}.png", unit(i))
                for i, src in enumerate((pipe, replay))]
        rows += [NewImage(f"r{i}", "resynthesis", src.id, desc, f"hr{i}", f"r{i}.png", unit(10 + i), seed=seed)
                 for i, (src, seed) in enumerate(((pipe, 0), (pipe, None), (replay, None)))]
        # a store ingested before ingest refused repeats: o0's bytes again (another description), o1's under pipe
        rows += [NewImage(f"o{i}", "original", pipe.id, store.description_id("another"), f"ho{i - 2}", f"o{i}.png",
                          unit(i)) for i in (2, 3)]
        # o4's bytes again as o5: the copy whose description has resyntheses is kept (the image was lost); o6's
        # under a source with no resyntheses: still two labels, not a stray original and a scored copy
        lone = store.ensure_source("lone", "replay", "fp-l")
        rows += [NewImage(f"o{i}", "original", src.id, d, f"h{i // 2}", f"o{i}.png", unit(i)) for i, src, d in
                 ((4, pipe, store.description_id("another")), (5, pipe, desc), (6, pipe, desc), (7, lone, desc))]
        # such repeats are refused now (the write checks an original's bytes): stored apart, then given them
        repeats = {row.key: row.file_hash for row in rows}
        store.add_images([dataclasses.replace(row, file_hash=f"u-{row.key}") for row in rows])
        with store.db.write_session() as s:
            for key, file_hash in repeats.items():
                s.execute(update(Image).where(Image.key == key).values(file_hash=file_hash))
            s.commit()
        evalset = from_store(store)
    kept = sorted((evalset.sources[c], int(s)) for c, s in zip(evalset.res_source, evalset.res_seed))
    assert kept == [("old", -1), ("pipe", 0)]  # the seedless replay image stays: replay has no seeds
    assert evalset.orig_path == ["o0.png", "o5.png"]
    assert evalset.skipped == {TWO_SOURCES: ["o1.png", "o3.png", "o6.png", "o7.png"],
                               STORED_TWICE: ["o2.png", "o4.png"]}
