"""Fault injection through the real CLI: kill -9 at each write step, races between processes, damaged
files, hostile manifests. Every case ends with nothing committed lost and either the right answer or a
one-line error with a non-zero exit code."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import run_cli
from tests.procs import resynth  # noqa: F401  (test_jobs imports it from here)

REPO = Path(__file__).resolve().parents[1]
NEW_PROMPT = "a lighthouse keeper with a lantern at dusk"


def in_process(*argv) -> subprocess.CompletedProcess:
    """`resynth ...` in this process, its output captured: for refusals, which need no process of their own."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(*argv)
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def one_line_error(out: subprocess.CompletedProcess, code: int) -> str:
    assert out.returncode == code, (out.returncode, out.stderr[-2000:])
    err = out.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("resynth: error:"), err
    return err


def verify(store: Path, *extra: str) -> dict:
    out = in_process("verify", "--store", store, "--json", *extra)
    assert out.returncode in (0, 4), out.stderr[-2000:]
    return json.loads(out.stdout)


def vectors(store: Path) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{store / 'metadata.sqlite'}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM vectors").fetchone()[0]


@pytest.fixture(scope="module")
def prepared(models, originals, tmp_path_factory) -> Path:
    """Every zoo pipeline registered, every original ingested, one resynthesis per (prompt, source)."""
    root = tmp_path_factory.mktemp("prepared")
    store = root / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"]) == 0
    for name, folder in models["pipelines"].items():
        assert run_cli("source", "add", name, folder, "--store", store, "--steps", 2, "--quiet") == 0
    manifest = root / "originals.csv"
    manifest.write_text("image,source,description,role\n" + "".join(
        f"{o['image']},{o['source']},{o['prompt']},original\n" for o in originals))
    assert run_cli("ingest", manifest, "--store", store, "--quiet", "--allow-outside") == 0
    queries = root / "q.jsonl"
    queries.write_text("".join(json.dumps({"image": str(o["image"]), "prompt": o["prompt"]}) + "\n"
                               for o in originals))
    assert run_cli("attribute", "--queries", queries, "--store", store, "--per-source", 1, "--quiet") == 0
    return store


