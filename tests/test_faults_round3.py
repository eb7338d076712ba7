"""Third round of attacks on the store (docs/guarantees.md), each defect it found pinned by a cheap test:
`verify` while a writer has not saved yet, images bought before a failing embedder load, `reembed` of an
altered or cut image, and a PostgreSQL server that is down or out of connection slots."""
from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine.cli import main
from engine.errors import UserError, kind_of
from engine.options import Options
from index.errors import StoreBusy, StoreError, StoreUnavailable
from index.faults import skipping
from index.store import NewImage, Store
from tests import pg

EMBEDDER = {"identity": "test-embedder", "arch": "x", "checkpoint": "x"}
DIM = 8


@pytest.fixture
def clip(models):
    """The tiny zoo's CLIP (the session's zoo: nothing more to build in a whole-suite run)."""
    return models["clip_config"], models["clip_checkpoint"]


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 40 % 256, 80, 200 - i)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(store: Store, start: int, count: int) -> None:
    source = store.sources()[0] if store.sources() else store.add_source("a", "replay", "fp")
    desc = store.description_id("a prompt")
    rows = []
    for i in range(start, start + count):
        vector = np.random.default_rng(i).normal(size=DIM).astype(np.float32)
        rows.append(NewImage(key=f"k{i}", role="resynthesis", source_id=source.id, description_id=desc,
                             file_hash=store.write_image(f"images/fp/k{i}.png", _png(i)), path=f"images/fp/k{i}.png",
                             vector=vector / np.linalg.norm(vector), seed=i))
    store.add_images(rows)


def test_verify_notes_an_index_that_only_lags_and_still_reports_damage(tmp_path):
    """`resynth verify` beside `serve --workers 2` answered exit 4 "index file lags the database" between two
    periodic saves, and after every kill -9 of a writer: not damage (each open and save catches up), so a
    note; a vector that differs from the database is still a problem."""
    root = tmp_path / "s"
    with Store.create(root, EMBEDDER, DIM) as store:
        _add(store, 0, 4)
    with skipping("close:publish"), Store.open(root) as store:  # a writer killed after its commit
        _add(store, 4, 3)
    with Store.open(root, writable=False) as store:
        report = store.verify()
        assert report["ok"], report["problems"]
        assert report["index"]["lag"] == {"missing": 3, "deleted": 0}
        assert any("lags the database (+3 -0)" in note for note in report["notes"])
    with Store.open(root) as store:  # a writable open saves the catch-up
        report = store.verify()
        assert report["ok"] and not report["notes"] and "lag" not in report["index"]


def test_a_process_left_running_across_a_reembed_writes_nothing(tmp_path):
    """A server not restarted after `resynth reembed` (the docs ask for it; a user forgets) kept going in
    the old space: it bought every image again (keys name the embedder), stored old-space vectors (then
    "images have no vector" in verify), wrote the old index file back and logged that the database had lost
    data. It is now refused, in one line, from the database at its next write and from store.json at its
    next refresh."""
    root = tmp_path / "s"
    with Store.create(root, EMBEDDER, DIM) as store:
        _add(store, 0, 3)
    old = Store.open(root)
    try:
        other = {"identity": "other-embedder", "arch": "y", "checkpoint": "y"}
        with Store.open(root) as switching:
            ids = [image_id for image_id, _, _ in switching.images_without_vector(other["identity"])]
            switching.add_vectors(other["identity"], ids, np.eye(len(ids), DIM, dtype=np.float32))
            switching.switch_embedder(other, DIM)
        with pytest.raises(StoreError, match="switched to embedder other-embedder") as caught:
            _add(old, 10, 1)  # before any refresh: the database refuses it in the write's transaction
        assert kind_of(caught.value).code == "store_switched" and "\n" not in str(caught.value)
        assert old.refresh() is False
        with pytest.raises(StoreError, match="restart this process"):
            old.search(np.zeros((1, DIM), np.float32), np.array([1], np.int64))
    finally:
        old.close()  # saves nothing: no index file of the old space comes back
    assert not (root / "vectors.faiss").exists()
    with Store.open(root, writable=False) as store:
        report = store.verify()
        assert report["ok"], report["problems"]


