#!/usr/bin/env bash
# Idempotent workstation setup: venv in .venv, CPU PyTorch first, the project with its extras,
# and Debian's mosquitto when missing. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "== installing mosquitto (Debian package)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.lineinspect-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # A bare `torch` requirement would pull a multi-GB CUDA build: install the CPU build first, the
  # project's `torch>=2.1` range is then already satisfied.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "== installing CPU PyTorch"
    $PIP install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import torch" # fail loudly if that did not work
  fi
  echo "== installing lineinspect[train,dev]"
  $PIP install -q -e ".[train,dev]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import edge, train, engines, calibration, onnxruntime, paho.mqtt, efficientnet_lite_pytorch"
  echo "$want" > "$stamp"
fi
