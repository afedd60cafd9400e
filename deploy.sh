#!/usr/bin/env bash
# deploy.sh: one command from a workstation to a running LineInspect station on a device.
#
#   ./deploy.sh TARGET --bundle DIR --config STATION.yaml [--precision fp32|fp16|int8]
#               [--no-service] [--dry-run] [--prefix DIR] [--python PY] [--health-timeout S]
#   ./deploy.sh TARGET --rollback [--dry-run] [--prefix DIR]
#   ./deploy.sh TARGET --stop [--prefix DIR]
#
# TARGET is user@host, host, or `local` (this machine, no ssh). See docs/deploy.md.
# The systemd unit runs as --user (default: the system user `lineinspect`, created on the device).
# Environment: DEPLOY_SSH_OPTS (extra ssh options, e.g. "-p 2222 -i key"), DEPLOY_PIP_OPTS (extra
# pip options on the device, e.g. "--index-url http://mirror/simple"), DEPLOY_PYTHON (workstation
# python that stages the release; default .venv/bin/python, else python3).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TARGET=""
BUNDLE=""
CONFIG=""
PRECISION=""
PREFIX=/opt/lineinspect
DEVICE_PY=python3
ACTION=deploy
MODE=service
DRY=0
HEALTH_TIMEOUT=60
KEEP=5
UNIT_USER=""
SERVICE_USER=lineinspect # the unit's user when --user is not given; created by the install step
# What may reach ssh, the device's shell scripts, file names and the systemd unit. Checked here,
# again on the device (remote.sh), and names in the config by deploy/stage.py.
USER_RE='^[a-z_][a-z0-9_-]{0,31}$'
HOST_RE='^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$'
PATH_RE='^(/[A-Za-z0-9_.+-]+)+$'
ID_RE='^[0-9a-f]{12}$'

STAGE=""
PHASE=start  # how far a deploy got: decides what a failure rolls back
STOPPED_OLD=0
OLD_CURRENT=""
OLD_PREVIOUS=""
OLD_MODE=""
OLD_USER=""
CREDENTIALS_CHANGED=0
NSTEPS=11
STEP=0
SSH=(ssh)
RSYNC_RSH="ssh"

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

q() { printf '%q' "$1"; } # a value shown in a message: one line, whatever it holds

# A URI's password never reaches the terminal or a log: scheme://user:***@host.
redact() { sed -E 's#(://[^/:@[:space:]]*):[^/[:space:]]*@#\1:***@#g'; }

die() { # bad arguments or inputs: exit 2
  printf 'error: %s\n' "$*" >&2
  exit 2
}

fail() { # the deploy itself failed (and was rolled back): exit 1
  printf 'error: %s\n' "$*" >&2
  exit 1
}

step() {
  STEP=$((STEP + 1))
  printf '== [%d/%d] %s\n' "$STEP" "$NSTEPS" "$*"
}

