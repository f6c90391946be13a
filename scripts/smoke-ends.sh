#!/usr/bin/env bash
# Both ends of pyproject.toml's ranges, each in a venv built from scratch:
#   .venv-newest  the newest releases the ranges allow (no lock)
#   .venv-oldest  every direct dependency at its floor (requirements/oldest.txt)
# In each: the versions installed, the bundled example job (built, run and verified in a temp folder) and the
# tests marked smoke. A venv that passed is removed (the newest torch the range allows is a CUDA build, ~6 GB
# in a venv, and CI's disk is shared by three venvs). usage: bash scripts/smoke-ends.sh [newest] [oldest]   (both by default)
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0

say() { echo "[smoke-ends] $*"; }

build() {  # VENV [pip options]: a fresh venv holding qvlm[test]
  local venv=$1
  shift
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$@" -e ".[test]"
}

example() {  # VENV: the README's first command, in a temp folder so that the ends do not share an output
  local venv=$PWD/$1 work
  work=$(mktemp -d)
  mkdir "$work/examples"
  cp examples/tiny-llava.yaml "$work/examples/"
  (cd "$work" && "$venv/bin/python" -m qvlm.tiny llava models/tiny-llava \
    && "$venv/bin/qvlm-submit" examples/tiny-llava.yaml && "$venv/bin/qvlm" verify out/tiny-llava-w4)
  rm -rf "$work"
}

smoke_tests() {  # VENV
  local rc=0
  "$1/bin/python" -m pytest -m smoke -q -p no:cacheprovider || rc=$?
  if [ "$rc" -eq 5 ]; then
    say "no test is marked smoke (pytest exit 5): mark the capture, job and export tests with @pytest.mark.smoke"
  fi
  return "$rc"
}

check_end() {  # NAME [pip options]
  local name=$1 venv=.venv-$1 t=$SECONDS
  shift
  build "$venv" "$@"
  say "$name: installed in $((SECONDS - t)) s:"
  bash scripts/versions.sh "$venv"
  t=$SECONDS
  example "$venv"
  say "$name: example job verified in $((SECONDS - t)) s"
  t=$SECONDS
  smoke_tests "$venv"
  say "$name: smoke tests passed in $((SECONDS - t)) s"
  rm -rf "$venv"  # a failed end keeps its venv to look into; a passed one frees its disk (newest: ~6 GB, CUDA torch)
}

ends=("$@")
[ ${#ends[@]} -gt 0 ] || ends=(newest oldest)
for end in "${ends[@]}"; do
  case $end in
    newest) check_end newest ;;
    oldest) check_end oldest -c requirements/oldest.txt ;;
    *) say "unknown end '$end' (newest or oldest)"; exit 2 ;;
  esac
done
