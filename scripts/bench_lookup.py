"""Cached attribution throughput against raw FAISS, from 10k to 1M stored 768-d vectors; flat vs IVF vs HNSW.

What is measured, and why this way:
* The store is real (index.store.Store, SQLite + FAISS) and its sources are the tiny zoo's pipelines
  (real fingerprints, real cache keys), but its vectors are synthetic: ViT-L/14 size (768-d) vectors
  with structure (a per-description centre + a per-source "style" + noise), so that attribution has a
  right answer and approximate indexes can be scored on it. Query images are placeholders; a stand-in
  embedder returns each query's vector, so the figure is the lookup machinery, not CLIP.
* Attribution goes through the library's Workspace (engine.workspace), opened on the store: only its
  embedder is the stand-in (the synthetic store has no CLIP checkpoint to load). Every resynthesis the
  queries need is stored, so `Workspace.attribute` generates nothing: this is the cached path a
  service sees for repeated descriptions.
* Rows go into SQLite in bulk (not Store.add_images: one ORM flush per row would dominate), with the
  per-vector checksums add_images writes; the index is then rebuilt by Store.open from the stored
  vectors, exactly as after a crash ("open+rebuild"). The store is then closed and opened again as a
  user's process would find it ("reopen": the index file is read and verified against the database,
  ids in full and a sample of vectors against their checksums), and that handle is the one measured.

Dataset search ("what in the whole store is closest", Store.nearest): for each size the store's search
index is built by Store.rebuild (`--search-flat-max 0`, the default here, forces the IVF choice at any
size; the library's own threshold is vectors.FLAT_MAX) and the benchmark's queries are answered by the
exact scan and by the search index: recall@32 against exact and ms per query, raw FAISS and through
Store.nearest (which adds the SQL that turns ids into references). `--no-search` skips it.

Memory: N x 768 float32 is 3.1 GB at 1M, held by the store's flat index, once more as the benchmark's
own matrix, and again by each IVF/HNSW copy; SQLite holds another ~3.2 GB on disk. The default stops
at 100k (about 3 minutes on 2 cores); `--max-vectors 1000000` needs ~14 GB RAM and ~4 GB disk, and
HNSW construction at 1M takes tens of minutes on 2 cores, so `--ann-max` caps the index comparison.

    python scripts/bench_lookup.py [--max-vectors 100000] [--queries 200] [--ann-max 100000] [--profile]
    python scripts/bench_lookup.py --sizes 100000,1000000 --ann-max 0   # dataset search only at 1M: ~14 GB
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine import zoo  # noqa: E402
from engine.attribute import Query  # noqa: E402
from engine.generate import source_params_hash  # noqa: E402
from engine.options import Options  # noqa: E402
from engine.workspace import Workspace  # noqa: E402
from index import ivf  # noqa: E402
from index import vectors as vx  # noqa: E402
from index.keys import cache_key, normalise_description, sha256_text  # noqa: E402
from index.store import DB_NAME, Store  # noqa: E402

SIZES = (10_000, 100_000, 1_000_000)
IDENTITY = "synthetic-vit-l-14-768"


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def index_mb(index) -> float:
    """Serialized size: what the index holds in RAM, give or take FAISS's small headers."""
    return faiss.serialize_index(index).nbytes / 2**20


