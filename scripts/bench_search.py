"""The `bench` step of scripts/bench_realistic.py: exact, IVF-Flat, IVF-PQ (with and without exact
re-ranking) and HNSW on the generator's vectors, and the store's own search index as `rebuild` builds it
(index.ivf.build_search_index: lists on disk, nprobe chosen for recall@32 >= 0.95) served by
index.ivf.search_ivf, exactly as SearchIndex answers a query.

Timing: "1 by 1" is one query per search call (the caller single-threaded, FAISS free to use both
cores), "batched" is 64 queries per call, both in ms per query, after one warm-up call. Build time is
training plus adding (wall clock, 2 threads). Memory: bytes the index holds (codes + ids + centroids,
or the HNSW graph), from its serialised size; the exact row holds only the vectors themselves.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

import realistic_vectors as rv
from index import ivf

BATCH = 64


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[f >= 0], t)) / len(t) for f, t in zip(found, truth)]))


def timed(search, queries: np.ndarray, single_max: int | None = None) -> tuple[np.ndarray, float, float]:
    """(ids, ms per query 1 by 1 over the first `single_max` queries, ms per query in batches of BATCH)."""
    search(queries[:1])
    clock = time.perf_counter()
    ones = queries[:single_max]
    for q in ones:
        search(q[None])
    single = (time.perf_counter() - clock) / len(ones) * 1e3
    clock = time.perf_counter()
    ids = np.concatenate([search(queries[start:start + BATCH]) for start in range(0, len(queries), BATCH)])
    batched = (time.perf_counter() - clock) / len(queries) * 1e3
    return ids, single, batched


def index_bytes(index) -> int:
    return int(len(faiss.serialize_index(index)))


def row(name: str, params: str, ids: np.ndarray, truth: np.ndarray, single: float, batched: float,
        build_s: float | None, memory: int | None, **extra) -> dict:
    out = {"index": name, "params": params, "recall": round(recall(ids, truth), 4), "ms_1by1": round(single, 3),
           "ms_batched": round(batched, 3), "build_s": None if build_s is None else round(build_s, 1),
           "memory_mb": None if memory is None else round(memory / 2**20, 1), **extra}
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def bench_size(n: int, dim: int, structure: rv.Structure, queries: int, hnsw_max: int, seed: int,
               work: Path, store_only: bool = False) -> dict:
    faiss.omp_set_num_threads(2)
    clock = time.perf_counter()
    stored, q, layout = rv.generate(n, dim, structure, queries=queries, seed=seed)
    generate_s = time.perf_counter() - clock
    print(f"n={n}: generated in {generate_s:.0f}s", file=sys.stderr, flush=True)
    rows = []

    def exact(batch):
        return faiss.knn(batch, stored, ivf.RECALL_K, metric=faiss.METRIC_INNER_PRODUCT)[1]
    truth, single, batched = timed(exact, q, single_max=50)  # the exact scan 1 by 1 is slow: 50 queries
    rows.append(row("exact (flat IP)", "-", truth, truth, single, batched, 0.0, stored.nbytes))
    half = queries // 2
    nlist = ivf.nlist_for(n)
    # IVF-Flat and IVF-PQ trained on the same fixed-seed sample the store's build uses
    specs = [] if store_only else [f"IVF{nlist},Flat"] + [f"IVF{nlist},PQ{m}" for m in (dim // 16, dim // 8)
                                    if m in ivf.PQ_CHOICES and not store_only]
    for spec in specs:
        clock = time.perf_counter()
        index, _ = ivf.train_search_index(stored, spec)
        for start in range(0, n, 65536):
            index.add(stored[start:start + 65536])
        build_s = time.perf_counter() - clock
        memory = index_bytes(index)
        pq = "PQ" in spec
        for nprobe in (1, 2, 4, 8, 16, 32, 64, 128):
            if nprobe > nlist:
                break
            for rerank in ((False, True) if pq else (False,)):
                rescore = (lambda found: stored[found]) if rerank else None

                def search(batch, index=index, nprobe=nprobe, rescore=rescore):
                    return ivf.search_ivf(index, batch, ivf.RECALL_K, nprobe, rescore=rescore)[1]
                ids, single, batched = timed(search, q)
                name = "IVF-PQ + exact re-rank" if rerank else ("IVF-PQ" if pq else "IVF-Flat")
                rows.append(row(name, f"{spec} nprobe={nprobe}", ids, truth, single, batched, build_s, memory,
                                recall_seen=round(recall(ids[:half], truth[:half]), 4),
                                recall_new=round(recall(ids[half:], truth[half:]), 4),
                                scanned=round(nprobe * n / nlist)))
        index = None  # its memory back before the next one
    if n <= hnsw_max and not store_only:
        clock = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 40
        for start in range(0, n, 65536):
            hnsw.add(stored[start:start + 65536])
        build_s = time.perf_counter() - clock
        memory = n * (dim * 4 + 32 * 2 * 4 + 8)  # vectors + level-0 links (2M) + offsets (upper levels ~1/M)
        for ef in (16, 32, 64, 128, 256):
            hnsw.hnsw.efSearch = ef

            def search(batch):
                return hnsw.search(batch, ivf.RECALL_K)[1]
            ids, single, batched = timed(search, q)
            rows.append(row("HNSW", f"M=32 efC=40 efSearch={ef}", ids, truth, single, batched, build_s, memory))
        del hnsw
    # the store's own: build_search_index (lists on disk, nprobe by its recall rule), served by search_ivf
    spec = ivf.choose_index(n, dim, flat_max=0)
    ids_all = np.arange(n, dtype=np.int64)
    data = work / f"bench-{n}.ivfdata"
    clock = time.perf_counter()
    index, infos = ivf.build_search_index(ids_all, stored, spec, data_path=data)
    build_s = time.perf_counter() - clock
    rescore = (lambda found: stored[found]) if infos.get("rerank") else None

    def served(batch, index=index):
        return ivf.search_ivf(index, batch, ivf.RECALL_K, infos["nprobe"], rescore=rescore)[1]
    ids, single, batched = timed(served, q)
    rows.append(row("store default (lists on disk)", f"{spec} nprobe={infos['nprobe']}", ids, truth, single,
                    batched, build_s, index_bytes(index) + data.stat().st_size,
                    recall_by_nprobe=infos["recall_by_nprobe"]))
    index = None
    data.unlink(missing_ok=True)
    return {"n": n, "dim": dim, "queries": queries, "layout": layout, "generate_s": round(generate_s, 1),
            "nlist": nlist, "rows": rows}


def bench(args) -> None:
    report = json.loads((args.out / "check.json").read_text())
    structure = rv.Structure(**report["structure"])
    for n in (int(s) for s in args.sizes.split(",")):
        result = bench_size(n, args.dim, structure, args.queries, args.hnsw_max, args.seed, args.out,
                            args.store_only)
        result["structure"] = structure.to_dict()
        name = f"bench-{n}-{args.dim}{'-store' if args.store_only else ''}.json"
        (args.out / name).write_text(json.dumps(result, indent=1))
        print(table(result))


def table(result: dict) -> str:
    lines = [f"n={result['n']:,} dim={result['dim']}",
             "| index | parameters | recall@32 | ms/query 1 by 1 | ms/query batched 64 | build s | memory MB |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['index']} | {r['params']} | {r['recall']:.3f} | {r['ms_1by1']:.2f} | {r['ms_batched']:.2f}"
                     f" | {r['build_s']} | {r['memory_mb']} |")
    return "\n".join(lines)
