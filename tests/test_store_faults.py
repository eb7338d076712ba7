"""The store under faults: damaged files, lost data, races between real processes, kills mid-save.

No models: vectors are deterministic random unit vectors of size 16, derived from their keys. Tests taking
the `db` fixture run twice: on metadata.sqlite and on a fresh database of a real PostgreSQL server.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import zlib
from pathlib import Path

import faiss
import numpy as np
import pytest

from index import vectors as vx
from index.errors import StoreDamaged, StoreInputError
from index.keys import sha256_file
from index.pending import pending_tasks
from index.store import NewImage, Store
from tests.test_store_refusals import _child, mounts  # noqa: F401, F811 - real tmpfs mounts, a child process

DIM = 16
REPO = Path(__file__).resolve().parents[1]
EMBEDDER = {"identity": "test-embedder", "arch": "x", "checkpoint": "x"}


def vec_for(key: str) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(key.encode())).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _rows(store: Store, keys: list[str], source: str = "replay", prompt: str = "a prompt") -> list[NewImage]:
    src = store.ensure_source(source, "replay", f"fp-{source}")
    desc = store.description_id(prompt)
    return [NewImage(key=k, role="resynthesis", source_id=src.id, description_id=desc, file_hash=f"h-{k}",
                     path=f"images/{source}/{k}.png", vector=vec_for(k), seed=i) for i, k in enumerate(keys)]


def _keys(n: int, start: int = 0, prefix: str = "k") -> list[str]:
    return [f"{prefix}{i}" for i in range(start, start + n)]


def _make(tmp_path: Path, n: int = 40, db: str | None = None) -> Path:
    root = tmp_path / "s"
    with Store.create(root, EMBEDDER, DIM, db_url=db) as store:
        if n:
            store.add_images(_rows(store, _keys(n)))
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _search_is_right(store: Store, keys: list[str]) -> bool:
    found = store.existing_keys(keys)
    ids = np.array([found[k] for k in keys], np.int64)
    sims, best = store.search(np.stack([vec_for(k) for k in keys]), ids)
    return bool(np.array_equal(best[:, 0], ids) and np.allclose(sims[:, 0], 1.0, atol=1e-5))


def _file_ids(root: Path) -> np.ndarray:
    index, why = vx.read_checked(root / "vectors.faiss", DIM)
    assert index is not None, why
    return np.sort(vx.index_ids(index))


def _sql(path: Path, *statements: str) -> list:
    """Run statements on the database with a plain connection, closed after (no sidecar files left)."""
    db = sqlite3.connect(path)
    try:
        out = [db.execute(statement).fetchall() for statement in statements]
        db.commit()
        return out
    finally:
        db.close()


def _query(root: Path, *statements: str) -> list:
    """Run statements on a store's database, whichever backend its store.json names."""
    url = json.loads((root / "store.json").read_text()).get("db")
    if url:
        from tests import pg

        return pg.sql(url, *statements)
    return _sql(root / "metadata.sqlite", *statements)


def _db_ids(root: Path) -> np.ndarray:
    return np.array(sorted(r[0] for r in _query(root, "SELECT id FROM vectors")[0]), np.int64)


# A small worker process driven line by line over stdin (answers "ok ..." per command).
WORKER = r'''
import os, sys, time, zlib
import numpy as np
from pathlib import Path
sys.path.insert(0, os.environ["REPO"])
from index.store import Store, NewImage
from index.errors import StoreError

def vec_for(key):
    v = np.random.default_rng(zlib.crc32(key.encode())).normal(size=16).astype(np.float32)
    return v / np.linalg.norm(v)

root = Path(sys.argv[1])
start_at = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
store = Store.open(root)
print("ready", flush=True)
for line in sys.stdin:
    cmd, *args = line.split()
    try:
        if start_at:
            time.sleep(max(0.0, start_at - time.time()))  # both workers go at once
            start_at = 0.0
        if cmd == "add":  # add KEYPREFIX START N
            src = store.ensure_source("replay", "replay", "fp-replay")
            desc = store.description_id("shared prompt")
            keys = [f"{args[0]}{i}" for i in range(int(args[1]), int(args[1]) + int(args[2]))]
            ids = store.add_images([NewImage(key=k, role="resynthesis", source_id=src.id, description_id=desc,
                                             file_hash="h", path=f"images/replay/{k}.png", vector=vec_for(k))
                                    for k in keys])
            print("ok", len(set(ids)), flush=True)
        elif cmd == "save":
            store.save_index()
            print("ok", flush=True)
        elif cmd == "loop":  # add+save batches forever, reporting what is committed
            n = 0
            while True:
                store.add_images(store_rows := [NewImage(key=f"L{n + i}", role="resynthesis",
                    source_id=store.ensure_source("replay", "replay", "fp-replay").id,
                    description_id=store.description_id("shared prompt"), file_hash="h",
                    path=f"images/replay/L{n + i}.png", vector=vec_for(f"L{n + i}")) for i in range(5)])
                n += 5
                print("committed", n, flush=True)
                store.save_index()
        elif cmd == "addsource":
            store.add_source(args[0], "replay", "fp")
            print("ok", flush=True)
        elif cmd == "claim":  # claim OWNER LEASE KEYS...
            print("ok", " ".join(store.claim(args[2:], args[0], float(args[1]))), flush=True)
        elif cmd == "release":
            store.release(args[1:], args[0])
            print("ok", flush=True)
        elif cmd == "quit":
            break
    except StoreError as exc:
        print("error", type(exc).__name__, str(exc), flush=True)
store.close()
'''