def normalised(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


class StandInEmbedder:
    """Returns the vector registered for each query image: isolates lookup cost from CLIP cost."""

    def __init__(self, identity: str):
        self.identity = identity
        self.table: dict[int, np.ndarray] = {}

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return np.stack([self.table[image.info["bench_id"]] for image in images])


class BenchWorkspace(Workspace):
    """The library's Workspace on a synthetic store; only the embedder is the stand-in (its `embed`
    step, timing included, is the Workspace's own)."""

    def __init__(self, store: Store, stand_in: StandInEmbedder):
        super().__init__(store)
        self.stand_in = stand_in

    @property
    def embedder(self) -> StandInEmbedder:  # type: ignore[override]
        return self.stand_in


class World:
    """Synthetic description centres and source styles: vector = centre + style + noise, normalised."""

    def __init__(self, dim: int, sources: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.dim = dim
        self.styles = normalised(self.rng.standard_normal((sources, dim))) * 0.5

    def centres(self, count: int, start: int) -> np.ndarray:
        return normalised(np.random.default_rng(1000 + start).standard_normal((count, self.dim)))

    def sample(self, centres: np.ndarray, source_index: np.ndarray) -> np.ndarray:
        noise = normalised(self.rng.standard_normal((len(centres), self.dim))) * 0.7
        return normalised(centres + self.styles[source_index] + noise)


def description(number: int) -> str:
    return f"synthetic description number {number}"


def build_store(root: Path, models: dict, size: int, dim: int, per_source: int, world: World) -> tuple[Store, dict]:
    """A store with the zoo's sources and `size` stored resyntheses; returns it and the benchmark's copy."""
    with Workspace(Store.create(root, {"identity": IDENTITY, "arch": "synthetic", "checkpoint": ""}, dim)) as ws:
        for name, folder in models["pipelines"].items():
            ws.add_source(name, folder, steps=2)
        sources = ws.sources()
    per_description = len(sources) * per_source
    descriptions = size // per_description
    matrix = np.empty((descriptions * per_description, dim), np.float32)
    started = time.perf_counter()
    db = sqlite3.connect(root / DB_NAME)
    db.execute("PRAGMA synchronous=OFF")  # bulk load of a throwaway benchmark store
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
    params = {s.id: source_params_hash(s) for s in sources}  # as the Workspace's plan keys them
    chunk = 2000
    for start in range(0, descriptions, chunk):
        count = min(chunk, descriptions - start)
        centres = world.centres(count, start)
        source_index = np.tile(np.repeat(np.arange(len(sources)), per_source), count)
        block = world.sample(np.repeat(centres, per_description, axis=0), source_index)
        first = start * per_description
        matrix[first:first + len(block)] = block
        texts, images, vectors = [], [], []
        for d in range(start, start + count):
            text = normalise_description(description(d))
            digest = sha256_text(text)
            texts.append((d + 1, text, digest))
            for s_i, source in enumerate(sources):
                for seed in range(per_source):
                    row = d * per_description + s_i * per_source + seed
                    key = cache_key(digest, source.fingerprint, seed, params[source.id], IDENTITY)
                    images.append((row + 1, key, "resynthesis", source.id, d + 1, seed, params[source.id],
                                   f"{row:064x}", f"images/{key}.png", now))
                    data = matrix[row].tobytes()
                    vectors.append((row + 1, row + 1, IDENTITY, data, vx.checksum(data)))
        db.executemany("INSERT INTO descriptions (id, text, hash) VALUES (?, ?, ?)", texts)
        db.executemany("INSERT INTO images (id, key, role, source_id, description_id, seed, params_hash, file_hash,"
                       " path, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", images)
        db.executemany("INSERT INTO vectors (id, image_id, embedder, data, checksum) VALUES (?, ?, ?, ?, ?)",
                       vectors)
    db.commit()
    db.close()
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    store = Store.open(root)  # no index file yet: rebuilt from the stored vectors, verified, written
    open_rebuild = time.perf_counter() - started
    assert store.open_report.rebuilt, store.open_report
    store.close()
    del store
    started = time.perf_counter()
    store = Store.open(root)  # as the next process finds it: index file read and verified, nothing rebuilt
    reopen = time.perf_counter() - started
    assert not store.open_report.rebuilt, store.open_report
    info = {"descriptions": descriptions, "vectors": int(store.index.ntotal), "bulk_load_s": load_seconds,
            "open_rebuild_s": open_rebuild, "reopen_s": reopen, "reopen_checked": store.open_report.checked,
            "per_description": per_description, "sources": [s.name for s in sources], "matrix": matrix}
    return store, info


def make_queries(world: World, info: dict, count: int, embedder: StandInEmbedder) -> tuple[list[Query], list[str]]:
    rng = np.random.default_rng(7)
    picks = rng.integers(0, info["descriptions"], count)
    truth = rng.integers(0, len(info["sources"]), count)
    chunks: dict[int, np.ndarray] = {}
    centres = np.stack([_centre(world, int(d), chunks) for d in picks])
    vectors = world.sample(centres, truth)
    queries = []
    for i, (d, vector) in enumerate(zip(picks, vectors)):
        image = Image.new("RGB", (1, 1))
        image.info["bench_id"] = i
        embedder.table[i] = vector
        queries.append(Query(image, f"query-{i}", f"query-{i}", description(int(d))))
    return queries, [info["sources"][t] for t in truth]


def _centre(world: World, number: int, chunks: dict[int, np.ndarray], chunk: int = 2000) -> np.ndarray:
    """The centre build_store gave description `number` (centres are seeded per chunk of 2000)."""
    start = number // chunk * chunk
    if start not in chunks:
        chunks[start] = world.centres(chunk, start)
    return chunks[start][number - start]


def per_query_seconds(fn, items) -> float:
    started = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - started) / len(items)


def predict(ids: np.ndarray, sims: np.ndarray, source_of: dict[int, str]) -> str | None:
    best: dict[str, float] = {}
    for vid, sim in zip(ids.tolist(), sims.tolist()):
        if vid >= 0:
            name = source_of[vid]
            best[name] = max(best.get(name, -2.0), sim)
    return max(best, key=best.get) if best else None


def compare_indexes(store: Store, info: dict, vectors: np.ndarray, candidates: list[np.ndarray],
                    truth: list[str], source_of: dict[int, str]) -> list[dict]:
    """An ID-filtered search (IDSelector over each query's candidates) run on flat, IVF and HNSW."""
    matrix, dim = info["matrix"], vectors.shape[1]
    ids = np.arange(1, len(matrix) + 1, dtype=np.int64)
    rows = []

    def evaluate(name: str, index, params_for, build_s: float, mem_mb: float, reference=None) -> list[str]:
        predictions, found_total = [], 0
        started = time.perf_counter()
        for vector, cand in zip(vectors, candidates):
            sims, found = index.search(vector[None, :], len(cand), params=params_for(cand))
            found_total += int((found[0] >= 0).sum())
            predictions.append(predict(found[0], sims[0], source_of))
        seconds = time.perf_counter() - started
        reference = reference or predictions
        rows.append({"index": name, "qps": len(vectors) / seconds,
                     "candidate_recall": found_total / sum(map(len, candidates)),
                     "accuracy": float(np.mean([p == t for p, t in zip(predictions, truth)])),
                     "agrees_with_flat": float(np.mean([p == r for p, r in zip(predictions, reference)])),
                     "build_s": build_s, "memory_mb": mem_mb})
        return predictions

    flat = evaluate("flat (store's IDMap2+FlatIP)", store.index,
                    lambda c: faiss.SearchParameters(sel=faiss.IDSelectorBatch(c)), info["open_rebuild_s"],
                    index_mb(store.index))

    nlist = max(16, int(2 * np.sqrt(len(matrix))))
    started = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = matrix[np.random.default_rng(0).choice(len(matrix), min(len(matrix), 40 * nlist), replace=False)]
    ivf.train(sample)
    ivf.add_with_ids(matrix, ids)
    build_s, mem = time.perf_counter() - started, index_mb(ivf)
    for nprobe in (1, 16, 64):
        evaluate(f"IVF{nlist},Flat nprobe={nprobe}", ivf,
                 lambda c, n=nprobe: faiss.SearchParametersIVF(sel=faiss.IDSelectorBatch(c), nprobe=n),
                 build_s, mem, flat)
    del ivf

    started = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 40
    hnsw_ids = faiss.IndexIDMap2(hnsw)
    hnsw_ids.add_with_ids(matrix, ids)
    build_s, mem = time.perf_counter() - started, index_mb(hnsw_ids)
    for ef in (64, 512):  # the ID map translates the selector to HNSW's internal rows
        evaluate(f"HNSW32 efSearch={ef}", hnsw_ids,
                 lambda c, e=ef: faiss.SearchParametersHNSW(sel=faiss.IDSelectorBatch(c), efSearch=e),
                 build_s, mem, flat)
    del hnsw_ids, hnsw
    return rows


def search_section(store: Store, vectors: np.ndarray, args, k: int = 32) -> dict:
    """Build the store's search index (Store.rebuild) and compare it with the exact scan on the queries."""
    started = time.perf_counter()
    store.rebuild(flat_max=args.search_flat_max, memory_budget_bytes=args.search_budget)
    rebuild_s = time.perf_counter() - started
    infos = json.loads(store.search_infos_path.read_text())
    out = {"type": infos["type"], "nprobe": infos.get("nprobe"), "build_s": infos["build_s"], "rebuild_s": rebuild_s,
           "stored_query_recall": infos["recall"], "recall_by_nprobe": infos.get("recall_by_nprobe"),
           "state": store.search_state["state"],
           "search_mb": (store.search_path.stat().st_size / 2**20) if store.search_path.exists() else 0.0}
    search = store.search_index.built
    if search is None:
        return out
    exact_ids = np.stack([store.index.search(v[None, :], k)[1][0] for v in vectors])
    ivf_ids = np.stack([ivf.search_ivf(search.index, v[None, :], k, search.nprobe,
                                      rescore=store.index.reconstruct_batch if search.rescored else None)[1][0]
                        for v in vectors])
    out["raw_recall"] = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ivf_ids, exact_ids)]))
    out["exact_ms"] = per_query_seconds(lambda v: store.index.search(v[None, :], k), vectors) * 1e3
    out["ivf_ms"] = per_query_seconds(lambda v: ivf.search_ivf(
        search.index, v[None, :], k, search.nprobe,
        rescore=store.index.reconstruct_batch if search.rescored else None), vectors) * 1e3
    near_exact = [[r.vector_id for r, _ in store.nearest(v, k, exact=True)] for v in vectors]
    near_ivf = [[r.vector_id for r, _ in store.nearest(v, k)] for v in vectors]
    out["nearest_recall"] = float(np.mean([len(set(a) & set(b)) / max(1, len(b))
                                           for a, b in zip(near_ivf, near_exact)]))
    out["nearest_exact_ms"] = per_query_seconds(lambda v: store.nearest(v, k, exact=True), vectors) * 1e3
    out["nearest_ivf_ms"] = per_query_seconds(lambda v: store.nearest(v, k), vectors) * 1e3
    return out


