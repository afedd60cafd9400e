#!/usr/bin/env bash
# Device side of deploy.sh. deploy.sh runs it over ssh (`ssh HOST bash -s -- ARGS < remote.sh`)
# or, for `local`, directly; nothing has to be installed on the device first.
#
#   remote.sh [--prefix DIR] [--python PY] [--station LINE/NAME] [--user USER] [--dry-run]
#             [--pip-opts "..."] COMMAND [ARGS]
#
# Layout under PREFIX (default /opt/lineinspect), owned by the deploying login user:
#   releases/<id>/   code/ bundle/ files/ deploy/ station.yaml RELEASE, venv -> ../../venvs/<key>
#   current, previous  links to releases/<id>; each is switched atomically (rename of a new link)
#   venvs/<key>/     one per (requirements, python, arch): shared by releases that need the same
#   shared/          station (line/name), mode, user, engines/ (TensorRT cache), station.env
#                    (environment, written by you, never shipped)
#   credentials/     <line>-<name>.yaml: the broker user/password moved out of the release
#                    config, 0600, owned by the station's user
#   data/            what the station writes: spool.sqlite, evidence (owned by --user)
#   run/             started, and for --no-service: supervisor.pid, restarts, station.log
#   deploy.log       one line per switch, rollback and failed release
#
# sudo (non-interactive, `sudo -n`) is used only where root is needed: creating PREFIX when its
# parent is not writable, creating the service user, handing data/ and the credentials to it,
# running `edge check` and the health check as it, the systemd unit, journalctl.
# The station itself never runs as root under systemd: see lineinspect.service.in.
# With --dry-run every command that would change the device is printed, not run; read-only probes
# (versions, free disk, whether a venv exists, whether the station is online) still run.
set -euo pipefail

PREFIX=/opt/lineinspect
PY=python3
DRY=0
PIP_OPTS=""
STATION=""    # line/name of the station being deployed ('' = what the prefix holds)
STATION_USER="" # user of the systemd unit ('' = the login user; --no-service: always it)
SUDO=()       # sudo -n when not root
SERVICE_USER=lineinspect # the system user the install step creates when it is the unit's user
# Values that reach file names, the unit and messages: checked here too, whoever called us.
NAME_RE='[A-Za-z0-9][A-Za-z0-9_.-]{0,63}'
STATION_RE="^$NAME_RE/$NAME_RE\$"
USER_RE='^[a-z_][a-z0-9_-]{0,31}$'
PATH_RE='^(/[A-Za-z0-9_.+-]+)+$'
ID_RE='^[0-9a-f]{12}$'

