#!/usr/bin/env bash
# Create .venv (if missing), install the package with its test extras (CPU torch), run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
"$PY" -m pytest -q "$@"
