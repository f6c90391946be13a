#!/usr/bin/env bash
# Create .venv and install qvlm with its test extras: exactly the tested set in requirements/lock.txt (every
# package, transitive ones included, given to pip as constraints). torch there is 2.13.0, which the CPU build
# 2.13.0+cpu matches; pip prefers it wherever it can find it, so no multi-GB CUDA build on a machine without a
# GPU. scripts/lock.sh refreshes the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q -c requirements/lock.txt --upgrade pip
.venv/bin/python -m pip install -q -c requirements/lock.txt -e ".[test]"