# Print a command under --dry-run, run it otherwise (workstation-side commands only; the device
# side prints its own dry-run lines).
run() {
  if [ "$DRY" = 1 ]; then
    printf '[dry-run]'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

parse_args() {
  [ $# -gt 0 ] || usage 2
  case $1 in -h | --help) usage 0 ;; esac
  TARGET=$1
  shift
  while [ $# -gt 0 ]; do
    case $1 in
      --bundle) BUNDLE=${2:?--bundle needs a directory} && shift ;;
      --config) CONFIG=${2:?--config needs a file} && shift ;;
      --precision) PRECISION=${2:?--precision needs fp32, fp16 or int8} && shift ;;
      --prefix) PREFIX=${2:?--prefix needs a directory} && shift ;;
      --python) DEVICE_PY=${2:?--python needs an interpreter} && shift ;;
      --health-timeout) HEALTH_TIMEOUT=${2:?--health-timeout needs seconds} && shift ;;
      --keep) KEEP=${2:?--keep needs a count} && shift ;;
      --user) UNIT_USER=${2:?--user needs a user name} && shift ;;
      --no-service) MODE=supervisor ;;
      --dry-run) DRY=1 ;;
      --rollback) ACTION=rollback ;;
      --stop) ACTION=stop ;;
      -h | --help) usage 0 ;;
      *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
  done
  check_target
  case $PRECISION in "" | fp32 | fp16 | int8) ;; *) die "--precision: fp32, fp16 or int8, not $(q "$PRECISION")" ;; esac
  [[ $HEALTH_TIMEOUT =~ ^[0-9]+$ ]] || die "--health-timeout: whole seconds, not $(q "$HEALTH_TIMEOUT")"
  if ! [[ $KEEP =~ ^[0-9]+$ ]] || [ "$KEEP" -lt 2 ]; then die "--keep: at least 2, not $(q "$KEEP")"; fi
  [[ $PREFIX == /* ]] || die "--prefix must be an absolute path on the device, not $(q "$PREFIX")"
  # The prefix is written into the systemd unit (where '%' and spaces are syntax) and rm -rf'd
  # under: plain path components only.
  if ! [[ $PREFIX =~ $PATH_RE ]] || [[ /$PREFIX/ == */../* || /$PREFIX/ == */./* ]]; then
    die "--prefix: $(q "$PREFIX") is not a plain absolute path (letters, digits, _ . + - between" \
      "slashes, no . or ..)"
  fi
  [[ $DEVICE_PY =~ ^[A-Za-z0-9_./+-]+$ ]] || die "--python: $(q "$DEVICE_PY") is not a command name or path"
  if [ -n "$UNIT_USER" ] && [ "$MODE" = supervisor ]; then
    die "--user sets the systemd unit's user; with --no-service the station runs as the login user"
  fi
  if [ -n "$UNIT_USER" ] && ! [[ $UNIT_USER =~ $USER_RE ]]; then
    die "--user: $(q "$UNIT_USER") is not a user name (a-z, 0-9, _ -, at most 32)"
  fi
  if [ "$ACTION" = deploy ] && [ "$MODE" = service ] && [ -z "$UNIT_USER" ]; then
    UNIT_USER=$SERVICE_USER
  fi
  if [ "$ACTION" = deploy ]; then
    [ -n "$BUNDLE" ] || die "--bundle DIR is required (or --rollback / --stop)"
    [ -n "$CONFIG" ] || die "--config STATION.yaml is required"
    [ -d "$BUNDLE" ] || die "--bundle $BUNDLE: not a directory"
    [ -f "$CONFIG" ] || die "--config $CONFIG: no such file"
  fi
  if [ "$TARGET" != local ]; then
    local opts=()
    # Split on whitespace on purpose: DEPLOY_SSH_OPTS is a list of ssh options.
    read -r -a opts <<<"${DEPLOY_SSH_OPTS:-}"
    SSH=(ssh -o BatchMode=yes -o ConnectTimeout=10 "${opts[@]}")
    RSYNC_RSH="ssh -o BatchMode=yes -o ConnectTimeout=10 ${DEPLOY_SSH_OPTS:-}"
  fi
}

# TARGET reaches ssh and rsync as an argument: one starting with '-' would be an option
# (-oProxyCommand=... runs a command here). Only `local`, host or user@host get through.
check_target() {
  [ "$TARGET" = local ] && return 0
  local user="" host=$TARGET
  if [[ $TARGET == *@* ]]; then
    user=${TARGET%%@*}
    host=${TARGET#*@}
  fi
  if [[ $TARGET == *@* ]] && ! [[ $user =~ $USER_RE ]] || ! [[ $host =~ $HOST_RE ]]; then
    die "TARGET: $(q "$TARGET") is not local, host or user@host (host: letters, digits, _ . -," \
      "not starting with -; for IPv6 or odd names use a Host alias in ~/.ssh/config)"
  fi
}

# Run deploy/remote.sh COMMAND ARGS on the device: piped through ssh, or directly for `local`.
remote() {
  local args=(--prefix "$PREFIX" --python "$DEVICE_PY")
  [ "$DRY" = 1 ] && args+=(--dry-run)
  [ -n "${DEPLOY_PIP_OPTS:-}" ] && args+=(--pip-opts "$DEPLOY_PIP_OPTS")
  [ -n "${STATION_ID:-}" ] && args+=(--station "$STATION_ID")
  [ -n "$UNIT_USER" ] && args+=(--user "$UNIT_USER")
  args+=("$@")
  if [ "$TARGET" = local ]; then
    bash "$REPO/deploy/remote.sh" "${args[@]}"
  else
    "${SSH[@]}" -- "$TARGET" "bash -s --$(printf ' %q' "${args[@]}")" <"$REPO/deploy/remote.sh"
  fi
}

# remote ARGS with FILE on the command's stdin (remote() pipes the script itself through ssh's
# stdin): runs the remote.sh the release just shipped. For a secret: it never is an argument.
remote_with_input() {
  local file=$1
  shift
  local args=(--prefix "$PREFIX" --python "$DEVICE_PY")
  [ -n "$UNIT_USER" ] && args+=(--user "$UNIT_USER")
  args+=("$@")
  if [ "$DRY" = 1 ]; then
    remote "$@" </dev/null
  elif [ "$TARGET" = local ]; then
    bash "$REPO/deploy/remote.sh" "${args[@]}" <"$file"
  else
    "${SSH[@]}" -- "$TARGET" \
      "bash $(printf '%q' "$PREFIX/releases/$REL_ID/deploy/remote.sh")$(printf ' %q' "${args[@]}")" <"$file"
  fi
}

indent() { redact | sed 's/^/    /'; }

# Read `fact key=value` lines of remote output into FACT_key variables; print the other lines.
# The device's output is data: only these keys are read, each by a plain assignment (a key used
# as a variable name, e.g. by printf -v, runs any $(...) in an array subscript).
read_facts() {
  local line value rest=""
  while IFS= read -r line; do
    value=${line#fact *=}
    case $line in
      "fact current="*) FACT_current=$value ;;
      "fact previous="*) FACT_previous=$value ;;
      "fact mode="*) FACT_mode=$value ;;
      "fact tensorrt="*) FACT_tensorrt=$value ;;
      "fact user="*) FACT_user=$value ;;
      "fact "*) ;; # a fact this deploy.sh does not know: ignored
      *) rest+="$line"$'\n' ;;
    esac
  done
  printf '%s' "$rest" | redact
}

# current/previous/mode facts into OLD_*; a release id the device reports must look like one.
take_facts() {
  local name id
  OLD_CURRENT=${FACT_current:-}
  OLD_PREVIOUS=${FACT_previous:-}
  for name in current previous; do
    if [ "$name" = current ]; then id=$OLD_CURRENT; else id=$OLD_PREVIOUS; fi
    if [ -n "$id" ] && ! [[ $id =~ $ID_RE ]]; then
      die "$TARGET:$PREFIX/$name -> $(q "$id") is not a release id: fix or remove that link"
    fi
  done
  case ${FACT_mode:-} in "" | service | supervisor) OLD_MODE=${FACT_mode:-} ;; *) OLD_MODE="" ;; esac
  OLD_USER=""
  if [[ ${FACT_user:-} =~ $USER_RE ]]; then OLD_USER=$FACT_user; fi
}

# ------------------------------------------------------------------------------------- steps
step_stage() {
  PHASE=stage
  local py=${DEPLOY_PYTHON:-}
  if [ -z "$py" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then py="$REPO/.venv/bin/python"; else py=python3; fi
  fi
  STAGE=$(mktemp -d "${TMPDIR:-/tmp}/lineinspect-release.XXXXXX")
  "$py" "$REPO/deploy/stage.py" --repo "$REPO" --config "$CONFIG" --bundle "$BUNDLE" \
    --prefix "$PREFIX" ${PRECISION:+--precision "$PRECISION"} --out "$STAGE/release" --shell \
    >"$STAGE/info" || exit 2 # stage.py said why, in one `error:` line
  # REL_KEY=value lines, read as data by a fixed list of keys (never eval'd).
  local line value
  while IFS= read -r line; do
    value=${line#*=}
    case ${line%%=*} in
      REL_ID) REL_ID=$value ;;
      REL_LINE) REL_LINE=$value ;;
      REL_STATION) REL_STATION=$value ;;
      REL_MODEL) REL_MODEL=$value ;;
      REL_BACKEND) REL_BACKEND=$value ;;
      REL_PRECISION) REL_PRECISION=$value ;;
      REL_SOURCE) REL_SOURCE=$value ;;
      REL_CAMERA) REL_CAMERA=$value ;;
      REL_EXCLUSIVE) REL_EXCLUSIVE=$value ;;
      REL_BYTES) REL_BYTES=$value ;;
      REL_CREDENTIALS) REL_CREDENTIALS=$value ;;
    esac
  done <"$STAGE/info"
  [[ ${REL_ID:-} =~ $ID_RE ]] || fail "deploy/stage.py gave no release id"
  STATION_ID="$REL_LINE/$REL_STATION"
  chmod 755 "$STAGE/release" # the staged root is mkdtemp's 0700; the station user must read it
  step "stage: release $REL_ID: model $REL_MODEL, station $STATION_ID, backend $REL_BACKEND" \
    "$REL_PRECISION, $((REL_BYTES / 1024)) KiB"
}

step_preflight() {
  PHASE=preflight
  step "preflight: $TARGET${PREFIX:+ ($PREFIX)}"
  local fails=0
  command -v rsync >/dev/null || {
    printf 'FAIL  %-10s %s\n' rsync "not installed on this workstation: apt-get install rsync"
    fails=1
  }
  if [ "$TARGET" != local ]; then
    local err
    if err=$("${SSH[@]}" -- "$TARGET" true 2>&1); then
      printf 'ok    %-10s %s\n' ssh "$TARGET reachable"
    else
      printf 'FAIL  %-10s %s\n' ssh "$TARGET: $(printf '%s' "$err" | tail -n1)"
      fail "preflight failed: nothing was changed on $TARGET"
    fi
  fi
  local out rc=0 need=$((REL_BYTES * 2))
  out=$(remote preflight --service "$([ "$MODE" = service ] && echo yes || echo no)" \
    --camera "$REL_CAMERA" --need-bytes "$need" --backend "$REL_BACKEND" 2>&1) || rc=$?
  read_facts <<<"$out"
  take_facts
  if [ "$rc" != 0 ] || [ "$fails" != 0 ]; then
    fail "preflight failed: nothing was changed on $TARGET"
  fi
  if [ -z "${FACT_tensorrt:-}" ] && [ -n "$PRECISION" ] && [ "$PRECISION" != fp32 ]; then
    echo "note  --precision $PRECISION without TensorRT: ONNX Runtime runs the bundle's $PRECISION graph"
  fi
}

step_ship() {
  PHASE=ship
  local dest="$PREFIX/releases/$REL_ID/"
  step "ship: release $REL_ID -> $TARGET:$dest"
  remote prepare 2>&1 | indent
  # Left alone on the device: the venv and engine-cache links, and the bytecode python writes.
  local rsync=(rsync -rlp --checksum --delete --itemize-changes
    --filter='P /venv' --filter='P /bundle/engines' --exclude=__pycache__/)
  if [ "$TARGET" = local ]; then
    rsync+=("$STAGE/release/" "$dest")
  else
    rsync+=(-e "$RSYNC_RSH" -- "$STAGE/release/" "$TARGET:$dest")
  fi
  if [ "$DRY" = 1 ]; then
    run "${rsync[@]}"
    ship_private
    return 0
  fi
  local changes
  # Itemized lines starting with <, >, c, h or * are created, sent or deleted entries; a line
  # starting with '.' is an unchanged file. No -t: mtimes of a fresh stage are no change.
  changes=$("${rsync[@]}" | grep -c '^[<>ch*]' || true)
  if [ "$changes" = 0 ]; then
    echo "    release $REL_ID already on the device, identical: nothing copied"
  else
    echo "    $changes files and folders created or updated"
  fi
  ship_private
}

# The release's owner-only files (a config with a camera password, a TLS key) readable by the
# service user too; the broker credentials to their own file outside the release.
ship_private() {
  remote private-files "$REL_ID" 2>&1 | indent
  [ -n "${REL_CREDENTIALS:-}" ] || return 0
  local out
  out=$(remote_with_input "$STAGE/credentials.yaml" credentials "$REL_CREDENTIALS" 2>&1)
  printf '%s\n' "$out" | grep -v '^fact ' | indent
  # New credentials with the same release: the station must restart to use them.
  if grep -qx 'fact credentials=changed' <<<"$out"; then CREDENTIALS_CHANGED=1; fi
}

step_venv() {
  PHASE=venv
  step "venv: python environment for the station on the device"
  local args=() r
  while IFS= read -r r; do [ -n "$r" ] && args+=(--req "$r"); done <"$STAGE/release/requirements.txt"
  while IFS= read -r r; do [ -n "$r" ] && args+=(--req-jetson "$r"); done \
    <"$STAGE/release/requirements-jetson.txt"
  remote venv "$REL_ID" "${args[@]}" 2>&1 | indent
}

step_engine() {
  PHASE=engine
  step "engine: $REL_PRECISION for backend $REL_BACKEND"
  remote engine "$REL_ID" "$REL_PRECISION" "$REL_BACKEND" 2>&1 | indent
}

step_check() {
  PHASE=check
  step "check: python -m edge check on the device"
  if [ "$REL_EXCLUSIVE" = True ] && [ -n "$OLD_CURRENT" ]; then
    echo "    $REL_SOURCE is held by one process at a time: stopping the running station first"
    STOPPED_OLD=1
    remote stop 2>&1 | indent
  fi
  remote check "$REL_ID" 2>&1 | indent
}

step_service() {
  PHASE=service
  if [ "$MODE" = service ]; then
    step "service: systemd unit (Restart=always, after network-online, journal)"
  else
    step "service: none (--no-service): supervised background process"
  fi
  remote install-service "$REL_ID" "$MODE" 2>&1 | indent
}

step_switch() {
  PHASE=switched
  local prev=$OLD_CURRENT
  [ "$OLD_CURRENT" = "$REL_ID" ] && prev=$OLD_PREVIOUS # same release again: keep the way back
  step "switch: current -> $REL_ID (previous -> ${prev:-none})"
  remote links "$REL_ID" "$prev" 2>&1 | indent
}

step_restart() {
  step "restart: station of release $REL_ID"
  remote start "$MODE" 2>&1 | indent
}

step_health() {
  step "health: retained 'online' status of release $REL_ID (up to ${HEALTH_TIMEOUT}s)"
  remote health "$REL_ID" "$MODE" "$HEALTH_TIMEOUT" 2>&1 | indent
}

step_prune() {
  PHASE=finished
  step "prune: keep the newest $KEEP releases"
  remote prune "$KEEP" 2>&1 | indent
}

# ----------------------------------------------------------------------------------- rollback
# On any failure after staging: bring back what ran before (the EXIT trap calls this).
on_exit() {
  local rc=$?
  set +e
  if [ "$rc" != 0 ] && [ "$DRY" = 0 ]; then
    case $PHASE in
      start | stage | preflight | finished) ;;
      ship | venv | engine | check | service)
        remote mark "$REL_ID" "failed at $PHASE:" >/dev/null 2>&1
        if [ -z "$OLD_CURRENT" ]; then
          echo "rollback: deploy failed at $PHASE; there was no station before: none is running"
        elif [ "$STOPPED_OLD" = 1 ]; then
          echo "rollback: deploy failed at $PHASE; restarting release $OLD_CURRENT"
          restore_old
        else
          echo "rollback: deploy failed at $PHASE; release $OLD_CURRENT stays current and was" \
            "never stopped"
        fi
        ;;
      switched)
        remote mark "$REL_ID" "failed at health:" >/dev/null 2>&1
        if [ -z "$OLD_CURRENT" ]; then
          echo "rollback: first release $REL_ID failed; stopping it, no station is running"
          remote stop 2>&1 | indent
          remote links "" "" 2>&1 | indent
        else
          echo "rollback: release $REL_ID failed; switching back to $OLD_CURRENT"
          remote links "$OLD_CURRENT" "$OLD_PREVIOUS" 2>&1 | indent
          restore_old
        fi
        ;;
    esac
  fi
  [ -n "$STAGE" ] && rm -rf "$STAGE"
  case $PHASE in
    ship | venv | engine | check | service | switched)
      if [ "$rc" != 0 ]; then
        local at=$PHASE
        [ "$at" = switched ] && at="start/health, after the switch"
        [ "$DRY" = 0 ] && printf 'error: release %s failed at %s (rolled back, see above)\n' \
          "$REL_ID" "$at" >&2
        rc=1 # whatever status the failing step had: the deploy failed
      fi
      ;;
  esac
  exit "$rc"
}

restore_old() { # runs under set +e (from on_exit): each step only if the one before worked
  local mode=${OLD_MODE:-$MODE} ok=0
  if [ "$mode" = service ]; then UNIT_USER=${OLD_USER:-$UNIT_USER}; else UNIT_USER=""; fi
  if remote install-service "$OLD_CURRENT" "$mode" 2>&1 | indent &&
    remote start "$mode" 2>&1 | indent &&
    remote health "$OLD_CURRENT" "$mode" "$HEALTH_TIMEOUT" 2>&1 | indent; then
    ok=1
  fi
  if [ "$ok" = 1 ]; then
    echo "rollback: release $OLD_CURRENT is current and online again"
  else
    echo "rollback: release $OLD_CURRENT is current but NOT healthy: look at the device"
  fi
}

# ------------------------------------------------------------------------------------ actions
do_deploy() {
  step_stage
  step_preflight
  step_ship
  step_venv
  step_engine
  if [ "$DRY" = 0 ] && [ "$OLD_CURRENT" = "$REL_ID" ] && [ "$CREDENTIALS_CHANGED" = 0 ] &&
    remote is-live "$REL_ID" "$MODE"; then
    PHASE=finished
    echo "== release $REL_ID is already current and online on $TARGET: nothing changed"
    return 0
  fi
  step_check
  step_service
  step_switch
  step_restart
  step_health
  step_prune
  if [ "$DRY" = 1 ]; then
    echo "== dry run: nothing was changed on $TARGET"
  else
    echo "== deployed release $REL_ID to $TARGET ($PREFIX/current); previous: ${OLD_CURRENT:-none}"
  fi
}

do_rollback() {
  NSTEPS=3
  local out
  out=$(remote facts)
  read_facts <<<"$out"
  take_facts
  MODE=${OLD_MODE:-$MODE}
  # The unit's user, as the deploy that installed it recorded it: check and health run as it.
  if [ "$MODE" = service ]; then UNIT_USER=${UNIT_USER:-${OLD_USER:-$SERVICE_USER}}; else UNIT_USER=""; fi
  [ -n "$OLD_CURRENT" ] || die "$TARGET:$PREFIX has no current release"
  [ -n "$OLD_PREVIOUS" ] || die "$TARGET:$PREFIX has no previous release to roll back to"
  REL_ID=$OLD_PREVIOUS
  PHASE=switched
  step "switch: current -> $REL_ID (previous -> $OLD_CURRENT)"
  remote links "$REL_ID" "$OLD_CURRENT" 2>&1 | indent
  step "restart: station of release $REL_ID"
  remote start "$MODE" 2>&1 | indent
  step "health: retained 'online' status of release $REL_ID (up to ${HEALTH_TIMEOUT}s)"
  remote health "$REL_ID" "$MODE" "$HEALTH_TIMEOUT" 2>&1 | indent
  PHASE=finished
  if [ "$DRY" = 1 ]; then
    echo "== dry run: nothing was changed on $TARGET"
  else
    echo "== rolled back to release $REL_ID on $TARGET (run --rollback again to return to $OLD_CURRENT)"
  fi
}

main() {
  parse_args "$@"
  trap on_exit EXIT
  case $ACTION in
    deploy) do_deploy ;;
    rollback) do_rollback ;;
    stop)
      NSTEPS=1
      step "stop: station under $TARGET:$PREFIX"
      remote stop 2>&1 | indent
      ;;
  esac
}

main "$@"