say() { printf '%s\n' "$*"; }
ok() { printf 'ok    %-10s %s\n' "$1" "$2"; }
bad() { printf 'FAIL  %-10s %s\n' "$1" "$2"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}
refuse() { # hostile or malformed input: nothing was done
  printf 'error: %s\n' "$*" >&2
  exit 2
}
q() { printf '%q' "$1"; }
plain_path() { [[ $1 =~ $PATH_RE ]] && [[ /$1/ != */../* && /$1/ != */./* ]]; }

# Run a command that changes the device, or print it under --dry-run.
run() {
  if [ "$DRY" = 1 ]; then
    printf '[dry-run]'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Write stdin to PATH through a temp file and a rename, or print what would be written.
# `write_file PATH root` writes as root (systemd's directory).
write_file() {
  local path=$1 sudo=()
  if [ "${2:-}" = root ]; then sudo=("${SUDO[@]}"); fi
  if [ "$DRY" = 1 ]; then
    printf '[dry-run] write %s:\n' "$path"
    sed 's/^/[dry-run]   /'
  else
    "${sudo[@]}" tee "$path.tmp" >/dev/null
    "${sudo[@]}" mv -f "$path.tmp" "$path"
  fi
}

# Point link NAME (under PREFIX) at releases/ID atomically: a new link renamed over the old one.
set_link() {
  local name=$1 id=$2
  if [ -z "$id" ]; then
    run rm -f "$PREFIX/$name"
  else
    run ln -sfn "releases/$id" "$PREFIX/.$name.new"
    run mv -T "$PREFIX/.$name.new" "$PREFIX/$name"
  fi
}

link_id() { # release id a link points at, '' when none
  local t
  t=$(readlink "$PREFIX/$1" 2>/dev/null) || return 0
  basename "$t"
}

log_event() {
  if [ "$DRY" = 0 ] && [ -d "$PREFIX" ]; then
    printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >>"$PREFIX/deploy.log"
  fi
}

station_id() { # line/name: from --station, else from what the prefix holds
  if [ -n "$STATION" ]; then
    printf '%s' "$STATION"
  else
    local held
    held=$(cat "$PREFIX/shared/station" 2>/dev/null) || die "$PREFIX/shared/station: no station deployed here"
    [[ $held =~ $STATION_RE ]] || refuse "$PREFIX/shared/station: $(q "$held") is not line/name"
    printf '%s' "$held"
  fi
}

# The user the station runs as, when it is not the login user ('' when it is).
station_user() {
  if [ -n "$STATION_USER" ] && [ "$STATION_USER" != "$(id -un)" ]; then printf '%s' "$STATION_USER"; fi
}

# Command prefix that runs what follows as the station's user.
as_station() {
  local user
  user=$(station_user)
  if [ -z "$user" ]; then
    AS_STATION=()
  elif [ "$(id -u)" = 0 ]; then
    AS_STATION=(runuser -u "$user" --)
  else
    AS_STATION=(sudo -n -u "$user" --)
  fi
}

unit_name() {
  local id
  id=$(station_id)
  printf 'lineinspect-%s' "$(printf '%s' "${id/\//-}" | tr -c 'A-Za-z0-9_.-' '_')"
}

existing_parent() {
  local d=$1
  while [ ! -e "$d" ]; do d=$(dirname "$d"); done
  printf '%s' "$d"
}

mode_of_prefix() { cat "$PREFIX/shared/mode" 2>/dev/null || true; }

# --------------------------------------------------------------------------------- preflight
# One line per check; exit 1 when any failed. `fact key=value` lines are for deploy.sh.
cmd_preflight() {
  local service=yes camera="" need=0 backend=auto fails=0
  while [ $# -gt 0 ]; do
    case $1 in
      --service) service=$2 ;;
      --camera) camera=$2 ;;
      --need-bytes) need=$2 ;;
      --backend) backend=$2 ;;
      *) die "preflight: unknown option $1" ;;
    esac
    shift 2
  done

  local arch
  arch=$(uname -m)
  case $arch in
    aarch64 | x86_64) ok arch "$arch" ;;
    *) bad arch "$arch: LineInspect runs on aarch64 (Jetson) or x86_64" && fails=$((fails + 1)) ;;
  esac

  if [ -f /etc/nv_tegra_release ]; then
    local l4t jp
    l4t=$(sed -n 's/^# R\([0-9]*\) (release), REVISION: \([0-9.]*\).*/R\1.\2/p' /etc/nv_tegra_release)
    jp=$(dpkg-query -W -f='${Version}' nvidia-jetpack 2>/dev/null || true)
    # JetPack 5.1 is L4T R35.2 (Python 3.8, TensorRT 8.5); 6.x is R36 (Python 3.10).
    local major=${l4t#R} minor
    major=${major%%.*}
    minor=${l4t#R*.}
    minor=${minor%%.*}
    if [ -n "$l4t" ] && { [ "$major" -lt 35 ] || { [ "$major" = 35 ] && [ "$minor" -lt 2 ]; }; }; then
      bad jetson "L4T $l4t${jp:+, JetPack $jp}: LineInspect needs JetPack 5.1 (L4T R35.2) or 6.x (R36)"
      fails=$((fails + 1))
    else
      ok jetson "L4T ${l4t:-unknown}${jp:+, JetPack $jp}"
    fi
  else
    ok jetson "not a Jetson (no /etc/nv_tegra_release)"
  fi

  local pyver
  if ! pyver=$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null); then
    bad python "$PY not found (pass --python)"
    fails=$((fails + 1))
  elif ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 8))'; then
    bad python "$PY is $pyver; the station needs 3.8+ (python3 is 3.8 on JetPack 5, 3.10 on 6)"
    fails=$((fails + 1))
  elif ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
    bad python "$PY $pyver has no venv/ensurepip: apt-get install python3-venv"
    fails=$((fails + 1))
  else
    ok python "$PY $pyver"
  fi

  local trt=""
  trt=$("$PY" -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null) || trt=""
  if [ -n "$trt" ]; then
    ok tensorrt "$trt (system python, visible in the venv)"
    # pycuda (the `jetson` extra) is built from source by pip: it needs nvcc and Python.h.
    if ! "$PY" -c 'import pycuda' 2>/dev/null; then
      if ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then
        bad cuda "no nvcc to build pycuda: apt-get install nvidia-jetpack (or cuda-toolkit)"
        fails=$((fails + 1))
      elif ! "$PY" -c 'import os, sysconfig as s; assert os.path.exists(s.get_paths()["include"] + "/Python.h")' 2>/dev/null; then
        bad cuda "no Python.h to build pycuda: apt-get install python3-dev"
        fails=$((fails + 1))
      else
        ok cuda "nvcc and Python.h present: pip builds pycuda on the first deploy"
      fi
    fi
  elif [ "$backend" = tensorrt ]; then
    bad tensorrt "not found, but the station config asks for backend tensorrt"
    fails=$((fails + 1))
  else
    ok tensorrt "not found: the station will run the ONNX Runtime backend"
  fi

  local parent avail
  parent=$(existing_parent "$PREFIX")
  avail=$(($(df -Pk "$parent" | awk 'NR==2 {print $4}') * 1024))
  # A venv (numpy, opencv, onnxruntime) takes ~400 MB; count it unless one exists already.
  if ! compgen -G "$PREFIX/venvs/*/.complete" >/dev/null; then need=$((need + 600 * 1024 * 1024)); fi
  if [ "$avail" -ge "$need" ]; then
    ok disk "$((avail / 1048576)) MB free at $parent (need $((need / 1048576)) MB)"
  else
    bad disk "$((avail / 1048576)) MB free at $parent, need $((need / 1048576)) MB"
    fails=$((fails + 1))
  fi

  if [ -n "$camera" ]; then
    if [ -c "$camera" ]; then
      ok camera "$camera present"
    else
      local found
      found=$(find /dev -maxdepth 1 -name 'video*' 2>/dev/null | sort | tr '\n' ' ')
      bad camera "$camera not present (video devices: ${found:-none})"
      fails=$((fails + 1))
    fi
  else
    ok camera "source needs no local device (edge check reads a frame)"
  fi

  if command -v rsync >/dev/null; then
    ok rsync "$(rsync --version | head -n1 | awk '{print $3}')"
  else
    bad rsync "not installed: apt-get install rsync"
    fails=$((fails + 1))
  fi

  local me
  me=$(id -un)
  if [ -e "$PREFIX" ] && [ ! -w "$PREFIX" ]; then
    bad prefix "$PREFIX is not writable by $me: deploy as its owner, or chown it to $me"
    fails=$((fails + 1))
  elif [ ! -e "$PREFIX" ] && [ ! -w "$parent" ] && ! sudo -n true 2>/dev/null; then
    bad prefix "cannot create $PREFIX: $parent is not writable and sudo asks $me for a password"
    fails=$((fails + 1))
  else
    ok prefix "$PREFIX (owned by $me)"
  fi

  if [ "$service" = yes ]; then
    if [ ! -d /run/systemd/system ]; then
      bad systemd "systemd is not running here: deploy with --no-service"
      fails=$((fails + 1))
    elif [ "${#SUDO[@]}" -gt 0 ] && ! sudo -n true 2>/dev/null; then
      bad systemd "installing a unit needs root: passwordless sudo for $me, or --no-service"
      fails=$((fails + 1))
    else
      ok systemd "$(systemctl --version | head -n1)"
    fi
  fi
  if [ -n "$STATION_USER" ] && id "$STATION_USER" >/dev/null 2>&1; then
    ok user "the station runs as $STATION_USER ($(id -nG "$STATION_USER" | tr ' ' ','))"
  elif [ "$STATION_USER" = "$SERVICE_USER" ]; then
    ok user "the station will run as $SERVICE_USER: a system user created now (group video)"
  elif [ -n "$STATION_USER" ]; then
    bad user "no user $STATION_USER on the device (only $SERVICE_USER is created by deploy)"
    fails=$((fails + 1))
  fi

  local held
  held=$(cat "$PREFIX/shared/station" 2>/dev/null || true)
  if [ -n "$held" ] && ! [[ $held =~ $STATION_RE ]]; then
    # Not echoed as it is: it goes back to deploy.sh as lines of output.
    bad station "$PREFIX/shared/station holds $(q "$held"), not line/name: fix or remove it"
    fails=$((fails + 1))
  elif [ -n "$STATION" ] && [ -n "$held" ] && [ "$held" != "$STATION" ]; then
    bad station "$PREFIX holds station $held, not $STATION: one station per --prefix"
    fails=$((fails + 1))
  fi

  say "fact tensorrt=$trt"
  cmd_facts
  [ "$fails" = 0 ]
}

# current/previous release ids and the mode (for deploy.sh's --rollback and its own rollback).
cmd_facts() {
  say "fact current=$(link_id current)"
  say "fact previous=$(link_id previous)"
  say "fact mode=$(mode_of_prefix)"
  say "fact user=$(cat "$PREFIX/shared/user" 2>/dev/null || true)"
}

cmd_prepare() {
  if [ ! -d "$PREFIX" ] && [ ! -w "$(existing_parent "$PREFIX")" ]; then
    # Created once as root, then owned by the login user: no sudo for anything under it.
    run sudo -n mkdir -p "$PREFIX"
    run sudo -n chown "$(id -u):$(id -g)" "$PREFIX"
  fi
  local d
  for d in releases venvs shared shared/engines data run; do
    [ -d "$PREFIX/$d" ] || run mkdir -p "$PREFIX/$d"
  done
  if [ ! -f "$PREFIX/shared/station" ]; then
    printf '%s\n' "$(station_id)" | write_file "$PREFIX/shared/station"
  fi
  if [ -n "$STATION_USER" ] && [ "$(cat "$PREFIX/shared/user" 2>/dev/null || true)" != "$STATION_USER" ]; then
    printf '%s\n' "$STATION_USER" | write_file "$PREFIX/shared/user"
  fi
  if [ "$STATION_USER" = "$SERVICE_USER" ] && ! id "$SERVICE_USER" >/dev/null 2>&1; then
    # No login, no home, no password: a user that only runs the station.
    run "${SUDO[@]}" useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin --comment "LineInspect station" "$SERVICE_USER"
    if getent group video >/dev/null; then run "${SUDO[@]}" usermod -aG video "$SERVICE_USER"; fi
  fi
  # A station running as another user writes its spool (and evidence) under data/.
  if [ -n "$(station_user)" ] &&
    [ "$(stat -c %U "$PREFIX/data" 2>/dev/null || true)" != "$STATION_USER" ]; then
    run "${SUDO[@]}" chown -R "$STATION_USER:" "$PREFIX/data"
  fi
}

# Files of release ID that stage.py made owner-only (a config holding a camera's password, a
# TLS key): readable by the station's user through its own group, by nobody else.
cmd_private_files() { # ID
  local rel="$PREFIX/releases/$1" user f
  user=$(station_user)
  [ -n "$user" ] || return 0
  if [ "$DRY" = 1 ] && [ ! -d "$rel" ]; then
    say "[dry-run] owner-only files of releases/$1: group $user, mode 0640"
    return 0
  fi
  while IFS= read -r -d '' f; do
    run "${SUDO[@]}" chgrp "$(id -gn "$user")" "$f"
    run chmod 0640 "$f"
  done < <(find "$rel" -type f -perm 0600 -print0)
}

# NAME: the broker credentials from stdin (fd 3) to PREFIX/credentials/NAME, 0600, owned by the
# station's user. Written to a new file and renamed: never readable by others, never half there.
cmd_credentials() { # NAME
  local name=$1 dir="$PREFIX/credentials" user owner
  [[ $name =~ ^$NAME_RE-$NAME_RE\.yaml$ ]] || refuse "credentials: $(q "$name") is not <line>-<name>.yaml"
  user=$(station_user)
  owner=${user:-$(id -un)}
  if [ "$DRY" = 1 ]; then
    say "[dry-run] write $dir/$name (0600, owner $owner): the broker user name and password"
    return 0
  fi
  [ -d "$dir" ] || mkdir -p "$dir"
  local root=()
  if [ -n "$user" ]; then
    root=("${SUDO[@]}")
    chmod 0711 "$dir" # the station's user opens its own file by name; nobody lists the folder
  else
    chmod 0700 "$dir"
  fi
  # shellcheck disable=SC2016 # $1, $2 are the inner shell's arguments
  "${root[@]}" sh -c 'umask 077
    cat >"$1.new" && chown "$2:" "$1.new" || exit 1
    if cmp -s "$1.new" "$1"; then rm -f "$1.new"; echo unchanged; else mv -f "$1.new" "$1"; echo changed; fi' \
    sh "$dir/$name" "$owner" <&3 | {
    read -r what
    say "credentials $dir/$name (0600, owner $owner): $what"
    say "fact credentials=$what"
  }
}

