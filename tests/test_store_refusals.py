"""The store where real machines refuse: a read-only mount, a full disk, a write lock held by another
program past the busy timeout, text one backend cannot keep. Each refusal is one typed line that names
the cause and the way out; nothing acknowledged is lost, nothing is written where nothing may be, and
the store opens again afterwards.

Real conditions, never mocks: read-only bind mounts and small tmpfs mounts (as root; skipped with the
reason where the machine refuses), separate processes holding the lock, a real PostgreSQL server
(tests/pg.py) for the tests that take the `db` fixture.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

from index.errors import StoreBusy, StoreFull, StoreInputError, StoreReadOnly
from index.keys import normalise_description
from index.schema import Source
from index.store import NewImage, Store
from tests.procs import resynth

DIM = 16
REPO = Path(__file__).resolve().parents[1]
EMBEDDER = {"identity": "test-embedder", "arch": "x", "checkpoint": "x"}


def vec_for(key: str, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(key.encode())).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _rows(store: Store, keys: list[str], path: str = "images/{k}.png") -> list[NewImage]:
    src = store.ensure_source("replay", "replay", "fp-replay")
    desc = store.description_id("a prompt")
    return [NewImage(key=k, role="resynthesis", source_id=src.id, description_id=desc, file_hash=f"h-{k}",
                     path=path.format(k=k), vector=vec_for(k, store.dim), seed=i) for i, k in enumerate(keys)]


def _make(root: Path, n: int = 40, db: str | None = None, dim: int = DIM) -> Path:
    with Store.create(root, EMBEDDER, dim, db_url=db) as store:
        if n:
            store.add_images(_rows(store, [f"k{i}" for i in range(n)]))
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _child(code: str, *args, env: dict | None = None, timeout: float = 120) -> list[dict]:
    """Run `code` in a fresh Python process; it prints one JSON object per line (`say`). A store error
    is printed as {"error": type, "message": ...}; any other exception fails the test (a traceback)."""
    prelude = ("import json, sys, os\nsys.path.insert(0, os.environ['REPO'])\n"
               "def say(**kw):\n    print(json.dumps(kw, default=str), flush=True)\n")
    full_env = {**os.environ, "REPO": str(REPO), **(env or {})}
    result = subprocess.run([sys.executable, "-c", prelude + code, *map(str, args)], capture_output=True, text=True,
                            cwd=REPO, env=full_env, timeout=timeout)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _one_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and len(message) < 400, message


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.fixture
def mounts(tmp_path):
    """mount(kind, folder) makes a real mount (read-only bind of `folder`, or a small tmpfs), unmounted
    after the test; skipped with the machine's reason where mounting is refused."""
    made: list[Path] = []

    def mount(kind: str, folder: Path, size: str = "8m") -> Path:
        if os.geteuid() != 0:
            pytest.skip("real mounts need root (read-only bind mounts, tmpfs)")
        target = tmp_path / f"mnt{len(made)}"
        target.mkdir()
        if kind == "ro":
            steps = [["mount", "--bind", str(folder), str(target)],
                     ["mount", "-o", "remount,bind,ro", str(target)]]
        else:
            steps = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)]]
        for step in steps:
            done = _run(step)
            if done.returncode:
                if made or step is not steps[0]:
                    _run(["umount", "-l", str(target)])
                pytest.skip(f"this machine refuses `{' '.join(step[:3])}`: {done.stderr.strip()[:200]}")
        made.append(target)
        return target

    yield mount
    for target in reversed(made):
        if _run(["umount", str(target)]).returncode:
            _run(["umount", "-l", str(target)])


# ----- a read-only store ------------------------------------------------------------------------
READ_ONLY = r'''
import numpy as np, zlib
from index.store import Store
from index.errors import StoreError
root, writable = sys.argv[1], sys.argv[2] == "1"
def vec(key):
    v = np.random.default_rng(zlib.crc32(key.encode())).normal(size=16).astype(np.float32)
    return v / np.linalg.norm(v)
with Store.open(root, writable=writable) as store:
    say(writable=store.writable, stats=store.stats(), sources=[s.name for s in store.sources()])
    report = store.verify(files=False)
    say(verify_ok=report["ok"], problems=report["problems"])
    keys = [f"k{i}" for i in range(40)]
    found = store.existing_keys(keys)
    ids = np.array([found[k] for k in keys], np.int64)
    sims, best = store.search(np.stack([vec(k) for k in keys]), ids)
    near = store.nearest(vec("k3"), 1)
    say(cached=len(found), right=bool((best[:, 0] == ids).all()), nearest=near[0][0].key,
        known=store.find_description_id("a prompt") is not None)
    for name, write in (("description", lambda: store.description_id("a new prompt")),
                        ("source", lambda: store.add_source("new", "replay", "fp")),
                        ("remove", lambda: store.remove_source("replay")),
                        ("repair", lambda: store.verify(repair=True)),
                        ("rebuild", lambda: store.rebuild()),
                        ("config", lambda: store.update_config(captioner="x"))):
        try:
            write()
            say(write=name, error=None)
        except StoreError as exc:
            say(write=name, error=type(exc).__name__, message=str(exc))
'''


