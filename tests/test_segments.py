"""Saves proportional to what changed: the live index as a base file plus segments named by a manifest
(index/segments.py). A save adds a segment and leaves the base alone; removals persist as a removed-ids
file; segments merge past MAX_SEGMENTS and fold into a new base past COMPACT_FRACTION; other processes
see each publication; a kill -9 at every publishing step loses nothing and leaves nothing half-read.

No models: vectors are deterministic random unit vectors of size 16, derived from their keys.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from index import segments
from index import vectors as vx
from index.faults import ENV, observing
from index.store import NewImage, Store

DIM = 16
REPO = Path(__file__).resolve().parents[1]
EMBEDDER = {"identity": "test-embedder", "arch": "x", "checkpoint": "x"}


def vec_for(key: str) -> np.ndarray:
    v = np.random.default_rng(zlib.crc32(key.encode())).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _rows(store: Store, keys: list[str], source: str = "a") -> list[NewImage]:
    src = store.ensure_source(source, "replay", f"fp-{source}")
    desc = store.description_id("a prompt")
    return [NewImage(key=k, role="resynthesis", source_id=src.id, description_id=desc, file_hash=f"h-{k}",
                     path=f"images/{source}/{k}.png", vector=vec_for(k), seed=i) for i, k in enumerate(keys)]


def _keys(n: int, start: int = 0, prefix: str = "k") -> list[str]:
    return [f"{prefix}{i}" for i in range(start, start + n)]


def _make(tmp_path: Path, n: int = 200) -> Path:
    """A store whose base file holds `n` vectors (source a) and 10 of source b."""
    root = tmp_path / "s"
    with Store.create(root, EMBEDDER, DIM) as store:
        store.add_images(_rows(store, _keys(n)))
        store.add_images(_rows(store, _keys(10, prefix="b"), source="b"))
    assert not segments.manifest_path(root / "vectors.faiss").exists()  # one base file, as before segments
    return root


def _parts(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if segments.PART_RE.match(p.name))


def _agrees(store: Store) -> bool:
    """The served index holds exactly the database's ids, each with its own vector."""
    ids = store.vector_ids()
    if not np.array_equal(np.sort(vx.index_ids(store.index)), ids):
        return False
    found = store.existing_keys([k for k in _all_keys(store)])
    keys = {v: k for k, v in found.items()}
    matrix = store.vectors(ids)
    return all(np.allclose(row, vec_for(keys[int(i)]), atol=1e-6) for i, row in zip(ids, matrix))


def _all_keys(store: Store) -> list[str]:
    from sqlalchemy import select

    from index.schema import Image

    with store.session() as s:
        return list(s.scalars(select(Image.key)))


def test_a_save_adds_a_segment_and_leaves_the_base_alone(tmp_path):
    root = _make(tmp_path)
    base = root / "vectors.faiss"
    before = (base.stat().st_ino, base.read_bytes())
    with Store.open(root) as store:
        store.add_images(_rows(store, _keys(5, start=500)))
        store.save_index()
        assert isinstance(store.index, vx.MappedIndex) and store.index.delta.ntotal == 0
        assert len(store.index.segments) == 1 and _agrees(store)
        store.add_images(_rows(store, _keys(3, start=600)))
    assert (base.stat().st_ino, base.read_bytes()) == before  # never rewritten
    assert len(_parts(root)) == 2 and segments.manifest_path(base).exists()
    with Store.open(root) as again:  # the base and both segments, verified by digest
        assert again.open_report.digest and again.open_report.added == 0 and not again.open_report.notes
        assert again.index.ntotal == 218 and _agrees(again)
        assert again.verify(files=False)["ok"]
    index, why = vx.read_checked(base, DIM)  # the in-memory form holds the segments too
    assert why is None and index.ntotal == 218


