"""Stage one release for deploy.sh on the workstation: code, bundle, rendered station config.

    python deploy/stage.py --repo . --config station.yaml --bundle bundle --prefix /opt/lineinspect \
        [--precision fp16] --out STAGE_DIR

writes STAGE_DIR/{code/, deploy/, bundle/, files/, station.yaml, requirements*.txt, RELEASE} and
prints one JSON object (release id, station identity, backend, precision, source, ...) on stdout,
or with --shell the same as `REL_<KEY>=value` lines, one per line, that deploy.sh reads as data
(by a fixed list of keys; never eval'd).

The release id is a hash of everything staged, so the same inputs give the same id on every run
(deploy.sh's idempotency rests on it). The station config is rewritten for the device:
- `bundle` -> the release's own bundle (`--bundle` wins over the file's `bundle:`);
- `precision` -> `--precision` when given;
- relative workstation files it names (source folder or video, ROI mask, TLS files) are copied
  into `files/` and pointed at there; absolute paths and URIs are device paths, kept as they are;
- a relative `mqtt.spool`, `evidence.dir` or `recalibration.dir` moves to `<prefix>/data/`, so
  reject events not yet acknowledged by the broker (and what the station collected) survive a
  release switch or a rollback;
- `mqtt.password` (and `mqtt.username`) move out of the release into STAGE_DIR/../credentials.yaml
  (0600), which deploy.sh installs as `<prefix>/credentials/<line>-<name>.yaml`; the config
  names it with `credentials_file`. A config that still holds a URI with a password (an RTSP
  camera's) is written 0600, and every URI printed or recorded (RELEASE) is redacted.
Hostile input is refused before anything is written: a station line/name or `mqtt.prefix`
segment that is not a plain name (they become topics, file names and the systemd unit's name),
a control character in any value, a manifest entry outside the bundle.
Errors are one line `error: ...` on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

# Packages the device runs. `train` and `calibration` import torch and never go to a device.
CODE_PACKAGES = ("edge", "engines")
DEPLOY_FILES = ("remote.sh", "supervise.sh", "station.sh", "health.py", "lineinspect.service.in")
# Config sections whose `dir` the station writes into (see edge/config.py).
# Sources that hold a camera exclusively: the running station must stop before `edge check`.
EXCLUSIVE_SCHEMES = ("v4l2://", "csi://")
EXCLUSIVE_GST = ("v4l2src", "nvarguscamerasrc", "nvv4l2camerasrc")


# Names that become MQTT topic levels, file names and the systemd unit's name: no '/', '+', '#',
# spaces, leading '-' or '.', nothing a shell, sed or systemd would read as syntax.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "letters, digits, '_', '.', '-'; starts with a letter or digit; at most 64"
# A device path the unit's ReadWritePaths= may name (systemd reads '%' and spaces as syntax).
DEVICE_PATH_RE = re.compile(r"(/[A-Za-z0-9_.+-]+)+")
# scheme://user:password@host: the password (everything up to the netloc's last '@') goes.
USERINFO_RE = re.compile(r"(://[^/:@\s]*):[^/\s]*@")
CREDENTIAL_KEYS = ("mqtt_username", "mqtt_password")


def redact(text: str) -> str:
    """`rtsp://user:pass@host/x` -> `rtsp://user:***@host/x`, anywhere in `text`."""
    return USERINFO_RE.sub(r"\1:***@", text)


def has_uri_password(value: Any) -> bool:
    """Whether a config value (any nesting) holds a URI with a password."""
    if isinstance(value, dict):
        return any(has_uri_password(v) for v in value.values())
    if isinstance(value, list):
        return any(has_uri_password(v) for v in value)
    return isinstance(value, str) and USERINFO_RE.search(value) is not None


def check_no_control_chars(value: Any, key: str, source: Path) -> None:
    """Refuse a newline (or any control character) anywhere in the config: values reach shell
    scripts, `fact` lines, the systemd unit and log lines, where a newline starts a new one."""
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{key}.{k}" if key else str(k)
            check_no_control_chars(str(k), path, source)
            check_no_control_chars(v, path, source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_no_control_chars(v, f"{key}[{i}]", source)
    elif isinstance(value, str) and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise StageError(f"{source}: {key}: control character in {redact(value)!r}")


def check_name(value: str, key: str, source: Path) -> None:
    if not NAME_RE.fullmatch(value):
        raise StageError(f"{source}: {key}: {redact(value)!r} is not a plain name ({NAME_RULE})")


class StageError(Exception):
    """A problem with the inputs, reported as one line."""


def _ignore_caches(_dir: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))}


def read_requirements(pyproject: Path, extra: str = "jetson") -> tuple[list[str], list[str]]:
    """(base dependencies, the `extra`'s) from pyproject.toml."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    project = tomllib.loads(pyproject.read_text())["project"]
    return list(project["dependencies"]), list(
        project.get("optional-dependencies", {}).get(extra, [])
    )


def is_exclusive(uri: str) -> bool:
    if uri.startswith(EXCLUSIVE_SCHEMES) or uri.startswith("/dev/video"):
        return True
    return uri.startswith("gst://") and any(e in uri for e in EXCLUSIVE_GST)


def camera_device(uri: str) -> str:
    """The /dev node a live source needs on the device ('' when it needs none)."""
    if uri.startswith("v4l2://"):
        return uri[len("v4l2://") :]
    if uri.startswith("/dev/video"):
        return uri
    if uri.startswith("csi://"):
        return f"/dev/video{uri[len('csi://') :] or '0'}"
    return ""


def _local_path(base: Path, value: str) -> tuple[Path | None, str]:
    """(workstation file to ship, or None when the value is a device path/URI; URI prefix)."""
    if value.startswith("file://") and not value.startswith("file:///"):
        return (base / value[len("file://") :]).resolve(), "file://"
    if "://" in value or Path(value).expanduser().is_absolute():
        return None, ""
    return (base / value).resolve(), ""


class Stager:
    def __init__(self, out: Path, base: Path) -> None:
        self.out, self.base = out, base
        self.shipped: dict[Path, str] = {}  # workstation path -> name under files/

    def ship(self, value: str | None, key: str) -> str | None:
        """Copy a relative workstation file/folder into files/ and return the device value."""
        if value is None:
            return None
        src, scheme = _local_path(self.base, value)
        if src is None:
            return value
        if not src.exists():
            raise StageError(f"{key}: {value} -> {src}: not found on this workstation")
        if src not in self.shipped:
            name = src.name
            taken = set(self.shipped.values())
            i = 1
            while name in taken:  # two files with the same name from different folders
                i += 1
                name = f"{i}-{src.name}"
            dst = self.out / "files" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=_ignore_caches)
            else:
                shutil.copy2(src, dst)
            self.shipped[src] = name
        trail = "/" if src.is_dir() and value.endswith("/") else ""
        return f"{scheme}files/{self.shipped[src]}{trail}"


