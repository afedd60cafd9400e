#!/usr/bin/env bash
# Idempotent workstation setup: venv in .venv, CPU PyTorch first, the project with its extras,
# and Debian's mosquitto when missing. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

# Debian packages: the broker for the demo; for the tests also sshd + rsync (deploy.sh test) and
# chromium (renders the calibration report headlessly). `--test` asks for the test set.
apt_want=(mosquitto:/usr/sbin/mosquitto)
if [ "${1:-}" = "--test" ]; then
  apt_want+=(openssh-server:/usr/sbin/sshd openssh-client:/usr/bin/ssh rsync:/usr/bin/rsync
             chromium:/usr/bin/chromium shellcheck:/usr/bin/shellcheck)
fi
missing=()
for item in "${apt_want[@]}"; do
  [ -x "${item#*:}" ] || missing+=("${item%%:*}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
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
    $PIP install -q torch==2.13.0 numpy 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import torch" # fail loudly if that did not work
  fi
  echo "== installing lineinspect[train,dev,opcua]"
  $PIP install -q -e ".[train,dev,opcua]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import edge, train, engines, calibration, onnxruntime, paho.mqtt, efficientnet_lite_pytorch, websocket, asyncua"
  echo "$want" > "$stamp"
fi
