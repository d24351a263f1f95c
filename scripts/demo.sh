#!/usr/bin/env bash
# Create .venv (if missing), install the package (CPU torch), run the main job: `verifier demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
.venv/bin/verifier demo "$@"