# ------------------------------------------------------------------------------------- venv
# venv ID --req "SPEC" ... --req-jetson "SPEC" ...: create or reuse venvs/<key>, link it.
cmd_venv() {
  local id=$1 reqs=() jetson=()
  shift
  while [ $# -gt 0 ]; do
    case $1 in
      --req) reqs+=("$2") ;;
      --req-jetson) jetson+=("$2") ;;
      *) die "venv: unknown option $1" ;;
    esac
    shift 2
  done
  if "$PY" -c 'import tensorrt' 2>/dev/null; then
    reqs+=("${jetson[@]}")
    [ -d /usr/local/cuda/bin ] && PATH="$PATH:/usr/local/cuda/bin" # nvcc for pycuda's build
  fi

  # JetPack's own OpenCV (GStreamer, nvarguscamerasrc) and an onnxruntime-gpu wheel are visible
  # through --system-site-packages: a pip copy would shadow them with CPU-only, GStreamer-less
  # builds. JetPack's cv2 is built against numpy 1.x, so numpy stays below 2 then.
  local final=() r sys_cv2=0 sys_ort=0
  "$PY" -c 'import cv2' 2>/dev/null && sys_cv2=1
  "$PY" -c 'import onnxruntime' 2>/dev/null && sys_ort=1
  for r in "${reqs[@]}"; do
    case $r in
      opencv-python*) if [ "$sys_cv2" = 1 ]; then continue; fi ;;
      onnxruntime*) if [ "$sys_ort" = 1 ]; then continue; fi ;;
    esac
    final+=("$r")
  done
  if [ "$sys_cv2" = 1 ]; then
    final+=("numpy<2")
    say "system OpenCV $("$PY" -c 'import cv2; print(cv2.__version__)') is used (not opencv-python-headless)"
  fi
  if [ "$sys_ort" = 1 ]; then
    say "system onnxruntime $("$PY" -c 'import onnxruntime as o; print(o.__version__)') is used"
  fi

  local text key dir
  text=$(printf '%s\n' "${final[@]}")
  key=$(printf '%s\n%s\n%s\n' "$text" "$("$PY" -VV 2>&1)" "$(uname -m)" | sha256sum | cut -c1-12)
  dir="$PREFIX/venvs/$key"
  if [ -f "$dir/.complete" ]; then
    say "venv $key reused ($(tr '\n' ' ' <"$dir/.complete"))"
  else
    say "creating venv $key with --system-site-packages: $(printf '%s ' "${final[@]}")"
    run rm -rf "$dir"
    run "$PY" -m venv --system-site-packages "$dir"
    # shellcheck disable=SC2086 # PIP_OPTS is a list of options, split on purpose
    run "$dir/bin/python" -m pip install -q --disable-pip-version-check $PIP_OPTS "${final[@]}"
    run "$dir/bin/python" -c 'import numpy, cv2, yaml, paho.mqtt, onnxruntime'
    printf '%s\n' "$text" | write_file "$dir/.complete"
  fi
  local rel="$PREFIX/releases/$id"
  if [ "$(readlink "$rel/venv" 2>/dev/null || true)" != "../../venvs/$key" ]; then
    run ln -sfn "../../venvs/$key" "$rel/venv"
  fi
  # TensorRT engines are per device: one cache for every release, keyed by onnx sha inside.
  if [ "$(readlink "$rel/bundle/engines" 2>/dev/null || true)" != "../../../shared/engines" ]; then
    run ln -sfn ../../../shared/engines "$rel/bundle/engines"
  fi
}

