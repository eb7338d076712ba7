"""Seventh round of attacks (docs/guarantees.md): the store beside live writers, as `verify` sees it. Real
processes write while `verify` reads; where the race is a matter of microseconds, an SQLAlchemy event holds the
reader at the exact step while a real child process commits and saves, so each case runs deterministically."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from sqlalchemy import event

from index.store import NewImage, Store
from tests.test_store_refusals import _fill, mounts  # noqa: F401, F811 - real tmpfs mounts

DIM = 16
REPO = Path(__file__).resolve().parents[1]
EMBEDDER = {"identity": "test-embedder", "arch": "x", "checkpoint": "x"}


def _vec(key: str) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(key.encode())).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _rows(store: Store, keys: list[str]) -> list[NewImage]:
    src = store.ensure_source("replay", "replay", "fp-replay")
    desc = store.description_id("a prompt")
    return [NewImage(key=k, role="resynthesis", source_id=src.id, description_id=desc, file_hash=f"h-{k}",
                     path=f"images/{k}.png", vector=_vec(k), seed=i) for i, k in enumerate(keys)]


def _make(root: Path, n: int, db: str | None) -> Path:
    with Store.create(root, EMBEDDER, DIM, db_url=db) as store:
        store.add_images(_rows(store, [f"k{i}" for i in range(n)]))
    return root


WRITE_AND_SAVE = r'''
import sys, zlib, numpy as np
sys.path.insert(0, sys.argv[2])
from index.store import NewImage, Store
with Store.open(sys.argv[1]) as store:
    src, desc = store.source("replay"), store.description_id("a prompt")
    keys = [f"late{i}" for i in range(8)]
    vec = lambda k: np.random.default_rng(zlib.crc32(k.encode())).normal(size=16).astype(np.float32)
    store.add_images([NewImage(key=k, role="resynthesis", source_id=src.id, description_id=desc, file_hash=k,
                               path=f"images/{k}.png", vector=vec(k)) for k in keys])
    store.save_index()  # committed, then published: what every writer does
'''


def test_verify_beside_a_writer_that_saves_mid_check_reports_no_lost_data(tmp_path, db):
    """A writer committing and saving while `verify` ran: verify read the database's ids, then the index file the
    writer had just saved, and reported the new vectors as "not in the database (it lost data): restore
    metadata.sqlite from a backup" (3 of 25 runs of `verify` beside a writer saving every third batch). The index
    files are now read first, as the open reads them: a vector in them was committed before, so it is in any
    database snapshot taken after."""
    root = _make(tmp_path / "store", 20, db)
    with Store.open(root, writable=False) as store:
        fired: list[str] = []

        def writer_saves_now(conn, cursor, statement, *args) -> None:
            if not fired and statement.lstrip().upper().startswith("SELECT") and "vectors" in statement:
                fired.append(statement)  # the snapshot of this read transaction is taken: now another process
                done = subprocess.run([sys.executable, "-c", WRITE_AND_SAVE, str(root), str(REPO)],
                                      capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, done.stderr[-2000:]

        event.listen(store.db.engine, "after_cursor_execute", writer_saves_now)
        report = store.verify(files=False)
        assert fired, "the writer never ran"
    assert report["ok"], report["problems"]
    assert not any("lost data" in p for p in report["problems"])
    assert report["index"]["lost_from_database"] == 0
    with Store.open(root, writable=False) as store:  # and the store is whole: the writer's vectors are there
        assert store.stats()["vectors"] == 28
        assert store.verify(files=False)["ok"]


SAVE_STOPPED_MIDWAY = r'''
import os, signal, sys, zlib, numpy as np
sys.path.insert(0, sys.argv[2])
from index.store import NewImage, Store
signal.signal(signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGSTOP))  # stopped there, lock held
with Store.open(sys.argv[1]) as store:
    src, desc = store.source("replay"), store.description_id("a prompt")
    vec = lambda k: np.random.default_rng(zlib.crc32(k.encode())).normal(size=16).astype(np.float32)
    store.add_images([NewImage(key=k, role="resynthesis", source_id=src.id, description_id=desc, file_hash=k,
                               path=f"images/{k}.png", vector=vec(k)) for k in ("s1", "s2")])
    os.environ["RESYNTH_INTERRUPT_AT"] = "index:manifest-before-replace"
    store.save_index()
print("saved", flush=True)
'''


def test_verify_beside_a_save_in_progress_calls_its_files_no_leftovers(tmp_path):
    """A save in progress in another process (its segment published, its manifest still a temporary file: a large
    one, or a process paused there) made `verify` exit 4 with "1 index segment files no manifest names" and "1
    leftover temporary files", files the save was writing and then published. Files of a save that holds the
    store's publish lock, and temporary files of a live process, are now notes; the same files left by a killed
    writer are still problems."""
    root = _make(tmp_path / "store", 20, None)
    child = subprocess.Popen([sys.executable, "-c", SAVE_STOPPED_MIDWAY, str(root), str(REPO)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2400):  # until the child stops itself inside its save
            state = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "T" or child.poll() is not None:
                break
            time.sleep(0.05)
        assert state == "T", child.communicate()
        assert list(root.glob(".*.tmp")) and list(root.glob("*seg-*"))
        with Store.open(root, writable=False) as store:
            report = store.verify(files=False)
        assert report["ok"], report["problems"]
        assert any("in progress" in note for note in report["notes"]), report["notes"]
    finally:
        os.kill(child.pid, signal.SIGCONT)  # the save finishes
        out, err = child.communicate(timeout=120)
    assert child.returncode == 0 and "saved" in out, err[-2000:]
    with Store.open(root, writable=False) as store:
        report = store.verify(files=False)
        assert report["ok"] and not report["notes"], report


INIT = r'''
import json, os, signal, sys
sys.path.insert(0, sys.argv[4])
from index.errors import StoreError
from index.store import Store
if sys.argv[5] == "pause":  # stopped just before store.json is renamed into place, the database made
    signal.signal(signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGSTOP))
    os.environ["RESYNTH_INTERRUPT_AT"] = "config:before-replace"
try:
    with Store.create(sys.argv[1], {"identity": sys.argv[2], "arch": "x", "checkpoint": "x"}, int(sys.argv[3])) as s:
        print(json.dumps({"ok": s.embedder_identity, "dim": s.dim}), flush=True)
except StoreError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
'''


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_two_inits_at_once_with_different_embedders_one_is_refused(tmp_path):
    """Two `init`s of one new folder at once, with different embedders (and vector sizes): both said the store
    was made, each bound to its own embedder, and the last store.json written won; the other process went on
    writing vectors of its own size into a store bound to another embedder. A creation now holds a lock on the
    folder until store.json is written; the second waits, then joins the store or is refused in one line, as a
    later `init` is."""
    root = tmp_path / "store"
    first = subprocess.Popen([sys.executable, "-c", INIT, str(root), "emb-a", "16", str(REPO), "pause"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2400):
            if first.poll() is not None or _stopped(first.pid):
                break
            time.sleep(0.05)
        assert _stopped(first.pid), first.communicate()
        err_file = tmp_path / "second.err"
        with open(err_file, "w") as err:
            second = subprocess.Popen([sys.executable, "-c", INIT, str(root), "emb-b", "32", str(REPO), "go"],
                                      stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.monotonic() + 120  # until it finished (before) or says it waits for the first (now)
        while second.poll() is None and "held by another process" not in err_file.read_text() and \
                time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out_a, err_a = first.communicate(timeout=120)
    out_b, _ = second.communicate(timeout=120)
    err_b = err_file.read_text()
    assert "Traceback" not in err_a + err_b, err_a + err_b
    a, b = json.loads(out_a), json.loads(out_b)
    assert a == {"ok": "emb-a", "dim": 16}, a
    assert b.get("error") == "StoreInputError" and "already bound to embedder emb-a" in b["message"], b
    assert json.loads((root / "store.json").read_text())["embedder"]["identity"] == "emb-a"


BUILD_LISTS = r'''
import errno, json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from index import ivf
rng = np.random.default_rng(0)
matrix = rng.normal(size=(20000, 16)).astype(np.float32)
ids = np.arange(1, 20001, dtype=np.int64)
try:
    ivf.build_search_index(ids, matrix, "IVF141,Flat", data_path=Path(sys.argv[1]) / ".lists.tmp", recall_queries=50)
    print(json.dumps({"built": True}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno}))
'''


def test_search_lists_on_a_disk_without_room_are_an_error_not_a_sigbus(tmp_path, mounts):  # noqa: F811
    """`rebuild` of a store past the exact-search size on a disk with room for its shards but not for the merged
    inverted lists died of SIGBUS ("Bus error", exit 135; measured through `Store.rebuild` on a tmpfs with 4.2 MB
    free): FAISS sizes the lists file with truncate and fills it through a mapping, and the check before the build
    counted the ids once where shards and lists both hold them. The room is checked once the shards are written,
    by the lists' exact size: ENOSPC, which the store reports as its one disk-full line."""
    disk = mounts("tmpfs", tmp_path, "8m")
    filler = _fill(disk, 2_200_000)  # the shards (1.45 MB) fit, the lists (1.44 MB more) do not
    done = subprocess.run([sys.executable, "-c", BUILD_LISTS, str(disk), str(REPO)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert json.loads(done.stdout) == {"errno": errno.ENOSPC}
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no shard left behind, no lists file begun
    filler.unlink()


REMOVE_SOURCE = r'''
import sys
sys.path.insert(0, sys.argv[2])
from index.store import Store
with Store.open(sys.argv[1]) as store:
    assert store.remove_source("gone") == 4  # its rows committed away, then its files deleted
'''


def test_verify_beside_a_source_removal_reports_no_missing_files(tmp_path, db):
    """`source remove` in another process while `verify` ran: verify's snapshot still held the source's rows, the
    removal deleted their files after its commit, and verify said "4 image files are missing" (exit 4). A file
    found missing is now looked up again in a fresh snapshot: a row that is gone by then is no missing file."""
    import hashlib
    root = tmp_path / "store"
    with Store.create(root, EMBEDDER, DIM, db_url=db) as store:
        for name in ("kept", "gone"):
            src = store.ensure_source(name, "replay", f"fp-{name}")
            desc = store.description_id(f"a prompt for {name}")
            rows = []
            for i in range(4):
                data = f"{name}-{i}".encode() * 10
                relative = f"images/{name}/{i}.png"
                store.write_image(relative, data)
                rows.append(NewImage(key=f"{name}{i}", role="resynthesis", source_id=src.id, description_id=desc,
                                     file_hash=hashlib.sha256(data).hexdigest(), path=relative,
                                     vector=_vec(f"{name}{i}"), seed=i))
            store.add_images(rows)
    with Store.open(root, writable=False) as store:
        fired: list[str] = []

        def removal_now(conn, cursor, statement, *args) -> None:
            if not fired and statement.lstrip().upper().startswith("SELECT") and "vectors" in statement:
                fired.append(statement)
                done = subprocess.run([sys.executable, "-c", REMOVE_SOURCE, str(root), str(REPO)],
                                      capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, done.stderr[-2000:]

        event.listen(store.db.engine, "after_cursor_execute", removal_now)
        report = store.verify(files=True)
        assert fired
    assert not (root / "images" / "gone").exists()
    assert report["ok"], report["problems"]
    assert report["files"]["missing"] == 0


HOLD_PUBLISH_LOCK = r'''
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)  # as another process's save or rebuild holds it
print("held", flush=True)
time.sleep(float(sys.argv[2]))
'''


def test_a_save_waiting_for_the_publish_lock_says_so(tmp_path):
    """`resynth rebuild` (any save) while another process held store.lock (a rebuild of a large store: minutes) sat
    silent for up to RESYNTH_LOCK_TIMEOUT_S (600 s by default) before its one line: a user saw a hung command.
    After a second of waiting it now says, in one line, what it waits for and for how long at most; it then goes
    on as before (here: the holder lets go and the rebuild succeeds)."""
    from tests import procs
    root = _make(tmp_path / "store", 20, None)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_PUBLISH_LOCK, str(root / "store.lock"), "600"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        running = procs.start("rebuild", "--store", root, env={"RESYNTH_LOCK_TIMEOUT_S": "300"})
        deadline = time.monotonic() + 90
        while "store.lock" not in running._err.read_text() and running.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running.alive()  # still waiting for the holder
    finally:
        holder.kill()  # lets go of the lock
        holder.wait()
    done = running.wait()
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "store.lock" in line]
    assert len(lines) == 1 and "waiting" in lines[0] and "300 s" in lines[0], (done.stderr, done.stdout)


REBUILD_STOPPED_MIDWAY = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from index.store import Store
signal.signal(signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGSTOP))  # stopped there, lock held
with Store.open(sys.argv[1]) as store:
    os.environ["RESYNTH_INTERRUPT_AT"] = "search:lists-published"  # its lists out, search.faiss not yet
    store.rebuild(flat_max=100)
print("rebuilt", flush=True)
'''


def test_verify_beside_a_rebuild_in_progress_reports_no_problem(tmp_path):
    """A `rebuild` building the search index in another process publishes the lists file first, then search.faiss
    and search.json: `verify` meanwhile said "1 search lists files no search index names", exit 4. The search files
    are now read under the publish lock when it is free; while a rebuild holds it, what it has not finished is a
    note."""
    root = _make(tmp_path / "store", 400, None)
    child = subprocess.Popen([sys.executable, "-c", REBUILD_STOPPED_MIDWAY, str(root), str(REPO)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2400):
            if child.poll() is not None or _stopped(child.pid):
                break
            time.sleep(0.05)
        assert _stopped(child.pid), child.communicate()
        assert list(root.glob("search-*.ivfdata")) and not (root / "search.json").exists()
        with Store.open(root, writable=False) as store:
            report = store.verify(files=False)
        assert report["ok"], report["problems"]
        assert any("in progress" in note for note in report["notes"]), report["notes"]
    finally:
        os.kill(child.pid, signal.SIGCONT)
        out, err = child.communicate(timeout=300)
    assert child.returncode == 0 and "rebuilt" in out, err[-2000:]
    with Store.open(root, writable=False) as store:
        report = store.verify(files=False)
        assert report["ok"] and report["search"]["on_disk"] == "ok", report


def test_a_store_is_created_where_a_folder_cannot_be_locked_exclusively(tmp_path, monkeypatch):
    """NFS emulates flock with a byte-range lock, which wants a descriptor open for writing: the creation lock on the
    store folder (read-only, a folder) fails EBADF there, and `init` on an NFS folder with locking failed."""
    import fcntl

    from index import layout

    real = fcntl.flock

    def nfs(fd: int, operation: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EBADF, "Bad file descriptor")
        real(fd, operation)

    monkeypatch.setattr(layout.fcntl, "flock", nfs)
    with Store.create(tmp_path / "s", EMBEDDER, DIM) as store:
        store.add_images(_rows(store, ["a", "b"]))
    with Store.open(tmp_path / "s", writable=False) as reader:
        assert reader.stats()["vectors"] == 2