def _check_read_only(lines: list[dict], why: str | None) -> None:
    assert lines[0]["writable"] is False and lines[0]["stats"]["vectors"] == 40 and lines[0]["sources"] == ["replay"]
    assert lines[1]["verify_ok"], lines[1]["problems"]
    assert lines[2] == {"cached": 40, "right": True, "nearest": "k3", "known": True}
    writes = lines[3:]
    assert len(writes) == 6
    for line in writes:
        assert line["error"] == "StoreReadOnly", line
        _one_line(line["message"])
        assert "backup" not in line["message"] and "damaged" not in line["message"]
        if why:
            assert f"is read-only ({why})" in line["message"], line["message"]


def test_read_only_mount_answers_reads_and_writes_nothing(tmp_path, db, mounts):
    """On a read-only bind mount (writable open asked, or not): stats, sources, verify, cached lookups and
    dataset search answer; every write is refused in one line naming the read-only filesystem; not one
    byte changes and no sidecar, temp or lock file appears (SQLite reads it immutable)."""
    source = tmp_path / "src"
    _make(source / "s", db=db)
    before = _snapshot(source)
    assert not any(name.endswith(("-wal", "-shm")) for name in before)  # closed cleanly
    view = mounts("ro", source)
    for writable in ("1", "0"):
        _check_read_only(_child(READ_ONLY, view / "s", writable), "read-only filesystem")
        assert _snapshot(source) == before
    with Store.open(source / "s") as store:  # still a normal, writable store where it is writable
        assert store.writable and store.stats()["vectors"] == 40


def test_read_only_mount_reads_the_log_a_killed_writer_left(tmp_path, mounts):
    """A writer killed after its commit leaves the rows in SQLite's write-ahead log: a read-only mount
    still answers with them (read, not ignored), and writes nothing."""
    source = tmp_path / "src"
    root = _make(source / "s")
    code = ("from index.store import Store, NewImage\nimport numpy as np, signal\n"
            "store = Store.open(sys.argv[1])\nsrc = store.source('replay')\nd = store.description_id('a prompt')\n"
            "store.add_images([NewImage(key=f'w{i}', role='original', source_id=src.id, description_id=d, "
            "file_hash=f'w{i}', path=f'images/w{i}.png', vector=np.ones(16, np.float32) / 4) for i in range(7)])\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", f"import sys, os\nsys.path.insert(0, {str(REPO)!r})\n" + code,
                             root], cwd=REPO, capture_output=True, timeout=120)
    assert killed.returncode == -9
    assert (root / "metadata.sqlite-wal").stat().st_size > 0
    before = _snapshot(source)
    view = mounts("ro", source)
    lines = _child("from index.store import Store\nwith Store.open(sys.argv[1]) as s:\n"
                   "    say(n=s.stats()['vectors'], index=int(s.index.ntotal), w=len(s.existing_keys(['w0', 'w6'])))\n",
                   view / "s")
    assert lines == [{"n": 47, "index": 47, "w": 2}]
    assert _snapshot(source) == before


def test_commands_on_a_read_only_mount(tmp_path, models, mounts):
    """The CLI on a read-only mount: stats, source list and verify answer (exit 0); a command that
    writes says so in one line (exit 5: the machine refused), never a traceback."""
    source = tmp_path / "src"
    done = resynth("init", "--store", source / "s", "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"])
    assert done.returncode == 0, done.stderr
    before = _snapshot(source)
    view = mounts("ro", source)
    store = str(view / "s")
    for argv in (["stats", "--json"], ["source", "list"], ["verify", "--json", "--no-files"]):
        done = resynth(*argv, "--store", store)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (argv, done.stderr)
    for argv in (["source", "remove", "nothing-here"], ["rebuild"], ["verify", "--repair"]):
        done = resynth(*argv, "--store", store)
        err = done.stderr.strip()
        assert done.returncode == 5 and "Traceback" not in err and len(err.splitlines()) == 1, (argv, err)
        assert "read-only" in err and "backup" not in err, err
    assert _snapshot(source) == before


