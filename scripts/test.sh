#!/usr/bin/env bash
# Quickstart 2 (and CI): set up, lint, run the test suite. Extra args go to pytest,
# e.g. `scripts/test.sh -m "not slow"` for the quick run.
# Then the device side again under Python 3.8 (JetPack 5): scripts/test_py38.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
bash scripts/test_py38.sh
