"""Importing a tree laid out like the paper's published dataset: manifest, ingest, links, replay attribution."""
from __future__ import annotations

import json
import os
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

import engine
from engine import Options
from engine.attribute import Query
from engine.manifest import read_manifest
from engine.errors import UserError
from engine.published import BAD_NAME, OVER_LIMITS, SHARED_ORIGINAL, image_number, import_published, read_descriptions
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
    # A manifest from elsewhere cannot add a source that reads as a stored one, a name no source may have,
    # or one image under two true sources; each refusal names its row, and nothing is written.
    first, copy = dataset / "images" / "alpha" / "00001.png", tmp_path / "copy.png"
    copy.write_bytes(first.read_bytes())
    for rows, said in (([f"{first},ALPHA,d,original"], "m.csv:2: source 'ALPHA' differs from the store's source "
                                                       "'alpha' only by case"),
                       ([f"{first},new,d,original", f"{first},a\\b,d,resynthesis"], "m.csv:3: invalid source name"),
                       ([f"{first},alpha,d,original", f"{copy},beta,d,original"], "m.csv:3: original "),
                       ([f"{first},alpha,d,original", f"{copy},Beta,d,resynthesis"], "differs from the store's"),
                       ([f"{first},alpha,d,original,{'0' * 64}"], "m.csv:2: "),  # a damaged download
                       ([f"{first},alpha,d,original,{'0' * 63}"], "m.csv:2: sha256 must be 64 hexadecimal")):
        (tmp_path / "m.csv").write_text("image,source,description,role,sha256\n" + "\n".join(rows) + "\n")
        assert run_cli("ingest", tmp_path / "m.csv", "--store", empty_store, "--allow-outside", "--quiet") == 2
        err = capsys.readouterr().err.strip()
        assert said in err and "\n" not in err, err
        assert "same bytes as" in err or "original " not in said
        assert "does not match the manifest's sha256 (000000000000... recorded" in err or "0" * 64 not in rows[0]

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
    with_bom = tmp_path / "bom.csv"  # Excel's: the headerless file's first id was taken for a header, and lost
    with_bom.write_bytes(b"\xef\xbb\xbf00001,a man\n00002,a woman\n")
    json_bom = tmp_path / "bom.json"  # refused as "not a readable descriptions file"
    json_bom.write_bytes(b"\xef\xbb\xbf" + as_object.read_bytes())
    for path in (as_object, as_list, headerless, with_bom, json_bom):
        assert read_descriptions(path) == {1: "a man", 2: "a woman"}
    twice = tmp_path / "twice.csv"  # one id, two descriptions: the last was used without a word
    twice.write_text("id,prompt\n00001,a man\n1,a woman\n2,a woman\n00002,a woman\n")
    conflicts: set[int] = set()
    assert read_descriptions(twice, conflicts) == {1: "a woman", 2: "a woman"} and conflicts == {1}


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
    with open(tmp_path / "dump.json", "wb") as handle:  # sparse: read whole, it was held in memory, then refused
        handle.truncate(257 << 20)
    fails(dataset, "--descriptions", tmp_path / "dump.json", match="more than a descriptions file's 256 MB")
    prompts = tmp_path / "m.csv"  # --out naming the descriptions file: the user's file was replaced by the manifest
    prompts.write_text("00001,a man\n")
    fails(dataset, "--descriptions", prompts, match="is the --descriptions file")
    assert prompts.read_text() == "00001,a man\n"
    prompts.unlink()
    assert not (tmp_path / "m.csv").exists()