def test_cached_attribution_on_a_read_only_mount(tmp_path, models, originals, mounts, capsys):
    """A query whose resyntheses are stored is answered from a read-only mount, identically and
    writing nothing; one that needs a generation says in one line that the store is read-only.
    The store is made in this process; the read-only runs are the CLI in processes of their own."""
    from tests.helpers import run_cli

    source = tmp_path / "src"
    store = source / "s"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--quiet") == 0
    name, folder = next(iter(models["pipelines"].items()))
    assert run_cli("source", "add", name, folder, "--store", store, "--steps", 2, "--quiet") == 0
    query = ["attribute", str(originals[0]["image"]), "--prompt", originals[0]["prompt"], "--per-source", "1",
             "--json", "--quiet"]
    capsys.readouterr()
    assert run_cli(*query, "--store", store) == 0
    first = subprocess.CompletedProcess([], 0, capsys.readouterr().out, "")
    before = _snapshot(source)
    view = mounts("ro", source)
    again = resynth(*query, "--store", view / "s")
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    answers = [json.loads(out)["results"][0] for out in (first.stdout, again.stdout)]
    assert answers[1]["cached"] == 1 and answers[1]["generated"] == 0
    assert [answers[1][k] for k in ("predicted", "scores")] == [answers[0][k] for k in ("predicted", "scores")]
    new = [*query[:3], originals[0]["prompt"] + " never asked before", *query[4:-1]]  # progress bars on
    fresh = resynth(*new, "--store", view / "s")
    err = fresh.stderr.strip()  # the refusal only: no "generating: 0%" bar promising images first
    assert fresh.returncode == 5 and len(err.splitlines()) == 1 and "read-only" in err, err
    assert "generating" not in err, err
    assert _snapshot(source) == before


# ----- a full disk ------------------------------------------------------------------------------
def _fill(folder: Path, leave: int) -> Path:
    """Fill the filesystem of `folder` until `leave` bytes are free."""
    filler = folder / "filler"
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))
    return filler


FILL_DB = r'''
import numpy as np
from index.store import Store, NewImage
from index.errors import StoreError
store = Store.open(sys.argv[1])
src, d = store.source("replay"), store.description_id("a prompt")
acked = []
try:
    for batch in range(400):
        keys = [f"f{batch}-{i}" for i in range(50)]
        rng = np.random.default_rng(batch)
        added = store.add_images([NewImage(key=k, role="original", source_id=src.id, description_id=d,
                                           file_hash=k, path=f"images/{k}.png",
                                           vector=rng.normal(size=store.dim).astype(np.float32)) for k in keys])
        acked += keys
        say(acked=keys, inserted=added.inserted)
except StoreError as exc:
    say(error=type(exc).__name__, message=str(exc))
try:
    store.close()
    say(closed=True)
except StoreError as exc:
    say(error=type(exc).__name__, message=str(exc), at="close")
'''


def test_full_disk_is_one_line_and_loses_nothing(tmp_path, mounts):
    """A tmpfs filled up: the index file write (rebuild) and the database writes (ingest-like batches)
    each end in one StoreFull line; the old index file stays whole, no temp file is left, every
    acknowledged row is there after space is freed, and the store opens and verifies clean."""
    disk = mounts("tmpfs", tmp_path, "8m")
    root = _make(disk / "s", n=1000, dim=256)  # about 1 MB of vectors in the database, 1 MB of index
    index_before = (root / "vectors.faiss").read_bytes()
    filler = _fill(disk, 256 << 10)
    lines = _child("from index.store import Store\nfrom index.errors import StoreError\n"
                   "store = Store.open(sys.argv[1])\ntry:\n    store.rebuild(search=False)\n"
                   "except StoreError as exc:\n    say(error=type(exc).__name__, message=str(exc))\nstore.close()\n",
                   root)
    assert lines and lines[0]["error"] == "StoreFull", lines
    _one_line(lines[0]["message"])
    assert "no space left" in lines[0]["message"] and "backup" not in lines[0]["message"]
    assert (root / "vectors.faiss").read_bytes() == index_before
    assert not list(root.glob(".*.tmp"))

    lines = _child(FILL_DB, root)
    errors = [line for line in lines if "error" in line]
    assert errors and errors[0]["error"] == "StoreFull", lines
    for line in errors:
        _one_line(line["message"])
        assert "no space left" in line["message"] and "backup" not in line["message"]
    acked = [k for line in lines for k in line.get("acked", [])]
    filler.unlink()
    with Store.open(root) as store:
        assert len(store.existing_keys(acked)) == len(acked)
        assert store.stats()["vectors"] >= 1000 + len(acked)
        report = store.verify(files=False)
        assert report["ok"], report["problems"]
    assert not list(root.glob(".*.tmp"))


