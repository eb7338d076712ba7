"""Offline jobs: `resynthesize` a description list (in process and on a local Ray cluster, same keys and
vectors, resumable) and `reembed` a store for another CLIP layer without regenerating an image, with
the switch surviving a kill at each step."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from sqlalchemy import select

import engine
from engine import Options
from index.schema import Image, Vector
from tests.conftest import PROMPTS
from tests.helpers import run_cli
from tests.test_store_cli_faults import one_line_error, resynth

TEXTS = PROMPTS[:3]


def _stored(store_dir) -> dict[str, np.ndarray]:
    """key -> live vector of every stored image."""
    with engine.open(store_dir, writable=False) as ws:
        store = ws.store
        with store.session() as s:
            rows = s.execute(select(Image.key, Vector.data).join(Vector, Vector.image_id == Image.id)
                             .where(Vector.embedder == store.embedder_identity)).all()
    return {key: np.frombuffer(data, np.float32) for key, data in rows}


@pytest.fixture
def two_sources(store_dir) -> tuple[str, ...]:
    with engine.open(store_dir, writable=False) as ws:
        return tuple(s.name for s in ws.sources()[:2])


@pytest.fixture(scope="module")
def ray():
    """One local Ray cluster for this module's tests (each started its own: seconds each)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_and_in_process_store_the_same_keys_and_vectors(store_dir, two_sources, tmp_path, ray):
    other = tmp_path / "other"
    shutil.copytree(store_dir, other)
    listing = tmp_path / "descriptions.txt"
    listing.write_text("# a dataset's descriptions\n" + "\n".join(TEXTS + [TEXTS[0]]) + "\n")
    sources = ",".join(two_sources)
    assert run_cli("resynthesize", listing, "--store", store_dir, "--sources", sources, "--per-source", 2,
                   "--quiet") == 0
    here = _stored(store_dir)
    assert len(here) == len(TEXTS) * 2 * 2
    with engine.open(other) as ws:
        report = ws.resynthesize_dataset(listing, Options(sources=two_sources, per_source=2), ray="local")
    assert report["backend"] == "ray" and report["generated"] == len(here) and not report["failed"]
    there = _stored(other)
    assert set(there) == set(here)
    for key, vector in here.items():
        np.testing.assert_allclose(there[key], vector, atol=1e-4)
    # resumable: everything is stored now, so a second run generates nothing
    with engine.open(store_dir) as ws:
        again = ws.resynthesize_dataset(TEXTS, Options(sources=two_sources, per_source=2))
    assert (again["generated"], again["cached"]) == (0, len(here))


def test_reembed_on_ray_stores_the_same_vectors(models, store_dir, two_sources, tmp_path, ray):
    with engine.open(store_dir) as ws:
        ws.resynthesize_dataset(TEXTS[:2], Options(sources=two_sources, per_source=1))
    other = tmp_path / "other"
    shutil.copytree(store_dir, other)
    clip = {"clip_config": models["clip_config"], "clip_layer": "final"}
    with engine.open(store_dir) as ws:
        here = ws.reembed(models["clip_checkpoint"], **clip)
    with engine.open(other) as ws:
        there = ws.reembed(models["clip_checkpoint"], ray="local", **clip)
    assert there["backend"] == "ray" and there["embedded"] == here["embedded"] == len(TEXTS[:2]) * 2
    a, b = _stored(store_dir), _stored(other)
    assert set(a) == set(b)
    for key, vector in a.items():
        np.testing.assert_allclose(b[key], vector, atol=1e-5)


def test_descriptions_input_errors_are_one_line(store_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    assert "holds no description" in one_line_error(resynth("resynthesize", empty, "--store", store_dir), 2)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,source\nx.png,a\n")
    assert "description" in one_line_error(resynth("resynthesize", manifest, "--store", store_dir), 2)
    assert "not found" in one_line_error(resynth("resynthesize", tmp_path / "nope.txt", "--store", store_dir), 2)


def _reembed_args(models, store_dir) -> list:
    return ["reembed", "--store", store_dir, "--clip-config", models["clip_config"],
            "--clip-checkpoint", models["clip_checkpoint"], "--clip-layer", "final"]


@pytest.fixture
def db_store(models, tmp_path, db) -> tuple:
    """A store with two of the tiny pipelines, its metadata in SQLite or in a real PostgreSQL database."""
    store = tmp_path / "db-store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"], "--clip-checkpoint",
                   models["clip_checkpoint"], *(["--db", db] if db else []), "--quiet") == 0
    names = tuple(list(models["pipelines"])[:2])
    for name in names:
        assert run_cli("source", "add", name, models["pipelines"][name], "--store", store, "--steps", 2,
                       "--quiet") == 0
    return store, names


