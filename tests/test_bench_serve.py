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
    assert set(rows) == {"model", "library c=1", "library batch 32", "server c=1", "server c=8"}
    assert all(row["errors"] == 0 and row["qps"] > 0 for row in rows.values())
    assert rows["model"]["vs_model"] == 1.0 and "vs model" in done.stdout