def stage(
    repo: Path, config: Path, bundle: Path, prefix: str, precision: str | None, out: Path
) -> dict[str, Any]:
    sys.path.insert(0, str(repo))
    from edge import config as station_config
    from edge.bundle import MANIFEST, PRECISION_FILES, THRESHOLDS, Bundle
    from edge.errors import LineInspectError

    raw = yaml.safe_load(config.read_text()) or {}
    check_no_control_chars(raw, "", config)
    try:
        cfg = station_config.load(config)  # typed validation: unknown keys, wrong types
    except LineInspectError as exc:
        raise StageError(redact(str(exc))) from exc
    check_name(cfg.station.line, "station.line", config)
    check_name(cfg.station.name, "station.name", config)
    for level in cfg.mqtt.prefix.split("/"):  # a topic prefix may have levels: plain names each
        if not NAME_RE.fullmatch(level):
            raise StageError(
                f"{config}: mqtt.prefix: {cfg.mqtt.prefix!r} is not plain names joined by '/' "
                f"({NAME_RULE})"
            )
    if precision:
        raw["precision"] = cfg.precision = precision
    try:
        b = Bundle(bundle)  # manifest parses, every listed file exists (hashes: `edge check`)
    except LineInspectError as exc:
        raise StageError(str(exc)) from exc
    for name in (MANIFEST, THRESHOLDS):
        if (bundle / name).is_symlink():
            raise StageError(f"{bundle / name}: a symlink; bundle files must be plain files")
    graph = PRECISION_FILES[cfg.precision]
    if graph not in b.manifest.files:
        raise StageError(
            f"{bundle}: no {cfg.precision} graph ({graph}) in this bundle; run "
            f"`python -m engines quantize` or deploy with --precision fp32"
        )

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for pkg in CODE_PACKAGES:
        shutil.copytree(repo / pkg, out / "code" / pkg, ignore=_ignore_caches)
    (out / "deploy").mkdir()
    for name in DEPLOY_FILES:
        shutil.copy2(repo / "deploy" / name, out / "deploy" / name)
    # The bundle contract only: manifest, listed files, thresholds. Never engines/ (device cache).
    (out / "bundle").mkdir()
    # Bundle() refused manifest entries outside the bundle; this keeps every write inside the
    # stage even if that check were ever bypassed.
    inside = (out / "bundle").resolve()
    for name in [MANIFEST, *b.manifest.files, THRESHOLDS]:
        src, dst = bundle / name, out / "bundle" / name
        if src.is_file():
            if not dst.resolve().is_relative_to(inside):
                raise StageError(f"{bundle / MANIFEST}: files: {name!r} is outside the bundle")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)

    st = Stager(out, config.resolve().parent)
    source = raw.setdefault("source", {})
    mqtt = raw.setdefault("mqtt", {})
    data = f"{prefix.rstrip('/')}/data"  # the station's own state, kept across releases
    writable = set()
    # Every path-bearing key, as edge/config.py declares it (field metadata "path").
    for key, kind in station_config.path_keys().items():
        value = station_config.get_key(raw, key)
        if kind == "bundle":
            raw[key] = "bundle"
        elif kind in ("source", "input") and value:
            station_config.set_key(raw, key, st.ship(str(value), key))
            shipped = station_config.get_key(raw, key)
            if key in ("mqtt.tls.keyfile", "opcua.private_key") and shipped.startswith("files/"):
                # A private key: its owner only (deploy gives the service user's group read).
                for p in [out / shipped, *(out / shipped).rglob("*")]:
                    if p.is_file():
                        p.chmod(0o600)
        elif kind in ("state_file", "state_dir"):
            # What the station writes lives in <prefix>/data, kept across releases.
            value = value or station_config.default_of(key)
            if not value:
                continue
            if not Path(value).expanduser().is_absolute():
                value = f"{data}/{Path(value).name}"
                station_config.set_key(raw, key, value)
            writable.add(str(Path(value).parent) if kind == "state_file" else value)
        # secret (credentials_file): written by move_credentials below
    creds = move_credentials(raw, mqtt, config, prefix, cfg.station.line, cfg.station.name)
    if creds:
        write_private(out.parent / "credentials.yaml", yaml.safe_dump(creds, sort_keys=False))
    # A service must not exit (and be restarted in a loop) when its broker is down or refuses
    # it after a reboot: it inspects and spools until the broker takes it. An explicit setting in
    # the config wins. (The deploy's own health check still needs the broker.)
    mqtt.setdefault("require_broker_at_start", False)
    if isinstance(raw.get("opcua"), dict):  # the same for a PLC that is down after a reboot
        raw["opcua"].setdefault("require_at_start", False)

    header = (
        f"# Written by deploy.sh from {config.name}; edit the original and deploy again.\n"
        "# Relative paths resolve against this release folder.\n"
    )
    text = header + yaml.safe_dump(raw, sort_keys=False)
    if has_uri_password(raw):  # e.g. an RTSP camera's password: the station needs it as it is
        write_private(out / "station.yaml", text)
    else:
        (out / "station.yaml").write_text(text)
    writable = sorted(writable)
    for path in writable:  # ReadWritePaths= of the unit: a plain absolute path each
        if not DEVICE_PATH_RE.fullmatch(path) or "/../" in f"{path}/" or "/./" in f"{path}/":
            raise StageError(
                f"{config}: {path!r}: a folder the station writes must be a plain absolute "
                "path (letters, digits, '_', '.', '+', '-'; no '..')"
            )
    (out / "WRITABLE").write_text("".join(f"{p}\n" for p in writable))
    base, jetson = read_requirements(repo / "pyproject.toml")
    if raw.get("opcua") is not None:  # the `opcua` extra, only where a station uses it
        base += read_requirements(repo / "pyproject.toml", "opcua")[1]
    (out / "requirements.txt").write_text("\n".join(base) + "\n")
    (out / "requirements-jetson.txt").write_text("\n".join(jetson) + "\n")

    release_id = tree_hash(out)[:12]
    uri = source["uri"]
    info = {
        "id": release_id,
        "line": cfg.station.line,
        "station": cfg.station.name,
        "model": b.manifest.name,
        "backend": cfg.backend,
        "precision": cfg.precision,
        "source": redact(uri),
        "camera": camera_device(uri),
        "exclusive": is_exclusive(uri),
        "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "config": str(config.resolve()),
        "bundle": str(bundle.resolve()),
        "credentials": credentials_name(cfg.station.line, cfg.station.name) if creds else "",
    }
    (out / "RELEASE").write_text(json.dumps(info, indent=2) + "\n")
    return info


