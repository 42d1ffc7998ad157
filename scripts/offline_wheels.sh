#!/usr/bin/env bash
# Wheels of looplm's runtime dependencies, at the versions installed here, for a GPU machine
# that has CUDA PyTorch (and Triton) but no package index:
#
#   bash scripts/offline_wheels.sh [DIR=wheels] [PYTHON_VERSION=3.12]
#   # copy DIR there, then: bash scripts/gpu_check.sh --wheels DIR
#
# Binary wheels are downloaded for that Python on x86-64 Linux; DeepSpeed and ANTLR publish
# only source archives, so they are built here into pure-Python wheels (DeepSpeed's CUDA ops
# compile on first use there). torch, numpy and the other packages a CUDA PyTorch image
# already holds are left out; wandb too (logging.wandb=false needs none).
set -euo pipefail
dir=${1:-wheels}
python_version=${2:-3.12}
mkdir -p "$dir"
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
binary=()
for name in hydra-core omegaconf datasets dill multiprocess hjson pydantic pydantic-core \
    annotated-types typing-inspection zstandard; do
  binary+=("$name==$(version "$name")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dir" "${binary[@]}" liger-kernel==0.8.5
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$dir" \
  "deepspeed==$(version deepspeed)" "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls "$dir"
du -sh "$dir"
