#!/usr/bin/env bash
# Keep one station running where there is no systemd (deploy.sh --no-service): start it, restart it
# when it exits (backoff 1 s doubling to 30 s, reset after a minute of good running), append its
# output to RUN_DIR/station.log, and on SIGTERM pass the signal on and wait for it to drain.
#
#   supervise.sh RELEASE_DIR RUN_DIR
#
# RUN_DIR/supervisor.pid holds this script's pid, RUN_DIR/restarts how often the station exited
# without being asked to (the health check reads it to tell a crash loop from a slow start).
set -uo pipefail  # no -e: a failing station is what this loop is for
release=$1
run_dir=$2
log="$run_dir/station.log"
max_log_bytes=$((10 * 1024 * 1024))

echo 0 >"$run_dir/restarts"
echo $$ >"$run_dir/supervisor.pid"
child=0
stopping=0
on_signal() {
  stopping=1
  if [ "$child" -gt 0 ]; then kill -TERM "$child" 2>/dev/null || true; fi
}
trap on_signal TERM INT

note() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) supervise: $*" >>"$log"; }

delay=1
restarts=0
while [ "$stopping" = 0 ]; do
  if [ -f "$log" ] && [ "$(stat -c %s "$log")" -gt "$max_log_bytes" ]; then
    mv -f "$log" "$log.1"  # one old generation; journald does this properly under systemd
  fi
  note "starting $release"
  started=$SECONDS
  "$release/deploy/station.sh" >>"$log" 2>&1 </dev/null &
  child=$!
  rc=0
  wait "$child" || rc=$?
  # A trapped signal ends `wait` early: keep waiting while the station drains.
  while kill -0 "$child" 2>/dev/null; do
    rc=0
    wait "$child" || rc=$?
  done
  child=0
  note "station exited with status $rc"
  [ "$stopping" = 1 ] && break
  restarts=$((restarts + 1))
  echo "$restarts" >"$run_dir/restarts"
  if [ $((SECONDS - started)) -ge 60 ]; then delay=1; fi
  note "restart $restarts in $delay s"
  sleep "$delay" &
  sleeper=$!
  wait "$sleeper" || true # interruptible by SIGTERM, unlike a foreground sleep
  kill "$sleeper" 2>/dev/null || true
  delay=$((delay * 2 > 30 ? 30 : delay * 2))
done
note "stopped"
rm -f "$run_dir/supervisor.pid"