station_python() { # ID ARGS: the release's python with its code on the path (login user)
  AS_STATION=()
  release_python "$@"
}

station_python_as_station() { # ID ARGS: the same, as the station's user (what it can read)
  as_station
  release_python "$@"
}

release_python() {
  local rel="$PREFIX/releases/$1"
  shift
  # From the release folder: `python -m` puts the working directory first on sys.path, and an
  # `edge` folder there (a checkout, for `local`) would shadow the release's code.
  if [ "$DRY" = 1 ]; then
    run cd "$rel"
  else
    cd "$rel"
  fi
  run "${AS_STATION[@]}" env PYTHONPATH="$rel/code" "$rel/venv/bin/python" "$@"
}

# ----------------------------------------------------------------------------------- engine
cmd_engine() { # ID PRECISION BACKEND
  local id=$1 precision=$2 backend=$3 rel="$PREFIX/releases/$1"
  if [ "$backend" = onnxruntime ]; then
    say "backend onnxruntime in the station config: no TensorRT engine needed"
  elif ! "$PY" -c 'import tensorrt' 2>/dev/null; then
    say "TensorRT not found on device: running the ONNX Runtime backend ($precision graph)"
  else
    # Reuses a cached engine whose name (onnx sha, GPU, TensorRT version, precision) matches.
    station_python "$id" -m engines build "$rel/bundle" --precision "$precision"
  fi
}