# ----- a database held by another program -------------------------------------------------------
HOLD_SQLITE = r'''
import sqlite3
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("held", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
'''

HOLD_PG = r'''
import psycopg
url = sys.argv[1].replace("postgresql+psycopg://", "postgresql://")
with psycopg.connect(url) as conn:
    conn.execute("LOCK TABLE sources IN EXCLUSIVE MODE")  # writes wait; reads go on
    print("held", flush=True)
    sys.stdin.read()
'''

WRITE_WHILE_HELD = r'''
import time
from index.store import Store
from index.errors import StoreError
with Store.open(sys.argv[1]) as store:
    say(vectors=store.stats()["vectors"])  # reads go on while the lock is held
    started = time.monotonic()
    try:
        store.add_source("late", "replay", "fp-late")
        say(error=None)
    except StoreError as exc:
        say(error=type(exc).__name__, message=str(exc), waited=time.monotonic() - started)
'''


def test_write_lock_held_by_another_program_past_the_busy_timeout(tmp_path, db):
    """Another program holds the database's write lock (SQLite BEGIN EXCLUSIVE, a PostgreSQL table
    lock) longer than the busy timeout (RESYNTH_BUSY_TIMEOUT_S, 1 s here): the write ends in one
    StoreBusy line after about that long, reads still answer, and once the lock is gone it succeeds."""
    root = _make(tmp_path / "s", db=db)
    target = db if db else str(root / "metadata.sqlite")
    holder = subprocess.Popen([sys.executable, "-c", "import sys\n" + (HOLD_PG if db else HOLD_SQLITE), target],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        lines = _child(WRITE_WHILE_HELD, root, env={"RESYNTH_BUSY_TIMEOUT_S": "1"})
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert lines[0] == {"vectors": 40}
    assert lines[1]["error"] == "StoreBusy", lines
    _one_line(lines[1]["message"])
    assert "locked by another program" in lines[1]["message"] and "backup" not in lines[1]["message"]
    assert 0.8 < lines[1]["waited"] < 20
    with Store.open(root) as store:
        store.add_source("late", "replay", "fp-late")
        assert [s.name for s in store.sources()] == ["late", "replay"]
        assert store.verify(files=False)["ok"]


def test_busy_error_type_maps_like_other_store_errors():
    from index.errors import StoreError, StoreUnavailable

    assert issubclass(StoreBusy, StoreUnavailable) and issubclass(StoreFull, StoreUnavailable)
    assert issubclass(StoreUnavailable, StoreError) and issubclass(StoreReadOnly, StoreInputError)


# ----- text both backends keep alike ------------------------------------------------------------
def _counts(store: Store) -> tuple:
    stats = store.stats()
    return len(store.sources()), stats["descriptions"], stats["vectors"]


def test_nul_and_control_characters_are_treated_alike_on_both_backends(tmp_path, db):
    """A NUL (or another control character) in a description is normalised to a space on both backends;
    in a new source name it is refused, and a NUL in an image path, key or hash refuses the whole batch, in
    one line, before anything is written (PostgreSQL cannot store NUL; SQLite could). A lookup takes any name
    but NUL: a source stored before its name's character was refused can still be found and removed."""
    root = _make(tmp_path / "s", db=db)
    with Store.open(root) as store:
        plain = store.description_id("a red\tcar")
        assert store.description_id("a red\x00car") == plain
        assert store.description_id("a\x07red \x7fcar\x1b") == plain
        assert store.find_description_id("a\x00red car") == plain
        assert normalise_description("a\x00b\x85c") == "a b c"
        before = _counts(store)
        for bad in ("gen\x00a", "gen\na", "gen\x1ba"):
            for register in (store.add_source, store.ensure_source):
                with pytest.raises(StoreInputError, match="control character") as caught:
                    register(bad, "replay", "fp")
                _one_line(str(caught.value))
            with pytest.raises(StoreInputError, match="control character" if "\x00" in bad else "unknown source"):
                store.source(bad)
        with pytest.raises(StoreInputError, match="control character"):
            store.ensure_source("fine", "replay", "fp", path="/models/a\x00b")
        rows = _rows(store, ["n1", "n2"])
        rows[1].path = "images/n\x002.png"
        with pytest.raises(StoreInputError, match="image path"):
            store.add_images(rows)
        rows = _rows(store, ["n3", "n\x004"])
        with pytest.raises(StoreInputError, match="image key"):
            store.add_images(rows)
        rows = _rows(store, ["n5"])
        rows[0].seed = 2 ** 63
        with pytest.raises(StoreInputError, match=r"seed 9223372036854775808 does not fit .*2\^63-1\)"):
            store.add_images(rows)
        assert _counts(store) == before
        assert store.existing_keys(["n1", "n3", "n5"]) == {}
        with store.db.write_session() as s:  # as `source add` stored it before invisible characters were refused
            s.execute(insert(Source).values(name="a\u200bb", kind="replay", fingerprint="fp-old", params_json="{}"))
            s.commit()
        with pytest.raises(StoreInputError, match="invisible or bidi character U\\+200B"):
            store.add_source("a\u200bb", "replay", "fp-old")
        old = store.source("a\u200bb")
        assert old.fingerprint == "fp-old"
        store.add_images([NewImage(key="old", role="resynthesis", source_id=old.id, description_id=plain,
                                   file_hash="h-old", path="images/old.png", vector=vec_for("old"))])
        assert store.remove_source("a\u200bb") == 1 and _counts(store) == before
        with pytest.raises(StoreInputError, match="unknown source"):
            store.source("a\u200bb")
        added = store.add_images(_rows(store, ["n1"], path="images/new\nline.png"))  # a legal file name
        assert added.inserted == 1 and store.add_images(_rows(store, ["n1"])).inserted == 0
    with Store.open(root) as store:
        report = store.verify(files=False)
        assert report["ok"], report["problems"]


def test_healthy_database_behind_a_log_it_cannot_open_is_not_called_damaged(tmp_path, mounts):
    """A write-ahead log left without its index file, on a read-only mount: SQLite cannot open it
    there. The file checks out, so the message says what to do and never to restore from a backup."""
    source = tmp_path / "src"
    root = _make(source / "s")
    keep = sqlite3.connect(root / "metadata.sqlite")  # an open reader keeps the log files in place
    keep.execute("SELECT count(*) FROM vectors").fetchall()
    with Store.open(root) as store:
        store.add_images(_rows(store, ["late"]))
    shutil.copy(root / "metadata.sqlite-wal", tmp_path / "wal")
    keep.close()
    shutil.copy(tmp_path / "wal", root / "metadata.sqlite-wal")  # a log with frames, no -shm beside it
    (root / "metadata.sqlite-shm").unlink(missing_ok=True)
    if not (root / "metadata.sqlite-wal").stat().st_size:
        pytest.skip("SQLite checkpointed the log away; nothing to read")
    view = mounts("ro", source)
    lines = _child("from index.store import Store\nfrom index.errors import StoreError\ntry:\n"
                   "    Store.open(sys.argv[1]).close()\n    say(error=None)\nexcept StoreError as exc:\n"
                   "    say(error=type(exc).__name__, message=str(exc))\n", view / "s")
    if lines[0]["error"] is None:
        return  # this SQLite reads such a log read-only: nothing to refuse
    assert lines[0]["error"] in ("StoreReadOnly", "StoreUnavailable"), lines
    _one_line(lines[0]["message"])
    assert "backup" not in lines[0]["message"] and "damaged" not in lines[0]["message"]


@pytest.mark.parametrize("raw", ["abc", "-1", "nan"])
def test_a_wait_from_the_environment_that_is_no_duration_is_one_line(raw, monkeypatch):
    """RESYNTH_BUSY_TIMEOUT_S=abc silently waited the default 30 s; every such variable is checked alike."""
    from index.failures import BUSY_ENV, busy_timeout_s
    from index.layout import LOCK_ENV, lock_timeout_s

    for name, read in ((BUSY_ENV, busy_timeout_s), (LOCK_ENV, lock_timeout_s)):
        monkeypatch.setenv(name, raw)
        with pytest.raises(StoreInputError, match=f"{name}=.* is not a number of seconds"):
            read()
        monkeypatch.setenv(name, "2.5")
        assert read() == 2.5
        monkeypatch.delenv(name)


def test_verify_calls_a_folder_where_the_index_file_belongs_a_problem(tmp_path):
    """verify said ok ("index file not written yet") while every save failed on the folder there."""
    root = _make(tmp_path / "s", n=3)
    for leftover in root.glob("vectors.faiss*"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    (root / "vectors.faiss").mkdir()
    with Store.open(root, writable=False) as store:
        report = store.verify(files=False)
    assert not report["ok"] and any("is not a file" in p for p in report["problems"]), report