def test_removals_persist_as_a_removed_ids_file(tmp_path):
    root = _make(tmp_path)
    base = root / "vectors.faiss"
    before = base.stat().st_ino
    with Store.open(root) as store:
        store.add_images(_rows(store, _keys(4, prefix="c"), source="c"))
        store.save_index()
        with observing("ids:full-read") as full_reads:
            assert store.remove_source("b") == 10 and store.remove_source("c") == 4  # base rows, segment rows
            store.add_images(_rows(store, _keys(2, start=900)))
            store.save_index()
        assert not full_reads  # each save compared ids by the cached digests, never read them all
        assert vx.index_digest(store.index)[0] == vx.id_digest(store.vector_ids()) and _agrees(store)
    assert base.stat().st_ino == before
    assert len([p for p in _parts(root) if ".del-" in p]) == 1  # the superseded removed-ids file went
    with Store.open(root) as again:
        assert again.open_report.digest and again.open_report.removed == 0
        assert again.index.ntotal == 202 and _agrees(again) and again.verify(files=False)["ok"]


def test_segments_merge_then_fold_into_a_new_base(tmp_path, monkeypatch):
    root = _make(tmp_path)
    base = root / "vectors.faiss"
    monkeypatch.setattr(segments, "MAX_SEGMENTS", 3)
    with Store.open(root) as store:
        for k in range(4):
            store.add_images(_rows(store, _keys(2, start=1000 + 10 * k)))
            store.save_index()
        assert len(store.index.segments) == 1 and store.index.segments[0].ntotal == 8  # merged at the 4th
        store.remove_source("b")
        assert _agrees(store)
        inode = base.stat().st_ino
        store.add_images(_rows(store, _keys(60, start=2000)))  # past COMPACT_FRACTION of the base
        store.save_index()
        assert base.stat().st_ino != inode and not store.index.segments and not len(store.index.removed)
        assert _agrees(store)
    assert _parts(root) == [] and not segments.manifest_path(base).exists()
    with Store.open(root) as again:
        assert again.open_report.digest and again.index.ntotal == 268 and _agrees(again)


def test_other_processes_see_each_publication(tmp_path):
    """A reader's refresh notices a segment (the manifest changed, the base did not); two writers that
    publish in turn add segments over each other's, never a whole new base."""
    root = _make(tmp_path)
    base = root / "vectors.faiss"
    inode = base.stat().st_ino
    reader = Store.open(root, writable=False)
    first, second = Store.open(root), Store.open(root)
    try:
        first.add_images(_rows(first, _keys(5, start=500)))
        first.save_index()
        # `second` did not refresh: its save finds the disk's manifest moved on and adds over it
        second.add_images(_rows(second, _keys(5, start=600)))
        second.save_index()
        first.add_images(_rows(first, _keys(5, start=700)))
        first.save_index()
        assert reader.refresh() and reader.index.ntotal == 225 and _agrees(reader)
        assert not reader.refresh()
        for store in (first, second):
            store.refresh()
            assert _agrees(store)
        assert base.stat().st_ino == inode and len(_parts(root)) == 3
        first.rebuild(search=False)  # a new base, under second's feet: its next save adds over that one
        assert _parts(root) == []
        inode = base.stat().st_ino
        second.add_images(_rows(second, _keys(5, start=800)))
        second.save_index()
        assert base.stat().st_ino == inode and len(_parts(root)) == 1 and _agrees(second)
        assert reader.refresh() and reader.index.ntotal == 230 and _agrees(reader)
    finally:
        for store in (reader, first, second):
            store.close()


def test_a_store_with_a_single_index_file_still_opens(tmp_path):
    """Before segments a store had vectors.faiss alone; so does one whose manifest is lost or stale."""
    root = _make(tmp_path)
    with Store.open(root) as store:
        store.add_images(_rows(store, _keys(5, start=500)))
    segments.manifest_path(root / "vectors.faiss").unlink()  # the segments are now unnamed
    with Store.open(root) as store:
        assert store.open_report.added == 5 and store.index.ntotal == 215 and _agrees(store)
        report = store.verify(files=False)
    with Store.open(root) as store:
        assert store.open_report.digest and _agrees(store)
    assert report["index"]["segments"]["manifest"] == "ok" and report["ok"]  # the open saved a segment


