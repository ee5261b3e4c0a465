#!/usr/bin/env bash
# The README's first command: set up .venv on a fresh machine, then run `fedpath demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec .venv/bin/fedpath demo "$@"
