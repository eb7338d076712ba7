"""The serving benchmark's CPU form (issue 26): scripts/bench_serve.py --quick runs end to end, every
row is made of cache hits (the script asserts nothing is generated) and no request fails."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_serve_quick_runs_on_the_cpu(tmp_path):
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_serve.py"), "--quick", "--device", "cpu",
                           "--workdir", str(tmp_path / "bench"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"model", "library c=1", "library batch 32", "library list 130", "server c=1",
                         "server c=8"}
    assert all(row["errors"] == 0 and row["qps"] > 0 for row in rows.values()), (rows, done.stdout[-2000:])
    assert rows["model"]["vs_model"] == 1.0 and "vs model" in done.stdout


def test_a_long_query_list_embeds_the_next_chunk_while_one_is_scored(tmp_path, monkeypatch):
    """`attribute` over several chunks reads and embeds chunk n+1 on a worker thread while chunk n is
    looked up and scored: the same answers as one chunk, every embedding on the worker, stage seconds kept."""
    import threading

    import numpy as np

    import engine
    import engine.request

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_serve

    queries = bench_serve.build(tmp_path / "bench", "tiny", "cpu", 2, 5)  # 10 cache-hit queries
    data, prompts = [d for d, _ in queries], [p for _, p in queries]
    with engine.open(tmp_path / "bench" / "store", device="cpu") as ws:
        whole = ws.attribute(data, prompt=prompts)
        threads: list[str] = []
        embed = ws.embed
        monkeypatch.setattr(ws, "embed", lambda images: threads.append(threading.current_thread().name)
                            or embed(images))
        monkeypatch.setattr(engine.request, "QUERY_CHUNK", 4)  # chunks of 4, 4 and 2
        chunked = ws.attribute(data, prompt=prompts)
    assert len(threads) == 3 and all(name.startswith("resynth-ahead") for name in threads), threads
    assert [r.predicted for r in chunked.results] == [r.predicted for r in whole.results]
    assert np.allclose([s.score for r in chunked.results for s in r.scores],
                       [s.score for r in whole.results for s in r.scores], atol=1e-5)
    assert chunked.seconds["embed"] > 0 and chunked.generated == 0
