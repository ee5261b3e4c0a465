#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv, offline-friendly.
# torch is installed first from the CPU wheel so that no dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON_BIN=${PYTHON:-python3}
# --test-tools: also the system tools the tests drive, installed here once (as root, from
# Debian's packages) rather than during the tests: docker-compose (Debian's v1 tool) validates
# docker-compose.yml without a Docker engine; nginx runs deploy/nginx/fedpath-superlink.conf in
# tests/test_reverse_proxy.py. Without root or apt-get, the tests that need them say so.
if [ "${1:-}" = "--test-tools" ]; then
  missing=()
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "fedpath setup: installing ${missing[*]} (Debian packages) for the tests"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
      >/dev/null 2>&1 || echo "fedpath setup: could not install ${missing[*]}; their tests say so"
  fi
fi
stamp=.venv/.fedpath-setup-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/fedpath ]; then
  exit 0
fi
echo "fedpath setup: installing into .venv (first run takes a minute or two)"
[ -x .venv/bin/python ] || "$PYTHON_BIN" -m venv .venv
pip_install() {
  # pip's resolver warns about unused find-links folders on some machines; keep real errors.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
pip_install "torch==2.13.0"
pip_install -c constraints.txt -e ".[dev]"
echo "$want" > "$stamp"