cmd_check() { # ID: as the station's user: its credentials, camera group and files
  station_python_as_station "$1" -m edge check "$PREFIX/releases/$1/station.yaml"
}

# --------------------------------------------------------------------------------- service
supervisor_pid() { # pid of our running supervisor, '' when none
  local pid
  pid=$(cat "$PREFIX/run/supervisor.pid" 2>/dev/null) || return 0
  if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "deploy/supervise.sh"; then
    printf '%s' "$pid"
  fi
}

unit_restarts() { systemctl show -p NRestarts --value "$(unit_name)" 2>/dev/null || echo 0; }

unit_path() { printf '/etc/systemd/system/%s.service' "$(unit_name)"; }

is_running() { # MODE
  if [ "$1" = service ]; then
    systemctl is-active --quiet "$(unit_name)" 2>/dev/null
  else
    [ -n "$(supervisor_pid)" ]
  fi
}

# Folders the station of release ID writes outside PREFIX/data (stage.py's WRITABLE).
writable_paths() { # ID
  local p
  while IFS= read -r p; do
    plain_path "$p" || refuse "releases/$1/WRITABLE: $(q "$p") is not a plain absolute path"
    printf '%s\n' "$p"
  done < <(cat "$PREFIX/releases/$1/WRITABLE" 2>/dev/null || true)
}

