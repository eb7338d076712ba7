"""Cached attributions through `resynth serve` and the library, against the CLIP model's own rate.

Builds (or reuses) a store under --workdir whose every query is a cache hit: replay sources (a published
dataset's layout: --sources sources x --descriptions descriptions x 4 stored images, smooth random pixels)
ingested with `Workspace.ingest`, and queries made the same way at other seeds, each with its description
as the prompt. Nothing is ever generated; every figure is lookup + decode + embed + search + score.

  model        the store's own embedder (the engine's feature: middle-block class token) on ready,
               preprocessed tensors on the device, batches of --max-batch, bf16 autocast on CUDA: the
               ceiling every other row is divided by
  library      `Workspace.attribute` in this process: one query per call (c=1), --max-batch per call, and a
               long list per call (--list, several chunks: the next chunk is read and embedded while one
               is scored)
  server c=N   `resynth serve` on loopback (--max-requests set to the highest level, so no request is
               shed with a 503), N client threads posting one multipart query each at a time; with
               --workers 1,4 also `serve --workers 4` (rows "server w4 c=N"); "server CPU ms" is the
               CPU time the server's processes spent per answered request

Each row gives queries per second, p50 and p99 latency (per call: a batched library call's latency is the
whole batch's), errors, and the ratio to the model's rate. Client, server and model share this machine.

Sizes:
  --size tiny (default; CI runs it with --quick): the zoo's tiny random CLIP, 64 px images, CPU.
  --size real: open_clip ViT-L-14-336 with random weights (built from its config, no download), 336 px
      images; meant for a GPU (--device cuda): on a CPU it runs at a few images per second.

    python scripts/bench_serve.py [--size tiny|real] [--device cuda] [--seconds 8] [--levels 1,32,128]
                                  [--workdir DIR] [--quick] [--json FILE]
"""
from __future__ import annotations

import argparse
import io
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
from PIL import Image  # noqa: E402

import engine  # noqa: E402
from engine.service.process import ServerProcess  # noqa: E402

SIDES = {"tiny": 64, "real": 336}
STORED_SEEDS = (0, 1, 2, 3)
QUERY_SEED = 100


