#!/usr/bin/env bash
# The main job: compress the bundled digits DiT (half its blocks), recover, export ONNX, report, gate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ditc run recipes/digits-dit-depth50.yaml -o exports/digits-dit-depth50 "$@"