@pytest.fixture
def store(prepared, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(prepared, copy)
    return copy


# ----- kill -9 at each write step, then the rerun completes and nothing committed is lost ----------
def test_kill_during_attribute_generation(store, originals, models):
    n = len(models["pipelines"])
    query = ["attribute", originals[0]["image"], "--prompt", NEW_PROMPT, "--per-source", 1, "--store", store,
             "--json", "--quiet"]
    before = vectors(store)
    assert resynth(*query, crash_at="generate:before-commit").returncode == -9  # PNGs on disk, no rows
    assert vectors(store) == before
    # the rerun generates them all, commits, and dies before its index save: the rows are kept
    assert resynth(*query, crash_at="index:before-replace").returncode == -9
    assert vectors(store) == before + n
    again = resynth(*query)  # the next open finds the committed rows: nothing generated twice
    assert again.returncode == 0 and json.loads(again.stdout)["cache"] == {"cached": n, "generated": 0}
    report = verify(store)
    assert report["ok"], report["problems"]


def test_kill_during_ingest_rebuild_and_calibrate(store, originals, tmp_path):
    more = tmp_path / "more.csv"  # the originals again under new replay sources: new rows
    more.write_text("image,source,description,role\n" + "".join(
        f"{o['image']},copy-{o['source']},{o['prompt']},resynthesis\n" for o in originals))
    before = vectors(store)
    assert resynth("ingest", more, "--store", store, "--quiet", "--allow-outside",
                   crash_at="images:after-commit").returncode == -9
    committed = vectors(store)
    assert committed > before
    assert resynth("ingest", more, "--store", store, "--quiet", "--allow-outside").returncode == 0
    assert vectors(store) == before + len(originals)
    assert resynth("rebuild", "--store", store, "--quiet", crash_at="index:before-replace").returncode == -9
    assert resynth("rebuild", "--store", store, "--quiet").returncode == 0
    config = (store / "store.json").read_bytes()
    assert resynth("calibrate", "--store", store, "--quiet", "--per-source", 1,
                   crash_at="config:before-replace").returncode == -9
    assert (store / "store.json").read_bytes() == config  # the old config, whole
    assert resynth("calibrate", "--store", store, "--quiet", "--per-source", 1).returncode == 0
    assert json.loads((store / "store.json").read_text())["calibration"]["fitted"]
    report = verify(store)
    assert report["ok"], report["problems"]
    assert not list(store.glob(".*.tmp"))  # the dead processes' temp files were cleaned up at open


def test_kill_during_source_remove_leaves_orphans_that_repair_removes(store, models):
    name = next(iter(models["pipelines"]))
    own = [p for p in (store / "images").rglob("*.png")]
    killed = resynth("source", "remove", name, "--store", store, "--quiet", crash_at="remove:after-commit")
    assert killed.returncode == -9
    listed = json.loads(resynth("source", "list", "--store", store, "--json").stdout)
    assert name not in {s["name"] for s in listed}  # committed
    orphans = [p for p in own if p.exists()]
    assert orphans, "the kill landed after the file deletion"
    for path in orphans:  # as if the crash was long ago (recent unreferenced files may be commits in flight)
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    report = verify(store)
    assert not report["ok"] and any("belong to no row" in p for p in report["problems"])
    repaired = resynth("verify", "--repair", "--store", store)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    remaining = [p for p in own if p.exists()]
    assert len(remaining) == len(own) * (len(models["pipelines"]) - 1) // len(models["pipelines"])  # its files only
    assert verify(store)["ok"]


# ----- damaged files ---------------------------------------------------------------------------
def test_missing_database_is_one_line_and_touches_nothing(store, originals):
    index_bytes = (store / "vectors.faiss").read_bytes()
    (store / "metadata.sqlite").unlink()
    for argv in (["stats"], ["source", "list"], ["attribute", originals[0]["image"], "--prompt", "x"],
                 ["rebuild"], ["verify"]):
        one_line_error(in_process(*argv, "--store", store), 4)
    assert (store / "vectors.faiss").read_bytes() == index_bytes
    assert not (store / "metadata.sqlite").exists()


def test_garbled_index_is_detected_rebuilt_never_served(store, originals):
    query = ["attribute", originals[0]["image"], "--prompt", originals[0]["prompt"], "--per-source", 1,
             "--store", store, "--json", "--quiet"]
    good = json.loads(in_process(*query).stdout)["results"][0]
    data = bytearray((store / "vectors.faiss").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = os.urandom(min(4096, len(data) - middle))
    (store / "vectors.faiss").write_bytes(bytes(data))
    report = verify(store)
    assert not report["ok"]
    answer = json.loads(in_process(*query).stdout)["results"][0]  # a writable open rebuilt it first
    assert answer["predicted"] == good["predicted"]
    assert [round(s["score"], 5) for s in answer["scores"]] == [round(s["score"], 5) for s in good["scores"]]
    assert verify(store)["ok"]


# ----- races between processes -----------------------------------------------------------------
def test_two_processes_ingest_one_manifest(store, originals, tmp_path):
    manifest = tmp_path / "race.csv"
    manifest.write_text("image,source,description,role\n" + "".join(
        f"{o['image']},race-{o['source']},{o['prompt']},resynthesis\n" for o in originals))
    before = vectors(store)
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: resynth("ingest", manifest, "--store", store, "--quiet", "--allow-outside",
                                               "--json"), range(2)))
    for out in outs:
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert vectors(store) == before + len(originals)
    assert sum(json.loads(o.stdout)["added"] for o in outs) == len(originals)


def test_two_processes_attribute_one_new_prompt_generate_once(store, originals, models):
    n = len(models["pipelines"])
    argv = ["attribute", originals[1]["image"], "--prompt", NEW_PROMPT + " raced", "--per-source", 2,
            "--no-adaptive", "--store", store, "--json", "--quiet"]
    before = vectors(store)
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: resynth(*argv), range(2)))
    for out in outs:
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    answers = [json.loads(o.stdout) for o in outs]
    assert sum(a["cache"]["generated"] for a in answers) == 2 * n  # each image made once, by one of them
    assert vectors(store) == before + 2 * n
    assert answers[0]["results"][0]["predicted"] == answers[1]["results"][0]["predicted"]


