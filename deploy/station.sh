#!/usr/bin/env bash
# Start the station of the release this script sits in (systemd's ExecStart, supervise.sh's child).
# The release folder is resolved once, here: a later switch of `current` does not move a running
# station; the switch takes effect at the next (re)start.
set -euo pipefail
release="$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$release"
# Secrets (e.g. LINEINSPECT_MQTT_PASSWORD) live on the device only, never in a release.
env_file="$release/../../shared/station.env"
if [ -f "$env_file" ]; then
  set -a
  # shellcheck disable=SC1090
  . "$env_file"
  set +a
fi
export PYTHONPATH="$release/code" PYTHONUNBUFFERED=1
exec "$release/venv/bin/python" -m edge run "$release/station.yaml" "$@"
