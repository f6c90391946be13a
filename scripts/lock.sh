#!/usr/bin/env bash
# Refresh requirements/lock.txt, the exact set scripts/setup.sh installs: qvlm[test] goes into a throwaway
# venv with nothing but pyproject.toml's ranges (so pip takes the newest releases they allow) on top of the
# local CPU build of torch, and every package installed there is written down. Run it, then the tests, then
# commit the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="torch==2.13.0"  # the CPU build (2.13.0+cpu, found through pip's find-links); PyPI's 2.13.0 pulls CUDA

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
pip=("$scratch/venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q "$TORCH"
"${pip[@]}" install -q -e ".[test]"
{
  echo "# The tested set: every package scripts/setup.sh installs, transitive ones included, used there as a"
  echo "# pip constraints file. Written by scripts/lock.sh ($(python3 -V), $(date -u +%Y-%m-%d)); do not edit by hand."
  echo "# torch has no local label, so the CPU build 2.13.0+cpu matches where pip can find it."
  "${pip[@]}" freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