cmd_unit() { # ID: the systemd unit for this prefix and station, rendered from release ID
  local id=$1 unit user=${STATION_USER:-$(id -un)} station
  [[ $user =~ $USER_RE ]] || refuse "unit: $(q "$user") is not a user name"
  station=$(station_id)
  unit=$(unit_name)
  local text rw="-$PREFIX/data" home=yes p paths
  paths=$(writable_paths "$id")
  for p in $paths; do rw+=" -$p"; done # '-': a folder not there yet is no start failure
  # ProtectHome=yes hides /home, /root and /run/user: read-only where the station lives there.
  for p in "$PREFIX" $paths; do
    case $p/ in /home/* | /root/* | /run/user/*) home=read-only ;; esac
  done
  text=$(<"$PREFIX/releases/$id/deploy/lineinspect.service.in")
  # Every value was checked against a strict pattern above; quoted replacements are literal
  # (no '&' or '\' expansion, unlike sed).
  text=${text//@PREFIX@/"$PREFIX"}
  text=${text//@USER@/"$user"}
  text=${text//@UNIT@/"$unit"}
  text=${text//@STATION@/"$station"}
  text=${text//@READWRITE@/"$rw"}
  text=${text//@PROTECTHOME@/"$home"}
  # The video group gives a non-root station the camera; a system without one gets no such line.
  if ! getent group video >/dev/null; then
    text=$(printf '%s\n' "$text" | grep -v '^SupplementaryGroups=')
  fi
  printf '%s\n' "$text"
}

cmd_install_service() { # ID MODE (service|supervisor)
  local id=$1 mode=$2
  if [ "$(mode_of_prefix)" != "$mode" ]; then
    printf '%s\n' "$mode" | write_file "$PREFIX/shared/mode"
  fi
  if [ "$mode" != service ]; then
    say "--no-service: the station runs under deploy/supervise.sh, log in $PREFIX/run/station.log"
    return 0
  fi
  local unit path text
  unit=$(unit_name)
  path=$(unit_path)
  if [ "$DRY" = 1 ] && [ ! -d "$PREFIX/releases/$id" ]; then
    text=$(printf '(the unit from releases/%s/deploy/lineinspect.service.in)' "$id")
  else
    text=$(cmd_unit "$id")
  fi
  if [ -f "$path" ] && [ "$(cat "$path")" = "$text" ]; then
    say "unit $unit unchanged ($path)"
  else
    printf '%s\n' "$text" | write_file "$path" root
    run "${SUDO[@]}" systemctl daemon-reload
    say "unit $unit written: $path"
  fi
  systemctl is-enabled --quiet "$unit" 2>/dev/null || run "${SUDO[@]}" systemctl enable "$unit"
  # ProtectSystem=strict: the station cannot create a folder it writes outside PREFIX/data.
  local p user
  user=$(station_user)
  while IFS= read -r p; do
    [ -n "$p" ] && [ ! -d "$p" ] && run "${SUDO[@]}" install -d -m 0750 -o "${user:-$(id -un)}" "$p"
  done < <(writable_paths "$id")
}

cmd_stop() {
  local pid
  pid=$(supervisor_pid)
  if [ -n "$pid" ]; then
    say "stopping supervised station (pid $pid)"
    run kill -TERM "$pid"
    if [ "$DRY" = 0 ]; then
      local tries=300 # the station drains its queue and spool: up to 30 s
      while [ -d "/proc/$pid" ] && [ "$tries" -gt 0 ]; do
        sleep 0.1
        tries=$((tries - 1))
      done
      if [ -d "/proc/$pid" ]; then
        say "supervisor $pid still running after 30 s: killing its process group"
        kill -KILL -- "-$pid" 2>/dev/null || true
      fi
    fi
  fi
  if [ -d /run/systemd/system ] && [ -f "$PREFIX/shared/station" ] && [ -f "$(unit_path)" ] &&
    systemctl is-active --quiet "$(unit_name)"; then
    say "stopping unit $(unit_name)"
    run "${SUDO[@]}" systemctl stop "$(unit_name)"
  fi
}

cmd_start() { # MODE: (re)start the current release
  local mode=$1
  # The health check accepts only statuses published after this (device clock).
  date +%s | write_file "$PREFIX/run/started"
  if [ "$mode" = service ]; then
    # A supervised station left from a --no-service deploy would hold the camera.
    if [ -n "$(supervisor_pid)" ]; then cmd_stop; fi
    run "${SUDO[@]}" systemctl restart "$(unit_name)"
    # systemd counts its automatic restarts: more of them than now during the health check
    # means the station crash-loops.
    unit_restarts | write_file "$PREFIX/run/restarts"
    return 0
  fi
  cmd_stop
  if [ "$DRY" = 1 ]; then
    run setsid "$PREFIX/current/deploy/supervise.sh" "$PREFIX/current" "$PREFIX/run"
    return 0
  fi
  local rel
  rel=$(cd -P "$PREFIX/current" && pwd)
  say "starting $rel under deploy/supervise.sh"
  rm -f "$PREFIX/run/supervisor.pid"
  echo 0 >"$PREFIX/run/restarts" # not a count left by the supervisor before
  # setsid: own session and process group, so the ssh session can end and stop can kill it all.
  setsid "$rel/deploy/supervise.sh" "$rel" "$PREFIX/run" </dev/null >/dev/null 2>&1 &
  local tries=50
  while [ -z "$(supervisor_pid)" ] && [ "$tries" -gt 0 ]; do
    sleep 0.1
    tries=$((tries - 1))
  done
  [ -n "$(supervisor_pid)" ] || die "supervisor did not start (see $PREFIX/run/station.log)"
}

# ------------------------------------------------------------------------------------ health
cmd_health() { # ID MODE TIMEOUT: wait until the station started last is online
  local id=$1 mode=$2 timeout=$3 rel="$PREFIX/releases/$1" out rc since
  since=$(cat "$PREFIX/run/started" 2>/dev/null || echo 0)
  if [ "$DRY" = 1 ]; then
    station_python_as_station "$id" "$rel/deploy/health.py" "$rel" --timeout "$timeout" --since "<start>"
    return 0
  fi
  as_station # the health check reads the station's config and credentials
  # Short slices: between them, a crash loop ends the wait early.
  local deadline=$((SECONDS + timeout)) slice
  while :; do
    slice=$((deadline - SECONDS))
    [ "$slice" -le 5 ] || slice=5
    [ "$slice" -ge 1 ] || slice=1
    rc=0
    out=$(cd "$rel" && "${AS_STATION[@]}" env PYTHONPATH="$rel/code" "$rel/venv/bin/python" \
      "$rel/deploy/health.py" "$rel" --timeout "$slice" --since "$since" 2>&1) || rc=$?
    if [ "$rc" = 0 ]; then
      if is_running "$mode"; then
        say "$out"
        return 0
      fi
      out="station process is not running although its status said online"
    fi
    local restarts=0 before
    before=$(cat "$PREFIX/run/restarts" 2>/dev/null || echo 0)
    if [ "$mode" = service ]; then
      restarts=$(($(unit_restarts) - before))
    else
      restarts=$before # supervise.sh counts from 0 at every start
    fi
    if [ "$restarts" -gt 0 ]; then
      out="$out; the station exited and was restarted (crash loop?)"
      break
    fi
    [ "$SECONDS" -lt "$deadline" ] || break
  done
  say "$out"
  say "last lines of the station log:"
  cmd_logs 20 "$since" | sed 's/^/    /'
  return 1
}

cmd_logs() { # [LINES] [SINCE]
  local n=${1:-50} since=${2:-}
  if [ "$(mode_of_prefix)" = service ]; then
    "${SUDO[@]}" journalctl -u "$(unit_name)" -n "$n" --no-pager ${since:+--since "@$since"} 2>&1 || true
  else
    tail -n "$n" "$PREFIX/run/station.log" 2>/dev/null || true
  fi
}

# Exit 0 when release ID is current, running in MODE and online: nothing to do.
cmd_is_live() { # ID MODE
  local id=$1 mode=$2 rel="$PREFIX/releases/$1"
  as_station
  [ "$(link_id current)" = "$id" ] && [ -x "$rel/venv/bin/python" ] && is_running "$mode" &&
    (cd "$rel" && "${AS_STATION[@]}" env PYTHONPATH="$rel/code" "$rel/venv/bin/python" \
      "$rel/deploy/health.py" "$rel" --timeout 5 --settle 0 >/dev/null 2>&1)
}

cmd_links() { # CURRENT PREVIOUS ('' removes a link)
  set_link current "$1"
  set_link previous "$2"
  log_event "current=${1:-none} previous=${2:-none}"
}

cmd_mark() { # ID WHAT: note a failed release in deploy.log
  log_event "$2 $1"
}

# Keep the newest KEEP releases plus current and previous; drop venvs no release links to.
cmd_prune() { # KEEP
  local keep=$1 cur prev n=0 r
  cur=$(link_id current)
  prev=$(link_id previous)
  [ -d "$PREFIX/releases" ] || return 0
  # shellcheck disable=SC2012 # release names are hex ids: ls -t is safe and lists newest first
  while read -r r; do
    n=$((n + 1))
    if [ "$n" -gt "$keep" ] && [ "$r" != "$cur" ] && [ "$r" != "$prev" ]; then
      say "removing old release $r"
      run rm -rf "${PREFIX:?}/releases/$r"
    fi
  done < <(ls -1t "$PREFIX/releases")
  local v used
  for v in "$PREFIX"/venvs/*; do
    [ -d "$v" ] || continue
    used=0
    for r in "$PREFIX"/releases/*; do
      [ "$(readlink "$r/venv" 2>/dev/null || true)" = "../../venvs/$(basename "$v")" ] && used=1
    done
    if [ "$used" = 0 ]; then
      say "removing unused venv $(basename "$v")"
      run rm -rf "$v"
    fi
  done
}

main() {
  while [ $# -gt 0 ]; do
    case $1 in
      --prefix) PREFIX=$2 && shift 2 ;;
      --python) PY=$2 && shift 2 ;;
      --pip-opts) PIP_OPTS=$2 && shift 2 ;;
      --station) STATION=$2 && shift 2 ;;
      --user) STATION_USER=$2 && shift 2 ;;
      --dry-run) DRY=1 && shift ;;
      *) break ;;
    esac
  done
  plain_path "$PREFIX" || refuse "--prefix: $(q "$PREFIX") is not a plain absolute path"
  [ -z "$STATION" ] || [[ $STATION =~ $STATION_RE ]] || refuse "--station: $(q "$STATION") is not line/name"
  [ -z "$STATION_USER" ] || [[ $STATION_USER =~ $USER_RE ]] || refuse "--user: $(q "$STATION_USER") is not a user name"
  [[ $PY =~ ^[A-Za-z0-9_./+-]+$ ]] || refuse "--python: $(q "$PY") is not a command name or path"
  [ $# -gt 0 ] || die "usage: remote.sh [--prefix DIR] [--python PY] [--dry-run] COMMAND [ARGS]"
  if [ "$(id -u)" != 0 ]; then SUDO=(sudo -n); fi
  local cmd=$1
  shift
  case $cmd in # a release id becomes a path under PREFIX: 12 hex digits, nothing else
    venv | engine | check | unit | install-service | health | is-live | private-files | mark)
      [[ ${1:-} =~ $ID_RE ]] || refuse "$cmd: $(q "${1:-}") is not a release id"
      ;;
    links) for id in "$@"; do [ -z "$id" ] || [[ $id =~ $ID_RE ]] || refuse "links: $(q "$id") is not a release id"; done ;;
  esac
  case $cmd in
    preflight) cmd_preflight "$@" ;;
    facts) cmd_facts ;;
    prepare) cmd_prepare ;;
    private-files) cmd_private_files "$@" ;;
    credentials) cmd_credentials "$@" ;;
    venv) cmd_venv "$@" ;;
    engine) cmd_engine "$@" ;;
    check) cmd_check "$@" ;;
    unit) cmd_unit "$@" ;;
    install-service) cmd_install_service "$@" ;;
    stop) cmd_stop ;;
    start) cmd_start "$@" ;;
    health) cmd_health "$@" ;;
    logs) cmd_logs "$@" ;;
    is-live) cmd_is_live "$@" ;;
    links) cmd_links "$@" ;;
    mark) cmd_mark "$@" ;;
    prune) cmd_prune "$@" ;;
    *) die "unknown command $cmd" ;;
  esac
}

# Everything above is a definition: bash has read the whole script before main runs, so nothing
# below can swallow the rest of a script piped in on stdin (`bash -s`).
# fd 3 keeps the caller's stdin for `credentials` (run from a shipped copy, not through `bash -s`).
main "$@" 3<&0 </dev/null
