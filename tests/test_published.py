"""Importing a tree laid out like the paper's published dataset: manifest, ingest, links, replay attribution."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

import engine
from engine import Options
from engine.attribute import Query
from engine.manifest import read_manifest
from engine.published import image_number, read_descriptions
from index.schema import Image as ImageRow
from index.store import Store
from tests.helpers import run_cli

# generator -> (file suffix as in the published dataset, RGB tint): the tint is the generator's "style".
GENERATORS = {"alpha": (".png", (220, 40, 40)), "beta": (".jpg", (40, 200, 60)),
              "gamma": ("-chrome-0.png", (40, 60, 220))}
IDS = [1, 2, 3]
MISSING = ("beta", 2, "gamma")  # the resynthesis of beta/00002 by gamma is absent
ORPHAN = ("alpha", 7, "beta")  # a resynthesis of alpha/00007, an original not in the tree
DESCRIPTIONS = {1: "portrait of an old man with a beard", 2: "a young woman with red hair", 3: "a child in a blue hat"}


def _picture(generator: str, number: int, noise_seed: int) -> Image.Image:
    """Generator tint and stripes, a per-person square, per-image noise: same generator looks alike."""
    rng = np.random.default_rng(noise_seed)
    tint = np.array(GENERATORS[generator][1], np.float32)
    pixels = np.tile(tint, (64, 64, 1))
    period = 4 + 4 * list(GENERATORS).index(generator)
    pixels[::period] *= 0.4
    pixels[8 * number:8 * number + 16, 8 * number:8 * number + 16] = 255 - tint
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resynthesis-dataset")
    images = root / "images"
    seed = 0
    for source, (suffix, _) in GENERATORS.items():
        for number in IDS:
            seed += 1
            _save(_picture(source, number, seed), images / source / f"{number:05d}{suffix}")
            for resynth, (resynth_suffix, _) in GENERATORS.items():
                if (source, number, resynth) != MISSING:
                    seed += 1
                    _save(_picture(resynth, number, seed),
                          images / source / "images" / resynth / f"{number:05d}{resynth_suffix}")
    source, number, resynth = ORPHAN
    _save(_picture(resynth, number, 999), images / source / "images" / resynth / f"{number:05d}.jpg")
    # Strays: hidden files, notes, an image with no id, a text file named like an image, a second file of one id.
    (images / ".DS_Store").write_bytes(b"\0\1")
    (images / "beta" / ".DS_Store").write_bytes(b"\0\1")
    (images / "alpha" / ".hidden.png").write_bytes(b"x")
    (images / "alpha" / "README.txt").write_text("generated with alpha")
    _save(_picture("alpha", 1, 1000), images / "alpha" / "cover.png")
    (images / "beta" / "00009.jpg").write_text("not an image")
    _save(_picture("gamma", 1, 1001), images / "gamma" / "00001-chrome-1.png")
    return root


@pytest.fixture
def empty_store(models, tmp_path) -> Path:
    """A store bound to the tiny CLIP with no pipeline sources: attribution can only replay."""
    path = tmp_path / "store"
    assert run_cli("init", "--store", path, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--json") == 0
    return path


def _import(capsys, *argv) -> dict:
    capsys.readouterr()
    assert run_cli("import-published", *argv, "--json", "--quiet") == 0
    return json.loads(capsys.readouterr().out)


def test_manifest_links_every_resynthesis_to_its_original(dataset, tmp_path, capsys):
    out = tmp_path / "manifest.csv"
    report = _import(capsys, dataset, "--out", out)
    assert report["generators"] == ["alpha", "beta", "gamma"]
    assert report["originals"] == 9 and report["resyntheses"] == 27 and report["linked"] == 26
    assert report["missing_resyntheses"] == 1 and report["missing_examples"] == ["beta/00002 by gamma"]
    assert report["orphans"] == 1 and report["descriptions"] == "placeholder"
    assert report["skipped"] == {"not dataset images": 4, "unreadable images": 1, "duplicate ids (first file kept)": 1}
    rows = read_manifest(out)  # the manifest reader accepts it (every path exists, originals resolve)
    by_path = {r.image: r for r in rows}
    resyntheses = [r for r in rows if r.role == "resynthesis"]
    assert len(resyntheses) == 27
    for row in resyntheses:
        if row.original is None:
            assert row.image.parts[-4:] == ("alpha", "images", "beta", "00007.jpg")
            continue
        original = by_path[row.original]
        assert original.role == "original" and original.description == row.description
        assert row.image.parent.parent.parent == original.image.parent  # images/<source>/images/<resynth>/
        assert image_number(row.image) == image_number(original.image)
    assert {r.description for r in rows if r.role == "original"} == {"id:00001", "id:00002", "id:00003"}


def test_round_trip_ingest_links_and_replay_attribution(dataset, empty_store, tmp_path, capsys):
    descriptions = tmp_path / "prompts.csv"
    descriptions.write_text("filename,prompt\n" + "".join(f"{n:05d}.png,\"{t}\"\n" for n, t in DESCRIPTIONS.items()))
    alternatives = tmp_path / "alt.json"
    alternatives.write_text(json.dumps({f"{n:05d}": f"another view: {t}" for n, t in DESCRIPTIONS.items()}))
    out = tmp_path / "manifest.csv"
    argv = (dataset, "--descriptions", descriptions, "--alt-descriptions", alternatives, "--out", out,
            "--ingest", "--store", empty_store)
    report = _import(capsys, *argv)
    assert report["descriptions"] == "file" and report["placeholder_ids"] == 1  # the orphan's id 7
    assert report["ingest"]["added"] == 36 and report["ingest"]["new_sources"] == ["alpha", "beta", "gamma"]
    assert "another view: a child in a blue hat" in out.read_text()
    assert _import(capsys, *argv)["ingest"]["skipped"] == 36  # re-running is a no-op

    with Store.open(empty_store) as store:
        stats = store.stats()
        assert stats["vectors"] == stats["index_vectors"] == 36
        assert {n: (s["kind"], s["originals"], s["resyntheses"]) for n, s in stats["sources"].items()} == {
            "alpha": ("replay", 3, 9), "beta": ("replay", 3, 10), "gamma": ("replay", 3, 8)}
        with store.session() as s:
            rows = s.scalars(select(ImageRow)).all()
        originals = {r.id: r for r in rows if r.role == "original"}
        linked = [r for r in rows if r.role == "resynthesis" and r.original_id is not None]
        assert len(linked) == 26
        for r in linked:  # a resynthesis shares its original's description and lives under its folder
            original = originals[r.original_id]
            assert r.description_id == original.description_id
            assert Path(r.path).parent.parent.parent == Path(original.path).parent

        assert all(s.kind == "replay" for s in store.sources())  # nothing can be generated, nothing needs to be
    with engine.open(empty_store) as ws:
        queries = [Query.read(dataset / "images" / name / f"{n:05d}{GENERATORS[name][0]}",
                              DESCRIPTIONS[n] if name != "gamma" else None)  # gamma: stored description
                   for name in GENERATORS for n in IDS]
        report = ws.attribute(queries, options=Options(per_source=3))
        results = report.results
    assert report.generated == 0 and ws.generator_calls == {}
    for query, result in zip(queries, results):
        true_source = Path(query.label).parent.name
        assert result.predicted == true_source, (query.label, result.scores)
        assert result.missing == [] and len(result.scores) == 3
        assert result.description_from == ("store" if true_source == "gamma" else "prompt")


def test_descriptions_file_formats(tmp_path):
    as_object = tmp_path / "d.json"
    as_object.write_text(json.dumps({"00001": "a  man", "2": "a woman"}))
    as_list = tmp_path / "d.jsonl"
    as_list.write_text('{"id": 1, "description": "a man"}\n{"id": "00002-0.png", "prompt": "a woman"}\n')
    headerless = tmp_path / "d.tsv"
    headerless.write_text("00001\ta man\n00002\ta woman\n")
    for path in (as_object, as_list, headerless):
        assert read_descriptions(path) == {1: "a man", 2: "a woman"}


def test_user_mistakes_are_one_line(dataset, tmp_path, capsys):
    def fails(*argv, match: str) -> None:
        capsys.readouterr()
        assert run_cli("import-published", *argv, "--quiet", "--out", tmp_path / "m.csv") == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and err.startswith("resynth: error:") and match in err, err

    fails(tmp_path / "nope", match="dataset folder not found")
    (tmp_path / "empty" / "images" / "alpha").mkdir(parents=True)
    fails(tmp_path / "empty", match="no dataset images")
    fails(dataset, "--descriptions", tmp_path / "none.csv", match="descriptions file not found")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    fails(dataset, "--descriptions", bad, match="not a readable descriptions file")
    fails(dataset, "--ingest", "--store", tmp_path / "no-store", match="no store at")
    assert not (tmp_path / "m.csv").exists()