def run_size(size: int, args, models: dict, workdir: Path) -> dict:
    world = World(args.dim, len(models["pipelines"]))
    root = workdir / f"store-{size}"
    shutil.rmtree(root, ignore_errors=True)
    rss_before = rss_mb()
    store, info = build_store(root, models, size, args.dim, args.per_source, world)
    result = {"vectors": info["vectors"], "descriptions": info["descriptions"], "bulk_load_s": info["bulk_load_s"],
              "open_rebuild_s": info["open_rebuild_s"], "reopen_s": info["reopen_s"],
              "reopen_checked": info["reopen_checked"], "rss_after_open_mb": rss_mb() - rss_before,
              "sqlite_mb": (root / DB_NAME).stat().st_size / 2**20, "sources": len(info["sources"]),
              "per_source": args.per_source, "candidates": info["per_description"]}
    embedder = StandInEmbedder(IDENTITY)
    queries, truth = make_queries(world, info, args.queries, embedder)
    ws = BenchWorkspace(store, embedder)
    options = Options(per_source=args.per_source)
    plan = ws.plan(options)
    for q in queries[:5]:
        ws.attribute(q, options=options)  # warm SQLite's page cache and SQLAlchemy's statement cache
    stage: dict[str, float] = {}
    answers, generated = [], 0
    started = time.perf_counter()
    for q in queries:
        report = ws.attribute(q, options=options)
        answers += report.results
        generated += report.generated
        for k, v in report.seconds.items():
            stage[k] = stage.get(k, 0.0) + v
    single = (time.perf_counter() - started) / len(queries)
    stage = {k: v / len(queries) for k, v in stage.items()}
    assert generated == 0, "the benchmark must only hit the cache"
    started = time.perf_counter()
    assert ws.attribute(queries, options=options).generated == 0
    batched = (time.perf_counter() - started) / len(queries)

    vectors = np.stack([embedder.table[i] for i in range(len(queries))])
    found = [ws.candidates(q.prompt, plan).resyntheses for q in queries]
    candidates = [np.array([r.vector_id for rows in c.values() for r in rows], np.int64) for c in found]
    matrix = info["matrix"]
    # the lambdas bind what they use as defaults: the names are deleted below to free the store
    raw_topk = per_query_seconds(lambda v, index=store.index: index.search(v[None, :], 8), vectors)
    started = time.perf_counter()
    store.index.search(vectors, 8)
    raw_topk_batch = (time.perf_counter() - started) / len(vectors)
    pairs = list(zip(vectors, candidates))
    raw_filtered = per_query_seconds(lambda p, index=store.index: vx.search_among(index, p[0][None, :], p[1]),
                                     pairs)
    gather = per_query_seconds(lambda p, rows=matrix: rows[p[1] - 1] @ p[0], pairs)
    result.update({
        "attribute_ms": single * 1e3, "attribute_batch_ms": batched * 1e3,
        "stage_ms": {k: v * 1e3 for k, v in stage.items()},
        "untimed_ms": (single - sum(stage.values())) * 1e3,  # Python glue between the stages
        "faiss_topk_ms": raw_topk * 1e3, "faiss_topk_batch_ms": raw_topk_batch * 1e3,
        "faiss_filtered_ms": raw_filtered * 1e3, "numpy_gather_ms": gather * 1e3,
        "accuracy": float(np.mean([a.predicted == t for a, t in zip(answers, truth)])),
    })
    if args.profile and size == max(args.sizes):
        profile = cProfile.Profile()
        profile.enable()
        for q in queries:
            ws.attribute(q, options=options)
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(28)
        out.write("\n---- by own time ----\n")
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(18)
        result["profile"] = out.getvalue()
    if size <= args.ann_max:
        source_of = {int(r.vector_id): name for c in found for name, rows in c.items() for r in rows}
        result["indexes"] = compare_indexes(store, info, vectors, candidates, truth, source_of)
    if not args.no_search:
        result["search"] = search_section(store, vectors, args)
    ws.close()
    del info, matrix, ws, store
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def print_tables(results: dict[int, dict]) -> None:
    first = next(iter(results.values()))
    print(f"\n## cached attribution vs raw FAISS (per query, ms; 768-d, {first['sources']} sources x "
          f"K={first['per_source']} candidates)")
    print(f"{'vectors':>9} {'attribute':>10} {'batch':>8} {'describe':>9} {'lookup':>7} {'embed':>7} {'search':>7}"
          f" {'untimed':>8}"
          f" {'faiss top8':>11} {'filtered':>9} {'gather':>8} {'/top8':>7} {'/filt.':>8} {'acc':>5}")
    for r in results.values():
        s = r["stage_ms"]
        print(f"{r['vectors']:>9} {r['attribute_ms']:>10.2f} {r['attribute_batch_ms']:>8.2f}"
              f" {s.get('describe', 0):>9.3f} {s.get('lookup', 0):>7.2f} {s.get('embed', 0):>7.3f}"
              f" {s.get('search', 0):>7.2f}"
              f" {r['untimed_ms']:>8.2f} {r['faiss_topk_ms']:>11.3f}"
              f" {r['faiss_filtered_ms']:>9.3f} {r['numpy_gather_ms']:>8.4f}"
              f" {r['attribute_ms'] / r['faiss_topk_ms']:>6.2f}x {r['attribute_ms'] / r['faiss_filtered_ms']:>7.1f}x"
              f" {r['accuracy']:>5.0%}")
    print("faiss top8 = unfiltered top-8 over all vectors, one query at a time; filtered = the store's IDSelector "
          f"search alone (vx.search_among); gather = numpy dot with the {first['candidates']} candidate rows; "
          "/top8 and /filt. = "
          "attribute time over those")
    print("lookup = the Workspace's SQL stage (cache keys, candidates); search = scoring the candidates; "
          "untimed = Python glue no stage counts")
    print(f"\n{'vectors':>9} {'sqlite MB':>10} {'bulk load s':>12} {'open+rebuild s':>15} {'reopen s':>9} {'RSS MB':>8}"
          f" {'qps single':>11} {'qps batch':>10} {'faiss qps (batch top8)':>23}")
    for r in results.values():
        print(f"{r['vectors']:>9} {r['sqlite_mb']:>10.0f} {r['bulk_load_s']:>12.1f} {r['open_rebuild_s']:>15.1f}"
              f" {r['reopen_s']:>9.2f}"
              f" {r['rss_after_open_mb']:>8.0f} {1e3 / r['attribute_ms']:>11.0f} {1e3 / r['attribute_batch_ms']:>10.0f}"
              f" {1e3 / r['faiss_topk_batch_ms']:>23.0f}")
    print("open+rebuild = first Store.open: index built from the stored vectors, checked and written; reopen = "
          "the next open: index file read, its ids checked against the database and a sample of its vectors "
          "against their checksums (" + ", ".join(f"{r['reopen_checked']}" for r in results.values())
          + " checked)")
    for r in results.values():
        if "indexes" not in r:
            continue
        print(f"\n## index families at {r['vectors']} vectors: ID-filtered search (IDSelector over "
              f"the {r['candidates']} candidates)")
        print(f"{'index':34} {'qps':>8} {'cand. recall':>13} {'accuracy':>9} {'= flat':>7} {'build s':>8}"
              f" {'mem MB':>7}")
        for row in r["indexes"]:
            print(f"{row['index']:34} {row['qps']:>8.0f} {row['candidate_recall']:>13.1%} {row['accuracy']:>9.1%}"
                  f" {row['agrees_with_flat']:>7.1%} {row['build_s']:>8.1f} {row['memory_mb']:>7.0f}")
    searched = [r for r in results.values() if "search" in r]
    if searched:
        print("\n## dataset search (Store.nearest, k=32): exact scan vs the search index built by Store.rebuild")
        print(f"{'vectors':>9} {'type':>18} {'nprobe':>7} {'build s':>8} {'MB':>6} {'R@32 stored':>12}"
              f" {'R@32 queries':>13} {'exact ms':>9} {'index ms':>9} {'ratio':>6}"
              f" {'nearest R@32':>13} {'exact ms':>9} {'index ms':>9} {'ratio':>6}")
        for r in searched:
            x = r["search"]
            if "exact_ms" not in x:
                print(f"{r['vectors']:>9} {x['type']:>18}  (exact scan: no search index)")
                continue
            print(f"{r['vectors']:>9} {x['type']:>18} {x['nprobe']:>7} {x['build_s']:>8.1f} {x['search_mb']:>6.0f}"
                  f" {x['stored_query_recall']:>12.3f} {x['raw_recall']:>13.3f} {x['exact_ms']:>9.2f}"
                  f" {x['ivf_ms']:>9.3f} {x['exact_ms'] / x['ivf_ms']:>5.1f}x {x['nearest_recall']:>13.3f}"
                  f" {x['nearest_exact_ms']:>9.2f} {x['nearest_ivf_ms']:>9.2f}"
                  f" {x['nearest_exact_ms'] / x['nearest_ivf_ms']:>5.1f}x")
        print("R@32 stored = recall@32 against exact with stored vectors as queries, measured by rebuild (nprobe "
              "chosen for >= 0.95); R@32 queries = the same on this benchmark's queries; first ms pair = raw FAISS "
              "top-32 one query at a time, second = Store.nearest(k=32) including its SQL; build s = search "
              "index train+add+nprobe choice (vectors.BUILD_THREADS threads)")
    for r in results.values():
        if "profile" in r:
            print(f"\n## cProfile: cached single-query attribution at {r['vectors']} vectors")
            print(r["profile"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-vectors", type=int, default=100_000,
                        help="largest store (sizes 10k, 100k, 1M up to this)")
    parser.add_argument("--ann-max", type=int, default=100_000, help="largest store for the flat/IVF/HNSW comparison")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--per-source", type=int, default=2)
    parser.add_argument("--workdir", help="where stores go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--profile", action="store_true", help="cProfile the cached lookups at the largest size")
    parser.add_argument("--threads", type=int, default=1,
                        help="FAISS OpenMP threads (default 1: one query at a time, steadier on a busy machine)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--sizes", help="comma-separated store sizes (default: 10k, 100k, 1M up to --max-vectors)")
    parser.add_argument("--no-search", action="store_true", help="skip the dataset search index section")
    parser.add_argument("--search-flat-max", type=int, default=0,
                        help=f"choose_index's flat threshold for the section (default 0: IVF at every size; "
                             f"the library's is {ivf.FLAT_MAX})")
    parser.add_argument("--search-budget", type=int, default=ivf.MEMORY_BUDGET,
                        help="memory budget in bytes for the search index (PQ codes beyond it)")
    args = parser.parse_args()
    args.sizes = ([int(x) for x in args.sizes.split(",")] if args.sizes
                  else [s for s in SIZES if s <= args.max_vectors])
    faiss.omp_set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-lookup-"))
    models = zoo.write_zoo(workdir / "zoo")
    results = {}
    for size in args.sizes:
        clock = time.perf_counter()
        results[size] = run_size(size, args, models, workdir)
        print(f"[{size} vectors done in {time.perf_counter() - clock:.0f}s]", file=sys.stderr, flush=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end, "
          f"FAISS threads {args.threads}, faiss {faiss.__version__}")
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
