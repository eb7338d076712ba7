"""What only a PostgreSQL store has: a URL in store.json (never a password), connection errors in one
line, a server that stops and comes back, one store per database shared by several store folders, and
read-only opens enforced by the server. Everything runs against a real server (tests/pg.py)."""
from __future__ import annotations

import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from index.errors import StoreDamaged, StoreError, StoreInputError
from index.store import NewImage, Store
from tests import pg
from tests.helpers import run_cli
from tests.procs import resynth

DIM = 16
EMBEDDER = {"identity": "test-embedder", "arch": "x", "checkpoint": "x"}
SECRET = "s3cret-Pa55word"


@pytest.fixture
def url():
    if not pg.admin_url():
        pytest.skip(pg.why())
    made = pg.create_database()
    try:
        yield made
    finally:
        pg.drop_database(made)


def _vec(key: str, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(key.encode())).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _add(store: Store, keys: list[str]) -> list[int]:
    src = store.ensure_source("replay", "replay", "fp")
    desc = store.description_id("a prompt")
    return store.add_images([NewImage(key=k, role="resynthesis", source_id=src.id, description_id=desc,
                                      file_hash=f"h-{k}", path=f"images/replay/{k}.png", vector=_vec(k, store.dim))
                             for k in keys])


def _with_password(url: str, password: str = SECRET) -> str:
    user, rest = url.split("://", 1)[1].split("@", 1)
    return f"postgresql+psycopg://{user}:{password}@{rest}"


def _files_text(root: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file())


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("resynth: error: ") and "Traceback" not in err, err
    return lines[0]


_cli = resynth


def test_password_is_refused_in_the_url_and_never_written(tmp_path, url, monkeypatch):
    for bad in (_with_password(url), url + f"?password={SECRET}"):
        with pytest.raises(StoreInputError, match="PGPASSWORD") as caught:
            Store.create(tmp_path / "refused", EMBEDDER, DIM, db_url=bad)
        assert SECRET not in str(caught.value) and "\n" not in str(caught.value)
        assert not (tmp_path / "refused" / "store.json").exists()
    # the way that works: the password in the environment (trust authentication accepts any)
    monkeypatch.setenv("RESYNTH_DB_PASSWORD", SECRET)
    root = tmp_path / "s"
    with Store.create(root, EMBEDDER, DIM, db_url=url) as store:
        _add(store, ["a", "b"])
    assert json.loads((root / "store.json").read_text())["db"] == url
    assert SECRET not in _files_text(root)
    with Store.open(root) as store:
        assert store.index.ntotal == 2 and not (root / "metadata.sqlite").exists()


def test_init_with_a_bad_url_or_no_server_fails_in_one_line(tmp_path, models, url, capsys, monkeypatch):
    monkeypatch.setenv("RESYNTH_DB_PASSWORD", SECRET)
    init = ["init", "--clip-config", models["clip_config"], "--clip-checkpoint", models["clip_checkpoint"]]
    dead = f"postgresql+psycopg://resynth@127.0.0.1:{pg._free_port()}/storedb"
    cases = {"not a url at all": "not a database URL", "sqlite:///x.db": "leave --db out",
             "mysql://u@h/db": "PostgreSQL URL", "postgresql+psycopg://u@127.0.0.1:5432": "names no database",
             _with_password(url): "PGPASSWORD", dead: "storedb' at 127.0.0.1"}
    for i, (bad, expected) in enumerate(cases.items()):
        root = tmp_path / f"s{i}"
        code = run_cli(*init, "--store", root, "--db", bad)
        line = _one_line_error(capsys.readouterr().err)
        assert code != 0 and expected in line and SECRET not in line, line
        assert not root.exists()  # no store folder left behind, not even an empty one
    assert run_cli(*init, "--store", tmp_path / "good", "--db", url) == 0
    assert json.loads((tmp_path / "good" / "store.json").read_text())["db"] == url


