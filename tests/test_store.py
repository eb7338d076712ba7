"""The store: round trips, rebuild, ingest idempotence, and agreement after crashes."""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import numpy as np

import pytest

from index import faults
from index import vectors as vx
from engine.errors import UserError
from index.errors import StoreDamaged, StoreInputError
from index.keys import normalise_description, sha256_file, sha256_text
from index.store import NewImage, Store
from tests import procs
from tests.helpers import db_args, run_cli

DIM = 8


def _store(tmp_path: Path, db: str | None = None) -> Store:
    return Store.create(tmp_path / "s", {"identity": "test-embedder", "arch": "x", "checkpoint": "x"}, DIM,
                        db_url=db)


def _rows(store: Store, n: int, start: int = 0, seed: int = 0) -> list[NewImage]:
    source = store.sources()[0] if store.sources() else store.add_source("a", "replay", "fp")
    desc = store.description_id("a prompt")
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return [NewImage(key=f"k{start + i}", role="resynthesis", source_id=source.id, description_id=desc,
                     file_hash=f"h{start + i}", path=f"p{start + i}", vector=v, seed=start + i)
            for i, v in enumerate(vecs)]


def _agree(store: Store) -> bool:
    return np.array_equal(np.sort(vx.index_ids(store.index)), store.vector_ids())


def test_round_trip_and_rebuild(tmp_path, db):
    with _store(tmp_path, db) as store:
        rows = _rows(store, 50)
        store.add_images(rows)
        ids = store.vector_ids()
        sims, found = vx.search_among(store.index, rows[0].vector[None], ids[:10])
    with Store.open(tmp_path / "s") as store:
        assert store.open_report.added == 0 and not store.open_report.rebuilt
        assert store.index.ntotal == 50 and _agree(store)
        again = vx.search_among(store.index, rows[0].vector[None], ids[:10])
        assert np.array_equal(found, again[1]) and np.allclose(sims, again[0])
        assert found[0, 0] == ids[0] and np.isclose(sims[0, 0], 1.0, atol=1e-5)  # itself, first
        assert set(found[0]) == set(ids[:10])  # the selector keeps exactly the candidates
        direct = store.search(rows[0].vector[None], ids[:10])  # what attribution uses: same answer
        assert np.array_equal(direct[1], found) and np.allclose(direct[0], sims, atol=1e-6)
        before = vx.index_ids(store.index)
        assert store.rebuild() == 50
        assert np.array_equal(np.sort(before), np.sort(vx.index_ids(store.index)))
        assert np.allclose(vx.search_among(store.index, rows[0].vector[None], ids[:10])[0], sims)


_CUT_UNDER_A_PROCESS = """
import sys
from pathlib import Path
import numpy as np
from index.store import Store
root = Path(sys.argv[1])
for mode in sys.argv[2:]:  # w: a writable process, r: a read-only one, s: a writable one that saves first
    with Store.open(root, writable=mode != "r") as store:
        ids = np.sort(store.vector_ids())
        before = store.vectors(ids)
        for part in root.glob("vectors.faiss*"):  # the base and its segment, each cut in place
            if not part.name.endswith(".json"):
                with open(part, "r+b") as handle:
                    handle.truncate(part.stat().st_size // 3)
        if mode == "s":  # a save first (it streams the mapped rows into a new base when the files are bad)
            store.live.dirty = True
            store.save_index()
        near = store.nearest(before[0], 3, exact=True)
        print(np.array_equal(store.vectors(ids), before), near[0][0].vector_id == ids[0], flush=True)
"""


