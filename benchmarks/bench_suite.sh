#!/usr/bin/env bash
# The default test suite's wall time from a clean clone, as CI runs it: a fresh clone of
# this checkout's HEAD, a fresh virtual environment, the README's test command (with
# pytest's 25 slowest tests). Prints the install and test times separately.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
git clone -q "$root" "$work/kdcli"
cd "$work/kdcli"
t0=$(date +%s)
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
pip install -q -e ".[test]"
t1=$(date +%s)
pytest -q --durations=25
t2=$(date +%s)
echo "install: $(( t1 - t0 )) s; test suite: $(( t2 - t1 )) s (target: under 300 s on 2 cores)"
grep -m1 "model name" /proc/cpuinfo