def _bomb() -> bytes:
    """A 50000 x 50000 PNG of a few hundred bytes: Pillow raises DecompressionBombError (no OSError) at open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(
        b"IEND", b"")


def test_a_sloppy_or_hostile_tree_is_skipped_file_by_file(tmp_path):
    """A bomb among the images was a traceback; a folder name no source may have (a backslash, 201
    characters) was written to the manifest and then refused the whole ingest; a truncated image passed the
    header check and refused the whole `--ingest` after the manifest was written. Each is now skipped and
    counted; generator folders that read as one name are refused, naming both."""
    root = tmp_path / "ds"
    images = root / "images"
    _save(_picture("alpha", 1, 1), images / "alpha" / "00001.png")
    _save(_picture("beta", 1, 2), images / "alpha" / "images" / "beta" / "00001.png")
    (images / "alpha" / "00002.png").write_bytes(_bomb())
    cut = images / "alpha" / "images" / "beta" / "00003.png"
    _save(_picture("beta", 3, 3), cut)
    cut.write_bytes(cut.read_bytes()[:-2000])  # the header intact, the pixels cut
    for odd in ("back\\slash", "x" * 201):
        _save(_picture("beta", 1, 4), images / odd / "00001.png")
    for generator in ("alpha", "beta"):  # a safety filter's black image as two generators' original: no true source
        _save(Image.new("RGB", (64, 64)), images / generator / "00004.png")
    report = import_published(root, tmp_path / "m.csv")
    assert (report.originals, report.resyntheses) == (1, 2)
    assert report.skipped == {OVER_LIMITS: 1, BAD_NAME: 2, SHARED_ORIGINAL: 2}
    report = import_published(root, tmp_path / "m.csv", decode=True)  # as `--ingest` scans
    assert (report.originals, report.resyntheses) == (1, 1)
    assert report.skipped == {OVER_LIMITS: 1, BAD_NAME: 2, SHARED_ORIGINAL: 2, "unreadable images": 1}

    for twin in ("Alpha", unicodedata.normalize("NFD", "café")):
        if twin != "Alpha":
            os.rename(images / "Alpha", images / unicodedata.normalize("NFC", "café"))
        _save(_picture("alpha", 1, 5), images / twin / "00001.png")
        with pytest.raises(UserError, match="differ only by case or Unicode form") as error:
            import_published(root, tmp_path / "m.csv")
        assert "\n" not in str(error.value) and repr(twin) in str(error.value)


def test_a_manifest_column_given_twice_is_refused_and_source_names_are_composed(tmp_path):
    """json.loads keeps the last of a repeated key, a CSV reader the last of a repeated header, and `path`
    is an alias of `image`: a row silently named another file than the one a reader sees first."""
    _save(_picture("alpha", 1, 1), tmp_path / "a.png")
    _save(_picture("alpha", 2, 2), tmp_path / "b.png")
    row = '"source": "s", "description": "d", "role": "original"'
    for name, text, said in (
            ("keys.jsonl", f'{{"image": "a.png", {row}, "image": "b.png"}}\n', "column 'image' is given twice"),
            ("alias.jsonl", f'{{"image": "a.png", {row}, "path": "b.png"}}\n', "as 'image' and 'path'"),
            ("head.csv", "image,source,description,role,Image\na.png,s,d,original,b.png\n", "as 'image' and 'Image'"),
            ("text.csv", "image,source,prompt,role,description\na.png,s,d,original,e\n", "'description' is given")):
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=said):
            read_manifest(tmp_path / name)
    for name, text in (  # what worked before and names no other file: columns resynth does not read, agreeing
            ("notes.csv", "image,source,description,role,notes,Notes, , \na.png,s,d,original,x,y,,\n"),  # spellings
            ("ids.jsonl", f'{{"ID": 1, "id": 2, "image": "a.png", {row}}}\n'),
            ("agree.csv", "image,path,source,description,role\na.png,a.png,s,d,original\n")):
        (tmp_path / name).write_text(text)
        assert [r.image.name for r in read_manifest(tmp_path / name)] == ["a.png"], name
    (tmp_path / "blank.csv").write_text("image,source,description,role\n\na.png,s,d,original\na.png,s,d,oops\n")
    with pytest.raises(UserError, match="blank.csv:4: role must be"):  # it said line 3, the row above
        read_manifest(tmp_path / "blank.csv")
    (tmp_path / "half.jsonl").write_text(f'{{"image": "a.png", {row}, "seed": 1.5}}\n')  # it was read as seed 1
    with pytest.raises(UserError, match="seed must be an integer, not '1.5'"):
        read_manifest(tmp_path / "half.jsonl")
    (tmp_path / "nfd.csv").write_text(f"image,source,description,role\na.png,{unicodedata.normalize('NFD', 'café')},"
                                      "d,original\n")
    assert read_manifest(tmp_path / "nfd.csv")[0].source == unicodedata.normalize("NFC", "café")
