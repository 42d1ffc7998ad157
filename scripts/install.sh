#!/usr/bin/env bash
# Installs looplm and its dependencies on a fresh machine.
#   bash scripts/install.sh        # the package
#   bash scripts/install.sh dev    # the package plus pytest (with pytest-xdist) and ruff
# torch is installed first and only when missing: the CUDA build where a GPU is visible,
# the pinned CPU build elsewhere (letting pip resolve torch freely pulls GBs of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "$PY" -m pip install torch
    else
        "$PY" -m pip install "torch==2.13.0"
    fi
fi
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
"$PY" -m pip install -e ".${extra}"