def test_reembed_switches_without_regenerating(models, db_store, originals):
    store_dir, two_sources = db_store
    options = Options(sources=two_sources, per_source=1, adaptive=False, mode="resynthesis")
    query = originals[0]
    with engine.open(store_dir) as ws:
        ws.resynthesize_dataset(TEXTS, options)
        before = ws.store.embedder_identity
        generated = ws.attribute([query["image"]], prompt=TEXTS[0], options=options).generated
    keys_before = set(_stored(store_dir))
    assert generated == 0 and len(keys_before) == len(TEXTS) * 2
    assert run_cli(*_reembed_args(models, store_dir), "--quiet") == 0
    with engine.open(store_dir) as ws:
        assert ws.store.embedder_identity != before and ws.store.embedder_identity.endswith("/final")
        assert ws.store.index_path.name != "vectors.faiss" and not (store_dir / "vectors.faiss").exists()
        report = ws.attribute([query["image"]], prompt=TEXTS[0], options=options)
        assert report.generated == 0 and report.cached == 2  # no image was made again
        assert ws.verify()["problems"] == []
        with ws.store.session() as s:
            assert set(s.scalars(select(Vector.embedder))) == {ws.store.embedder_identity}  # old vectors gone
    assert len(_stored(store_dir)) == len(keys_before)
    again = resynth(*_reembed_args(models, store_dir))
    assert "nothing to re-embed" in one_line_error(again, 2)


@pytest.mark.parametrize("crash_at", ["reembed:before-commit", "reembed:after-commit"])
def test_reembed_killed_at_the_switch(models, store_dir, two_sources, crash_at):
    """Killed before the database commits the switch: the old embedder stays live and a rerun finishes
    from the vectors already made. Killed after: the next open adopts the new embedder."""
    with engine.open(store_dir) as ws:
        ws.resynthesize_dataset(TEXTS[:2], Options(sources=two_sources, per_source=1))
        before = ws.store.embedder_identity
    killed = resynth(*_reembed_args(models, store_dir), "--quiet", crash_at=crash_at)
    assert killed.returncode == -9
    with engine.open(store_dir) as ws:
        identity = ws.store.embedder_identity
        assert (identity == before) == (crash_at == "reembed:before-commit")
        assert json.loads((store_dir / "store.json").read_text())["embedder"]["identity"] == identity
        assert ws.verify()["problems"] == []
    if crash_at == "reembed:before-commit":
        assert resynth(*_reembed_args(models, store_dir), "--quiet").returncode == 0
    with engine.open(store_dir) as ws:
        assert ws.store.embedder_identity != before and ws.stats()["vectors"] == len(TEXTS[:2]) * 2
        assert ws.verify()["problems"] == []


def test_switch_refuses_an_image_added_after_the_new_vectors_were_made(tmp_path):
    """An image committed by another process between re-embedding and the switch would lose its only
    vector: the switch refuses, and the store keeps answering with the old embedder."""
    from index.keys import sha256_text
    from index.store import NewImage, Store

    old = {"identity": "old/block1", "arch": "none", "checkpoint": "none"}
    new = {"identity": "new/block1", "arch": "none", "checkpoint": "none"}
    store = Store.create(tmp_path / "s", old, 4)
    source = store.add_source("A", "replay", sha256_text("A"))
    description = store.description_id("a portrait")

    def image(n: int) -> NewImage:
        key = sha256_text(str(n))
        return NewImage(key=key, role="resynthesis", source_id=source.id, description_id=description,
                        file_hash=key, path=f"{key}.png", vector=np.eye(4, dtype=np.float32)[n % 4])

    ids = store.add_images([image(0), image(1)])
    assert store.add_vectors(new["identity"], ids, np.eye(4, dtype=np.float32)[:2]) == 2
    store.add_images([image(2)])  # arrives after re-embedding listed the images
    with pytest.raises(Exception, match="added during the switch|no new/block1 vector"):
        store.switch_embedder(new, 4)
    assert store.embedder_identity == "old/block1" and store.stats()["vectors"] == 3
    store.close()