def smooth_image(rng: np.random.Generator, side: int) -> Image.Image:
    """Noise upscaled: closer to a generated image than white noise (and PNG-compressible)."""
    small = rng.integers(0, 256, (max(2, side // 8), max(2, side // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((side, side), Image.BICUBIC)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def clip_files(size: str, folder: Path) -> dict:
    """engine.init's CLIP arguments: the zoo's tiny CLIP, or ViT-L-14-336 with random weights saved once."""
    if size == "tiny":
        from engine import zoo

        config, checkpoint = zoo.write_clip_checkpoint(folder)
        return {"clip_config": config, "clip_checkpoint": checkpoint}
    checkpoint = folder / "vit-l-14-336-random.pt"
    if not checkpoint.exists():
        import open_clip
        import torch

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-L-14-336", pretrained=None)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), str(checkpoint) + ".tmp")
        os.replace(str(checkpoint) + ".tmp", checkpoint)
    return {"clip_model": "ViT-L-14-336", "clip_checkpoint": checkpoint}


def build(workdir: Path, size: str, device: str | None, sources: int, descriptions: int) -> list[tuple[bytes, str]]:
    """The store (built once per workdir and shape) and the queries: (PNG bytes, prompt)."""
    shape = {"size": size, "sources": sources, "descriptions": descriptions}
    texts = [f"benchmark scene {d}: an object of kind {d % 7} under light {d % 5}" for d in range(descriptions)]
    side = SIDES[size]
    queries = [(png(smooth_image(np.random.default_rng([QUERY_SEED, s, d]), side)), texts[d])
               for d in range(descriptions) for s in range(sources)]
    marker = workdir / "ready.json"
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return queries
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    data = workdir / "dataset"
    rows = []
    for s in range(sources):
        for d in range(descriptions):
            for seed in STORED_SEEDS:
                path = data / f"source-{s}" / f"{d}-{seed}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                smooth_image(np.random.default_rng([seed, s, d]), side).save(path)
                rows.append({"image": path.relative_to(data).as_posix(), "source": f"source-{s}",
                             "description": texts[d], "role": "resynthesis", "seed": seed})
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with engine.init(workdir / "store", device=device, **clip_files(size, workdir / "clip")) as ws:
        ws.ingest(data / "manifest.jsonl")
    marker.write_text(json.dumps(shape))
    return queries


def summary(latencies: list[float], per_call: int, errors: int, elapsed: float) -> dict:
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"calls": len(latencies), "errors": errors, "qps": round(len(latencies) * per_call / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def bench_model(store: Path, queries: list[tuple[bytes, str]], device: str | None, batch: int,
                seconds: float) -> dict:
    """The embedder's own forward on ready tensors on the device (no decode, no preprocess, no store)."""
    import torch

    with engine.open(store, device=device, writable=False) as ws:
        embedder = ws.embedder
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data, _ in queries[:batch]]
        ready = torch.stack([embedder.preprocess(im) for im in images]).to(embedder.device)

        def forward() -> None:
            with torch.inference_mode(), embedder._autocast():
                embedder._features(ready)
            if embedder.cuda:
                torch.cuda.synchronize()

        forward()  # warm-up
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            forward()
            calls += 1
        elapsed = time.perf_counter() - started
        name = (torch.cuda.get_device_name(embedder.device) if embedder.cuda
                else f"CPU, {torch.get_num_threads()} threads")
        return {"qps": round(calls * len(ready) / elapsed, 1), "batch": len(ready), "device": name,
                "p50_ms": round(elapsed / calls * 1000, 2), "p99_ms": None, "errors": 0}


def bench_library(store: Path, queries: list[tuple[bytes, str]], device: str | None, per_call: int,
                  seconds: float) -> dict:
    """`Workspace.attribute` on `per_call` queries per call: the work a request does, in process."""
    with engine.open(store, device=device) as ws:

        def call(i: int) -> None:
            chunk = [queries[(i + j) % len(queries)] for j in range(per_call)]
            report = ws.attribute([data for data, _ in chunk], prompt=[prompt for _, prompt in chunk])
            assert report.generated == 0, "every query must be a cache hit"

        call(0)  # warm-up
        latencies, started, i = [], time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            call(i)
            latencies.append(time.perf_counter() - t0)
            i += per_call
        return summary(latencies, per_call, 0, time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The processes `pid` started (a --workers supervisor's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def bench_server(url: str, queries: list[tuple[bytes, str]], concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        mine, failed, i = [], 0, offset
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.perf_counter() < deadline:
                data, prompt = queries[i % len(queries)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    reply = http.post("/v1/attribute", files={"image": ("q.png", data, "image/png")},
                                      data={"prompt": prompt})
                    ok = reply.status_code == 200 and reply.json()["cache"]["generated"] == 0
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
    return summary(latencies, 1, errors[0], time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIDES), default="tiny")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the engine's choice)")
    parser.add_argument("--workdir", type=Path, help="store and dataset (default /tmp/resynth-bench-serve-SIZE)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each row")
    parser.add_argument("--levels", default="1,32,128", help="client concurrency levels")
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--descriptions", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32, help="the server's and the batched rows' batch")
    parser.add_argument("--workers", default="1", help="server worker counts to measure, e.g. 1,4 (`serve --workers`)")
    parser.add_argument("--list", type=int, default=512, help="queries per call of the long-list library row")
    parser.add_argument("--quick", action="store_true", help="CI: 0.3 s rows, levels 1 and 8, a small store")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.levels, args.descriptions, args.sources, args.list = 0.3, "1,8", 4, 4, 130
    workdir = args.workdir or Path(f"/tmp/resynth-bench-serve-{args.size}")
    queries = build(workdir, args.size, args.device, args.sources, args.descriptions)
    store = workdir / "store"
    rows: dict[str, dict] = {"model": bench_model(store, queries, args.device, args.max_batch, args.seconds)}
    rows["library c=1"] = bench_library(store, queries, args.device, 1, args.seconds)
    rows[f"library batch {args.max_batch}"] = bench_library(store, queries, args.device, args.max_batch,
                                                            args.seconds)
    rows[f"library list {args.list}"] = bench_library(store, queries, args.device, args.list, args.seconds)
    levels = [int(x) for x in args.levels.split(",")]
    batches: dict = {}
    for count in [int(x) for x in args.workers.split(",")]:
        prefix = "server" if count == 1 else f"server w{count}"
        # a deployment sized for the highest level: admits that many requests at once instead of shedding them
        extra = ["--max-batch", str(args.max_batch), "--max-requests", str(max(levels))]
        extra += ["--workers", str(count)] if count > 1 else []
        extra += ["--device", args.device] if args.device else []
        with ServerProcess(store, *extra) as server:
            for data, prompt in queries:  # warm-up: every query once
                reply = httpx.post(server.url + "/v1/attribute", files={"image": ("q.png", data, "image/png")},
                                   data={"prompt": prompt}, timeout=120)
                assert reply.status_code == 200 and reply.json()["cache"]["generated"] == 0, reply.text[:300]
            pids = [server.pid] + children(server.pid)
            for level in levels:
                cpu = sum(cpu_seconds(p) for p in pids)
                row = rows[f"{prefix} c={level}"] = bench_server(server.url, queries, level, args.seconds)
                # what one request costs the server's CPU: where the GPU outruns the cores, this (in one
                # process, the share of it that holds Python's lock) bounds the server's rate
                row["server_cpu_ms"] = round((sum(cpu_seconds(p) for p in pids) - cpu) / max(1, row["calls"])
                                             * 1000, 2)
            if count == 1:
                batches = httpx.get(server.url + "/v1/stats", timeout=30).json()["embed_batches"]
    ceiling = rows["model"]["qps"]
    for row in rows.values():
        row["vs_model"] = round(row["qps"] / ceiling, 3) if ceiling else None
    print(f"cached attributions, --size {args.size} on {rows['model']['device']}: {len(queries)} distinct queries "
          f"({args.sources} replay sources x {args.descriptions} descriptions, 4 stored each), {args.seconds:g} s "
          f"per row; {os.cpu_count()} CPU cores shared by client, server and model")
    print(f"{'':18} {'queries/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs model':>9} {'server CPU ms':>14}")
    for name, row in rows.items():
        p99 = "" if row["p99_ms"] is None else row["p99_ms"]
        print(f"{name:18} {row['qps']:>10} {row['p50_ms']:>8} {p99:>8} {row['errors']:>7} {row['vs_model']:>9} "
              f"{row.get('server_cpu_ms', ''):>14}")
    if batches:
        print(f"server CLIP forward passes: {batches['batches']} for {batches['images']} images "
              f"(mean batch {batches['mean_batch']}, one worker)")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "rows": rows, "embed_batches": batches}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
