#!/usr/bin/env bash
# Sets up x2vlm with its test requirements (installing whatever is missing) and runs the test suite.
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k config
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
PY=${PYTHON:-python3}
exec "$PY" -m pytest -q "$@" tests