def credentials_name(line: str, name: str) -> str:
    return f"{line}-{name}.yaml"


def move_credentials(
    raw: dict[str, Any], mqtt: dict[str, Any], config: Path, prefix: str, line: str, name: str
) -> dict[str, str]:
    """Take the broker password (and user name) out of the release config; return them.

    Only when there is a password: a config without one keeps its `mqtt.username` and gets no
    `credentials_file` key, which stations older than the key refuse.
    """
    if mqtt.get("password") is None:
        return {}
    creds = {"mqtt_password": str(mqtt.pop("password"))}
    if mqtt.get("username") is not None:
        creds = {"mqtt_username": str(mqtt.pop("username")), **creds}
    if "credentials_file" in raw:
        raise StageError(
            f"{config}: credentials_file and mqtt.password: give the password in one of them"
        )
    raw["credentials_file"] = f"{prefix.rstrip('/')}/credentials/{credentials_name(line, name)}"
    return creds


def write_private(path: Path, text: str) -> None:
    """Write `text` to a new file readable by its owner only, from the first byte on."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)  # O_CREAT's mode is masked by the umask; 0600 is what is meant


def tree_hash(root: Path) -> str:
    """sha256 over (relative path, mode bit x, content) of every file, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != "RELEASE":
            rel = p.relative_to(root).as_posix()
            x = "x" if os.access(p, os.X_OK) else "-"
            h.update(f"{rel}\0{x}\0".encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deploy/stage.py", description=__doc__.split("\n")[0])
    p.add_argument("--repo", required=True, type=Path)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--prefix", required=True)
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shell", action="store_true", help="print REL_<KEY>=value lines, not JSON")
    args = p.parse_args(argv)
    try:
        info = stage(args.repo, args.config, args.bundle, args.prefix, args.precision, args.out)
    except (StageError, OSError, KeyError, yaml.YAMLError) as exc:
        print(f"error: {redact(' '.join(str(exc).split()))}", file=sys.stderr)
        return 2
    if args.shell:
        # One value per line, read by deploy.sh as data: a newline would start another key.
        for key, value in info.items():
            text = str(value)
            if any(ord(c) < 32 or ord(c) == 127 for c in text):
                print(f"error: {key}: control character in {redact(text)!r}", file=sys.stderr)
                return 2
            print(f"REL_{key.upper()}={text}")
    else:
        print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
