"""Fifth round of attacks (docs/guarantees.md): faults nobody had tried, against real processes forked from the
tests' warm server (tests/procs.py). Memory the machine will not give (RLIMIT_AS lowered in the child: Pillow's
decode of a large image raised MemoryError, a traceback, exit 1), Ctrl-C (a real SIGINT, sent at a named write
step by RESYNTH_INTERRUPT_AT) and a `reembed` stopped after its commit (the old index's files stayed)."""
from __future__ import annotations

import io
import json
import os
import re
import resource
import signal
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.errors import StoreError
from index.faults import INTERRUPT_ENV
from index.store import NewImage, Store
from tests import procs
from tests.helpers import run_cli


def _limited(headroom: int, argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """The child: Ctrl-C as in a terminal, at most `headroom` bytes of address space past what it maps now
    (the imports are done: what is left is the command's own), then `resynth argv`."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a server started in the background ignores it
    if headroom:
        mapped = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mapped + headroom, mapped + headroom))
    procs._run(argv, env, cwd, out, err)


def _resynth(*argv, headroom: int = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder, "out"), Path(folder, "err")
        out.touch(), err.touch()
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        child = procs._forkserver().Process(target=_limited, args=(headroom, [str(a) for a in argv], environment,
                                                                   str(procs.REPO), str(out), str(err)))
        child.start()
        child.join(120)
        if child.exitcode is None:
            child.kill()
            child.join()
        return subprocess.CompletedProcess(argv, child.exitcode, out.read_text(), err.read_text())


@pytest.fixture
def one_source_store(models, tmp_path) -> Path:
    path = tmp_path / "store"
    assert run_cli("init", "--store", path, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], "--quiet") == 0
    name, folder = next(iter(models["pipelines"].items()))
    assert run_cli("source", "add", name, folder, "--store", path, "--steps", 2, "--guidance", 7, "--quiet") == 0
    return path


def test_memory_the_machine_refuses_is_one_line_and_the_store_is_untouched(one_source_store, tmp_path):
    """An image of 36 Mpixels (under the 64 Mpixel limit) decoded by a process whose address space is
    capped (ulimit -v, a container's limit): Pillow's MemoryError was a traceback, exit 1. Now one line
    naming the cause, exit 5 (HTTP 503), as every other refusal of the machine; nothing was written."""
    big = tmp_path / "big.png"
    Image.new("RGB", (6000, 6000), (10, 20, 30)).save(big)  # 120 KB on disk, 108 MB decoded
    before = sorted((p.name, p.stat().st_size) for p in one_source_store.iterdir() if p.is_file())
    done = _resynth("attribute", big, "--prompt", "a grey square", "--store", one_source_store, "--quiet", "--json",
                    headroom=60 << 20)  # one child (a second costs a CLIP load): --json says the kind too
    assert done.returncode == 5, done.stderr[-2000:]
    said = json.loads(done.stderr)  # one object on one line, not a traceback
    assert said["kind"] == "out_of_memory" and said["error"].startswith("out of memory: "), said
    assert sorted((p.name, p.stat().st_size) for p in one_source_store.iterdir() if p.is_file()) == before


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 40 % 256, 80, 200 - i)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_reembed_stopped_after_its_switch_leaves_nothing_behind(tmp_path, monkeypatch):
    """Ctrl-C (or SIGKILL) after a `reembed` committed its switch, before its clean-up (which deletes every
    old vector in one transaction: seconds on a large store): the old embedder's vectors and its index file
    stayed for good (as large as the new ones), and `verify --repair` neither reported nor removed them. The
    switch records what it supersedes; `verify` notes it, and its repair (or the rerun of reembed) drops it."""
    old, new = ({"identity": name, "arch": "x", "checkpoint": "x"} for name in ("old-embedder", "new-embedder"))
    root, rng = tmp_path / "s", np.random.default_rng(0)
    with Store.create(root, old, 8) as store:
        source, desc = store.add_source("a", "replay", "fp"), store.description_id("a prompt")
        store.add_images([NewImage(key=f"k{i}", role="resynthesis", source_id=source.id, description_id=desc,
                                   file_hash=store.write_image(f"images/fp/k{i}.png", _png(i)),
                                   path=f"images/fp/k{i}.png", vector=rng.normal(size=8).astype(np.float32), seed=i)
                          for i in range(3)])
    with Store.open(root) as store:
        ids = [image_id for image_id, _, _ in store.images_without_vector("new-embedder")]
        store.add_vectors("new-embedder", ids, rng.normal(size=(len(ids), 8)).astype(np.float32))
        monkeypatch.setenv(INTERRUPT_ENV, "reembed:after-commit")  # a real SIGINT, right after the commit
        with pytest.raises(KeyboardInterrupt):
            store.switch_embedder(new, 8)
    with Store.open(root) as store:
        assert store.embedder_identity == "new-embedder"  # the commit is the switch
        report = store.verify()
        assert report["superseded"]["vectors"] == 3 and any("reembed" in n for n in report["notes"])
        report = store.verify(repair=True)
        assert any("dropped 3 vectors of old-embedder" in d for d in report["repaired"])
        assert store.verify()["ok"] and len(store.vector_ids()) == 3
    assert sorted(p.name for p in root.glob("vectors*")) == [store.index_path.name]
    with sqlite3.connect(root / "metadata.sqlite") as db:
        left = db.execute("SELECT embedder, count(*) FROM vectors GROUP BY embedder").fetchall()
    assert left == [("new-embedder", 3)]


def test_the_clean_up_of_a_switch_leaves_a_reembed_back_and_a_stale_switch_refuses(tmp_path, monkeypatch, capsys):
    """Two processes, found in review of the record of what a switch supersedes. (1) A `reembed` back to the
    superseded embedder resumes from its vectors and adds those of images stored since: `verify --repair`
    run meanwhile deleted them all (the ones just made too), and the switch back then refused. (2) A `reembed`
    that opened the store before another one switched it named its own old embedder as superseded: the
    embedder it replaced, live until then, stayed for good, vectors and index file, and verify said ok."""
    old, new, third = ({"identity": n, "arch": "x", "checkpoint": "x"} for n in ("old-embedder", "new", "third"))
    root, rng = tmp_path / "s", np.random.default_rng(0)

    def add(store, i: int) -> None:
        source, desc = store.source("a"), store.description_id("a prompt")
        store.add_images([NewImage(key=f"k{i}", role="resynthesis", source_id=source.id, description_id=desc,
                                   file_hash=store.write_image(f"images/fp/k{i}.png", _png(i)),
                                   path=f"images/fp/k{i}.png", vector=rng.normal(size=8).astype(np.float32), seed=i)])

    def embed(store, name: str) -> None:
        ids = [image_id for image_id, _, _ in store.images_without_vector(name)]
        store.add_vectors(name, ids, rng.normal(size=(len(ids), 8)).astype(np.float32))

    with Store.create(root, old, 8) as store:
        store.add_source("a", "replay", "fp")
        add(store, 0), add(store, 1)
    with Store.open(root) as store:
        embed(store, "new")
        monkeypatch.setenv(INTERRUPT_ENV, "reembed:after-commit")
        with pytest.raises(KeyboardInterrupt):
            store.switch_embedder(new, 8)
    with Store.open(root) as store:
        add(store, 2)  # stored since: a "new" vector only
    with Store.open(root) as back:  # `reembed old-embedder`: embeds image 2, while a repair runs elsewhere
        embed(back, "old-embedder")
        assert run_cli("verify", "--repair", "--store", root) == 0
        assert back.switch_embedder(old, 8) == 3
    capsys.readouterr()
    with Store.open(root) as stale:  # (2): opened before another reembed switched
        embed(stale, "new")
        with Store.open(root) as other:
            embed(other, "third")
            other.switch_embedder(third, 8)
        with pytest.raises(StoreError, match="switched the store to third since this one opened it"):
            stale.switch_embedder(new, 8)
    with Store.open(root) as store:
        assert store.embedder_identity == "third" and store.verify()["ok"]
        assert store.verify()["unswitched"] == {"new": 3}  # no switch drops them now: verify shows them
    with sqlite3.connect(root / "metadata.sqlite") as db:
        left = db.execute("SELECT embedder, count(*) FROM vectors GROUP BY embedder ORDER BY 1").fetchall()
    assert left == [("new", 3), ("third", 3)]  # the stale run's vectors, kept for its rerun
    assert sorted(p.name for p in root.glob("vectors*")) == [store.index_path.name]


def test_a_store_deeper_than_sqlite_opens_is_one_line_that_says_so(tmp_path, capsys):
    """SQLite opens no database whose path passes about 500 bytes (file systems allow 4096): a store moved
    into a deep folder, or reached through a short link (SQLite follows it), was "unable to open database
    file: check the store folder's permissions and disk", exit 5, cut at 500 characters before the advice."""
    with Store.create(tmp_path / "s", {"identity": "e", "arch": "x", "checkpoint": "x"}, 8):
        pass
    deep = tmp_path.joinpath(*["d" * 200] * 3)
    deep.mkdir(parents=True)
    os.rename(tmp_path / "s", deep / "s")
    (tmp_path / "link").symlink_to(deep / "s")
    for store in (deep / "s", tmp_path / "link"):
        assert run_cli("stats", "--store", store) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and len(error) <= 520, error
        assert "SQLite opens no database whose path passes 504 bytes" in error and error.endswith("shorter path")


def test_names_past_the_file_system_limit_are_one_line_before_any_work(tmp_path, capsys):
    """A folder name past 255 bytes given to `triage`, or a `--report` name that leaves no room for its
    temporary file, was a traceback (OSError ENAMETOOLONG); the report's came after the attribution it was to
    hold. Both are one line, exit 2, before the store is opened."""
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    missing = tmp_path / "no-store"
    for argv, words in ((["triage", tmp_path / ("w" * 300), "--out", tmp_path / "out"], "name too long"),
                        (["attribute", image, "--prompt", "x", "--report", tmp_path / ("r" * 250 + ".html")],
                         "--report: the name")):
        assert run_cli(*argv, "--store", missing) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and words in error and "give a shorter" in error, error
    # a name its temporary file fits beside (.NAME.PID.tmp at most 255 bytes) is taken: a fixed margin refused it
    name = "r" * (255 - len(f"..{os.getpid()}.tmp") - 5) + ".html"
    (tmp_path / f".{name}.{os.getpid()}.tmp").touch()  # the file system takes the temporary name
    assert run_cli("attribute", image, "--prompt", "x", "--report", tmp_path / name, "--store", missing) == 2
    assert "no store at" in capsys.readouterr().err
    assert not missing.exists()
