"""Scale-out figures, each against a baseline in the same run:

  jobs      `resynthesize` of the same description list on a local Ray cluster (ray.init(num_cpus=2),
            one actor per pipeline source) against the in-process run, on two copies of one tiny-zoo
            store: seconds for each, and whether both stored the same keys and vectors.
  backends  the same store operations on SQLite and on PostgreSQL (a throwaway local server, started
            as the tests start theirs, `fsync=off`): ingest of --vectors 768-d vectors in transactions
            of 100, cached lookup (existing_keys of 10 keys + scoring their vectors by id, what a cached
            attribution does per query), and a verified open.

    python scripts/bench_scale.py [--part jobs,backends] [--descriptions 8] [--vectors 5000]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 768


def _stored(store_dir: Path) -> dict[str, np.ndarray]:
    import engine
    from sqlalchemy import select

    from index.schema import Image, Vector

    with engine.open(store_dir, writable=False) as ws:
        store = ws.store
        with store.session() as s:
            rows = s.execute(select(Image.key, Vector.data).join(Vector, Vector.image_id == Image.id)
                             .where(Vector.embedder == store.embedder_identity)).all()
    return {key: np.frombuffer(data, np.float32) for key, data in rows}


def jobs(tmp: Path, descriptions: int, per_source: int) -> None:
    import ray

    import engine
    from engine import Options, zoo

    models = zoo.write_zoo(tmp / "zoo")
    here = tmp / "in-process"
    engine.init(here, clip_checkpoint=models["clip_checkpoint"], clip_config=models["clip_config"]).close()
    with engine.open(here) as ws:
        for name, folder in models["pipelines"].items():
            ws.add_source(name, folder, steps=2)
        names = tuple(s.name for s in ws.sources())
    there = tmp / "ray"
    shutil.copytree(here, there)
    texts = [f"a photo of object number {i}, studio light" for i in range(descriptions)]
    options = Options(sources=names, per_source=per_source)
    started = time.perf_counter()
    with engine.open(here) as ws:
        local = ws.resynthesize_dataset(texts, options)
    local_s = time.perf_counter() - started
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        with engine.open(there) as ws:
            remote = ws.resynthesize_dataset(texts, options, ray="local")
        ray_s = time.perf_counter() - started
    finally:
        ray.shutdown()
    a, b = _stored(here), _stored(there)
    same = set(a) == set(b) and all(np.allclose(a[k], b[k], atol=1e-4) for k in a)
    print(f"jobs: {descriptions} descriptions x {len(names)} sources x {per_source} seeds = "
          f"{local['generated']} images (Ray: {remote['generated']})")
    print(f"  in-process {local_s:.1f} s, Ray local (2 CPUs, {len(names)} actors) {ray_s:.1f} s: "
          f"ratio Ray/in-process {ray_s / local_s:.2f}x; same keys and vectors: {same}")


def _rows(store, start: int, n: int, rng):
    from index.store import NewImage

    source = store.sources()[0] if store.sources() else store.add_source("a", "replay", "fp")
    desc = store.description_id("a prompt")
    vecs = rng.normal(size=(n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return [NewImage(key=f"k{start + i}", role="resynthesis", source_id=source.id, description_id=desc,
                     file_hash=f"h{start + i}", path=f"p{start + i}", vector=v, seed=start + i)
            for i, v in enumerate(vecs)]


def backend_figures(root: Path, db_url: str | None, vectors: int) -> dict:
    from index.store import Store

    embedder = {"identity": "bench", "arch": "x", "checkpoint": "x"}
    rng = np.random.default_rng(0)
    store = Store.create(root, embedder, DIM, db_url=db_url)
    started = time.perf_counter()
    for start in range(0, vectors, 100):
        store.add_images(_rows(store, start, min(100, vectors - start), rng))
    store.save_index()
    ingest = time.perf_counter() - started
    store.close()
    started = time.perf_counter()
    store = Store.open(root, writable=False)
    opened = time.perf_counter() - started
    keys = [f"k{i}" for i in rng.choice(vectors, 2000, replace=False)]
    query = np.ones((1, DIM), np.float32) / np.sqrt(DIM)
    started = time.perf_counter()
    for k in range(0, 2000, 10):
        ids = np.array(sorted(store.existing_keys(keys[k:k + 10]).values()), np.int64)
        store.search(query, ids)
    lookup = (time.perf_counter() - started) / 200 * 1000
    store.close()
    return {"ingest_s": ingest, "open_s": opened, "lookup_ms": lookup}


def backends(tmp: Path, vectors: int) -> None:
    from tests import pg

    server = pg.start_server()
    try:
        url = pg.database_on(server.url)
        rows = {"sqlite": backend_figures(tmp / "sqlite", None, vectors),
                "postgresql": backend_figures(tmp / "pg", url, vectors)}
    finally:
        server.destroy()
    print(f"backends: {vectors} 768-d vectors ingested in transactions of 100; 200 cached lookups of 10 keys")
    print(f"  {'':>10} {'ingest s':>9} {'vectors/s':>10} {'open s':>7} {'ms/lookup':>10}")
    for name, r in rows.items():
        print(f"  {name:>10} {r['ingest_s']:>9.2f} {vectors / r['ingest_s']:>10.0f} {r['open_s']:>7.3f}"
              f" {r['lookup_ms']:>10.2f}")
    s, p = rows["sqlite"], rows["postgresql"]
    print(f"  ratios PostgreSQL/SQLite: ingest {p['ingest_s'] / s['ingest_s']:.2f}x, "
          f"open {p['open_s'] / s['open_s']:.2f}x,"
          f" lookup {p['lookup_ms'] / s['lookup_ms']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="jobs,backends")
    parser.add_argument("--descriptions", type=int, default=8)
    parser.add_argument("--per-source", type=int, default=2)
    parser.add_argument("--vectors", type=int, default=5000)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        parts = args.part.split(",")
        if "backends" in parts:
            backends(Path(tmp), args.vectors)
        if "jobs" in parts:
            jobs(Path(tmp), args.descriptions, args.per_source)


if __name__ == "__main__":
    main()