def test_a_broken_segment_is_left_out_and_read_from_the_database(tmp_path):
    root = _make(tmp_path)
    with Store.open(root) as store:
        store.add_images(_rows(store, _keys(5, start=500)))
    segment = root / next(p for p in _parts(root) if ".seg-" in p)
    segment.write_bytes(segment.read_bytes()[:-8])  # torn (a manifest never names a torn file: hand damage)
    with Store.open(root) as store:
        assert store.open_report.added == 5 and _agrees(store)
        assert any("segments left out" in note for note in store.open_report.notes)
    with Store.open(root) as store:  # the open above rewrote one base from what it verified
        assert not store.open_report.notes and _agrees(store)
    assert _parts(root) == []


def test_verify_reports_and_repair_removes_unnamed_segment_files(tmp_path):
    root = _make(tmp_path)
    with Store.open(root) as store:
        store.add_images(_rows(store, _keys(5, start=500)))
    stray = root / "vectors.faiss.seg-000099-0123abcd"
    stray.write_bytes(b"left by a save that died before its manifest")
    with Store.open(root) as store:
        report = store.verify(files=False)
        assert not report["ok"] and report["index"]["segments"]["leftover_files"] == [stray.name]
        assert report["index"]["segments"]["segments"] == 1
        store.verify(repair=True, files=False)
        assert store.verify(files=False)["ok"] and _agrees(store)
    assert not stray.exists()


# ----- kill -9 at each publishing step -------------------------------------------------------------
CHILD = r'''
import os, sys, zlib
import numpy as np
from pathlib import Path
sys.path.insert(0, os.environ["REPO"])
from index.store import Store, NewImage

def vec_for(key):
    v = np.random.default_rng(zlib.crc32(key.encode())).normal(size=16).astype(np.float32)
    return v / np.linalg.norm(v)

root, action, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
store = Store.open(root)
if action == "add":
    src = store.ensure_source("a", "replay", "fp-a")
    desc = store.description_id("a prompt")
    store.add_images([NewImage(key=f"new{i}", role="resynthesis", source_id=src.id, description_id=desc,
                               file_hash="h", path=f"images/a/new{i}.png", vector=vec_for(f"new{i}"))
                      for i in range(n)])
    print("committed", flush=True)
    store.save_index()
elif action == "loop":  # n saves of 3 new vectors each: segments, merges and rewrites
    src = store.ensure_source("a", "replay", "fp-a")
    desc = store.description_id("a prompt")
    for k in range(n):
        store.add_images([NewImage(key=f"loop{k}-{i}", role="resynthesis", source_id=src.id, description_id=desc,
                                   file_hash="h", path=f"images/a/loop{k}-{i}.png", vector=vec_for(f"loop{k}-{i}"))
                          for i in range(3)])
        store.save_index()
else:
    store.remove_source("b")  # commits, then saves
store.close()
print("done", flush=True)
'''


