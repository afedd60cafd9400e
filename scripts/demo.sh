#!/usr/bin/env bash
# Quickstart 1: set up, then run the whole path on synthetic line data (see scripts/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