def test_a_mapped_file_cut_short_under_a_process_is_reloaded_not_a_crash(tmp_path):
    """The index files are memory-mapped: one cut short in place under a live process killed it with SIGBUS
    at its next search. It is noticed before the pages are read, and the index reloaded from the database."""
    import subprocess
    import sys

    with _store(tmp_path) as store:
        store.add_images(_rows(store, 40))
        store.save_index()
        store.add_images(_rows(store, 10, start=40, seed=1))
        store.save_index()  # a segment beside the base
    done = subprocess.run([sys.executable, "-c", _CUT_UNDER_A_PROCESS, str(tmp_path / "s"), "w", "r", "s"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert (done.returncode, done.stdout.split()) == (0, ["True"] * 6), done.stderr[-2000:]
    assert done.stderr.count("cut short under this process") >= 3
    with Store.open(tmp_path / "s") as store:  # the writable process saved the index again
        assert store.index.ntotal == 50 and _agree(store)


_SHM_CUT = """
import os, sys
from pathlib import Path
from index.store import Store
from tests.test_store import _rows
root = Path(sys.argv[1])
with Store.open(root) as store, Store.open(root, writable=False) as reader:
    before = reader.stats()["vectors"]
    os.truncate(root / "metadata.sqlite-shm", 0)  # under both processes' mappings
    store.add_images(_rows(store, 2, start=100, seed=3))
    print(before, reader.stats()["vectors"], store.stats()["vectors"])
"""


def test_the_sqlite_shm_file_cut_short_under_a_process_is_not_a_crash(tmp_path):
    """metadata.sqlite-shm cut to zero under open connections: their next read was SIGBUS (SQLite maps it)."""
    import subprocess
    import sys

    with _store(tmp_path) as store:
        store.add_images(_rows(store, 3))
    done = subprocess.run([sys.executable, "-c", _SHM_CUT, str(tmp_path / "s")], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent.parent)
    assert (done.returncode, done.stdout.split()) == (0, ["3", "5", "5"]), done.stderr[-2000:]


def test_a_vector_damaged_in_the_file_under_a_process_is_scored_as_stored(tmp_path):
    """An open checks the index file's vectors on a sample; a vector changed on disk afterwards (in place,
    under the process, the mapping sees it) was scored as it read. Every scored vector is checked against
    the database's checksum: the stored one is used, the live index repaired, and the next save rewrites."""
    with _store(tmp_path) as store:
        rows = _rows(store, 20)
        store.add_images(rows)
        store.save_index()
    with Store.open(tmp_path / "s") as store:
        refs = store.resyntheses(store.description_id("a prompt"))
        ids = np.array([r.vector_id for r in refs], np.int64)
        sums = {r.vector_id: r.checksum for r in refs}
        right = store.search(rows[3].vector[None], ids, sums)
        path = tmp_path / "s" / "vectors.faiss"
        data = bytearray(path.read_bytes())
        at = data.find(np.asarray(rows[3].vector, np.float32).tobytes())
        data[at:at + 4 * DIM] = np.asarray(-rows[3].vector, np.float32).tobytes()  # its opposite, same size
        with open(path, "r+b") as handle:
            handle.write(data)
        assert store.search(rows[3].vector[None], ids)[0][0, -1] < -0.99  # unchecked: the damage shows
        again = store.search(rows[3].vector[None], ids, sums)
        assert np.array_equal(again[1], right[1]) and np.allclose(again[0], right[0])
        assert np.allclose(store.vectors(ids[3:4]), rows[3].vector)  # replaced in the live index
        _sql(store, f"UPDATE vectors SET checksum = NULL WHERE id = {int(ids[5])}")  # an older row: none to check
        unchecked = store.resyntheses(store.description_id("a prompt"))
        assert store.search(rows[5].vector[None], ids, {r.vector_id: r.checksum for r in unchecked})[1][0, 0] == ids[5]
    with Store.open(tmp_path / "s") as store:  # and the file written again at close
        assert store.open_report.rebuilt is False and store.verify(files=False)["ok"]


def test_index_behind_database_is_repaired(tmp_path, db):
    """Crash after the database commit, before the index file was saved."""
    with _store(tmp_path, db) as store:
        store.add_images(_rows(store, 20))
    store = Store.open(tmp_path / "s")
    store.add_images(_rows(store, 7, start=20, seed=1))
    with faults.skipping("close:publish"):  # dies here: the committed rows never reach the FAISS file
        store.close()
    with Store.open(tmp_path / "s") as store:
        assert store.open_report.added == 7 and store.index.ntotal == 27 and _agree(store)


def test_index_ahead_of_database_is_repaired(tmp_path, db):
    """Crash after a delete committed in the database, before the index was saved."""
    with _store(tmp_path, db) as store:
        store.add_images(_rows(store, 20))
        store.save_index()
        saved = (tmp_path / "s" / "vectors.faiss").read_bytes()
        store.remove_source("a")
    (tmp_path / "s" / "vectors.faiss").write_bytes(saved)  # the old, larger index survives the "crash"
    with Store.open(tmp_path / "s") as store:
        assert store.open_report.removed == 20 and store.index.ntotal == 0 and _agree(store)


def test_torn_or_missing_index_file_is_rebuilt(tmp_path, db):
    with _store(tmp_path, db) as store:
        store.add_images(_rows(store, 30))
    path = tmp_path / "s" / "vectors.faiss"
    path.write_bytes(path.read_bytes()[:100])  # torn write (what atomic publish prevents)
    with Store.open(tmp_path / "s") as store:
        assert store.open_report.rebuilt and store.index.ntotal == 30 and _agree(store)
    path.unlink()
    with Store.open(tmp_path / "s", writable=False) as store:
        assert store.open_report.rebuilt and store.index.ntotal == 30
    assert not path.exists()  # a read-only open repairs in memory and writes nothing


def test_deleted_ids_are_never_reused(tmp_path, db):
    with _store(tmp_path, db) as store:
        store.add_images(_rows(store, 5))
        first = set(store.vector_ids().tolist())
        store.remove_source("a")
        store.add_images(_rows(store, 5, start=5))
        assert len(first) == 5 and not first & set(store.vector_ids().tolist())
    with Store.open(tmp_path / "s") as store:  # not even after a reopen (a new connection, a new process)
        seen = set(store.vector_ids().tolist())
        store.remove_source("a")
        store.add_images(_rows(store, 3, start=10))
        assert len(seen) == 5 and not (first | seen) & set(store.vector_ids().tolist())


def test_ingest_is_idempotent_and_links_originals(models, originals, tmp_path, db):
    store = tmp_path / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], *db_args(db)) == 0
    lines = ["image,source,description,role,original"]
    first, second = originals[0], originals[5]
    lines.append(f"{first['image']},genA,{first['prompt']},original,")
    lines.append(f"{second['image']},genB,{first['prompt']},resynthesis,{first['image']}")
    lines.append(f"{second['image']},genB,{first['prompt']},resynthesis,{first['image']}")  # duplicate row
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(lines) + "\n")
    import engine
    from index.schema import Image

    with engine.open(store) as ws:
        opened = ws.store
        report = ws.ingest(manifest, allow_outside=True)
        assert (report.added, report.skipped, report.new_sources) == (2, 1, ["genA", "genB"])
        again = ws.ingest(manifest, allow_outside=True)
        assert (again.added, again.skipped) == (0, 3)
        with opened.session() as s:
            images = {i.role: i for i in s.query(Image)}
        assert images["resynthesis"].original_id == images["original"].id
        assert opened.stats()["vectors"] == 2
        # the same bytes given again as an original: with another description, skipped and said (two copies
        # would be two queries, each a perfect reference for the other); under another source, refused
        lines.append(f"{first['image']},genA,another prompt,original,")
        manifest.write_text("\n".join(lines) + "\n")
        repeat = ws.ingest(manifest, allow_outside=True)
        assert (repeat.added, repeat.skipped) == (0, 4) and "1 original repeat the bytes" in repeat.warnings[0]
        (tmp_path / "n.csv").write_text(f"image,source,description,role\n{first['image']},genB,x,original\n")
        with pytest.raises(UserError, match=r"n.csv:2: original .* is stored already as an original of 'genA'"):
            ws.ingest(tmp_path / "n.csv", allow_outside=True)
        assert opened.stats()["vectors"] == 2
        # the same, stored by another process between ingest's check and its commit: the write refuses it too
        held = opened.originals_by_file([sha256_file(first["image"])])
        stored_id = images["original"].id
        genb = opened.source("genB")
        late = NewImage(key="late", role="original", source_id=genb.id, description_id=opened.description_id("x"),
                        file_hash=sha256_file(first["image"]), path="late.png", vector=np.ones(opened.dim, np.float32))
        with pytest.raises(StoreInputError, match="stored already as an original of 'genA'"):
            opened.add_images([late])
        late.source_id = opened.source("genA").id  # the same source, another description: the stored image kept
        assert (list(opened.add_images([late])), opened.add_images([late]).inserted) == ([stored_id], 0)
        assert opened.originals_by_file([sha256_file(first["image"])]) == held
        # new bytes given twice: the description a resynthesis has is kept, not the first (unscorable: lost)
        copy = tmp_path / "copy.png"
        shutil.copy(originals[1]["image"], copy)
        (tmp_path / "d.csv").write_text(f"image,source,description,role\n{originals[1]['image']},genA,lonely,original\n"
                                        f"{copy},genA,{first['prompt']},original\n{lines[2]}\n")
        assert ws.ingest(tmp_path / "d.csv", allow_outside=True).added == 1
        assert opened.originals_by_file([sha256_file(copy)]) == {
            sha256_file(copy): ("genA", sha256_text(normalise_description(first["prompt"])))}