def test_stopped_server_is_a_one_line_error_and_a_restart_is_picked_up(tmp_path, models):
    try:
        server = pg.start_server()  # a private one: this test stops it
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        db = pg.database_on(server.url)
        root = tmp_path / "s"
        assert run_cli("init", "--store", root, "--clip-config", models["clip_config"],
                       "--clip-checkpoint", models["clip_checkpoint"], "--db", db) == 0
        with Store.open(root) as store:
            _add(store, ["a", "b", "c"])
        assert _cli("stats", "--store", root, "--json").returncode == 0
        live = Store.open(root)
        server.stop()
        done = _cli("stats", "--store", root)
        line = _one_line_error(done.stderr)
        assert done.returncode == 4 and f"127.0.0.1:{server.port}" in line and "rs_" in line, line
        with pytest.raises(StoreError) as caught:  # an open store: the same one-line error, no driver exception
            live.stats()
        assert type(caught.value) is StoreError and "\n" not in str(caught.value)
        server.start()
        assert live.stats()["vectors"] == 3  # the pool reconnects (pre-ping) once the server is back
        live.close()
        done = _cli("stats", "--store", root, "--json")
        assert done.returncode == 0 and json.loads(done.stdout)["vectors"] == 3
    finally:
        server.destroy()


def test_one_store_per_database_shared_by_store_folders(tmp_path, url):
    with Store.create(tmp_path / "one", EMBEDDER, DIM, db_url=url) as store:
        _add(store, [f"k{i}" for i in range(10)])
    other = {"identity": "another-embedder", "arch": "y", "checkpoint": "y"}
    with pytest.raises(StoreInputError, match="already holds a store bound to embedder test-embedder"):
        Store.create(tmp_path / "two", other, DIM, db_url=url)
    assert not (tmp_path / "two" / "store.json").exists()
    # another folder (another machine) with the same embedder joins the store: same rows, its own index
    with Store.create(tmp_path / "three", EMBEDDER, DIM, db_url=url) as joined:
        assert joined.index.ntotal == 10 and joined.open_report.rebuilt
        assert set(joined.existing_keys([f"k{i}" for i in range(10)])) == {f"k{i}" for i in range(10)}
        assert len(set(_add(joined, [f"k{i}" for i in range(5, 15)]))) == 10  # 5 known, 5 new
    with Store.open(tmp_path / "one") as first:
        assert first.index.ntotal == 15 and first.open_report.added == 5 and first.verify(files=False)["ok"]
    # a store.json edited to another embedder is refused by the database's own record
    config = json.loads((tmp_path / "one" / "store.json").read_text())
    config["embedder"] = other
    (tmp_path / "one" / "store.json").write_text(json.dumps(config))
    with pytest.raises(StoreInputError, match="bound to embedder test-embedder"):
        Store.open(tmp_path / "one")


def test_missing_tables_are_refused_and_nothing_is_touched(tmp_path, url):
    root = tmp_path / "s"
    with Store.create(root, EMBEDDER, DIM, db_url=url) as store:
        _add(store, ["a", "b"])
    before = (root / "vectors.faiss").read_bytes()
    pg.sql(url, "DROP TABLE vectors CASCADE")
    for writable in (False, True):
        with pytest.raises(StoreDamaged) as caught:
            Store.open(root, writable=writable)
        message = str(caught.value)
        assert "lacks the store's tables (vectors)" in message and "from a backup" in message and "\n" not in message
        assert (root / "vectors.faiss").read_bytes() == before
    assert "vectors" not in {r[0] for r in pg.sql(url, "SELECT table_name FROM information_schema.tables")[0]}


def test_read_only_open_is_read_only_at_the_server(tmp_path, url):
    root = tmp_path / "s"
    with Store.create(root, EMBEDDER, DIM, db_url=url) as store:
        _add(store, ["a"])
    with Store.open(root, writable=False) as store:
        with pytest.raises(StoreInputError, match="read-only"):
            store.description_id("new text")  # refused by the store itself
        with pytest.raises(StoreInputError, match="read-only"), store.session() as s:  # and by the server
            s.execute(text("INSERT INTO store_meta (key, value) VALUES ('x', 'y')"))
            s.commit()
    assert pg.sql(url, "SELECT count(*) FROM store_meta WHERE key = 'x'") == [[(0,)]]


