"""Opening a store and answering cached queries, at several sizes: today's open against the baseline
(as before), each in a fresh process, on the same store in the same run.

  after    the index file memory-mapped; ids compared with the database by its trigger-kept digest
           (O(1), plus a range read of ids newer than the file: the watermark); writes go to a small
           delta beside the mapping, and a save streams the next file from it and maps that
  before   the index file read into memory (so a writer holds every vector); every id read from the
           database and compared

Both check a sample of vectors against their checksums. Measured per mode: seconds to open, the
process's private memory (RssAnon: what each serving process costs on its own; file-backed pages of a
mapped index are shared by every process and reclaimable) after the open and after 200 cached scorings
(10 candidates each, by id), and ms per scoring; for a writing process (once per mode), the private
memory after storing 1000 new vectors and after saving the index, and the save's time. Then a linear
fit of `after` against the size, projected to 100M vectors. Stores are built as scripts/bench_lookup.py
builds its own (768-d synthetic vectors, the tiny zoo's sources; about 2 minutes and 7.5 GB of disk per
million), kept under --stores.

    python scripts/bench_open.py [--sizes 10000,100000,1000000] [--repeats 2] [--stores DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _private_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _baseline(mode: str) -> None:
    """`before`: the whole index read into memory (and so copied by every write), every id compared."""
    import index.vectors as vx
    from index import faults

    if mode.startswith("before"):
        read = vx.read_checked
        vx.read_checked = lambda path, dim, mapped=False: read(path, dim, False)
        faults.arm("ids:digest")  # every id read and compared, as before the digest existed


def measure_write(store_dir: str, mode: str, count: int = 1000) -> dict:
    """One writing process: open, store `count` new vectors, save the index; private memory after each."""
    import os

    from index.store import NewImage, Store

    _baseline(mode)
    base = _private_mb()
    store = Store.open(Path(store_dir))
    source = store.sources()[0]
    tag = f"bench-write-{os.getpid()}-{time.time_ns()}"
    desc = store.description_id(tag)
    vectors = np.random.default_rng(1).normal(size=(count, store.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [NewImage(key=f"{tag}-{i}", role="resynthesis", source_id=source.id, description_id=desc,
                     file_hash=f"{tag}-{i}", path=f"images/{tag}-{i}.png", vector=v, seed=i)
            for i, v in enumerate(vectors)]
    started = time.perf_counter()
    store.add_images(rows)
    added_s, after_add = time.perf_counter() - started, _private_mb() - base
    started = time.perf_counter()
    store.save_index()
    saved_s, after_save = time.perf_counter() - started, _private_mb() - base
    store.close()
    return {"add_s": added_s, "private_after_add_mb": after_add, "save_s": saved_s,
            "private_after_save_mb": after_save}


def measure(store_dir: str, mode: str) -> dict:
    """One process: open, score, report (run as a child so each mode starts from a clean heap)."""
    if mode.endswith("-write"):
        return measure_write(store_dir, mode)
    from index.store import Store

    _baseline(mode)
    base = _private_mb()
    started = time.perf_counter()
    store = Store.open(Path(store_dir), writable=False)
    opened = time.perf_counter() - started
    after_open = _private_mb() - base
    total = int(store.index.ntotal)
    ids = np.random.default_rng(0).choice(np.arange(1, total + 1), 2000, replace=False)
    query = np.ones((1, store.dim), np.float32) / np.sqrt(store.dim)
    started = time.perf_counter()
    for k in range(0, 2000, 10):
        store.search(query, ids[k:k + 10])
    per = (time.perf_counter() - started) / 200 * 1000
    result = {"open_s": opened, "private_after_open_mb": after_open, "private_after_scoring_mb": _private_mb() - base,
              "ms_per_scoring": per, "vectors": total, "digest": store.open_report.digest}
    store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated vector counts")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stores", type=Path, help="keep (and reuse) the built stores here")
    parser.add_argument("--child", nargs=2, metavar=("STORE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1])))
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_lookup as bl
    from engine import zoo

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.stores or Path(tmp)
        models = zoo.write_zoo(folder / "zoo")
        table = {}
        for size in [int(x) for x in args.sizes.split(",")]:
            root = folder / f"s{size}"
            if not (root / "store.json").is_file():
                store, _ = bl.build_store(root, models, size, 768, 2, bl.World(768, len(models["pipelines"])))
                store.close()
            from index.store import Store
            Store.open(root).close()  # a writable open first: an older store gets its id digest here
            rows: dict[str, list[dict]] = {"before": [], "after": []}
            for _ in range(args.repeats):
                for mode in rows:
                    out = subprocess.run([sys.executable, __file__, "--child", str(root), mode],
                                         capture_output=True, text=True, check=True, cwd=ROOT)
                    rows[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            table[size] = {mode: {k: min(r[k] for r in runs) for k in runs[0]} for mode, runs in rows.items()}
            for mode in ("before-write", "after-write"):  # once each: every run adds to the store
                out = subprocess.run([sys.executable, __file__, "--child", str(root), mode],
                                     capture_output=True, text=True, check=True, cwd=ROOT)
                table[size][mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"768-d vectors, best of {args.repeats} fresh processes per mode and size")
    print(f"{'vectors':>9} {'mode':>7} {'open s':>7} {'private MB after open':>22} {'after 200 scorings':>19}"
          f" {'ms/scoring':>11}")
    for size, best in table.items():
        for mode, r in ((m, best[m]) for m in ("before", "after")):
            print(f"{size:>9} {mode:>7} {r['open_s']:>7.2f} {r['private_after_open_mb']:>22.0f}"
                  f" {r['private_after_scoring_mb']:>19.0f} {r['ms_per_scoring']:>11.3f}")
        b, a = best["before"], best["after"]
        print(f"{size:>9} ratios after/before: open {a['open_s'] / b['open_s']:.2f}x, private memory "
              f"{a['private_after_scoring_mb'] / max(b['private_after_scoring_mb'], 1e-9):.2f}x, "
              f"scoring {a['ms_per_scoring'] / b['ms_per_scoring']:.2f}x")
    print(f"\n{'vectors':>9} {'writer':>7} {'add 1000 s':>11} {'private MB after add':>21} {'save s':>7}"
          f" {'private MB after save':>22}")
    for size, best in table.items():
        for mode in ("before-write", "after-write"):
            r = best[mode]
            print(f"{size:>9} {mode.split('-')[0]:>7} {r['add_s']:>11.2f} {r['private_after_add_mb']:>21.0f}"
                  f" {r['save_s']:>7.2f} {r['private_after_save_mb']:>22.0f}")
    if len(table) >= 2:
        sizes = np.array(list(table), float)
        for key, unit in (("open_s", "s to open"), ("private_after_scoring_mb", "MB private")):
            slope, intercept = np.polyfit(sizes, [table[int(n)]["after"][key] for n in sizes], 1)
            print(f"projection of `after` to 100M vectors (linear fit): {slope * 1e8 + intercept:.1f} {unit}")


if __name__ == "__main__":
    main()
