#!/usr/bin/env bash
# Run HERE (not on the GPU machine): download the wheels a lent GPU machine lacks for resynth's GPU checks
# (its image has Python 3.12, torch, torchvision, numpy, pillow, accelerate, peft, safetensors, httpx ... but
# not these, or older versions: /work/.library/device/KINDS.md lists what it holds). Versions are this
# venv's, so the GPU runs the code the tests here ran. The folder .whl is git-ignored locally and travels
# with `carry: [".whl"]` (64 MiB at most together with the working tree).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
packages=""
for name in open_clip_torch ftfy wcwidth faiss-cpu SQLAlchemy greenlet diffusers transformers huggingface_hub \
            fastapi starlette uvicorn python-multipart pydantic pydantic_core annotated-types typing-inspection \
            httptools; do
    packages="$packages $name==$(version "$name")"
done
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl $packages
du -sh .whl