def test_a_claim_release_the_database_refused_is_retried(tmp_path, monkeypatch):
    """PostgreSQL restarted during a generation of `serve --workers 2`: the commit failed, and so did the
    release of the claim, so the live worker held the key for its whole lease and the other worker's
    request for the same prompt waited 15 minutes (measured, past a 120 s client timeout). A refused
    release is now retried in the background; here the database's write lock is held instead."""
    root = tmp_path / "s"
    Store.create(root, EMBEDDER, DIM).close()
    monkeypatch.setenv("RESYNTH_BUSY_TIMEOUT_S", "0.2")
    with Store.open(root) as store:
        assert store.claim(["a", "b", "c"], "me") == ["a", "b", "c"]
        holder = sqlite3.connect(root / "metadata.sqlite", isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StoreBusy):
                store.release(["a", "b"], "me")
        finally:
            holder.close()
        assert store.claims.pending_releases() == 2
        assert store.claim(["b"], "me") == ["b"]  # taken back meanwhile: its new lease is kept
        deadline = time.monotonic() + 10
        while store.claims.pending_releases() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.live_claims(["a", "b", "c"]) == {"b": "me", "c": "me"}


def test_a_generation_longer_than_its_lease_keeps_its_claims(tmp_path, clip, monkeypatch):
    """A batch that outlasted its claim's lease (48 images of a rate-limited API or of a large model on a
    slow GPU take more than the 15 minutes) had its keys taken over by a second process, which bought
    every image again: 8 images bought for 4 keys, measured with the lease shortened as here."""
    import threading

    from engine import resynthesis
    from tests.fake_images_api import FakeImagesApi

    # renewed every 0.4 s: a renewal may wait on the first process's own store writes, so the lease leaves
    # room for one late renewal (a 0.5 s lease failed under load)
    monkeypatch.setattr(resynthesis, "CLAIM_LEASE_SECONDS", 1.2)
    config, checkpoint = clip
    with FakeImagesApi(delay=0.8) as fake:
        with engine.init(tmp_path / "s", clip_config=config, clip_checkpoint=checkpoint, device="cpu") as ws:
            ws.add_source("api", kind="api", url=fake.url, model="m", size="32x32", concurrency=1)
        with engine.open(tmp_path / "s", device="cpu") as first, engine.open(tmp_path / "s", device="cpu") as second:
            second.embedder  # noqa: B018 - loaded now, so that it asks while the first one generates
            done: dict = {}
            slow = threading.Thread(target=lambda: done.update(
                first=first.resynthesize_dataset(["a slow prompt"], Options(per_source=3))))
            slow.start()
            while not fake.generation_log():
                time.sleep(0.05)
            time.sleep(1.4)  # past one lease, inside the 2.4 s batch: only a renewed claim still holds the keys
            done["second"] = second.resynthesize_dataset(["a slow prompt"], Options(per_source=3))
            slow.join()
    assert len(fake.generation_log()) == 3
    assert (done["first"]["generated"], done["second"]["generated"], done["second"]["cached"]) == (3, 0, 3)


def test_api_images_are_bought_only_after_the_embedder_loads(tmp_path, clip):
    """The embedder loaded after the first batch of API images was bought: a kill -9 during its load
    (seconds, measured) or a load that fails (here: changed weights) threw paid images away."""
    from tests.fake_images_api import FakeImagesApi

    config, checkpoint = clip
    moved = tmp_path / "clip"
    moved.mkdir()
    (moved / config.name).write_bytes(config.read_bytes())
    (moved / checkpoint.name).write_bytes(checkpoint.read_bytes())
    with FakeImagesApi() as fake:
        with engine.init(tmp_path / "s", clip_config=moved / config.name, clip_checkpoint=moved / checkpoint.name,
                         device="cpu") as ws:
            ws.add_source("api", kind="api", url=fake.url, model="m", size="32x32")
        data = bytearray((moved / checkpoint.name).read_bytes())
        data[-64:] = bytes(64)  # other weights under the bound name
        (moved / checkpoint.name).write_bytes(bytes(data))
        with engine.open(tmp_path / "s", device="cpu") as ws:
            with pytest.raises(UserError):
                ws.resynthesize_dataset(["a red house"], Options(per_source=2))
        assert fake.generation_log() == []


