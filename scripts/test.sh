#!/usr/bin/env bash
# The project's test command (the README's second command; CI runs exactly this).
# Sets up .venv if needed, lints, then runs every test including the slow/integration ones.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --test-tools
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
.venv/bin/ruff check .
bash scripts/lint_imports.sh
.venv/bin/python -m pytest -m "slow or not slow" "$@"
