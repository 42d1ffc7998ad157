#!/usr/bin/env bash
# One prepared validation of the GPU path, at most 9.5 minutes on one H100 or H200: tests/gpu,
# a 50-step bf16 ZeRO-2 job with flash-attn and with SDPA, the MFU of the Ouro-1.4B shape
# eager and compiled, the memory estimator against the measured peak, and the reproduction's
# deepest looped model for 60 steps. One JSON report.
#
#   bash scripts/gpu_check.sh [--out gpu_check.json] [--wheels DIR]
#   bash scripts/gpu_check.sh --dry-run      # anywhere: the same checks, CPU-sized
#
# See scripts/gpu_check.py for what each check measures.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python3 scripts/gpu_check.py "$@"
