#!/usr/bin/env bash
# Installs x2vlm and what it needs into the active Python ($PYTHON, default python3), skipping what is there.
# With no torch installed it installs the CPU build of torch 2.13.0 first, so that nothing pulls the CUDA
# packages; an installed torch (a CUDA build included) is kept: it is pinned while the rest installs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch 2.13.0 (CPU build unless the machine provides another)"
    "$PY" -m pip install -q torch==2.13.0
fi

# Already installed from this checkout, with everything importable? Then there is nothing to do.
if "$PY" - "$PWD" "$extras" <<'PY' 2>/dev/null; then
import os, sys
import x2vlm, deepspeed, timm, transformers, webdataset, wandb, safetensors, matplotlib  # noqa: F401
assert os.path.realpath(os.path.dirname(x2vlm.__file__)) == os.path.realpath(os.path.join(sys.argv[1], "x2vlm"))
if "test" in sys.argv[2]:
    import pytest  # noqa: F401
PY
    echo "[setup] x2vlm is installed from this checkout"
    exit 0
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
cat scripts/constraints.txt > "$constraints"
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >> "$constraints"
target="."
[ -n "$extras" ] && target=".[$extras]"
echo "[setup] installing x2vlm$([ -n "$extras" ] && echo "[$extras]") and its requirements"
"$PY" -m pip install -q -c "$constraints" -e "$target"
