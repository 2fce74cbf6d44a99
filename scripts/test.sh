#!/usr/bin/env bash
# The test suite (fast CPU tests; `-m slow` for the long ones).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Two workers (the suite is mostly single-threaded); --dist loadfile keeps each file on one
# worker, so module-scoped fixtures (a whole pipeline run) are built once.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
