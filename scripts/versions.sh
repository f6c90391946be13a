#!/usr/bin/env bash
# Print the versions a venv holds of qvlm's direct dependencies (those named in requirements/oldest.txt).
# usage: bash scripts/versions.sh VENV
set -euo pipefail
cd "$(dirname "$0")/.."
names=$(sed -e 's/#.*//' -e 's/[=<>!~ ].*//' requirements/oldest.txt | grep .)
# shellcheck disable=SC2086
"$1/bin/python" - $names <<'PY'
import sys
from importlib.metadata import version

print("  " + " ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
