#!/usr/bin/env bash
# Create .venv and install dit_compress with its test extras. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ditc-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing torch 2.13.0 (CPU) and dit_compress into .venv ..." >&2
  # torch first and pinned: an unpinned torch may resolve to a multi-GB CUDA build.
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" >&2 || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "is ignored" >&2 || true
  .venv/bin/python -c "import torch, diffusers, onnxruntime, dit_compress" 
  echo "$want" > "$stamp"
fi
