"""What a save of the live index costs, against today's full rewrite measured in the same run.

For each size, one store of N synthetic 768-d vectors (bulk-loaded into SQLite, then the index written
by a first open, as scripts/bench_lookup.py builds its stores), one writing process:

  new   Store.save_index as it is: what changed since the files on disk goes to a segment
        (index/segments.py); the base file is left alone
  old   the same call with the segment path switched off, so every save streams the whole index into
        a new file and maps it (what every save did before segments)

each after storing 1 and 1,000 new vectors (Store.add_images, not timed): `--new-per-old` segment saves
of each count, then one rewrite of each, `--repeats` times; medians (and the slowest segment save).
Also timed: writing the 1,000 vectors' bytes (3 MB) to a new file with fsync on the same disk, the
floor any save of them pays. Needs about 2.5x N x 3 KB of disk (SQLite + index) and N x 3 KB of page
cache: 1M is ~8 GB on disk.

    python scripts/bench_save.py [--sizes 100000,1000000] [--repeats 2] [--new-per-old 5] [--stores DIR]
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from index import vectors as vx  # noqa: E402
from index.live import LiveIndex  # noqa: E402
from index.store import DB_NAME, NewImage, Store  # noqa: E402

DIM = 768
EMBEDDER = {"identity": "bench-save", "arch": "synthetic", "checkpoint": ""}


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(root: Path, size: int) -> None:
    """A store of `size` vectors, rows bulk-inserted (the id digest is kept by the database's triggers)."""
    with Store.create(root, EMBEDDER, DIM) as store:
        source = store.ensure_source("a", "replay", "fp-a")
        desc = store.description_id("bench")
    rng = np.random.default_rng(0)
    db = sqlite3.connect(root / DB_NAME)
    db.execute("PRAGMA synchronous=OFF")  # a throwaway benchmark store
    for start in range(0, size, 20000):
        count = min(20000, size - start)
        matrix = _unit(rng, count)
        images, vectors = [], []
        for i in range(count):
            n = start + i + 1
            images.append((n, f"k{n}", "resynthesis", source.id, desc, n, f"h{n}", f"images/{n}.png",
                           "2026-01-01 00:00:00.000000"))
            data = matrix[i].tobytes()
            vectors.append((n, n, EMBEDDER["identity"], data, vx.checksum(data)))
        db.executemany("INSERT INTO images (id, key, role, source_id, description_id, seed, file_hash, path,"
                       " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", images)
        db.executemany("INSERT INTO vectors (id, image_id, embedder, data, checksum) VALUES (?, ?, ?, ?, ?)",
                       vectors)
    db.commit()
    db.close()
    with Store.open(root) as store:  # no index file yet: built from the stored vectors and written
        assert store.open_report.rebuilt and store.index.ntotal == size


@contextmanager
def full_rewrite() -> Iterator[None]:
    """Before segments: every save wrote one whole new file (the segment path answers 'rewrite')."""
    append = LiveIndex._append
    LiveIndex._append = lambda self, index, path: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        LiveIndex._append = append  # type: ignore[method-assign]


def save_after(store: Store, count: int, tag: str, rng: np.random.Generator) -> float:
    source = store.source("a")
    desc = store.description_id("bench")
    rows = [NewImage(key=f"{tag}-{i}", role="resynthesis", source_id=source.id, description_id=desc,
                     file_hash=f"{tag}-{i}", path=f"images/{tag}-{i}.png", vector=v, seed=i)
            for i, v in enumerate(_unit(rng, count))]
    store.add_images(rows)
    started = time.perf_counter()
    store.save_index()
    return time.perf_counter() - started


def bytes_floor(folder: Path, count: int) -> float:
    """Writing `count` vectors' bytes to a new file, fsync'd, in the store's folder."""
    data = _unit(np.random.default_rng(2), count).tobytes()
    path = folder / "bench-floor.bin"
    started = time.perf_counter()
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    took = time.perf_counter() - started
    path.unlink()
    return took


def measure(root: Path, repeats: int, new_per_old: int) -> dict:
    rng = np.random.default_rng(1)
    times: dict[str, list[float]] = {f"{mode}_{n}": [] for mode in ("new", "old") for n in (1, 1000)}
    floor = []
    with Store.open(root) as store:
        for r in range(repeats):
            for k in range(new_per_old):  # segments pile up between two rewrites, as they do in use
                for count in (1, 1000):
                    times[f"new_{count}"].append(save_after(store, count, f"new-{count}-{r}-{k}", rng))
                floor.append(bytes_floor(root, 1000))
            with full_rewrite():
                for count in (1, 1000):
                    times[f"old_{count}"].append(save_after(store, count, f"old-{count}-{r}", rng))
    out: dict = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"{k}_max": max(v) for k, v in times.items() if k.startswith("new")})
    out["floor_1000"] = statistics.median(floor)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--repeats", type=int, default=2, help="whole-file rewrites per count")
    parser.add_argument("--new-per-old", type=int, default=5, help="segment saves per count between two rewrites")
    parser.add_argument("--stores", type=Path, help="keep (and reuse) the built stores here")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(dir=args.stores) as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            root = (args.stores or Path(tmp)) / f"save-{size}"
            if not (root / "store.json").exists():
                started = time.perf_counter()
                build(root, size)
                print(f"built {size} vectors in {time.perf_counter() - started:.0f} s", flush=True)
            rows[size] = measure(root, args.repeats, args.new_per_old)
            print(size, {k: round(v, 4) for k, v in rows[size].items()}, flush=True)
    print(f"\nsave of the live index: old = whole file rewritten (median of {args.repeats}), new = a segment "
          f"(median and max of {args.repeats * args.new_per_old}); floor = 3 MB written and fsync'd")
    print(f"{'vectors':>9} {'after':>6} {'old s':>8} {'new ms':>8} {'new max ms':>11} {'old/new':>8} {'floor ms':>9}")
    for size, r in rows.items():
        for count in (1, 1000):
            old, new = r[f"old_{count}"], r[f"new_{count}"]
            floor = f"{r['floor_1000'] * 1000:>9.1f}" if count == 1000 else f"{'':>9}"
            print(f"{size:>9} {count:>6} {old:>8.2f} {new * 1000:>8.1f} {r[f'new_{count}_max'] * 1000:>11.1f}"
                  f" {old / new:>7.0f}x {floor}")


if __name__ == "__main__":
    main()
