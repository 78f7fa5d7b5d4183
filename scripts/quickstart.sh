#!/usr/bin/env bash
# Sets up x2vlm (installing whatever is missing) and runs the built-in demo on synthetic data.
# Usage: bash scripts/quickstart.sh [demo options, e.g. --out runs/demo]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=${PYTHON:-python3}
exec "$PY" -m x2vlm demo "$@"
