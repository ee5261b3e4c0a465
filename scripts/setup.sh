#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv, offline-friendly.
# torch is installed first from the CPU wheel so that no dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON_BIN=${PYTHON:-python3}
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
