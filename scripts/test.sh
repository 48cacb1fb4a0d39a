#!/usr/bin/env bash
# Lint and run the default (fast) test suite. Slow learning runs: .venv/bin/pytest -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/pytest "$@"
