#!/usr/bin/env bash
# Creates .venv (if missing) and installs jrft with its test extra.
# torch==2.13.0 first: a CPU build is on this kind of machine; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test]'
