#!/usr/bin/env bash
# The device side under Python 3.8 (JetPack 5, L4T R35): a venv in .venv38 with `pip install .`
# (the edge dependencies only, at their cp38 pins) plus the test tools, then the edge tests,
# the real-broker ones included. None of them imports torch, train, engines or calibration.
# Skipped, with a line saying so, where no Python 3.8 is installed (PYTHON38 names one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY38=${PYTHON38:-}
if [ -z "$PY38" ]; then
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for p in "$root"/versions/3.8.*/bin/python3.8; do [ -x "$p" ] && PY38=$p; done
  [ -n "$PY38" ] || PY38=$(command -v python3.8 || true)
fi
if [ -z "$PY38" ]; then
  echo "== python 3.8: no interpreter found (pyenv versions/3.8.*, python3.8, \$PYTHON38): skipped"
  exit 0
fi
# The edge tests: the device's modules and what feeds them (fakebundle builds its graph with onnx).
# Not the deploy tests: deploy.sh and deploy/stage.py run on the workstation (3.10+).
EDGE_TESTS=(
  tests/test_pipeline.py tests/test_pipeline_e2e.py tests/test_mqtt.py tests/test_spool.py
  tests/test_sources.py tests/test_config.py tests/test_faults.py tests/test_postprocess.py
  tests/test_reload.py tests/test_edge_metrics.py tests/test_evidence.py tests/test_backends.py
  tests/test_ports.py tests/test_drift.py tests/test_operator_view.py tests/test_outputs.py
  tests/test_opcua.py
)
VENV=${VENV38:-.venv38}
[ -x "$VENV/bin/python" ] || "$PY38" -m venv "$VENV"
stamp="$VENV/.lineinspect-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== python 3.8: pip install .[opcua] (edge dependencies) + pytest jsonschema websocket-client onnx"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check ".[opcua]" pytest jsonschema websocket-client "onnx<1.18" \
    2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import edge, cv2, numpy, onnxruntime, paho.mqtt, yaml, onnx, pytest, websocket, asyncua"
  echo "$want" >"$stamp"
fi
echo "== python 3.8: $("$VENV/bin/python" -V) edge tests"
# The installed copy of edge must not shadow the tree under test: run from the checkout.
exec env PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -p no:cacheprovider "${EDGE_TESTS[@]}"
