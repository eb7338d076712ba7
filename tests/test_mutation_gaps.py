"""Guarantees of docs/guarantees.md that a mutation audit found no test for: each test here fails when the
product breaks that guarantee in one small, realistic way (named in its docstring), and passes as it is."""
from __future__ import annotations

import io
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.store import NewImage, Store
from tests.helpers import run_cli
from tests.procs import _forkserver

EMBEDDER = {"identity": "test-embedder", "arch": "x", "checkpoint": "x"}
DIM = 8


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 40 % 256, 80, 200 - i)).save(buffer, format="PNG")
    return buffer.getvalue()


def _row(store: Store, source_id: int, i: int) -> NewImage:
    """One resynthesis row of a replay source, its image written first as a generation writes it."""
    path = f"images/fp/k{i}.png"
    vector = np.random.default_rng(i).normal(size=DIM).astype(np.float32)
    return NewImage(key=f"k{i}", role="resynthesis", source_id=source_id,
                    description_id=store.description_id("a prompt"), file_hash=store.write_image(path, _png(i)),
                    path=path, vector=vector / np.linalg.norm(vector), seed=i)


@pytest.fixture
def tiny_store(tmp_path) -> Path:
    root = tmp_path / "s"
    with Store.create(root, EMBEDDER, DIM) as store:
        store.add_source("a", "replay", "fp")
    return root


def _write_image(root: str, point: str) -> None:
    """In a process of its own: write one image, killed (SIGKILL) at crash point `point`."""
    import os

    os.environ["RESYNTH_CRASH_AT"] = point
    with Store.open(Path(root)) as store:
        store.write_image("images/fp/new.png", _png(5))


def test_an_image_appears_under_its_own_name_only_whole(tiny_store):
    """Write order, step 1: an image file is written under a temporary name, fsynced, then renamed, so a kill
    mid-write never leaves half a PNG under the name its row will give. Mutation that survived every test:
    index/objects.py LocalImages.write writing the target path directly (no temporary name, no rename)."""
    target = tiny_store / "images" / "fp" / "new.png"
    # a process of the suite's clean server (tests/procs.py), not a fork of this one and its threads
    process = _forkserver().Process(target=_write_image, args=(str(tiny_store), "image:before-replace"))
    process.start()
    process.join(60)
    assert process.exitcode == -signal.SIGKILL
    assert not target.exists()  # the kill came between the write and the rename
    left = list(target.parent.iterdir())  # only the dead writer's temporary file, which the next repair removes
    assert len(left) == 1 and left[0].match(".new.png.*.tmp"), left


def test_an_error_of_several_lines_is_still_one_line(tmp_path, capsys):
    """One-line errors: a message that carries a newline (here a --store path pasted with one) is printed on
    one line. Mutation that survived every test: engine/errors.py _one_line returning its text unchanged."""
    assert run_cli("stats", "--store", tmp_path / "no\nstore") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("resynth: error: no store at"), err