def _child(tmp_path: Path, root: Path, crash_at: str, action: str, n: int = 0) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "REPO": str(REPO), ENV: crash_at}
    return subprocess.run([sys.executable, str(script), str(root), action, str(n)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)


@pytest.mark.parametrize("crash_at,action,n", [
    ("index:segment-before-replace", "add", 5), ("index:removed-before-replace", "remove", 0),
    ("index:manifest-before-replace", "add", 5), ("index:manifest-before-replace", "remove", 0),
    ("index:manifest-replaced", "add", 5), ("index:before-replace", "add", 5),
    ("index:before-replace", "add", 80), ("index:base-replaced", "add", 80)])
def test_kill_at_each_publishing_step_loses_nothing(tmp_path, crash_at, action, n):
    root = _make(tmp_path)
    with Store.open(root) as store:  # a segment and a removed-ids file already published
        store.add_images(_rows(store, _keys(4, prefix="c"), source="c"))
        store.save_index()
        store.remove_source("c")
    out = _child(tmp_path, root, crash_at, action, n)
    assert out.returncode == -9, out.stderr[-2000:]
    assert "committed" in out.stdout or action == "remove"
    index, why = vx.read_checked(root / "vectors.faiss", DIM)  # what is published is whole
    assert index is not None and why is None
    with Store.open(root) as store:
        assert _agrees(store) and store.index.ntotal == (210 + n if action == "add" else 200)
        assert store.open_report.digest or store.open_report.removed or store.open_report.added
        store.add_images(_rows(store, _keys(1, prefix="z")))  # the next save clears what the kill left
    assert not segments.leftovers(root / "vectors.faiss")
    assert not list(root.glob(".*.tmp"))  # the killed save's temporary file went at the open
    with Store.open(root) as store:
        assert _agrees(store) and store.verify(files=False)["ok"]


def test_a_mapped_index_with_segments_behaves_as_the_faiss_index_it_stands_for(tmp_path):
    """Base + segments + removed ids + delta answer searches, filtered searches and reconstruction as
    the plain FAISS index with the same changes, and stream the same bytes faiss.write_index gives."""
    rng = np.random.default_rng(7)

    def unit(n):
        x = rng.normal(size=(n, DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    path = tmp_path / "a.faiss"
    plain = vx.new_index(DIM)
    plain.add_with_ids(unit(300), rng.permutation(np.arange(1, 301)))  # out of order: no binary search
    vx.write_atomic(plain, path)
    manifest = None
    for start in (301, 341):  # two segments published over the base
        mapped, _ = vx.read_checked(path, DIM, mapped=True)
        extra = unit(40)
        plain.add_with_ids(extra, np.arange(start, start + 40))
        mapped.add_with_ids(extra, np.arange(start, start + 40))
        gone = np.array([start - 5, 7])
        plain.remove_ids(gone)
        mapped.remove_ids(gone)
        manifest = segments.append(path, mapped.manifest, lambda h, m=mapped: m.stream_to(h, 1 + len(m.segments)),
                                   40, mapped.removed, False)
    mapped, problem = vx.read_checked(path, DIM, mapped=True)
    assert problem is None and mapped.manifest == manifest and len(mapped.segments) == 2
    extra = unit(10)
    for index in (plain, mapped):
        index.add_with_ids(extra, np.arange(400, 410))
        assert index.remove_ids(np.array([3, 320, 350, 405, 9999])) == 4
    assert plain.ntotal == mapped.ntotal == 300 + 80 + 10 - 3 - 4
    assert vx.index_digest(mapped) == vx.index_digest(plain)
    queries = unit(5)
    for params in (None, vx.faiss.SearchParameters(sel=vx.faiss.IDSelectorBatch(np.arange(1, 410, 3)))):
        want, got = plain.search(queries, 20, params=params), mapped.search(queries, 20, params=params)
        np.testing.assert_array_equal(want[1], got[1])
        np.testing.assert_allclose(want[0], got[0], rtol=1e-6)
    some = np.array([1, 301, 345, 380, 409])
    np.testing.assert_array_equal(plain.reconstruct_batch(some), mapped.reconstruct_batch(some))
    with pytest.raises(RuntimeError):
        mapped.reconstruct_batch(np.array([320]))
    streamed = tmp_path / "streamed"
    with open(streamed, "wb") as handle:
        mapped.stream_to(handle)
    assert streamed.read_bytes() == vx.faiss.serialize_index(plain).tobytes()


def test_remove_stale_temp_files_takes_unnamed_segment_files(tmp_path):
    root = _make(tmp_path)
    with Store.open(root) as store:
        store.add_images(_rows(store, _keys(5, start=500)))
        store.save_index()
        named = _parts(root)
        stray = root / "vectors.faiss.del-000042-89abcdef"
        stray.write_bytes(np.arange(3, dtype="<i8").tobytes())
        assert store.remove_stale_temp_files() == [stray.name] and _parts(root) == named
        assert _agrees(store)


def test_readers_see_whole_states_while_a_writer_publishes(tmp_path):
    """Another process adds and saves in a loop (segments, then a rewrite past a quarter of the base);
    every read of the index in the meantime is whole: readable, no id twice, never fewer vectors."""
    root = _make(tmp_path)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    writer = subprocess.Popen([sys.executable, str(script), str(root), "loop", "30"], cwd=REPO,
                              env={**os.environ, "REPO": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, reads = 0, 0
    while writer.poll() is None or not reads:
        index, why = vx.read_checked(root / "vectors.faiss", DIM, mapped=True)
        assert index is not None and why is None and not index.problem
        ids = vx.index_ids(index)
        assert len(np.unique(ids)) == len(ids) >= seen
        seen, reads = len(ids), reads + 1
    assert writer.returncode == 0, writer.stderr.read()
    with Store.open(root) as store:
        assert store.index.ntotal == 300 and _agrees(store)


# ----- damaged parts: never a traceback, never a wrong answer ------------------------------------
def _segmented(tmp_path: Path) -> Path:
    """_make's store with two segments and a removed-ids file published (source b removed)."""
    root = _make(tmp_path)
    with Store.open(root) as store:
        store.add_images(_rows(store, _keys(4, prefix="c"), source="c"))
        store.save_index()
        store.add_images(_rows(store, _keys(5, start=500)))
        store.save_index()
        store.remove_source("b")
    return root


def _manifest(root: Path) -> dict:
    import json

    return json.loads(segments.manifest_path(root / "vectors.faiss").read_text())


def test_a_malformed_manifest_is_left_out_never_a_traceback(tmp_path):
    """A manifest over the right base whose fields are missing or of the wrong type (hand-edited, or
    written by a foreign tool) is left out as a whole at read: verify, open and save never meet a
    missing key or a wrong type."""
    import json
    import shutil

    source = _segmented(tmp_path)
    good = _manifest(source)
    damage = {"no generation": lambda m: m.pop("generation"), "n a string": lambda m: m["segments"][0].update(n="4"),
              "removed without file": lambda m: m["removed"].pop("file")}
    for k, (what, change) in enumerate(damage.items()):
        root = tmp_path / f"copy{k}"
        shutil.copytree(source, root)  # (copy2: the base keeps its mtime, so the manifest still names it)
        manifest = json.loads(json.dumps(good))
        change(manifest)
        segments.manifest_path(root / "vectors.faiss").write_text(json.dumps(manifest))
        with Store.open(root, writable=False) as reader:
            report = reader.verify(files=False)
            assert _agrees(reader), what
        assert "malformed" in report["index"]["segments"]["manifest"] and not report["ok"], what
    with Store.open(root) as store:  # the writable open writes one base over what it verified
        assert any("malformed" in note for note in store.open_report.notes) and _agrees(store)
    with Store.open(root, writable=False) as again:
        assert again.verify(files=False)["ok"]


def test_a_removed_id_added_back_by_a_repair_is_saved_in_a_new_base(tmp_path):
    """A removed-ids file damaged to name a live vector: the open adds that vector back from the
    database; its save must not publish it as a segment (the removed ids hide every file's rows, so it
    would vanish from the served index) but write a new base."""
    root = _segmented(tmp_path)
    removed = root / _manifest(root)["removed"]["file"]
    data = bytearray(removed.read_bytes())
    data[0] ^= 0x80  # the first removed id (201, a row of b) becomes 73, a live row of a: still sorted
    removed.write_bytes(bytes(data))
    with Store.open(root) as store:
        assert store.open_report.added == 1 and store.open_report.removed == 1
        assert _agrees(store) and store.index.ntotal == 209
    with Store.open(root, writable=False) as again:
        assert not again.open_report.notes and _agrees(again)


def test_a_removed_ids_file_with_an_id_twice_is_left_out_and_the_repair_persists(tmp_path):
    """A removed-ids file naming one id twice (and so missing another) was taken at its count: the open
    repaired the index in memory, but its save saw nothing unsaved, so every open repaired it again."""
    root = _segmented(tmp_path)
    removed = root / _manifest(root)["removed"]["file"]
    data = removed.read_bytes()
    removed.write_bytes(data[:8] + data[:8] + data[16:])
    with Store.open(root) as store:
        assert any("not sorted and distinct" in note for note in store.open_report.notes) and _agrees(store)
    with Store.open(root, writable=False) as again:
        assert not again.open_report.notes and _agrees(again)


def test_an_id_with_its_top_bit_flipped_is_caught_though_the_digest_agrees(tmp_path):
    """The id digest is taken modulo 2^62, so an id with its sign bit flipped passed it and the open
    served a vector under a negative id (searches returned an id no row has). Ids no database gives
    are refused before the digest is trusted: the index is rebuilt; verify names them."""
    root = _segmented(tmp_path)
    segment = root / _manifest(root)["segments"][-1]["file"]
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0x80  # the sign bit of the last id
    segment.write_bytes(bytes(data))
    with Store.open(root, writable=False) as reader:
        assert reader.open_report.rebuilt and _agrees(reader)
        report = reader.verify(files=False)
    assert report["index"]["impossible_ids"] == 1 and report["index"]["lost_from_database"] == 0


def test_a_damaged_id_in_a_segment_is_rebuilt_not_called_lost_data(tmp_path):
    """A segment whose id map got a flipped byte (and its vector one too) holds a stored vector under an
    id the database never gave: the file is damaged, not the database, so the open rebuilds from the
    database rather than refusing with advice to restore a healthy database from a backup; verify says
    which it is."""
    root = _segmented(tmp_path)
    segment = root / _manifest(root)["segments"][-1]["file"]
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF  # a high byte of the last id
    data[-8 * 5 - 8 - 60] ^= 0x01  # and a byte of its vector (the last of the 5 rows, before the id map)
    segment.write_bytes(bytes(data))
    with Store.open(root, writable=False) as reader:
        assert reader.open_report.rebuilt and _agrees(reader)
        report = reader.verify(files=False)
    assert report["index"]["misnumbered"] == 1 and report["index"]["lost_from_database"] == 0
    assert any("id map is damaged" in p for p in report["problems"])
    with Store.open(root) as store:
        assert _agrees(store)
    with Store.open(root) as store:
        assert not store.open_report.notes and store.verify(files=False)["ok"]


def test_leftovers_the_machine_will_not_remove_never_fail_a_save_and_a_read_only_store_keeps_them(tmp_path):
    """Removing leftovers is housekeeping: a save whose commit is done does not fail over one that cannot
    be deleted (an immutable file: not even root may), verify keeps reporting it; a store opened
    read-only deletes nothing, not even a dead writer's temporary file."""
    root = _make(tmp_path)
    stuck = root / "vectors.faiss.seg-000099-0123abcd"
    stuck.write_bytes(b"left by a save that died before its manifest")
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode:
        pytest.skip("chattr +i is refused here")
    temp = root / ".vectors.faiss.999999.tmp"  # pid 999999: no such process
    temp.write_bytes(b"left by a writer that died")
    try:
        with Store.open(root, writable=False) as reader:
            assert reader.remove_stale_temp_files() == [] and temp.exists()
        with Store.open(root) as store:
            store.add_images(_rows(store, _keys(5, start=500)))
            store.save_index()
            assert _agrees(store) and len(store.index.segments) == 1
            report = store.verify(repair=True, files=False)
            assert not any("segment files" in line for line in report["repaired"])
            assert store.verify(files=False)["index"]["segments"]["leftover_files"] == [stuck.name]
        assert stuck.exists() and not temp.exists()
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], capture_output=True)


def test_something_else_in_a_files_place_is_one_line_or_served_around(tmp_path):
    """A folder where the base (or the publish lock) belongs cannot be replaced by a save: one line naming
    it, never an IsADirectoryError traceback; a link loop where the manifest belongs is read as none."""
    import shutil

    from index.errors import StoreDamaged

    source = _segmented(tmp_path)
    folder, loop = tmp_path / "folder", tmp_path / "loop"
    for root in (folder, loop):
        shutil.copytree(source, root)
    (folder / "vectors.faiss").unlink()
    (folder / "vectors.faiss").mkdir()
    with pytest.raises(StoreDamaged, match=r"vectors.faiss \(Is a directory\).*move it away") as caught:
        Store.open(folder)
    assert "\n" not in str(caught.value)
    manifest = segments.manifest_path(loop / "vectors.faiss")
    manifest.unlink()
    manifest.symlink_to(manifest.name)
    with Store.open(loop, writable=False) as reader:
        assert _agrees(reader)
        assert "move it away" in reader.verify(files=False)["index"]["segments"]["manifest"]
    with Store.open(loop) as store:  # the save replaces the link with a manifest
        assert _agrees(store)
    assert not manifest.is_symlink()
    (loop / "store.lock").unlink()
    (loop / "store.lock").mkdir()
    store = Store.open(loop)
    store.add_images(_rows(store, _keys(2, start=700)))
    with pytest.raises(StoreDamaged, match=r"store.lock \(Is a directory\)"):
        store.save_index()
    assert _agrees(store)
    with pytest.raises(StoreDamaged, match="store.lock"):
        store.close()  # which tries the same save (and lets the database go)


@pytest.fixture
def tmpfs(tmp_path):
    """A small real tmpfs (a disk that fills up); skipped where mounting is refused (not root)."""
    target = tmp_path / "disk"
    target.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a tmpfs mount needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(target)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"this machine refuses a tmpfs mount: {done.stderr.strip()[:200]}")
    yield target
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_an_open_whose_repair_cannot_be_saved_on_a_full_disk_still_serves(tmp_path, tmpfs):
    """A writable open repairs a damaged index from the database and saves it; when the disk is full that
    save fails, but the open does not: the repaired index is served from memory, the files are left as
    they were, and the first open after space is freed saves it."""
    root, dim = tmpfs / "s", 512
    matrix = np.random.default_rng(0).normal(size=(300, dim)).astype(np.float32)  # an index of ~600 KB
    with Store.create(root, EMBEDDER, dim) as store:
        src, desc = store.ensure_source("a", "replay", "fp-a"), store.description_id("a prompt")
        store.add_images([NewImage(key=f"k{i}", role="resynthesis", source_id=src.id, description_id=desc,
                                   file_hash=f"h{i}", path=f"images/a/{i}.png", vector=row)
                          for i, row in enumerate(matrix)])
    base = root / "vectors.faiss"
    base.write_bytes(b"garbage")
    filler = tmpfs / "filler"
    stat = os.statvfs(tmpfs)
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - (160 << 10)))  # room for SQLite, not the index

    def serves(store: Store) -> bool:
        ids = store.vector_ids()
        return len(ids) == 300 and np.array_equal(np.sort(vx.index_ids(store.index)), ids) and np.array_equal(
            store.vectors(ids), matrix)
    with Store.open(root) as store:
        assert store.writable and store.open_report.rebuilt and serves(store)
        assert any("not saved" in note and "no space left" in note for note in store.open_report.notes)
    assert base.read_bytes() == b"garbage" and not list(root.glob(".*.tmp"))
    filler.unlink()
    with Store.open(root) as store:
        assert store.open_report.rebuilt and serves(store)
    with Store.open(root) as store:
        assert not store.open_report.notes and serves(store)