# ----- hostile input ---------------------------------------------------------------------------
def test_manifest_rows_stay_inside_its_folder(store, originals, tmp_path):
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    outside = tmp_path / "elsewhere.png"
    for source, target in ((originals[0]["image"], folder / "inside.png"), (originals[2]["image"], outside)):
        image = Image.open(source).convert("RGB")
        image.putpixel((0, 0), (1, 2, 3))  # new bytes: the store holds the originals as another source's
        image.save(target)
    (folder / "link.png").symlink_to(originals[1]["image"])
    before = (vectors(store), in_process("source", "list", "--store", store, "--json").stdout)
    for row in (f"../{os.path.relpath(outside, tmp_path)}", str(outside), "link.png", "/etc/passwd"):
        manifest = folder / "m.csv"
        manifest.write_text(f"image,source,description,role\ninside.png,fresh,a,original\n{row},fresh,b,original\n")
        err = one_line_error(in_process("ingest", manifest, "--store", store, "--quiet"), 2)
        assert "outside the manifest" in err or "cannot decode" in err
    # a bad image at the end: nothing written, not even the new replay source
    shutil.copy(__file__, folder / "not-an-image.png")
    manifest.write_text("image,source,description,role\ninside.png,fresh,a,original\nnot-an-image.png,fresh,b,original\n")
    one_line_error(in_process("ingest", manifest, "--store", store, "--quiet"), 2)
    assert (vectors(store), in_process("source", "list", "--store", store, "--json").stdout) == before
    manifest.write_text(f"image,source,description,role\ninside.png,fresh,a,original\n{outside},fresh,b,original\n")
    assert resynth("ingest", manifest, "--store", store, "--quiet", "--allow-outside").returncode == 0


CELL = st.one_of(st.text(max_size=30), st.sampled_from(["../../etc/passwd", "/etc/passwd", "\0", "original",
                                                         "resynthesis", "9" * 30, "-1", "a.png", " "]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(CELL, min_size=0, max_size=7), max_size=5), jsonl=st.booleans(),
       header=st.sampled_from(["image,source,description,role,seed,original", "image,source", "", "a,b,c,d"]))
def test_fuzzed_manifests_fail_in_one_line(tmp_path, rows, jsonl, header):
    from engine.errors import UserError
    from engine.manifest import read_manifest

    (tmp_path / "a.png").write_bytes(b"not really")
    names = header.split(",")
    path = tmp_path / ("m.jsonl" if jsonl else "m.csv")
    if jsonl:
        path.write_text("".join(json.dumps(dict(zip(names, r))) + "\n" for r in rows))
    else:
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(names)
        writer.writerows(rows)
        path.write_text(buffer.getvalue())
    try:
        read_manifest(path, allow_outside=False)
    except UserError as exc:
        assert "\n" not in str(exc).strip()


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2048), fields=st.dictionaries(
    st.sampled_from(["per_source", "aggregation", "seed", "sources", "original_refs", "other"]),
    st.text(max_size=20), max_size=5))
def test_fuzzed_uploads_and_form_fields_fail_in_one_line(data, fields):
    from engine.errors import UserError
    from engine.images import read_image
    from engine.options import Options

    for attempt in (lambda: read_image(data, "upload"), lambda: read_image(b"\x89PNG\r\n\x1a\n" + data, "upload"),
                    lambda: Options.from_strings(fields)):
        try:
            attempt()
        except UserError as exc:
            assert "\n" not in str(exc) and "BytesIO" not in str(exc)


def test_closed_stdout_ends_quietly(store):
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "stats", "--store", str(store), "--json"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is printed (`resynth stats | head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(60) in (0, 141) and "Traceback" not in err and "BrokenPipe" not in err, err
