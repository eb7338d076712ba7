"""Fourth round of attacks on the store (docs/guarantees.md), each defect it found pinned by a cheap test: a
store reached through a link (verify --repair deleted every image), its folder moved under a running process
(images written to a ghost folder), store.json edited by hand or written by a newer resynth, a database of a
newer schema, a -wal file deleted under open processes, a file system without locks and a client whose clock
is off (a small LD_PRELOAD shim, built with the system's C compiler, stands in for both)."""
from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import kind_of
from index.errors import StoreDamaged, StoreError, StoreInputError, StoreUnavailable
from index.store import NewImage, Store
from tests.helpers import run_cli

EMBEDDER = {"identity": "test-embedder", "arch": "x", "checkpoint": "x"}
DIM = 8
OLD = (1_000_000_000, 1_000_000_000)  # an mtime long past the orphan grace period


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 40 % 256, 80, 200 - i)).save(buffer, format="PNG")
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


def _age(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            os.utime(path, OLD)


@pytest.fixture
def small_store(tmp_path) -> Path:
    root = tmp_path / "s"
    with Store.create(root, EMBEDDER, DIM) as store:
        _add(store, 0, 3)
    return root


def test_a_store_reached_through_a_link_keeps_its_images(small_store, tmp_path):
    """Opened through a link (or any path with one), the store named its rows' files by the link and listed
    images/ by the real path: `verify` reported every image as an orphan and `verify --repair` deleted them
    all. An images/ folder that is a link out of the store is the user's: nothing there is listed or removed."""
    link = tmp_path / "link"
    link.symlink_to(small_store)
    _age(small_store)
    with Store.open(link) as store:
        report = store.verify(repair=True)
        assert report["ok"] and report["orphans"]["count"] == 0, report["problems"]
    assert len(list((small_store / "images" / "fp").iterdir())) == 3

    outside = tmp_path / "elsewhere"
    shutil.move(small_store / "images", outside)
    (small_store / "images").symlink_to(outside)
    (outside / "fp" / "notes.txt").write_text("not the store's")
    (outside / "fp" / ".k9.png.999999999.tmp").write_text("not the store's either")
    _age(outside)
    with Store.open(small_store) as store:
        report = store.verify(repair=True)
        assert report["ok"], report["problems"]
        assert any("leads outside the store" in note for note in report["notes"])
    assert sorted(p.name for p in (outside / "fp").iterdir()) == [".k9.png.999999999.tmp", "k0.png", "k1.png",
                                                                   "k2.png", "notes.txt"]


def test_a_store_folder_moved_under_a_running_process_takes_no_writes(small_store, tmp_path):
    """Moved (or renamed, or replaced) while a server ran: its open database moved with the folder, its paths
    did not, so it wrote images, vectors.faiss and store.lock into a new folder at the old path while the
    rows went to the moved database, whose `verify` then found those images missing."""
    store = Store.open(small_store)
    moved = tmp_path / "moved"
    try:
        _add(store, 3, 1)  # unsaved: close() would publish it
        os.rename(small_store, moved)
        for attempt in (lambda: _add(store, 4, 1), store.verify, lambda: store.nearest(np.ones(DIM, np.float32), 1)):
            with pytest.raises(StoreError, match="was moved, renamed or replaced") as caught:
                attempt()
            assert kind_of(caught.value).exit_code == 4 and kind_of(caught.value).code == "store_moved"
    finally:
        store.close()  # saves nothing (a server's shutdown was a traceback): logged once
    assert not small_store.exists()  # no ghost folder
    with Store.open(moved) as store:
        report = store.verify()
        assert report["ok"], report["problems"]
        assert len(store.vector_ids()) == 4  # the commit before the move is kept


def test_a_generation_that_outlived_its_claim_leaves_the_stored_image_alone(small_store):
    """A process whose claim was taken over while it still generated (stopped, hung past its renewals, its
    clock off) wrote its image over the one the other process had stored under the same key: the row's
    sha256 and vector then described a file that was gone (`verify`: "differs from its recorded sha256")."""
    with Store.open(small_store) as late:
        source, desc = late.sources()[0], late.description_id("a prompt")
        path = "images/fp/k0.png"  # stored under k0 by the fixture meanwhile
        other = _png(99)
        file_hash = late.write_image(path, other)
        added = late.add_images([NewImage(key="k0", role="resynthesis", source_id=source.id, description_id=desc,
                                          file_hash=file_hash, path=path, vector=np.eye(1, DIM, 0, np.float32)[0],
                                          seed=0)])
        assert added.inserted == 0
        assert (small_store / path).read_bytes() == _png(0)
        late.write_image("images/fp/k7.png", b"leftover of a crash")  # no row: a rerun replaces it
        assert late.write_image("images/fp/k7.png", _png(7)) and (small_store / "images/fp/k7.png").read_bytes() \
            == _png(7)
        (small_store / "images/fp/k7.png").unlink()
        report = late.verify()
        assert report["ok"], report["problems"]


@pytest.mark.parametrize("edit, error, words", [
    ({"dim": 16}, StoreDamaged, 'set "dim" back to 8'),
    ({"embedder": {"identity": "other", "arch": "x", "checkpoint": "x"}}, StoreDamaged,
     "names embedder other, of which"),
    ({"format": 2}, StoreInputError, "newer resynth (store format 2; this resynth reads format 1)"),
    ({"format": "1"}, StoreDamaged, "gives the store format as '1'"),
    ({"format": None}, StoreDamaged, "gives the store format as None"),
])
def test_store_json_edited_by_hand_is_refused_naming_it(small_store, capsys, edit, error, words):
    """A vector size or embedder edited into store.json was refused as a database that "lost data" or holds a
    damaged vector, with advice to restore metadata.sqlite from a backup (and `verify --repair` rebuilt an
    empty index for an embedder the database lacks); a newer format said "has format 2, this resynth reads 1"."""
    config = {**json.loads((small_store / "store.json").read_text()), **edit}
    (small_store / "store.json").write_text(json.dumps(config))
    before = sorted(os.listdir(small_store))
    for writable, repair in ((False, False), (True, True)):
        with pytest.raises(error, match="store.json|store format") as caught:
            Store.open(small_store, writable=writable, repair=repair)
        assert words in str(caught.value) and "metadata.sqlite from a backup" not in str(caught.value)
    assert run_cli("stats", "--store", small_store) == (2 if error is StoreInputError else 4)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sorted(os.listdir(small_store)) == before


def test_extra_keys_in_store_json_are_kept_and_a_newer_schema_is_refused(small_store, capsys):
    """Keys a newer resynth adds to store.json are ignored; a database whose schema it changed is refused in
    one line naming both versions (store_meta "schema", written since this round)."""
    config = json.loads((small_store / "store.json").read_text())
    (small_store / "store.json").write_text(json.dumps({**config, "added_by_a_newer_resynth": [1]}))
    with Store.open(small_store) as store:
        assert store.verify()["ok"]
    with sqlite3.connect(small_store / "metadata.sqlite") as conn:
        assert conn.execute("SELECT value FROM store_meta WHERE key = 'schema'").fetchone() == ("1",)
        conn.execute("UPDATE store_meta SET value = '2' WHERE key = 'schema'")
    conn.close()
    with pytest.raises(StoreInputError, match=r"newer resynth \(schema version 2; this resynth reads schema "
                                              r"version 1 and older\): upgrade resynth"):
        Store.open(small_store, writable=False)
    assert run_cli("stats", "--store", small_store) == 2
    assert "schema version 2" in capsys.readouterr().err
    with sqlite3.connect(small_store / "metadata.sqlite") as conn:
        conn.execute("UPDATE store_meta SET value = '1' WHERE key = 'schema'")
    conn.close()
    (small_store / "store.json").unlink()  # "no store here (create one)" read as "start over"
    with pytest.raises(StoreDamaged, match="has a metadata.sqlite but no store.json: restore store.json"):
        Store.open(small_store)
    with Store.create(small_store, EMBEDDER, DIM) as store:  # written again, the rows kept
        assert len(store.vector_ids()) == 3


def test_a_store_name_past_the_file_system_limit_is_one_line(tmp_path, capsys):
    """A --store whose name passes 255 bytes was a traceback (ENAMETOOLONG) from `resynth stats` and `init`.
    The store's own names stay short (an image's temporary name: about 90 bytes), so a folder name of 250 works."""
    too_long = tmp_path / ("x" * 300)
    assert run_cli("stats", "--store", too_long) == 2
    assert "File name too long" in capsys.readouterr().err
    with pytest.raises(StoreInputError, match="a store .*at .*: File name too long"):
        Store.create(too_long, EMBEDDER, DIM)
    with Store.create(tmp_path / ("y" * 250), EMBEDDER, DIM) as store:
        _add(store, 0, 1)
        assert store.verify()["ok"]


@pytest.mark.parametrize("cut", ["delete", "truncate"])
def test_a_wal_file_deleted_under_open_processes_loses_nothing(small_store, cut):
    """Deleting or cutting metadata.sqlite-wal while a writer and a reader had the store open lost every row
    committed since the last checkpoint (up to 1000 pages), and an open meanwhile said "disk I/O error"."""
    writer, reader = Store.open(small_store), Store.open(small_store, writable=False)
    try:
        _add(writer, 3, 2)
        wal = small_store / "metadata.sqlite-wal"
        wal.unlink() if cut == "delete" else os.truncate(wal, 0)
        _add(writer, 5, 1)
        assert len(reader.vector_ids()) == 6
        with Store.open(small_store, writable=False) as fresh:
            assert len(fresh.vector_ids()) == 6
    finally:
        writer.close()
        reader.close()
    with Store.open(small_store) as store:
        report = store.verify()
        assert report["ok"] and len(store.vector_ids()) == 6, report["problems"]


SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <time.h>
int flock(int fd, int op) {
    if (getenv("SHIM_NO_FLOCK")) { errno = ENOLCK; return -1; }
    return ((int (*)(int, int))dlsym(RTLD_NEXT, "flock"))(fd, op);
}
int clock_gettime(clockid_t id, struct timespec *ts) {
    int rc = ((int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime"))(id, ts);
    const char *shift = getenv("SHIM_CLOCK_SHIFT_S");
    if (rc == 0 && shift && id == CLOCK_REALTIME) ts->tv_sec += atol(shift);
    return rc;
}
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    """A preload library: flock() answers ENOLCK (SHIM_NO_FLOCK), the wall clock is off (SHIM_CLOCK_SHIFT_S)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the preload shim")
    folder = tmp_path_factory.mktemp("shim")
    (folder / "shim.c").write_text(SHIM)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", folder / "shim.so", folder / "shim.c", "-ldl"], check=True)
    return folder / "shim.so"


def _child(code: str, shim: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "LD_PRELOAD": str(shim), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parent.parent)


def test_a_file_system_without_locks_is_one_line(small_store, shim):
    """flock() refused with ENOLCK (NFS without its lock daemon, some network and FUSE file systems) escaped
    as a traceback from every save; it is one line, exit 5, and the rows committed before it are kept."""
    code = f"""
        import numpy as np
        from index.store import NewImage, Store
        store = Store.open({str(small_store)!r})
        source, desc = store.sources()[0], store.description_id("a prompt")
        store.add_images([NewImage(key=f"n{{i}}", role="original", source_id=source.id, description_id=desc,
                                   file_hash="0" * 64, path=f"/elsewhere/{{i}}.png", vector=np.eye(1, {DIM}, i)[0])
                          for i in range(2)])
        try:
            store.save_index()
        except Exception as exc:
            print(type(exc).__name__, exc)
        store.db.dispose()
    """
    done = _child(code, shim, SHIM_NO_FLOCK="1")
    assert done.returncode == 0, done.stderr
    name, line = done.stdout.strip().split(" ", 1)
    assert name == "StoreUnavailable" and "does not support file locks" in line and "\n" not in line
    assert kind_of(StoreUnavailable(line)).exit_code == 5
    with Store.open(small_store) as store:
        assert len(store.vector_ids()) == 5 and store.verify(files=False)["ok"]  # their files are made up


def test_a_process_whose_wall_clock_is_stepped_keeps_to_live_claims_on_sqlite(tmp_path, shim):
    """On SQLite leases were on each process's wall clock: one whose clock was stepped an hour ahead (an NTP
    correction, a resumed VM) took every live claim over and generated (bought) the images again, and one an
    hour behind wrote leases that had expired for everyone else. They are now on the time since boot plus the
    wall time at boot as the store recorded it, which no step of a process's wall clock moves."""
    root = tmp_path / "s"
    Store.create(root, EMBEDDER, DIM).close()
    with Store.open(root) as store:
        assert store.claim(["a", "b"], "here", 900) == ["a", "b"]
        code = f"""
            from index.store import Store
            with Store.open({str(root)!r}) as store:
                print(store.claim(["a", "b", "c"], "elsewhere", 900), sorted(store.live_claims(["a", "b"])))
        """
        for shift in ("3600", "-3600", "timens"):
            store.release(["c"], "elsewhere")
            if shift == "timens":  # a container restored elsewhere (CRIU): its time since boot is offset
                if os.geteuid() != 0 or subprocess.run(["unshare", "--time", "--boottime", "7200", "--fork", "true"],
                                                       capture_output=True).returncode != 0:
                    continue
                done = subprocess.run(["unshare", "--time", "--boottime", "7200", "--fork", sys.executable, "-c",
                                       textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                                      cwd=Path(__file__).parent.parent)
            else:
                done = _child(code, shim, SHIM_CLOCK_SHIFT_S=shift)
            assert done.returncode == 0, done.stderr
            assert done.stdout.split() == ["['c']", "['a',", "'b']"], (shift, done.stdout)
            assert store.live_claims(["a", "b", "c"]) == {"a": "here", "b": "here", "c": "elsewhere"}, shift


def test_the_boot_clock_is_kept_only_once_committed(tmp_path, monkeypatch):
    """A process whose first claim of the boot failed (a full disk) kept the epoch it had computed though the
    row rolled back, so the next process recorded another: a stepped clock then ran off by its step."""
    import index.claims as claims_module

    root = tmp_path / "s"
    Store.create(root, EMBEDDER, DIM).close()
    with Store.open(root) as store:
        real = claims_module.upsert
        monkeypatch.setattr(claims_module, "upsert", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
        with pytest.raises((OSError, StoreError)):
            store.claim(["a"], "first", 900)
        monkeypatch.setattr(claims_module, "upsert", real)
        with Store.open(root) as other:  # another process records this boot's epoch, 1000 s behind this one's
            shifted = time.time() - 1000  # more than the lease: on its own clock this one takes the key
            monkeypatch.setattr(time, "time", lambda: shifted)
            assert other.claim(["a"], "other", 900) == ["a"]
            monkeypatch.undo()
        assert store.claim(["a"], "first", 900) == []  # on the recorded epoch: the other's lease is live
        assert store.live_claims(["a"]) == {"a": "other"}


def test_a_client_whose_clock_is_off_does_not_take_live_claims(shim):
    """Leases were written and compared on each process's own clock: a client of a shared PostgreSQL store whose
    clock ran an hour ahead (another host, an NTP step) took over every live claim and generated (bought) the
    images again. They are now on the server's clock. And a second folder joins a database's store only with
    its images where the store keeps them."""
    from sqlalchemy import create_engine

    from tests import pg

    def pg_engine(url: str):
        return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))

    if not pg.admin_url():
        pytest.skip(pg.why())
    url = pg.create_database()
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder) / "s"
            Store.create(root, EMBEDDER, DIM, db_url=url).close()
            with Store.open(root) as store:
                assert store.claim(["a", "b"], "here", 900) == ["a", "b"]
                code = f"""
                    from index.store import Store
                    with Store.open({str(root)!r}) as store:
                        print(store.claim(["a", "b", "c"], "ahead", 900), sorted(store.live_claims(["a", "b"])))
                """
                for shift in ("3600",):
                    done = _child(code, shim, SHIM_CLOCK_SHIFT_S=shift)
                    assert done.returncode == 0, done.stderr
                    assert done.stdout.split() == ["['c']", "['a',", "'b']"], (shift, done.stdout)
                assert store.live_claims(["a", "b", "c"]) == {"a": "here", "b": "here", "c": "ahead"}
            # a folder joining the database's store must keep its images where the store does (rows name them
            # relative to it): as if the store had been made with --images s3://bucket/prefix
            engine = pg_engine(url)
            with engine.begin() as conn:
                conn.exec_driver_sql("UPDATE store_meta SET value = 's3://bucket/prefix' WHERE key = 'images'")
            engine.dispose()
            with pytest.raises(StoreInputError, match="images are in s3://bucket/prefix, not this folder"):
                Store.create(Path(folder) / "joins", EMBEDDER, DIM, db_url=url)
            assert not (Path(folder) / "joins" / "store.json").exists()
    finally:
        pg.drop_database(url)


def test_a_stopped_postgresql_writer_does_not_lock_the_store_forever(tmp_path, monkeypatch):
    """A writer SIGSTOPped (or frozen, or cut off) inside its write transaction held the store's write lock on
    PostgreSQL for as long as it stayed stopped: every other writer was refused. The server now ends a write
    transaction left idle for PG_IDLE_WRITER_S (120 s; 1 s here), and the lock goes with it. To the server a
    stopped client is one that sends nothing: here a session left open (measured with SIGSTOP too)."""
    import time

    import index.db
    from index.errors import StoreBusy
    from tests import pg

    if not pg.admin_url():
        pytest.skip(pg.why())
    url = pg.create_database()
    monkeypatch.setattr(index.db, "PG_IDLE_WRITER_S", 1.0)
    monkeypatch.setenv("RESYNTH_BUSY_TIMEOUT_S", "0.3")
    try:
        root = tmp_path / "s"
        Store.create(root, EMBEDDER, DIM, db_url=url).close()
        with Store.open(root) as stopped, Store.open(root) as other:
            stalled = stopped.db.write_session()
            stalled.connection()  # BEGIN: the write lock is taken, then nothing more is sent
            with pytest.raises(StoreBusy):
                other.claim(["k"], "me")
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert other.claim(["k"], "me") == ["k"]
                    break
                except StoreBusy:
                    assert time.monotonic() < deadline, "the stalled writer still holds the lock"
            with pytest.raises(StoreUnavailable, match="ended this process's write transaction, idle for 1 s"):
                stalled.commit()  # its transaction was ended: nothing of it is committed, one line
            stalled.close()
    finally:
        pg.drop_database(url)