def test_a_segment_save_that_fails_on_a_full_disk_keeps_the_old_manifest_and_serves(tmp_path, tmpfs):
    """The disk fills between a save's steps (room for its segment, none for its manifest): one
    StoreFull line; the manifest in force is the old one, the process serves everything it added, and
    the same save succeeds once space is freed (the unnamed segment is then removed)."""
    root = tmpfs / "s"
    with Store.create(root, EMBEDDER, DIM) as store:
        store.add_images(_rows(store, _keys(200)))
    from index.errors import StoreFull

    store = Store.open(root)
    try:
        store.add_images(_rows(store, _keys(5, start=500)))
        store.save_index()
        manifest = segments.manifest_path(root / "vectors.faiss")
        before = manifest.read_bytes()
        store.add_images(_rows(store, _keys(5, start=600)))
        filler = tmpfs / "filler"
        stat = os.statvfs(tmpfs)
        filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 4096))  # one page: the segment, no manifest
        with pytest.raises(StoreFull, match="no space left"):
            store.save_index()
        assert manifest.read_bytes() == before and len(_parts(root)) == 2 and _agrees(store)
        filler.unlink()
        store.save_index()
        assert manifest.read_bytes() != before and len(_parts(root)) == 2 and _agrees(store)
    finally:
        store.close()
    with Store.open(root, writable=False) as again:
        assert again.open_report.digest and _agrees(again) and again.verify(files=False)["ok"]