def _write_big_manifest(originals, tmp_path: Path, copies: int) -> Path:
    from PIL import Image as PILImage

    lines = ["image,source,description,role,seed"]
    for c in range(copies):
        for i, o in enumerate(originals):
            path = tmp_path / "big" / f"{c}-{i}.png"
            path.parent.mkdir(exist_ok=True)
            image = PILImage.open(o["image"]).convert("RGB")
            image.putpixel((0, 0), (c % 256, c // 256, i))  # distinct bytes per copy
            image.save(path)
            lines.append(f"big/{path.name},gen-{o['source']},{o['prompt']},resynthesis,{c}")
    manifest = tmp_path / "big.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_kill_during_ingest_leaves_store_consistent(models, originals, tmp_path, db):
    store = tmp_path / "store"
    assert run_cli("init", "--store", store, "--clip-config", models["clip_config"],
                   "--clip-checkpoint", models["clip_checkpoint"], *db_args(db)) == 0
    manifest = _write_big_manifest(originals, tmp_path, copies=40)
    total = 40 * len(originals)
    proc = procs.start("ingest", manifest, "--store", store, "--quiet", "--allow-outside")
    deadline = time.time() + 60
    while time.time() < deadline and proc.alive():  # wait for some committed batches, then kill -9
        with Store.open(store, writable=False) as peek:
            if peek.stats()["vectors"] >= 64:
                break
        time.sleep(0.05)
    assert proc.alive(), "ingest finished before it could be killed"
    proc.kill()
    assert proc.wait().returncode == -signal.SIGKILL
    with Store.open(store) as opened:
        assert _agree(opened)
        partial = opened.stats()["vectors"]
        assert 0 < partial < total
    assert run_cli("ingest", manifest, "--store", store, "--quiet", "--allow-outside") == 0  # resumes
    with Store.open(store) as opened:
        assert opened.stats()["vectors"] == total and _agree(opened)


def test_a_save_between_a_commit_and_its_add_adds_nothing_twice(tmp_path):
    """add_images commits, then adds to the live index: a server's periodic save in between read the new
    vectors from the database, and the add repeated their ids (the file written next was unreadable)."""
    with _store(tmp_path) as store:
        store.add_images(_rows(store, 5))
        rows = _rows(store, 3, start=5, seed=2)
        matrix = np.stack([r.vector for r in rows])
        recorded = store.catalog.record_images(rows, matrix)
        store.live.publish()  # the save, between the two steps
        store.live.add(np.array(recorded.vector_ids, np.int64), matrix[recorded.rows])
        assert store.index.ntotal == 8 and _agree(store)
        store.save_index()
    with Store.open(tmp_path / "s") as store:
        assert not store.open_report.rebuilt and store.index.ntotal == 8 and _agree(store)


def test_two_processes_share_a_store(tmp_path, db):
    """A vector committed by another process after this one opened is found by search, not lost."""
    with _store(tmp_path, db) as first:
        rows = _rows(first, 3)
        first.add_images(rows)
        with Store.open(tmp_path / "s") as second:
            later = _rows(second, 4, start=3, seed=2)
            second.add_images(later)
            second.save_index()
            assert first.refresh()  # the file changed under `first`: swapped in, verified
            assert first.index.ntotal == 7
        more = _rows(first, 2, start=7, seed=3)
        with Store.open(tmp_path / "s") as third:
            third.add_images(more)  # committed, but `first` never reloads
        ids = first.vector_ids()
        sims, found = first.search(more[0].vector[None], ids)
        assert set(found[0]) == set(ids) and np.isclose(sims[0].max(), 1.0, atol=1e-5)


def test_the_index_stays_mapped_through_writes(tmp_path):
    """A process scores from the mapped file (no private copy of every vector), and writes without
    copying it either: added vectors go to a small delta, removed ids are filtered out; a save streams
    the next file and maps it; what it wrote is in the next process's index."""
    store = _store(tmp_path)
    store.add_images(_rows(store, 20))
    store.close()
    store = Store.open(tmp_path / "s")
    assert isinstance(store.index, vx.MappedIndex)
    before = store.search(np.ones((1, store.dim), np.float32), np.arange(1, 21))
    assert len(before[1][0]) == 20 and _agree(store)
    store.add_images(_rows(store, 5, start=20))
    assert isinstance(store.index, vx.MappedIndex) and store.index.delta.ntotal == 5
    assert store.index.ntotal == 25 and _agree(store)
    after = store.search(np.ones((1, store.dim), np.float32), np.arange(1, 21))
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6)
    store.save_index()  # streamed from the mapping, then mapped: the delta is empty again
    assert isinstance(store.index, vx.MappedIndex) and store.index.delta.ntotal == 0 and _agree(store)
    store.close()
    with Store.open(tmp_path / "s") as again:
        assert again.index.ntotal == 25 and _agree(again) and again.open_report.digest


def test_mapped_index_behaves_as_the_faiss_index_it_stands_for(tmp_path):
    """Adds, removes, filtered and unfiltered searches, reconstruction and the saved bytes of a mapped
    index with a delta equal those of the plain FAISS index with the same changes."""
    rng = np.random.default_rng(5)
    def unit(n):
        x = rng.normal(size=(n, DIM)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    plain = vx.new_index(DIM)
    plain.add_with_ids(unit(300), np.arange(1, 301))
    vx.write_atomic(plain, tmp_path / "a.faiss")
    mapped, problem = vx.read_checked(tmp_path / "a.faiss", DIM, mapped=True)
    assert problem is None and isinstance(mapped, vx.MappedIndex)
    extra = unit(40)
    for index in (plain, mapped):
        index.add_with_ids(extra, np.arange(301, 341))
    gone = np.array([3, 50, 301, 333, 999])
    assert plain.remove_ids(gone) == mapped.remove_ids(gone) == 4
    assert plain.ntotal == mapped.ntotal == 336
    np.testing.assert_array_equal(np.sort(vx.index_ids(plain)), np.sort(vx.index_ids(mapped)))
    queries = unit(6)
    for k in (1, 10, 400):
        np.testing.assert_allclose(plain.search(queries, k)[0], mapped.search(queries, k)[0], atol=1e-6)
    wanted = np.array([1, 3, 7, 50, 200, 301, 302, 333, 340])
    a, b = vx.search_among(plain, queries, wanted), vx.search_among(mapped, queries, wanted)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    np.testing.assert_array_equal(plain.reconstruct_batch(np.array([340, 2, 302])),
                                  mapped.reconstruct_batch(np.array([340, 2, 302])))
    with pytest.raises(RuntimeError):
        mapped.reconstruct_batch(np.array([50]))
    vx.write_atomic(plain, tmp_path / "plain.faiss")
    vx.write_atomic(mapped, tmp_path / "streamed.faiss")
    assert (tmp_path / "plain.faiss").read_bytes() == (tmp_path / "streamed.faiss").read_bytes()


def _sql(store: Store, statement: str) -> None:
    """A hand edit of the database, behind the store's back (what another tool could do)."""
    with store.db.write_engine.begin() as conn:
        conn.exec_driver_sql(statement)


def test_open_compares_ids_by_the_database_digest(tmp_path, db):
    """An open reads no id list when the database's trigger-kept digest matches the file's ids, or
    when the file is only behind by newer ids (the watermark); anything else falls back to the full
    comparison, which still catches lost rows; a hand-edited digest is recomputed, never trusted."""
    with _store(tmp_path, db) as store:
        store.add_images(_rows(store, 20))
    with faults.observing("ids:full-read") as full_reads:
        _digest_checks(tmp_path, full_reads)


def _digest_checks(tmp_path: Path, full_reads: list) -> None:
    with faults.skipping("close:publish"), Store.open(tmp_path / "s") as store:  # dies before publishing:
        assert store.open_report.digest and store.open_report.checked == 20 and not full_reads
        store.add_images(_rows(store, 7, start=20, seed=1))  # the file is 7 vectors behind
    with Store.open(tmp_path / "s", writable=False) as store:
        assert store.open_report.digest and store.open_report.added == 7 and not full_reads
    with Store.open(tmp_path / "s") as store:
        assert store.open_report.digest and store.index.ntotal == 27 and not full_reads
        store.remove_source("a")  # cascaded deletes keep the digest too
        store.add_images(_rows(store, 4, start=40, seed=2))
        assert store.verify(files=False)["database"]["id_digest"] == "ok" and _agree(store)
    full_reads.clear()  # verify and _agree read every id on purpose
    with Store.open(tmp_path / "s") as store:
        assert store.open_report.digest and store.index.ntotal == 4 and not full_reads
        _sql(store, "UPDATE vector_sets SET n = n + 1")  # a hand edit: never trusted
    with Store.open(tmp_path / "s", writable=False) as store:
        assert not store.open_report.digest and full_reads and "vector_sets" in " ".join(store.open_report.notes)
        assert store.verify(files=False)["database"]["id_digest"] == "stale"
    with Store.open(tmp_path / "s") as store:  # a writable open recomputes it
        assert any("recomputed" in n for n in store.open_report.notes)
    full_reads.clear()
    with faults.skipping("close:publish"), Store.open(tmp_path / "s") as store:
        assert store.open_report.digest and not full_reads
        lost = int(vx.index_ids(store.index).max())
        _sql(store, f"DELETE FROM vectors WHERE id = {lost}")  # a row lost with no tombstone
    with pytest.raises(StoreDamaged, match="database lost data"):
        Store.open(tmp_path / "s")
    assert full_reads


def test_labelled_vectors_and_added_images(tmp_path, db):
    """`labelled_vectors` lists every image with a vector of the store's embedder, with its labels, by
    image id (what evaluation reads); `add_images` returns the image ids and how many were new."""
    with _store(tmp_path, db) as store:
        first = store.add_images(_rows(store, 3))
        assert first.inserted == 3
        other = store.add_source("b", "replay", "fp-b")
        desc = store.description_id("another prompt")
        vec = np.full(DIM, 0.5, np.float32)
        again = store.add_images(_rows(store, 2, start=2) + [NewImage(
            key="o1", role="original", source_id=other.id, description_id=desc, file_hash="ho", path="images/o.png",
            vector=vec)])
        assert again.inserted == 2 and list(again[:1]) == [first[2]]
        store.add_vectors("other-embedder", [first[0]], vec[None])  # another embedder's: not listed
        rows = store.labelled_vectors()
        assert [r.id for r in rows] == sorted(first) + list(again[1:])
        last = rows[-1]
        assert (last.role, last.source, last.description_id, last.seed, last.original_id, last.file_hash,
                last.path) == ("original", "b", desc, None, None, "ho", "images/o.png")
        assert last.vector.dtype == np.float32 and np.array_equal(last.vector, vec)
        assert rows[0].role == "resynthesis" and rows[0].source == "a" and rows[0].seed == 0
        with pytest.raises(AttributeError):
            rows[0].role = "original"  # frozen
        assert store.add_images([]).inserted == 0


def test_a_stored_image_is_read_only_as_the_bytes_its_row_recorded(tmp_path):
    """checked_image: the bytes when they match the recorded sha256; the store's damage when the file is altered
    or gone (an ingested original's own path, outside the store, is not put in the message: HTTP clients read it)."""
    import hashlib

    from index.errors import StoreDamaged

    outside = tmp_path / "evidence" / "suspect-42.png"
    outside.parent.mkdir()
    outside.write_bytes(b"original bytes")
    with _store(tmp_path) as store:
        row = _rows(store, 1)[0]
        row.path, row.file_hash, row.role = str(outside), hashlib.sha256(b"original bytes").hexdigest(), "original"
        store.add_images([row])
        image_id = 1
        assert store.catalog.image_file_row(image_id)[0] == str(outside)
        assert store.checked_image(image_id) == b"original bytes" and store.checked_image(10 ** 9) is None
        for spoil in ("altered", "gone"):
            if spoil == "altered":
                outside.write_bytes(b"original bytez")
            else:
                outside.unlink()
            with pytest.raises(StoreDamaged) as damaged:
                store.checked_image(image_id)
            message = str(damaged.value)
            assert f"stored image {image_id}" in message and "evidence" not in message, message
            assert store.image_bytes(image_id) is None