def test_generation_happens_once_across_processes_and_survives_kill(tmp_path, models, originals, url):
    """Through the real CLI on a PostgreSQL store: a `kill -9` before the commit leaves no rows, then two
    processes attributing one new prompt at once generate each resynthesis exactly once between them."""
    root = tmp_path / "s"
    assert run_cli("init", "--store", root, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--db", url) == 0
    for name, folder in models["pipelines"].items():
        assert run_cli("source", "add", name, folder, "--store", root, "--steps", 2, "--quiet") == 0
    n = len(models["pipelines"])
    argv = ["attribute", originals[1]["image"], "--prompt", "a lighthouse keeper raced on postgres",
            "--per-source", 2, "--no-adaptive", "--store", root, "--json", "--quiet"]
    count = "SELECT count(*) FROM vectors"
    killed = resynth(*argv, crash_at="generate:before-commit")
    assert killed.returncode == -9 and pg.sql(url, count) == [[(0,)]]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: _cli(*argv), range(2)))
    for out in outs:
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    answers = [json.loads(o.stdout) for o in outs]
    assert sum(a["cache"]["generated"] for a in answers) == 2 * n  # each image made once, by one of them
    assert pg.sql(url, count) == [[(2 * n,)]]
    assert answers[0]["results"][0]["predicted"] == answers[1]["results"][0]["predicted"]
    done = _cli("verify", "--store", root, "--json")
    assert done.returncode in (0, 4), done.stderr
    report = json.loads(done.stdout)
    assert report["index"]["bad_content"] == 0 and report["index"]["lost_from_database"] == 0
    assert report["database"]["vectors"] == 2 * n and not report["orphans"]["count"]


def test_64_bit_seeds_are_stored_and_an_older_32_bit_column_is_widened_at_a_writable_open(tmp_path, url):
    """PostgreSQL's INTEGER holds 32 bits; manifests carry seeds up to 2^63-1 (A1111 often past 2^31), and
    an ingest failed mid-way on them. New stores make images.seed BIGINT; an older store's column is
    widened by the next writable open (a read-only open reads it as it is)."""
    root = tmp_path / "s"
    seeds = {"big": 3_000_000_000, "max": 2 ** 63 - 1, "big2": 3_000_000_001, "max2": 2 ** 63 - 2}

    def add(store: Store, keys: list[str]) -> None:
        src, desc = store.ensure_source("replay", "replay", "fp"), store.description_id("a prompt")
        store.add_images([NewImage(key=k, role="resynthesis", source_id=src.id, description_id=desc, seed=seeds[k],
                                   file_hash=f"h-{k}", path=f"images/{k}.png", vector=_vec(k)) for k in keys])

    def stored(store: Store) -> dict[str, int | None]:
        return {Path(v.path).stem: v.seed for v in store.labelled_vectors()}

    column = "SELECT data_type FROM information_schema.columns WHERE table_name = 'images' AND column_name = 'seed'"
    with Store.create(root, EMBEDDER, DIM, db_url=url) as store:
        add(store, ["big", "max"])
        assert stored(store) == {"big": seeds["big"], "max": seeds["max"]}
    assert pg.sql(url, column) == [[("bigint",)]]
    # the shape an older resynth made (its seeds fitted 32 bits)
    pg.sql(url, "UPDATE images SET seed = 7", "ALTER TABLE images ALTER COLUMN seed TYPE INTEGER")
    with Store.open(root, writable=False) as old:
        assert stored(old) == {"big": 7, "max": 7} and not old.db.has_wide_seeds
    assert pg.sql(url, column) == [[("integer",)]]
    with Store.open(root) as store:
        assert pg.sql(url, column) == [[("bigint",)]]
        add(store, ["big2", "max2"])
    with Store.open(root) as store:  # idempotent: nothing left to do
        assert stored(store) == {**seeds, "big": 7, "max": 7} and store.db.has_wide_seeds
        assert store.verify(files=False)["ok"]
