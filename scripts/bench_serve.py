"""Throughput of `resynth serve` on cached attributions, against the library called in process.

Builds (or reuses) a demo store with `resynth demo --workdir` (tiny model zoo, every description's
resyntheses stored), then:

1. library: this process opens the store with `engine.open` and calls `Workspace.attribute` on one
   query at a time (the PNG bytes and prompt a request carries) for --seconds;
2. server: starts `resynth serve` on loopback and, at each concurrency level, that many client
   threads post the same queries (multipart PNG + prompt) for --seconds each;
3. library again: on a shared machine other load comes and goes (and a torch call made while
   other processes hold the cores can stall for ~0.4 s), so the library runs before and after
   the server and the ratio is taken against the faster of the two runs.

Prints requests per second, p50 and p99 latency and errors per level, and the ratio of the
server's rate to the in-process library's. Client and server share this machine's cores, so the
server figures include the client's own cost.

    python scripts/bench_serve.py [--workdir /tmp/resynth-bench] [--seconds 8] [--levels 1,8,32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

import engine  # noqa: E402
from engine.demo import DESCRIPTIONS, MARKER, run_demo  # noqa: E402
from engine.service.process import ServerProcess  # noqa: E402


def demo_queries(workdir: Path) -> list[tuple[bytes, str]]:
    """(PNG bytes, prompt) of every demo original; all their resyntheses are stored by the demo."""
    if not (workdir / MARKER).exists() or not (workdir / "store").exists():
        print(f"building the demo store in {workdir} ...", file=sys.stderr)
        run_demo(workdir, progress=False)
    rows = []
    for path in sorted((workdir / "dataset" / "originals").glob("*/*.png")):
        rows.append((path.read_bytes(), DESCRIPTIONS[int(path.stem)]))
    return rows


def summary(latencies: list[float], errors: int, elapsed: float) -> dict:
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests": len(latencies), "errors": errors, "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def bench_library(store_dir: Path, queries: list[tuple[bytes, str]], seconds: float) -> dict:
    """The same work a request does (decode, describe, cache lookup, embed, score), one query per call."""
    with engine.open(store_dir) as ws:

        def one(i: int, warming: bool = False) -> None:
            data, prompt = queries[i % len(queries)]
            report = ws.attribute(data, prompt=prompt)  # the upload's bytes, decoded by the one image reader
            assert warming or report.generated == 0, "every resynthesis should be stored after warming up"

        for i in range(len(queries)):  # warm up: generates whatever the demo did not store (e.g. a larger K)
            one(i, warming=True)
        latencies, started, i = [], time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            one(i)
            latencies.append(time.perf_counter() - t0)
            i += 1
        return summary(latencies, 0, time.perf_counter() - started)


def bench_server(url: str, queries: list[tuple[bytes, str]], concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        mine, failed, i = [], 0, offset
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.perf_counter() < deadline:
                data, prompt = queries[i % len(queries)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    ok = http.post("/v1/attribute", files={"image": ("q.png", data, "image/png")},
                                   data={"prompt": prompt}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    mine.append(time.perf_counter() - t0)
                else:
                    failed += 1
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(latencies, errors[0], time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/resynth-bench", help="demo workdir (built if missing)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each measurement")
    parser.add_argument("--levels", default="1,8,32", help="client concurrency levels")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    queries = demo_queries(workdir)
    load_before = os.getloadavg()[0]
    library_runs = [bench_library(workdir / "store", queries, args.seconds)]
    rows = {}
    with ServerProcess(workdir / "store") as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:  # warm up: every query once
            for data, prompt in queries:
                reply = http.post("/v1/attribute", files={"image": ("q.png", data, "image/png")},
                                  data={"prompt": prompt})
                assert reply.status_code == 200 and reply.json()["cache"]["generated"] == 0, reply.text
        for level in (int(x) for x in args.levels.split(",")):
            rows[level] = bench_server(server.url, queries, level, args.seconds)
        stats = httpx.get(server.url + "/v1/stats").json()
    library_runs.append(bench_library(workdir / "store", queries, args.seconds))
    library = max(library_runs, key=lambda run: run["rps"])
    print(f"cached attributions, {len(queries)} distinct queries, {args.seconds:g} s per row, "
          f"{os.cpu_count()} CPU cores shared by client and server; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'':14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs library':>11}")
    for name, run in zip(("library before", "library after"), library_runs):
        mark = "1.00" if run is library else f"{run['rps'] / library['rps']:.2f}"
        print(f"{name:14} {run['rps']:>8} {run['p50_ms']:>8} {run['p99_ms']:>8} {0:>7} {mark:>11}")
    for level, row in rows.items():
        ratio = row["rps"] / library["rps"] if library["rps"] else float("nan")
        row["vs_library"] = round(ratio, 2)
        print(f"{f'server c={level}':14} {row['rps']:>8} {row['p50_ms']:>8} {row['p99_ms']:>8} "
              f"{row['errors']:>7} {ratio:>11.2f}")
    batches = stats["embed_batches"]
    print(f"server CLIP forward passes: {batches['batches']} for {batches['images']} images "
          f"(mean batch {batches['mean_batch']}); generated during the run: "
          f"{stats['service'].get('generated', 0)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"library": library_runs, "server": rows, "embed_batches": batches},
                                              indent=2))


if __name__ == "__main__":
    main()
