#!/usr/bin/env bash
# Quickstart 2 (and CI): set up, lint, run the test suite. Extra args go to pytest,
# e.g. `scripts/test.sh -m "not slow"` for the quick run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