def test_placement_gives_each_source_a_whole_gpu():
    """Five sources, one GPU: one actor at a time holds the whole GPU (a share each loaded five pipelines on it
    at once, each sizing its batches by the same free memory); without GPUs, the CPUs are shared."""
    from engine.jobs import _placement

    class Cluster:
        def __init__(self, resources: dict):
            self.resources = resources

        def cluster_resources(self) -> dict:
            return self.resources

    assert _placement(Cluster({"GPU": 1.0, "CPU": 16.0}), 5) == ({"num_gpus": 1.0, "num_cpus": 1.0}, "cuda")
    assert _placement(Cluster({"GPU": 8.0, "CPU": 4.0}), 5) == ({"num_gpus": 1.0, "num_cpus": 0.8}, "cuda")
    assert _placement(Cluster({"CPU": 2.0}), 4) == ({"num_cpus": 0.5}, "cpu")


def test_abandon_drops_a_given_up_reembeds_vectors_and_keeps_a_running_ones(tmp_path):
    """A reembed given up left its vectors for good (verify only noted them); `reembed --abandon` deletes them.
    One running now (its lease, renewed every batch) keeps its own; one killed (its owner's pid is gone from
    this host) does not, though its lease has 15 minutes to run."""
    import socket
    import subprocess

    from engine.resynthesis import dead_here
    from index.keys import sha256_text
    from index.reembed import RUNNING
    from index.store import NewImage, Store

    old = {"identity": "old/block1", "arch": "none", "checkpoint": "none"}
    store = Store.create(tmp_path / "s", old, 4)
    source = store.add_source("A", "replay", sha256_text("A"))
    description = store.description_id("a portrait")
    ids = store.add_images([NewImage(key=sha256_text(str(n)), role="resynthesis", source_id=source.id,
                                     description_id=description, file_hash=sha256_text(str(n)),
                                     path=f"{n}.png", vector=np.eye(4, dtype=np.float32)[n]) for n in range(3)])
    for name in ("given-up/final", "running/final", "killed/final"):
        store.add_vectors(name, ids, np.eye(4, dtype=np.float32)[:3])
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert store.claim([RUNNING + "running/final"], "another-host:1:a", 900) == [RUNNING + "running/final"]
    killed = f"{socket.gethostname()}:{gone.pid}:b"
    assert store.claim([RUNNING + "killed/final"], killed, 900) == [RUNNING + "killed/final"]
    assert store.verify()["unswitched"] == {"given-up/final": 3, "killed/final": 3, "running/final": 3}

    assert store.discard_unswitched(dead_here) == ({"given-up/final": 3, "killed/final": 3}, ["running/final"])
    assert store.verify()["unswitched"] == {"running/final": 3}
    assert store.stats()["vectors"] == 3  # the live set is untouched

    # a handle opened before another process switched: its live embedder is the given-up one now
    other = Store.open(tmp_path / "s")
    other.switch_embedder({"identity": "running/final", "arch": "none", "checkpoint": "none"}, 4)
    other.close()
    with pytest.raises(Exception, match="switched to embedder running/final"):
        store.discard_unswitched(dead_here)
    store.close()
    again = Store.open(tmp_path / "s")
    assert again.embedder_identity == "running/final" and again.stats()["vectors"] == 3
    assert again.verify()["problems"] == ["3 image files are missing"]  # nothing else: no vector was lost
    again.close()


def test_reembed_abandon_on_the_command_line(models, store_dir, two_sources):
    with engine.open(store_dir) as ws:
        ws.resynthesize_dataset(TEXTS[:2], Options(sources=two_sources, per_source=1))
        before = ws.store.embedder_identity
    assert resynth(*_reembed_args(models, store_dir), "--quiet", crash_at="reembed:before-commit").returncode == -9
    with engine.open(store_dir, writable=False) as ws:
        assert list(ws.verify()["unswitched"].values()) == [4]
    out = resynth("reembed", "--store", store_dir, "--abandon", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert list(report["dropped"].values()) == [4] and report["running"] == []  # the killed run's lease is let go
    assert "no reembed to give up" in resynth("reembed", "--store", store_dir, "--abandon").stdout
    with engine.open(store_dir, writable=False) as ws:
        assert "unswitched" not in ws.verify() and ws.store.embedder_identity == before
    for argv, says in ((("reembed", "--store", store_dir), "required: --clip-checkpoint (or --abandon)"),
                       ((*_reembed_args(models, store_dir), "--abandon"),
                        "--abandon takes no --clip-* or --ray option")):
        usage = resynth(*argv)  # a usage error, as argparse's own
        assert usage.returncode == 2 and usage.stderr.splitlines()[-1].endswith(says), usage.stderr
        assert "Traceback" not in usage.stderr
    assert resynth(*_reembed_args(models, store_dir), "--quiet").returncode == 0  # the reembed made afresh