def test_a_publish_lock_held_by_a_hung_process_is_one_line_not_a_hang(tmp_path, monkeypatch):
    """Another process holding store.lock (a hung save, `flock store.lock ...`) made every save wait
    forever. A save now waits RESYNTH_LOCK_TIMEOUT_S, then one StoreBusy line; it serves meanwhile and
    saves once the lock is let go. An open that would save its catch-up opens anyway."""
    import fcntl

    from index.errors import StoreBusy
    from index.faults import skipping

    root = _make(tmp_path)
    with skipping("close:publish"), Store.open(root) as store:
        store.add_images(_rows(store, _keys(3, start=900)))  # committed, not published: the index lags
    monkeypatch.setenv("RESYNTH_LOCK_TIMEOUT_S", "0.1")
    holder = os.open(root / "store.lock", os.O_RDWR)  # its own open file: a lock apart from the store's
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        store = Store.open(root)
        assert any("was not saved" in note and "store.lock" in note for note in store.open_report.notes)
        store.add_images(_rows(store, _keys(2, start=950)))
        with pytest.raises(StoreBusy, match="store.lock is held by another process") as caught:
            store.save_index()
        assert "\n" not in str(caught.value) and _agrees(store)
    finally:
        os.close(holder)
    store.save_index()
    store.close()
    with Store.open(root, writable=False) as again:
        assert not again.open_report.notes and again.index.ntotal == 215 and _agrees(again)


def test_a_copy_that_keeps_no_file_times_keeps_its_segments(tmp_path):
    """`cp -r` (no -p) gives every file of the copy a new mtime: the manifest, which named its base by size, mtime
    and id map, read as written over another base, so verify said 'index segment files no manifest names' (exit
    4) and --repair deleted them. The base is the same file: its segments are served and verify passes."""
    import shutil

    source = _segmented(tmp_path)
    root = tmp_path / "copy"
    shutil.copytree(source, root, copy_function=shutil.copyfile)  # contents only, as cp -r
    assert (root / "vectors.faiss").stat().st_mtime_ns != (source / "vectors.faiss").stat().st_mtime_ns
    with Store.open(root, writable=False) as reader:
        report = reader.verify(files=False)
        assert report["ok"], report["problems"]
        assert _agrees(reader) and reader.index.segment_ids, "its segments are served"
