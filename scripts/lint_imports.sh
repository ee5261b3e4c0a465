#!/usr/bin/env bash
# The layer contracts of pyproject.toml ([tool.importlinter]), checked with import-linter.
# import-linter walks packages on disk, and in an editable install `fedpath` exists only as an
# import hook (the repository keeps common/, client/, ... at the top), so the packages are
# copied under a throwaway fedpath/ folder first. A broken contract exits 1 naming the import.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/fedpath"
: > "$tree/fedpath/__init__.py"
for package in common client server synthetic deploy; do
  cp -r "$root/$package" "$tree/fedpath/$package"
done
cd "$tree"
PYTHONPATH="$tree" "$root/.venv/bin/lint-imports" --no-cache "$root/pyproject.toml"
