"""Opening a store and answering cached queries: the index file mapped (today) against read into memory
(the baseline, as before), each in a fresh process, on the same store in the same run.

What is measured, per mode: seconds to open (index file checked against the database, a sample of its
vectors against their checksums), the process's private memory (RssAnon: what each serving process costs
on its own; file-backed pages of a mapped index are shared by every process and reclaimable) after the
open and after 200 cached scorings (10 candidates each, by id), and ms per scoring. The store is built as
scripts/bench_lookup.py builds its own (768-d synthetic vectors, the tiny zoo's sources).

    python scripts/bench_open.py [--vectors 100000] [--repeats 2]
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


def measure(store_dir: str, mapped: bool) -> dict:
    """One process: open, score, report (run as a child so each mode starts from a clean heap)."""
    import index.vectors as vx
    from index.store import Store

    if not mapped:  # the baseline: the whole index read into this process's memory
        read = vx.read_checked
        vx.read_checked = lambda path, dim, mapped=False: read(path, dim, False)
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
              "ms_per_scoring": per, "vectors": total}
    store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("STORE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1] == "mapped")))
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_lookup as bl
    from engine import zoo

    with tempfile.TemporaryDirectory() as tmp:
        models = zoo.write_zoo(Path(tmp) / "zoo")
        store, _ = bl.build_store(Path(tmp) / "store", models, args.vectors, 768, 2, bl.World(768, len(models["pipelines"])))
        store.close()
        rows: dict[str, list[dict]] = {"copied": [], "mapped": []}
        for _ in range(args.repeats):
            for mode in rows:
                out = subprocess.run([sys.executable, __file__, "--child", str(Path(tmp) / "store"), mode],
                                     capture_output=True, text=True, check=True, cwd=ROOT)
                rows[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {mode: {k: min(r[k] for r in runs) for k in runs[0]} for mode, runs in rows.items()}
    print(f"{best['mapped']['vectors']} stored 768-d vectors, best of {args.repeats} fresh processes per mode")
    print(f"{'mode':>8} {'open s':>7} {'private MB after open':>22} {'after 200 scorings':>19} {'ms/scoring':>11}")
    for mode, r in best.items():
        print(f"{mode:>8} {r['open_s']:>7.2f} {r['private_after_open_mb']:>22.0f} {r['private_after_scoring_mb']:>19.0f}"
              f" {r['ms_per_scoring']:>11.3f}")
    c, m = best["copied"], best["mapped"]
    print(f"ratios mapped/copied: open {m['open_s'] / c['open_s']:.2f}x, private memory "
          f"{m['private_after_scoring_mb'] / max(c['private_after_scoring_mb'], 1e-9):.2f}x, "
          f"scoring {m['ms_per_scoring'] / c['ms_per_scoring']:.2f}x")


if __name__ == "__main__":
    main()
