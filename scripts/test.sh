#!/usr/bin/env bash
# The project's test command (the README's second command; CI runs exactly this).
# Sets up .venv if needed, lints, then runs every test including the slow/integration ones.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --test-tools
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
.venv/bin/ruff check .
bash scripts/lint_imports.sh
# Four workers on two cores: the real-process tests spend much of their time waiting on
# Flower's polling (measured on 2 cores: pytest 17.8 min with -n 4 and loadfile, 19 min
# with -n 2, 25-38 min serial).
# loadfile keeps each file on one worker (module fixtures built once); tests/conftest.py
# orders the longest files first (xdist hands them out in batches, so some share a worker).
.venv/bin/python -m pytest -m "slow or not slow" -n 4 --dist loadfile "$@"
