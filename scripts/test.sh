#!/usr/bin/env bash
# The project's test command (the README's second command; CI runs exactly this).
# Sets up .venv if needed, lints, then runs every test including the slow/integration ones.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# docker-compose (Debian's v1 tool) validates docker-compose.yml without a Docker engine.
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "fedpath test: installing docker-compose (Debian package) to validate docker-compose.yml"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; } \
    >/dev/null 2>&1 || echo "fedpath test: could not install docker-compose; its test will say so"
fi
# nginx (Debian's package) runs deploy/nginx/fedpath-superlink.conf in tests/test_reverse_proxy.py.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ] && [ "$(id -u)" = 0 ] \
  && command -v apt-get >/dev/null; then
  echo "fedpath test: installing nginx (Debian package) for the reverse-proxy test"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; } \
    >/dev/null 2>&1 || echo "fedpath test: could not install nginx; its test will say so"
fi
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
.venv/bin/ruff check .
.venv/bin/python -m pytest -m "slow or not slow" "$@"