def test_reembed_refuses_an_altered_or_cut_image(tmp_path, clip):
    """`reembed` embedded whatever bytes an image file held: a file replaced by another image since it was
    stored, or cut (a cut PNG can still decode), became a wrong vector of the new space, silently."""
    config, checkpoint = clip
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(3):
        (data / f"{i}.png").write_bytes(_png(i))
        rows.append({"image": f"{i}.png", "source": "a", "description": "a prompt", "role": "resynthesis", "seed": i})
    (data / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with engine.init(tmp_path / "s", clip_config=config, clip_checkpoint=checkpoint, device="cpu") as ws:
        ws.ingest(data / "m.jsonl")
        before = ws.store.embedder_identity
    (data / "1.png").write_bytes(_png(7))  # another valid image under the stored name
    with engine.open(tmp_path / "s", device="cpu") as ws:
        with pytest.raises(UserError, match=r"1 stored image\(s\) could not be read .*1\.png: differs from its "
                                            r"recorded sha256"):
            ws.reembed(checkpoint, clip_config=config, clip_layer="final")
        assert ws.store.embedder_identity == before  # not switched
    (data / "1.png").write_bytes(_png(1))  # restored: the rerun completes with the missing vector only
    with engine.open(tmp_path / "s", device="cpu") as ws:
        done = ws.reembed(checkpoint, clip_config=config, clip_layer="final")
        assert done["embedded"] == 1 and done["vectors"] == 3


def test_postgresql_down_or_out_of_connections_is_told_apart_from_damage(tmp_path, capsys, clip):
    """A stopped server was answered with the HTTP code `store_damaged` (exit 4 is right; a client should
    retry, not restore a backup), and a server out of connection slots (a role's CONNECTION LIMIT) came out
    as "cannot reach": libpq reports it with no SQLSTATE, so the existing out-of-resources rule missed it."""
    from engine.service.process import free_port

    config, checkpoint = clip
    dead = f"postgresql+psycopg://resynth@127.0.0.1:{free_port()}/nothing"
    assert main(["init", "--store", str(tmp_path / "dead"), "--db", dead, "--clip-config", str(config),
                 "--clip-checkpoint", str(checkpoint), "--json"]) == 4
    error = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert error["kind"] == "database_unreachable" and "cannot reach" in error["error"], error

    admin = pg.admin_url()
    if not admin:
        pytest.skip(pg.why())
    if not pg.superuser():
        pytest.skip("the test server's role is not a superuser: it cannot make the roles this test needs")
    role = f"lim_{uuid.uuid4().hex[:8]}"
    url = pg.create_database()
    name = url.rsplit("/", 1)[1]
    import psycopg
    from sqlalchemy.engine import make_url

    server = make_url(admin)
    pg.sql(admin, f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 1')
    pg.sql(admin, f'ALTER DATABASE "{name}" OWNER TO "{role}"')
    limited = make_url(url).set(username=role).render_as_string(hide_password=False)
    hog = None
    try:
        Store.create(tmp_path / "s", EMBEDDER, DIM, db_url=limited).close()
        hog = psycopg.connect(host=server.host, port=server.port, user=role, dbname=name, autocommit=True)
        with pytest.raises(StoreUnavailable, match="out of resources .*too many connections") as caught:
            Store.open(tmp_path / "s")
        assert "\n" not in str(caught.value) and kind_of(caught.value).exit_code == 5
        hog.close()
        hog = None
        with Store.open(tmp_path / "s") as store:  # the slot is free again: the same command succeeds
            assert store.stats()["vectors"] == 0
    finally:
        if hog is not None:
            hog.close()
        pg.drop_database(url)
        pg.sql(admin, f'DROP ROLE IF EXISTS "{role}"')


def test_readiness_says_when_the_database_is_gone(tmp_path, clip):
    """/readyz answered 200 while PostgreSQL was down and every lookup 503: a balancer kept sending requests."""
    from fastapi.testclient import TestClient

    from engine.service.app import create_app
    from engine.service.config import Limits
    from engine.service.core import Service

    if not pg.admin_url():
        pytest.skip(pg.why())
    config, checkpoint = clip
    url = pg.create_database()
    try:
        assert main(["init", "--store", str(tmp_path / "s"), "--db", url, "--clip-config", str(config),
                     "--clip-checkpoint", str(checkpoint), "--quiet"]) == 0
        with TestClient(create_app(Service.open(tmp_path / "s", Limits()))) as client:
            assert client.get("/readyz").json()["status"] == "ready"
            pg.drop_database(url)  # WITH (FORCE): its connections are cut, new ones refused
            reply = client.get("/readyz")
            assert reply.status_code == 503 and reply.json()["error"]["code"] == "database_unreachable", reply.text
    finally:
        pg.drop_database(url)


def test_a_read_only_process_after_a_reembed_killed_after_its_commit_keeps_searching(tmp_path):
    """`reembed` killed after its commit leaves store.json naming the old embedder: a read-only open adopts
    the database's new one, and its first refresh() took the lagging store.json for a second switch and
    refused every search (store_switched) until a writable open rewrote store.json."""
    root = tmp_path / "s"
    with Store.create(root, EMBEDDER, DIM) as store:
        _add(store, 0, 3)
    switch = ("import sys, numpy as np\nfrom index.store import Store\n"
              "with Store.open(sys.argv[1]) as st:\n"
              "    ids = [i for i, _, _ in st.images_without_vector('other-embedder')]\n"
              "    st.add_vectors('other-embedder', ids, np.eye(len(ids), 8, dtype=np.float32))\n"
              "    st.switch_embedder({'identity': 'other-embedder', 'arch': 'y', 'checkpoint': 'y'}, 8)\n")
    killed = subprocess.run([sys.executable, "-c", switch, str(root)], cwd=Path(__file__).parents[1],
                            env={**os.environ, "RESYNTH_CRASH_AT": "reembed:after-commit"}, timeout=60)
    assert killed.returncode == -9
    assert json.loads((root / "store.json").read_text())["embedder"]["identity"] == EMBEDDER["identity"]
    with Store.open(root, writable=False) as store:
        assert store.embedder_identity == "other-embedder"
        assert store.refresh() is False
        assert len(store.nearest(np.eye(1, DIM, dtype=np.float32)[0], 3)) == 3


def test_a_refused_claim_keeps_the_release_pending_and_the_retrier_does_not_block_claims(tmp_path, monkeypatch):
    """Two faults of the release retry: a claim() of a pending key took it off the retry list before its
    upsert, so when that upsert was refused too the key was never released (locked for its whole lease);
    and the retrier held its list's lock through its database wait, so every claim, renewal and
    pending_releases() of the process waited behind it (up to the busy timeout, 60 s by default)."""
    from index import claims

    root = tmp_path / "s"
    Store.create(root, EMBEDDER, DIM).close()
    monkeypatch.setenv("RESYNTH_BUSY_TIMEOUT_S", "0.6")
    monkeypatch.setattr(claims, "RELEASE_RETRY_S", 0.05)
    with Store.open(root) as store:
        store.claim(["a"], "me")
        holder = sqlite3.connect(root / "metadata.sqlite", isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StoreBusy):
                store.release(["a"], "me")
            time.sleep(0.15)  # the retrier is now inside its own wait for the write lock
            started = time.monotonic()
            assert store.claims.pending_releases() == 1
            assert time.monotonic() - started < 0.25
            with pytest.raises(StoreBusy):
                store.claim(["a"], "me")  # the next job for the key, refused too
            assert store.claims.pending_releases() == 1  # still to release
        finally:
            holder.close()
        deadline = time.monotonic() + 10
        while store.claims.pending_releases() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.live_claims(["a"]) == {} and store.claim(["a"], "other") == ["a"]


def test_a_role_that_does_not_own_an_older_store_still_opens_it_writable(tmp_path, caplog):
    """The 64-bit seed upgrade (ALTER TABLE) needs the table's owner: a role granted only SELECT, INSERT,
    UPDATE and DELETE could no longer open an older store writable ("must be owner of table images",
    "grant this role access"). It now keeps the 32-bit column and refuses only seeds past it, in one line."""
    from sqlalchemy.engine import make_url

    from index.errors import StoreInputError

    admin = pg.admin_url()
    if not admin:
        pytest.skip(pg.why())
    if not pg.superuser():
        pytest.skip("the test server's role is not a superuser: it cannot make the roles this test needs")
    role = f"dml_{uuid.uuid4().hex[:8]}"
    url = pg.create_database()
    root = tmp_path / "s"
    try:
        Store.create(root, EMBEDDER, DIM, db_url=url).close()
        pg.sql(url, "ALTER TABLE images ALTER COLUMN seed TYPE INTEGER", "DROP TABLE pending_tasks",
               f'CREATE ROLE "{role}" LOGIN',
               f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"',
               f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        config = json.loads((root / "store.json").read_text())
        config["db"] = make_url(url).set(username=role).render_as_string(hide_password=False)
        (root / "store.json").write_text(json.dumps(config))
        with caplog.at_level("WARNING", "resynth.store"), Store.open(root) as store:
            assert not store.db.has_wide_seeds and not store.db.has_pending_tasks  # nor may it add a table
            _add(store, 0, 1)  # a seed that fits 32 bits
            source, desc = store.sources()[0], store.description_id("a prompt")
            with pytest.raises(StoreInputError, match="32-bit seed column: the store's owner must open it") as caught:
                store.add_images([NewImage(key="big", role="resynthesis", source_id=source.id, description_id=desc,
                                           file_hash="h", path="images/big.png", seed=3_000_000_000,
                                           vector=np.eye(1, DIM, dtype=np.float32)[0])])
            assert "\n" not in str(caught.value)
        assert "upgrading images.seed to 64 bits (one time; the table is locked while it runs)" in caplog.text
        assert "lacks the pending_tasks table and this role may not create it" in caplog.text
        config["db"] = url
        (root / "store.json").write_text(json.dumps(config))
        with Store.open(root) as store:  # the owner widens it
            assert store.db.has_wide_seeds and store.db.has_pending_tasks and len(store.labelled_vectors()) == 1
    finally:
        pg.drop_database(url)
        pg.sql(admin, f'DROP ROLE IF EXISTS "{role}"')
