#!/usr/bin/env bash
# The checks that need a GPU (Triton kernels; bf16 / fp16 training steps over NCCL with ZeRO-2 and ZeRO-3, a
# checkpoint and a resume), in one command of a few minutes. The last line printed is one JSON object.
# Usage: bash scripts/gpu_check.sh [--steps 4] [--skip kernels|training]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
