#!/usr/bin/env bash
# Run ON the lent GPU machine, in one call (device tool: command "bash scripts/device/checks.sh",
# carry [".whl"], timeout_s about 540): installs the carried wheels, then the GPU benchmarks at real size,
# each bounded so the whole call ends in time. Results land in $OUT (JSON and logs). Prepare .whl first
# with scripts/device/wheels.sh, here.
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, open_clip, diffusers, faiss, fastapi; print('imports ok', torch.__version__)" || exit 1
# 1. the serving benchmark at ViT-L/14-336 (issue 26): model rate, library, server at c=1/32/128, 1 and 4 workers
timeout 330 python3 scripts/bench_serve.py --size real --device cuda --seconds 6 --levels 1,32,128 --workers 1,4 \
    --workdir /tmp/bench-serve-real --json "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log"
# 2. generation and embedding against the raw libraries, quick form
timeout 180 python3 scripts/bench_gpu.py --size real --quick --device cuda --json 2>&1 | tee "$OUT/gpu.log"