class Worker:
    def __init__(self, tmp_path: Path, root: Path, start_at: float = 0.0):
        script = tmp_path / "worker.py"
        script.write_text(WORKER)
        self.proc = subprocess.Popen([sys.executable, str(script), str(root), str(start_at)], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "REPO": str(REPO)})
        assert self.read() == "ready", self.proc.stderr.read()

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self) -> str:
        line = self.proc.stdout.readline().strip()
        if not line:
            raise AssertionError(f"worker died: {self.proc.stderr.read()}")
        return line

    def ask(self, line: str) -> str:
        self.send(line)
        return self.read()

    def quit(self) -> str:
        self.send("quit")
        self.proc.wait(timeout=30)
        err = self.proc.stderr.read()
        assert self.proc.returncode == 0 and "Traceback" not in err, err
        return err


# ----- the database: checked before anything, never recreated ----------------------------------
def _garble_pages(path: Path) -> None:
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(1)
    data[4096:] = rng.integers(0, 256, len(data) - 4096, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _drop_table(path: Path) -> None:
    _sql(path, "PRAGMA foreign_keys=OFF", "DROP TABLE vectors")


DAMAGE = {
    "deleted": lambda p: p.unlink(),
    "empty": lambda p: p.write_bytes(b""),
    "truncated-header": lambda p: p.write_bytes(p.read_bytes()[:60]),
    "truncated-half": lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]),
    "garbled-header": lambda p: p.write_bytes(b"\x13" * 100 + p.read_bytes()[100:]),
    "garbled-pages": _garble_pages,
    "table-dropped": _drop_table,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_database_is_refused_and_nothing_is_touched(tmp_path, damage):
    root = _make(tmp_path, n=300)  # several pages
    DAMAGE[damage](root / "metadata.sqlite")
    before = _snapshot(root)
    for writable in (False, True):
        with pytest.raises(StoreDamaged) as caught:
            Store.open(root, writable=writable)
        message = str(caught.value)
        assert "\n" not in message and "restore metadata.sqlite from a backup" in message
        assert "<" not in message and "Traceback" not in message
        assert _snapshot(root) == before  # vectors.faiss byte-identical, no database created, no lock file
    result = subprocess.run([sys.executable, "-c", "from index.store import Store; import sys; Store.open(sys.argv[1])",
                             str(root)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "StoreDamaged" in result.stderr


def test_read_only_open_writes_nothing(tmp_path, db):
    root = _make(tmp_path, db=db)
    path = root / "vectors.faiss"
    data = bytearray(path.read_bytes())
    data[-100:-50] = b"\x00" * 50  # damage the index too: repaired in memory only
    path.write_bytes(bytes(data))
    (root / ".vectors.faiss.999999999.tmp").write_bytes(b"x")  # a dead writer's leftover stays
    before = {k: v for k, v in _snapshot(root).items() if not k.endswith(("-wal", "-shm"))}
    with Store.open(root, writable=False) as store:
        assert store.index.ntotal == 40 and _search_is_right(store, _keys(40))
        with pytest.raises(StoreInputError):
            store.description_id("new text")
    after = {k: v for k, v in _snapshot(root).items() if not k.endswith(("-wal", "-shm"))}
    assert after == before


# ----- the index: content verified, rebuilt from the database, never served wrong ---------------
def test_random_bytes_over_vector_data_are_detected(tmp_path, db):
    root = _make(tmp_path, db=db)
    path = root / "vectors.faiss"
    data = bytearray(path.read_bytes())
    start = data.find(vec_for("k0").tobytes())
    assert start > 0
    data[start:start + 40 * DIM * 4] = np.random.default_rng(3).integers(0, 256, 40 * DIM * 4, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    garbled = path.read_bytes()
    with Store.open(root, writable=False) as store:
        assert store.open_report.rebuilt and _search_is_right(store, _keys(40))
    assert path.read_bytes() == garbled
    with Store.open(root) as store:
        assert store.open_report.rebuilt and "differ from the database" in " ".join(store.open_report.notes)
        assert _search_is_right(store, _keys(40))
    with Store.open(root) as store:
        assert not store.open_report.rebuilt and store.open_report.checked == 40
        assert store.verify(files=False)["ok"]


def test_right_ids_wrong_vectors_are_detected(tmp_path, db):
    root = _make(tmp_path, db=db)
    ids = _file_ids(root)
    fake = vx.new_index(DIM)
    wrong = np.random.default_rng(5).normal(size=(len(ids), DIM)).astype(np.float32)
    fake.add_with_ids(wrong / np.linalg.norm(wrong, axis=1, keepdims=True), ids)
    faiss.write_index(fake, str(root / "vectors.faiss"))
    with Store.open(root) as store:
        assert store.open_report.rebuilt and _search_is_right(store, _keys(40))
    assert Store.open(root, writable=False).verify(files=False)["ok"]


@pytest.mark.parametrize("kind", ["flat", "idmap", "l2", "dim", "nan"])
def test_index_of_another_kind_is_rebuilt(tmp_path, kind, db):
    root = _make(tmp_path, db=db)
    ids = _file_ids(root)
    vecs = np.stack([vec_for(k) for k in _keys(40)])
    if kind == "flat":
        index = faiss.IndexFlatIP(DIM)
        index.add(vecs)
    elif kind == "idmap":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(DIM))
        index.add_with_ids(vecs, ids)
    elif kind == "l2":
        index = faiss.IndexIDMap2(faiss.IndexFlatL2(DIM))
        index.add_with_ids(vecs, ids)
    elif kind == "dim":
        index = vx.new_index(DIM * 2)
        index.add_with_ids(np.hstack([vecs, vecs]), ids)
    else:
        index = vx.new_index(DIM)
        bad = vecs.copy()
        bad[3] = np.nan
        index.add_with_ids(bad, ids)
    faiss.write_index(index, str(root / "vectors.faiss"))
    with Store.open(root, writable=False) as store:
        assert store.open_report.rebuilt and _search_is_right(store, _keys(40))
        assert not store.verify(files=False)["ok"]
    with Store.open(root) as store:
        assert store.open_report.rebuilt
    assert np.array_equal(_file_ids(root), _db_ids(root))


def test_database_that_lost_rows_is_refused(tmp_path, db):
    root = _make(tmp_path, db=db)
    backup = (root / "metadata.sqlite").read_bytes() if db is None else None
    with Store.open(root) as store:
        store.add_images(_rows(store, _keys(10, start=40)))
    # rows vanish without a tombstone
    _query(root, "DELETE FROM vectors WHERE id IN (SELECT id FROM vectors ORDER BY id LIMIT 5)")
    before = (root / "vectors.faiss").read_bytes()
    restore = "restore metadata.sqlite from a backup" if db is None else "restore PostgreSQL database .* from a backup"
    for writable in (False, True):
        with pytest.raises(StoreDamaged, match=f"lost data.*{restore}"):
            Store.open(root, writable=writable)
        assert (root / "vectors.faiss").read_bytes() == before
    if db is not None:  # the explicit way out: the database as it is
        with Store.open(root, repair=True) as store:
            assert store.index.ntotal == 45 and "lost" in " ".join(store.open_report.notes)
        assert np.array_equal(_file_ids(root), _db_ids(root))
        return
    # an older copy of the database (restored from a stale backup) is caught the same way
    (root / "metadata.sqlite").write_bytes(backup)
    with pytest.raises(StoreDamaged, match="10 vectors"):
        Store.open(root)
    assert (root / "vectors.faiss").read_bytes() == before
    with Store.open(root, repair=True) as store:  # the explicit way out: the database as it is
        assert store.index.ntotal == 40 and "lost" in " ".join(store.open_report.notes)
    with Store.open(root) as store:
        assert store.index.ntotal == 40 and _search_is_right(store, _keys(40))


def test_deleted_source_is_not_lost_data_and_removes_only_its_files(tmp_path, db):
    root = _make(tmp_path, n=0, db=db)
    with Store.open(root) as store:
        for source in ("a", "b"):
            rows = _rows(store, _keys(3, prefix=source), source=source)
            for row in rows:
                row.path = f"images/shared/{row.key}.png"
            store.add_images(rows)
        shared = store.add_images([NewImage(key="b-dup", role="original", source_id=store.source("b").id,
                                            description_id=store.description_id("p"), file_hash="h",
                                            path="images/shared/a0.png", vector=vec_for("b-dup"))])
        assert shared
        for key in _keys(3, prefix="a") + _keys(3, prefix="b"):
            (root / "images" / "shared").mkdir(parents=True, exist_ok=True)
            (root / "images" / "shared" / f"{key}.png").write_bytes(key.encode())
        store.save_index()
        old_index = (root / "vectors.faiss").read_bytes()
        assert store.remove_source("a") == 3
    left = sorted(p.name for p in (root / "images" / "shared").iterdir())
    assert left == ["a0.png", "b0.png", "b1.png", "b2.png"]  # a0 is still referenced by a row of b
    (root / "vectors.faiss").write_bytes(old_index)  # crash before the index save: tombstones explain it
    with Store.open(root) as store:
        assert store.open_report.removed == 3 and store.index.ntotal == 4


# ----- races between processes ----------------------------------------------------------------
def test_racing_get_or_create_makes_one_row(tmp_path, db):
    root = _make(tmp_path, n=0, db=db)
    start_at = time.time() + 2.0
    workers = [Worker(tmp_path, root, start_at) for _ in range(3)]
    for w in workers:
        w.send("add K 0 30")
    answers = [w.read() for w in workers]
    assert answers == ["ok 30"] * 3
    for w in workers:
        assert w.ask("save") == "ok"
        w.quit()
    tables = ("sources", "descriptions", "images", "vectors")
    counts = _query(root, *(f"SELECT count(*) FROM {t}" for t in tables))
    count = {t: c[0][0] for t, c in zip(tables, counts)}
    assert count == {"sources": 1, "descriptions": 1, "images": 30, "vectors": 30}
    assert np.array_equal(_file_ids(root), _db_ids(root))
    # add_source of a taken name: a clear error for the loser, never an IntegrityError
    workers = [Worker(tmp_path, root, time.time() + 1.5) for _ in range(2)]
    for w in workers:
        w.send("addsource dup")
    answers = sorted(w.read() for w in workers)
    assert answers[0].startswith("error StoreInputError source 'dup' already exists") and answers[1] == "ok"
    for w in workers:
        w.quit()


def test_claims_single_flight_and_dead_claimant(tmp_path, db):
    root = _make(tmp_path, n=0, db=db)
    keys = _keys(4, prefix="C")
    maker = Worker(tmp_path, root)
    assert maker.ask(f"claim maker 30 {' '.join(keys)}") == "ok " + " ".join(keys)
    with Store.open(root) as store:
        assert store.claim(keys, "me", 30) == []  # held by a live owner
        maker.send("add C 0 4")
        started = time.monotonic()
        found = store.wait_for_keys(keys, timeout=20, poll=0.05)
        assert maker.read() == "ok 4"
        assert set(found) == set(keys) and time.monotonic() - started < 15
        assert maker.ask(f"release maker {' '.join(keys)}") == "ok"
        assert store.live_claims(keys) == {}
    maker.quit()
    # a claimant killed with -9 holds its keys only until its lease expires
    dead = Worker(tmp_path, root)
    more = _keys(3, prefix="D")
    assert dead.ask(f"claim dead 1.5 {' '.join(more)}") == "ok " + " ".join(more)
    os.kill(dead.proc.pid, signal.SIGKILL)
    dead.proc.wait()
    with Store.open(root) as store:
        assert store.claim(more, "me", 30) == []
        started = time.monotonic()
        assert store.wait_for_keys(more, timeout=20, poll=0.05) == {}  # returns when the lease ran out
        assert time.monotonic() - started < 10
        assert store.claim(more, "me", 30) == more  # taken over
        assert store.claim(more, "me", 60) == more  # renewal by the owner


def test_two_processes_claim_the_same_keys_at_once(tmp_path, db):
    """Single flight: two processes claim the same keys at the same moment (in opposite orders, which
    would deadlock row locks taken one by one): every key goes to exactly one of them."""
    root = _make(tmp_path, n=0, db=db)
    keys = _keys(40, prefix="R")
    start_at = time.time() + 2.5
    first, second = Worker(tmp_path, root, start_at), Worker(tmp_path, root, start_at)
    first.send(f"claim A 30 {' '.join(keys)}")
    second.send(f"claim B 30 {' '.join(reversed(keys))}")
    answers = [first.read(), second.read()]
    assert all(a.split()[0] == "ok" for a in answers), answers
    got_a, got_b = (set(a.split()[1:]) for a in answers)
    assert got_a | got_b == set(keys) and not got_a & got_b
    with Store.open(root, writable=False) as store:
        owners = store.live_claims(keys)
    assert {k for k, o in owners.items() if o == "A"} == got_a and {k for k, o in owners.items() if o == "B"} == got_b
    assert second.ask(f"claim B 30 {' '.join(keys)}").split()[1:] == [k for k in keys if k in got_b]  # renewal
    first.quit()
    second.quit()


def test_stale_save_never_drops_vectors_of_another_process(tmp_path, db):
    root = _make(tmp_path, n=0, db=db)
    first, second = Worker(tmp_path, root), Worker(tmp_path, root)
    assert first.ask("add A 0 10") == "ok 10"
    assert second.ask("add B 0 10") == "ok 10"
    assert second.ask("save") == "ok"
    assert first.ask("save") == "ok"  # its in-memory index lacks B's vectors: the save merges them
    assert len(_file_ids(root)) == 20
    assert second.ask("add B 10 5") == "ok 5"
    assert first.ask("add A 10 5") == "ok 5"
    assert first.ask("save") == "ok"
    assert second.ask("save") == "ok"
    assert np.array_equal(_file_ids(root), _db_ids(root)) and len(_db_ids(root)) == 30
    # concurrently, many interleaved saves
    for w in (first, second):
        w.send("add A 100 1")
    for w in (first, second):
        w.read()
    for step in range(8):
        for w, prefix in ((first, "P"), (second, "Q")):
            w.send(f"add {prefix} {step * 5} 5")
        for w in (first, second):
            w.read()
            w.send("save")
        for w in (first, second):
            assert w.read() == "ok"
    assert np.array_equal(_file_ids(root), _db_ids(root)) and len(_db_ids(root)) == 31 + 80
    first.quit()
    second.quit()


def test_kill_during_save_loop_loses_nothing_committed(tmp_path, db):
    root = _make(tmp_path, n=0, db=db)
    worker = Worker(tmp_path, root)
    worker.send("loop")
    committed = 0
    while committed < 150:
        committed = int(worker.read().split()[1])
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait()
    index, why = vx.read_checked(root / "vectors.faiss", DIM)
    assert index is not None, why  # the published file is always whole
    leftovers = list(root.glob(f".*.{worker.proc.pid}.tmp"))
    (root / f".vectors.faiss.{worker.proc.pid}.tmp").write_bytes(b"torn")  # as if killed mid-write
    with Store.open(root) as store:
        assert len(store.existing_keys([f"L{i}" for i in range(committed)])) == committed
        assert np.array_equal(np.sort(vx.index_ids(store.index)), _db_ids(root))
        assert store.verify(files=False)["index"]["bad_content"] == 0
    assert not list(root.glob(f".*.{worker.proc.pid}.tmp")), leftovers


def test_temp_files_of_dead_processes_are_removed(tmp_path):
    root = _make(tmp_path)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = root / f".vectors.faiss.{dead_pid}.tmp"
        live = root / f".store.json.{alive.pid}.tmp"
        other = root / "notes.tmp"
        for p in (stale, live, other):
            p.write_bytes(b"x")
        Store.open(root, writable=False).close()
        assert stale.exists()  # a read-only open removes nothing
        Store.open(root).close()
        assert not stale.exists() and live.exists() and other.exists()
    finally:
        alive.kill()
        alive.wait()


# ----- verify ---------------------------------------------------------------------------------
def test_verify_reports_and_repairs(tmp_path, db):
    root = _make(tmp_path, n=0, db=db)
    with Store.open(root) as store:
        rows = _rows(store, _keys(6))
        for row in rows:
            path = root / row.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(row.key.encode() * 10)
            row.file_hash = sha256_file(path)
        outside = tmp_path / "outside.png"  # an ingested original outside the store, by absolute path
        outside.write_bytes(b"original")
        (root / rows[5].path).unlink()
        rows[5].path, rows[5].file_hash = str(outside), sha256_file(outside)
        store.add_images(rows)
        store.save_index()
        report = store.verify()
        assert report["ok"], report["problems"]
    json.dumps(report)
    (root / "images" / "replay" / "k1.png").write_bytes(b"changed")
    (root / "images" / "replay" / "k2.png").unlink()
    orphan = root / "images" / "replay" / "stray.png"
    orphan.write_bytes(b"stray")
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    fresh = root / "images" / "replay" / "in-flight.png"
    fresh.write_bytes(b"maybe about to be committed")
    temp = root / "images" / "replay" / ".k9.png.999999999.tmp"
    temp.write_bytes(b"t")
    path = root / "vectors.faiss"
    data = bytearray(path.read_bytes())
    at = data.find(vec_for("k3").tobytes())
    data[at:at + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with Store.open(root, writable=False) as store:  # a read-only open serves a rebuilt copy
        assert store.open_report.rebuilt
    with Store.open(root) as store:
        path.write_bytes(bytes(data))  # damaged again behind the open store's back
        report = store.verify()
        json.dumps(report)
        assert not report["ok"]
        assert report["index"]["bad_content"] == 1 and report["index"]["bad_ids"]
        assert report["files"]["missing"] == 1 and report["files"]["mismatched"] == 1
        assert report["orphans"]["count"] == 1 and report["orphans"]["recent"] == 1
        assert report["temp_files"]["count"] == 1
        repaired = store.verify(repair=True)
        assert repaired["repaired"] and not orphan.exists() and fresh.exists() and not temp.exists()
        after = store.verify()
        assert after["index"]["bad_content"] == 0 and after["orphans"]["count"] == 0
        assert after["temp_files"]["count"] == 0
        assert sorted(after["problems"]) == ["1 image files are missing",
                                             "1 image files differ from their recorded sha256"]
        assert _search_is_right(store, _keys(6))


def test_store_made_before_checksums_and_tombstones_is_upgraded(tmp_path, db):
    root = _make(tmp_path, db=db)
    _query(root, "ALTER TABLE vectors DROP COLUMN checksum", "DROP TABLE deleted_vectors",
           "DROP TABLE claims", "DROP TABLE store_meta", "DROP TABLE pending_tasks",
           *(["PRAGMA foreign_keys=ON"] if db is None else []),
           # deleted by an old resynth: no tombstones then
           "DELETE FROM images WHERE id IN (SELECT image_id FROM vectors WHERE id <= 2)")
    with Store.open(root, writable=False) as store:  # read-only: nothing changed, still served
        assert store.index.ntotal == 38 and _search_is_right(store, _keys(38, start=2))
        assert pending_tasks(store).get(["k"]) == {} and pending_tasks(store).count() == 0
    with Store.open(root) as store:
        assert store.index.ntotal == 38
        pending_tasks(store).put("k", "api", {"poll": "https://example.invalid/t"})  # the table was added
        assert pending_tasks(store).get(["k"])["k"][0] == {"poll": "https://example.invalid/t"}
        assert pending_tasks(store).drop(["k"], older_than=3600) == 1 and pending_tasks(store).count() == 0
        assert store.verify(files=False)["database"]["vectors_without_checksum"] == 0
        store.add_images(_rows(store, _keys(2, start=100)))
    assert _query(root, "SELECT count(*) FROM vectors WHERE checksum IS NULL") == [[(0,)]]
    with Store.open(root) as store:
        report = store.verify(files=False)
        assert store.index.ntotal == 40 and report["ok"], report["problems"]


def test_hash_helper_matches():
    assert vx.checksum(b"abc") == hashlib.blake2b(b"abc", digest_size=16).hexdigest()


def test_an_unusable_images_entry_in_store_json_is_one_line_naming_it(tmp_path):
    """store.json's "images" edited into something that is not an object-store URL (a list, a number, an
    http URL) is one line naming store.json when the images are first needed, never a TypeError."""
    root = _make(tmp_path, n=3)
    config = json.loads((root / "store.json").read_text())
    for value in (["s3://bucket"], 5, "http://example.invalid/x"):
        (root / "store.json").write_text(json.dumps({**config, "images": value}))
        with Store.open(root, writable=False) as store:
            with pytest.raises(StoreInputError, match=r"store\.json names image storage .* correct its") as caught:
                store.verify()
        assert "\n" not in str(caught.value)


def test_a_stale_id_digest_under_a_held_write_lock_does_not_refuse_the_open(tmp_path, monkeypatch):
    """A writable open recomputes a stale id digest; when another program holds the database's write
    lock that recount waits out the busy timeout and fails, but the open goes on (ids compared one by
    one, as they must be with a stale digest) instead of refusing the store."""
    root = _make(tmp_path, n=20)
    _sql(root / "metadata.sqlite", "UPDATE vector_sets SET id_sum = id_sum + 1")
    monkeypatch.setenv("RESYNTH_BUSY_TIMEOUT_S", "0.2")
    holder = sqlite3.connect(root / "metadata.sqlite", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with Store.open(root) as store:
            assert any("could not be recomputed now" in note for note in store.open_report.notes)
            assert _search_is_right(store, _keys(20))
    finally:
        holder.close()
    with Store.open(root) as store:
        assert any("recomputed" in note for note in store.open_report.notes)
    with Store.open(root) as store:
        assert not store.open_report.notes


def test_store_json_naming_another_file_as_its_index_is_refused(tmp_path):
    """A store.json edited to name the database, itself or a path outside the folder as its index file
    is refused in one line at open: a writable open used to replace metadata.sqlite (or store.json)
    with a FAISS index, losing the store. A vector size that is not a positive whole number too."""
    root = _make(tmp_path, n=3)
    config = json.loads((root / "store.json").read_text())
    before = _snapshot(root)
    for change in ({"index_file": "metadata.sqlite"}, {"index_file": "store.json"}, {"index_file": "../x.faiss"},
                   {"index_file": 5}, {"dim": "sixteen"}):
        (root / "store.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(StoreDamaged, match="store.json .* restore store.json from a backup") as caught:
            Store.open(root)
        assert "\n" not in str(caught.value)
        assert {k: v for k, v in _snapshot(root).items() if k != "store.json"} == {
            k: v for k, v in before.items() if k != "store.json"}
    assert not (tmp_path / "x.faiss").exists()


def test_refresh_keeps_serving_when_store_json_goes_bad(tmp_path, caplog):
    """A serving process re-reads store.json at each refresh; one rewritten by someone else to name
    another file as the index (or garbage, or another vector size) used to be adopted unchecked, so every
    later request died with StoreDamaged. Now it is checked as an open checks it: the process keeps what
    it has, warns once per bad content, and adopts a good store.json again."""
    root = _make(tmp_path, n=3)
    config = json.loads((root / "store.json").read_text())
    with Store.open(root, writable=False) as store, caplog.at_level("WARNING", logger="index.store"):
        for change in ({"index_file": "metadata.sqlite"}, {"dim": 8}):
            (root / "store.json").write_text(json.dumps({**config, **change}))
            for _ in range(3):
                assert store.refresh() is False and store.index_path == root / "vectors.faiss"
                assert _search_is_right(store, _keys(3))
        (root / "store.json").write_text("{not json")
        store.refresh()
        assert [r.getMessage().split(":")[0] for r in caplog.records] == ["keeping the store config in use"] * 3
        assert "metadata.sqlite" in caplog.records[0].getMessage()
        (root / "store.json").write_text(json.dumps({**config, "calibration": {"t": 1}}))
        store.refresh()
        assert store.config["calibration"] == {"t": 1} and len(caplog.records) == 3


def test_source_remove_whose_image_file_cannot_be_deleted_still_succeeds(tmp_path):
    """`source remove` deletes a source's own image files after its commit; one the machine will not
    delete (an immutable file: not even root may) stays as an orphan instead of turning the finished
    removal into a traceback (the source is gone, so the command cannot be run again)."""
    root = _make(tmp_path, n=0)
    with Store.open(root) as store:
        rows = _rows(store, _keys(3), source="gone")
        for row in rows:
            (root / row.path).parent.mkdir(parents=True, exist_ok=True)
            (root / row.path).write_bytes(row.key.encode())
        store.add_images(rows)
        stuck = root / rows[0].path
        if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode:
            pytest.skip("chattr +i is refused here")
        try:
            assert store.remove_source("gone") == 3
            assert stuck.exists() and not (root / rows[1].path).exists()
            assert store.verify(files=False)["orphans"]["recent"] == 1
        finally:
            subprocess.run(["chattr", "-i", str(stuck)], capture_output=True)


# ----- a full disk: reads answer without writing ------------------------------------------------
FULL_DISK_READS = r"""
import contextlib, io, zlib
from pathlib import Path
import numpy as np
from index.store import Store
from index.errors import StoreError
from engine.cli import main
root = sys.argv[1]

def vec(key):
    v = np.random.default_rng(zlib.crc32(key.encode())).normal(size=16).astype(np.float32)
    return v / np.linalg.norm(v)

def folder():  # the -shm file is the readers' and writers' shared memory, not data: readers write it
    return {p.name: b"" if p.name.endswith("-shm") else p.read_bytes() for p in Path(root).iterdir() if p.is_file()}

def reads(writable):  # `attribute` opens writable: a cached one must answer too
    with Store.open(root, writable=writable) as store:
        keys = [f"k{i}" for i in range(40)]
        found = store.existing_keys(keys)
        ids = np.array([found[k] for k in keys], np.int64)
        sims, best = store.search(np.stack([vec(k) for k in keys]), ids)
        say(stats=store.stats(), sources=[s.name for s in store.sources()], verify=store.verify(files=False)["ok"],
            right=bool((best[:, 0] == ids).all()), known=store.find_description_id("a prompt"),
            near=store.nearest(vec("k3"), 1)[0][0].key)

def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--store", root, "--quiet"])
    say(argv=argv, code=code, out=out.getvalue(), err=err.getvalue())

start = folder()
reads(False)
cli("stats", "--json")
cli("source", "list", "--json")
cli("verify", "--json", "--no-files")
say(read_only_wrote=folder() != start)
reads(True)
cli("source", "add", "new", "--kind", "replay")
with Store.open(root) as store:
    try:
        store.add_source("other", "replay", "fp-other")
        say(wrote=True)
    except StoreError as exc:
        say(error=type(exc).__name__, message=str(exc))
"""

KILLED_WRITER = r"""
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute(sys.argv[2])
os._exit(0)  # killed after its commit: what it wrote is only in the -wal (and the -shm is sized)
"""


def _killed_writer(root: Path, statement: str) -> None:
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(root / "metadata.sqlite"), statement], check=True)
    assert (root / "metadata.sqlite-wal").stat().st_size > 0


def _here(code: str, *args) -> list[dict]:
    """`code` written for `_child`, run in this process: its `say` lines, as the child would print them."""
    lines: list[dict] = []

    def say(**kw) -> None:
        lines.append(json.loads(json.dumps(kw, default=str)))
    exec(code, {"say": say, "sys": type("argv", (), {"argv": ["-c", *map(str, args)]})})
    return lines


def _fill_up(disk: Path) -> None:
    """Write until the filesystem refuses another byte (ENOSPC), as `dd if=/dev/zero` would."""
    with open(disk / "fill", "wb", buffering=0) as handle:
        for block in (1 << 16, 512, 1):
            try:
                while True:
                    handle.write(b"\0" * block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    assert os.statvfs(disk).f_bavail == 0


def test_read_only_commands_answer_on_a_full_disk(tmp_path, mounts):  # noqa: F811 - the imported fixture
    """On a filesystem with no byte left SQLite cannot size even a reader's -shm file: stats, source
    list, verify and a cached lookup used to die with "no space left ... writing metadata.sqlite". They
    answer identically and write nothing (the database is read as on a read-only mount); a write is one
    StoreFull line, exit 5. Rows a killed writer left in the write-ahead log are still read."""
    disk = mounts("tmpfs", tmp_path, "3m")
    root = _make(disk)
    before = _here(FULL_DISK_READS, root)  # in this process: cheaper, and the same code
    assert [line["code"] for line in before if "code" in line] == [0, 0, 0, 0] and before[-1] == {"wrote": True}
    _killed_writer(root, "DELETE FROM sources WHERE name IN ('new', 'other')")  # back to what `before` read
    _sql(root / "metadata.sqlite", "PRAGMA wal_checkpoint(TRUNCATE)")  # its close removes -wal and -shm
    assert sorted(p.name for p in root.iterdir()) == ["metadata.sqlite", "store.json", "store.lock", "vectors.faiss"]
    _fill_up(disk)
    snapshot = _snapshot(root)
    after = _child(FULL_DISK_READS, root)
    assert _snapshot(root) == snapshot  # not one byte written, no sidecar left, by any of the opens
    assert after[4] == {"read_only_wrote": False}
    assert after[:4] + after[5:6] == before[:4] + before[5:6]  # the same answers
    add, write = after[6:]
    assert add["code"] == 5 and not add["out"] and len(add["err"].strip().splitlines()) == 1, add
    assert "no space left" in add["err"] and "backup" not in add["err"], add
    assert write["error"] == "StoreFull" and "no space left" in write["message"], write
    (disk / "fill").unlink()

    # a killed writer's log: read through it (immutable would miss its row); only the -shm is written
    _killed_writer(root, "INSERT INTO sources (name, kind, params_json, fingerprint, created_at) "
                         "VALUES ('in-log', 'replay', '{}', 'fp', '2026-01-01 00:00:00')")
    _fill_up(disk)
    snapshot = {k: v for k, v in _snapshot(root).items() if not k.endswith("-shm")}
    with Store.open(root, writable=False) as store:
        assert "in-log" in [s.name for s in store.sources()] and _search_is_right(store, _keys(40))
    assert {k: v for k, v in _snapshot(root).items() if not k.endswith("-shm")} == snapshot