@pytest.fixture
def one_source_store(models, tmp_path) -> tuple[Path, str]:
    """A store bound to the tiny CLIP with one tiny pipeline (2 steps): a generation costs one image."""
    path, name = tmp_path / "store", next(iter(models["pipelines"]))
    assert run_cli("init", "--store", path, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--quiet") == 0
    assert run_cli("source", "add", name, models["pipelines"][name], "--store", path, "--steps", 2, "--quiet") == 0
    return path, name


def test_a_generated_image_is_on_disk_before_its_row_commits(one_source_store, tmp_path, monkeypatch):
    """Write order: image file first (whole, under its final name), then the one transaction with its row and
    vector, so a kill right after the commit leaves no row naming a file that was never written. Mutation that
    survived every test (the kill tests crash before the commit or after the images anyway): engine/resynthesis.py
    store_generated committing the rows (add_images) before writing their images. What the store holds at the
    moment of each commit is read through the real commit, which then runs unchanged."""
    import hashlib

    import engine

    store, _ = one_source_store
    query = tmp_path / "query.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(query)
    on_disk: list[bool] = []
    with engine.open(store) as ws:
        commit = ws.store.add_images

        def observed(rows):
            on_disk.extend((store / r.path).is_file() and hashlib.sha256((store / r.path).read_bytes()).hexdigest()
                           == r.file_hash for r in rows)
            return commit(rows)

        monkeypatch.setattr(ws.store, "add_images", observed)
        report = ws.attribute(query, prompt="a red kite over a beach", options=engine.Options(per_source=1))
        assert report.generated == 1, report.to_dict()["cache"]
        assert ws.store.verify()["ok"]
    assert on_disk == [True]


def test_a_source_removed_through_a_workspace_is_gone_from_its_next_plan(tiny_store):
    """Changes made through a workspace apply at once (its source list is cached for others' changes only).
    Mutation that survived every test: engine/workspace.py remove_source no longer forgetting the cached list,
    so requests planned right after the removal still named the removed source."""
    import engine

    with engine.open(tiny_store) as ws:
        assert [s.name for s in ws.sources()] == ["a"]
        ws.remove_source("a")
        assert ws.sources() == []


def test_a_source_added_again_under_its_name_with_other_files_makes_the_calibration_stale(tiny_store):
    """A calibration is stale once the sources changed since `resynth calibrate` (docs/method.md): a source
    removed and added again under the same name with another model is such a change, whose old thresholds
    must not label answers "known". Mutation that survived every test (they add a source of a new name):
    engine/compare.py calibration_stale comparing the sources' names only, not their fingerprints."""
    import engine

    with engine.open(tiny_store) as ws:
        fitted = {s.name: s.fingerprint for s in ws.store.sources()}  # what fitting.py records
        ws.store.update_config(calibration={"fitted": True, "thresholds": {"a": 0.5},
                                            "notes": {"store_sources": fitted}})
        assert ws.calibration_stale() is None
        ws.remove_source("a")
        ws.store.add_source("a", "replay", "other-files")
        ws.sources_changed()
        assert "stale" in (ws.calibration_stale() or "")


def test_stats_and_source_list_write_nothing_even_where_a_writable_open_would_repair(tiny_store, capsys):
    """A read-only command (`stats`, `source list`) writes nothing, also on a store whose index file a writable
    open would write (here: never written, as after a killed first writer). Mutation that survived every test
    (they run these commands on read-only mounts, where every open is read-only anyway): engine/cli.py cmd_stats
    opening the store writable."""
    with Store.open(tiny_store) as store:
        source = store.sources()[0]
        store.add_images([_row(store, source.id, 0)])
    (tiny_store / "vectors.faiss").unlink()

    def files() -> dict:  # SQLite's reader may leave an empty log and its shared-memory file: no data
        return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tiny_store.iterdir()
                if not p.name.endswith(("-wal", "-shm"))}

    before = files()
    assert run_cli("stats", "--store", tiny_store) == 0
    assert run_cli("source", "list", "--store", tiny_store) == 0
    capsys.readouterr()
    assert files() == before and not (tiny_store / "vectors.faiss").exists()
    wal = tiny_store / "metadata.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0


def test_a_score_equal_to_its_threshold_is_accepted():
    """Ties, deterministically (docs/evaluation.md): a threshold accepts every score equal to it, as `calibrate`
    measured it (metrics.py counts score >= t as accepted). Mutation that survived every test: engine/attribute.py
    verdict saying "known" only for a score above the threshold."""
    from engine.attribute import SourceScore, verdict
    from engine.calibration import Calibration

    calibration = Calibration(fitted=True, thresholds={"a": 0.5})
    assert verdict([SourceScore("a", 0.5, 3)], calibration, None)[0] == "known"
    assert not calibration.is_unknown("a", 0.5)
    assert verdict([SourceScore("a", np.nextafter(0.5, 0), 3)], calibration, None)[0] == "unknown"
