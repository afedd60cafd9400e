"""Hostile and secret-bearing inputs to deploy.sh (issue 13, deploy half).

Each hostile input is refused with one `error:` line and exit status 2, and a canary file
proves that nothing it smuggled in ran: the canary is what the injected command would create.
None of these tests need sshd or a broker; the end-to-end secrets check over ssh is in
tests/test_deploy.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fakebundle import make_bundle, write_frames

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy.sh"
REMOTE = REPO / "deploy" / "remote.sh"


def run_deploy(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEPLOY_PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(DEPLOY), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def run_stage(config: Path, bundle: Path, out: Path, prefix: str = "/opt/li"):
    return subprocess.run(
        [sys.executable, str(REPO / "deploy/stage.py"), "--repo", str(REPO), "--config",
         str(config), "--bundle", str(bundle), "--prefix", prefix, "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def station_folder(tmp_path: Path, **overrides) -> Path:
    """A valid station config (replay folder) with `overrides` merged into its sections."""
    folder = tmp_path / "station"
    write_frames(folder / "frames", {1}, 2)
    cfg = {
        "bundle": "bundle",  # replaced by --bundle
        "station": {"line": "line9", "name": "hostile"},
        "source": {"uri": "frames/", "loop": True},
        "mqtt": {"host": "127.0.0.1", "port": 1883},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = folder / "station.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ----------------------------------------------------------------------- station name -> unit
def unit_injection(canary: Path) -> str:
    # sed's replacement turns backslash-newline into a newline: each injected line lands in the
    # unit as its own line, in a [Service] section systemd runs as root before the station.
    return f"x\\\n[Service]\\\nExecStartPre=/bin/touch {canary}\\\n[Unit]"


def test_station_name_with_service_lines_is_refused_by_stage(tmp_path):
    canary = tmp_path / "canary"
    config = station_folder(tmp_path, station={"name": unit_injection(canary)})
    out = tmp_path / "stage" / "release"
    err = one_error_line(run_stage(config, make_bundle(tmp_path / "bundle"), out))
    assert "station.name" in err and str(config) in err
    assert not out.exists()  # refused before anything was written


def test_unit_is_never_rendered_from_a_hostile_station_id(tmp_path):
    """remote.sh checks the station id itself (it also reads one from PREFIX/shared/station)."""
    canary = tmp_path / "canary"
    prefix = tmp_path / "prefix"
    (prefix / "releases" / "0123456789ab").mkdir(parents=True)
    (prefix / "releases" / "0123456789ab" / "deploy").symlink_to(REPO / "deploy")
    for station in (f"line9/{unit_injection(canary)}", "line9/a b", "-x/y", "line9"):
        r = subprocess.run(
            ["bash", str(REMOTE), "--prefix", str(prefix), "--station", station, "unit",
             "0123456789ab"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 2, (station, r.stdout)
        assert "ExecStartPre" not in r.stdout and r.stderr.count("\n") == 1, r.stderr
    (prefix / "shared").mkdir()
    (prefix / "shared" / "station").write_text(f"line9/{unit_injection(canary)}\n")
    r = subprocess.run(
        ["bash", str(REMOTE), "--prefix", str(prefix), "unit", "0123456789ab"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "ExecStartPre" not in r.stdout, r.stdout
    assert "shared/station" in r.stderr


# ------------------------------------------------------------ source.uri -> preflight facts
def test_source_uri_with_newline_and_command_is_refused(tmp_path):
    canary = tmp_path / "canary"
    uri = f"v4l2:///dev/video9\nfact x[$(touch {canary})]=1"
    config = station_folder(tmp_path, source={"uri": uri})
    prefix = tmp_path / "prefix"
    r = run_deploy("local", "--bundle", str(make_bundle(tmp_path / "bundle")), "--config",
                   str(config), "--prefix", str(prefix), "--no-service", "--dry-run")  # fmt: skip
    err = one_error_line(r)
    assert "source.uri" in err
    assert not canary.exists(), "the command in source.uri ran on the workstation"
    assert not prefix.exists()


def test_remote_facts_are_data_not_variable_names(tmp_path):
    """A device whose files say something hostile (tampered, or left by an older deploy) cannot
    make deploy.sh run anything: preflight echoes the station the prefix holds, and a `fact`
    line in it must not become a variable name."""
    config = station_folder(tmp_path)
    prefix = tmp_path / "prefix"
    (prefix / "shared").mkdir(parents=True)
    (prefix / "shared" / "station").write_text("x\nfact y[$(touch canary)]=1\n")
    r = run_deploy("local", "--bundle", str(make_bundle(tmp_path / "bundle")), "--config",
                   str(config), "--prefix", str(prefix), "--no-service", "--dry-run",
                   cwd=tmp_path)  # fmt: skip
    assert not (tmp_path / "canary").exists(), "a remote fact ran a command on the workstation"
    assert r.returncode == 1 and "preflight failed" in r.stderr, r.stdout + r.stderr


def test_release_ids_read_back_from_the_device_are_checked(tmp_path):
    prefix = tmp_path / "prefix"
    (prefix / "releases" / "0123456789ab").mkdir(parents=True)
    (prefix / "current").symlink_to("releases/0123456789ab")
    evil = "b[$(touch canary)]"  # a link target cannot hold a '/': relative to the cwd
    (prefix / "releases" / evil).mkdir()
    (prefix / "previous").symlink_to(f"releases/{evil}")
    r = run_deploy("local", "--rollback", "--prefix", str(prefix), "--dry-run", cwd=tmp_path)
    assert not (tmp_path / "canary").exists()
    err = one_error_line(r)
    assert "previous" in err and "not a release id" in err


# ------------------------------------------------------------------ manifest -> stage copy
def add_manifest_entry(bundle: Path, name: str, content: bytes) -> None:
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "symlinked-dir"])
def test_manifest_entry_outside_the_bundle_is_refused(tmp_path, kind):
    work = tmp_path / "work"
    bundle = make_bundle(work / "bundle")
    secret = tmp_path / "workstation-secret"
    secret.write_bytes(b"not for the device")
    out = tmp_path / "stage" / "release"
    if kind == "dotdot":
        # bundle/../../x is tmp_path/x; copied to out/bundle/../../x, that is tmp_path/stage/x.
        name = "../../x"
        (tmp_path / "x").write_bytes(b"payload")
        add_manifest_entry(bundle, name, b"payload")
        canary = tmp_path / "stage" / "x"
    elif kind == "absolute":
        name = str(secret)
        add_manifest_entry(bundle, name, secret.read_bytes())
        canary = None
    elif kind == "symlink":
        name = "extra.bin"
        (bundle / name).symlink_to(secret)
        add_manifest_entry(bundle, name, secret.read_bytes())
        canary = out / "bundle" / name
    else:
        name = "sub/extra.bin"
        (bundle / "sub").symlink_to(tmp_path)
        (tmp_path / "extra.bin").write_bytes(secret.read_bytes())
        add_manifest_entry(bundle, name, secret.read_bytes())
        canary = out / "bundle" / name
    config = station_folder(work)
    err = one_error_line(run_stage(config, bundle, out))
    assert "manifest.yaml" in err and repr(name) in err, err
    assert not out.exists()
    assert canary is None or not canary.exists()


def test_bundle_loader_refuses_manifest_paths_outside_the_bundle(tmp_path):
    """The station opens manifest files too: edge.bundle refuses the same names at load."""
    from edge.bundle import Bundle
    from edge.errors import BundleError

    bundle = make_bundle(tmp_path / "bundle")
    (tmp_path / "x").write_bytes(b"payload")
    add_manifest_entry(bundle, "../x", b"payload")
    with pytest.raises(BundleError, match=r"'\.\./x'"):
        Bundle(bundle)


# ---------------------------------------------------------------------- target -> ssh option
@pytest.mark.parametrize(
    "target",
    [
        "-oProxyCommand=touch {canary}",
        "-F{canary}",
        "user@-oProxyCommand=touch {canary}",
        "user@host;touch {canary}",
        "user@host:/tmp",
        "us er@host",
        "@host",
        "user@",
    ],
)
def test_target_that_is_not_user_at_host_is_refused(tmp_path, target):
    canary = tmp_path / "canary"
    target = target.format(canary=canary)
    config = station_folder(tmp_path)
    bundle = make_bundle(tmp_path / "bundle")
    # A deploy's preflight runs `ssh TARGET true`: with TARGET an option, "true" is the host
    # and the ProxyCommand runs (OpenSSH 9.2 refuses the host of --stop/--rollback, whose
    # "bash -s ..." has spaces; older clients do not).
    deploy = ["--bundle", str(bundle), "--config", str(config), "--dry-run"]
    for action in (deploy, ["--rollback"], ["--stop"]):
        r = run_deploy(target, *action, "--prefix", str(tmp_path / "prefix"))
        err = one_error_line(r)
        assert "TARGET" in err
        assert not canary.exists(), f"ssh ran a command from target {target!r}"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--prefix", "/opt/li\n[Service]"),
        ("--prefix", "/opt/../etc"),
        ("--prefix", "/opt/li%h"),
        ("--prefix", "/"),
        ("--user", "root\nExecStartPre=/bin/true"),
        ("--user", "-u0"),
    ],
)
def test_options_that_reach_the_unit_are_checked(tmp_path, option, value):
    args = ["host", "--stop", option, value]
    if option == "--user":
        args[2:2] = ["--prefix", "/opt/li"]
    err = one_error_line(run_deploy(*args))
    assert option in err


# ------------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("station.line", "../etc"),
        ("station.line", "a/b"),
        ("station.name", "a b"),
        ("station.name", "-rf"),
        ("station.name", ""),
        ("station.name", "x" * 65),
        ("station.name", "+"),
        ("station.name", "#"),
        ("mqtt.prefix", "lineinspect/#"),
        ("mqtt.prefix", "a//b"),
        ("mqtt.prefix", "/a"),
    ],
)
def test_names_in_topics_paths_and_units_are_refused(tmp_path, key, value):
    section, field = key.split(".")
    config = station_folder(tmp_path, **{section: {field: value}})
    out = tmp_path / "stage" / "release"
    err = one_error_line(run_stage(config, make_bundle(tmp_path / "bundle"), out))
    assert key in err and str(config) in err
    assert not out.exists()


@pytest.mark.parametrize("value", ["L1", "line-9.a_b", "x" * 64, "9"])
def test_ordinary_names_pass(tmp_path, value):
    config = station_folder(tmp_path, station={"line": value, "name": value})
    r = run_stage(config, make_bundle(tmp_path / "bundle"), tmp_path / "out")
    assert r.returncode == 0, r.stderr


def test_control_characters_in_any_config_value_are_refused(tmp_path):
    config = station_folder(tmp_path, mqtt={"client_id": "a\rb"})
    err = one_error_line(run_stage(config, make_bundle(tmp_path / "bundle"), tmp_path / "out"))
    assert "mqtt.client_id" in err


# ----------------------------------------------------------------------------- secrets
PASSWORD = "s3cret-mqtt-pw"
RTSP_PASSWORD = "s3cret-cam-pw"
RTSP = f"rtsp://camuser:{RTSP_PASSWORD}@10.0.0.7:554/stream1"


def test_mqtt_password_moves_to_a_private_credentials_file(tmp_path):
    config = station_folder(tmp_path, mqtt={"username": "station", "password": PASSWORD})
    out = tmp_path / "stage" / "release"
    r = run_stage(config, make_bundle(tmp_path / "bundle"), out)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    cfg = yaml.safe_load((out / "station.yaml").read_text())
    assert "password" not in cfg["mqtt"] and "username" not in cfg["mqtt"]
    assert cfg["credentials_file"] == "/opt/li/credentials/line9-hostile.yaml"
    assert info["credentials"] == "line9-hostile.yaml"
    creds = out.parent / "credentials.yaml"  # next to the release, never inside it
    assert yaml.safe_load(creds.read_text()) == {
        "mqtt_username": "station", "mqtt_password": PASSWORD,
    }  # fmt: skip
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    for p in out.rglob("*"):
        if p.is_file():
            assert PASSWORD.encode() not in p.read_bytes(), p


def test_no_password_no_credentials_file(tmp_path):
    """Until every device runs an edge that reads `credentials_file`, a config without a
    password stays as it was: no new key, no credentials file."""
    config = station_folder(tmp_path, mqtt={"username": "station"})
    out = tmp_path / "stage" / "release"
    r = run_stage(config, make_bundle(tmp_path / "bundle"), out)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load((out / "station.yaml").read_text())
    assert "credentials_file" not in cfg and cfg["mqtt"]["username"] == "station"
    assert not (out.parent / "credentials.yaml").exists()
    assert json.loads(r.stdout)["credentials"] == ""


def test_uri_credentials_are_redacted_and_the_config_is_private(tmp_path):
    config = station_folder(tmp_path, source={"uri": RTSP})
    out = tmp_path / "stage" / "release"
    r = run_stage(config, make_bundle(tmp_path / "bundle"), out)
    assert r.returncode == 0, r.stderr
    assert RTSP_PASSWORD not in r.stdout
    assert json.loads(r.stdout)["source"] == "rtsp://camuser:***@10.0.0.7:554/stream1"
    assert RTSP_PASSWORD not in (out / "RELEASE").read_text()
    # The station needs the real URI: its config keeps it, readable by its owner only.
    assert yaml.safe_load((out / "station.yaml").read_text())["source"]["uri"] == RTSP
    assert stat.S_IMODE((out / "station.yaml").stat().st_mode) == 0o600


def test_dry_run_output_redacts_uri_credentials(tmp_path):
    config = station_folder(tmp_path, source={"uri": RTSP}, mqtt={"password": PASSWORD})
    prefix = tmp_path / "prefix"
    r = run_deploy("local", "--bundle", str(make_bundle(tmp_path / "bundle")), "--config",
                   str(config), "--prefix", str(prefix), "--no-service", "--dry-run")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert RTSP_PASSWORD not in r.stdout + r.stderr and PASSWORD not in r.stdout + r.stderr
    assert f"{prefix}/credentials/line9-hostile.yaml" in r.stdout
    assert not prefix.exists()


def test_stage_errors_redact_uri_credentials(tmp_path):
    config = station_folder(tmp_path, source={"uri": RTSP + "\n"})
    err = one_error_line(run_stage(config, make_bundle(tmp_path / "bundle"), tmp_path / "out"))
    assert "source.uri" in err and RTSP_PASSWORD not in err


def test_opcua_key_ships_private_with_the_extra_and_a_lenient_start(tmp_path):
    """An OPC UA station: its private key ships owner-only, the release's requirements add the
    `opcua` extra, and a PLC that is down after a reboot does not stop the station."""
    config = station_folder(
        tmp_path,
        opcua={
            "mode": "server",
            "endpoint": "opc.tcp://0.0.0.0:4840/lineinspect",
            "certificate": "certs/station.der",
            "private_key": "certs/station.pem",
            "anonymous": True,
        },
    )
    certs = config.parent / "certs"
    certs.mkdir()
    (certs / "station.der").write_bytes(b"cert")
    (certs / "station.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    out = tmp_path / "stage" / "release"
    r = run_stage(config, make_bundle(tmp_path / "bundle"), out)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load((out / "station.yaml").read_text())
    assert cfg["opcua"]["require_at_start"] is False
    key = out / cfg["opcua"]["private_key"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "asyncua" in (out / "requirements.txt").read_text()
