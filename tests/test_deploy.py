"""deploy.sh end to end: a real OpenSSH server on a loopback port, a real mosquitto, a station
run as a supervised background process (`--no-service`), releases switched and rolled back.

The sshd has its own host key, config and authorized key, all under the test's tmp folder;
nothing in /etc/ssh or ~/.ssh is read or changed (sshd needs /run/sshd, created when missing).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edge.listen import Listener
from tests.broker import Mosquitto, find_mosquitto, free_port
from tests.fakebundle import make_bundle, write_frames

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy.sh"
SSHD = "/usr/sbin/sshd"
DEFECTIVE = {2, 7}  # of 10 frames looped at 5 fps: a reject every second on average


def _ensure_tools() -> str | None:
    """Install openssh-server and rsync from Debian when missing; the reason when impossible."""
    missing = [pkg for pkg, ok in (("openssh-server", os.access(SSHD, os.X_OK)),
                                   ("rsync", shutil.which("rsync"))) if not ok]  # fmt: skip
    if not missing:
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{' and '.join(missing)} missing, and no root apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:  # stale package lists: update once and try again
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not os.access(SSHD, os.X_OK) or not shutil.which("rsync"):
        return f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()[-300:]}"
    return None


class Sshd:
    """sshd -D on 127.0.0.1:<free port> with a host key and one authorized key made here."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.user = getpass.getuser()
        self.port = free_port()
        for name in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True
            )
        shutil.copy(root / "client_key.pub", root / "authorized_keys")
        host_pub = (root / "host_key.pub").read_text().split()
        (root / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        (root / "sshd_config").write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {root / 'host_key'}",
                    f"AuthorizedKeysFile {root / 'authorized_keys'}",
                    f"PidFile {root / 'sshd.pid'}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "UsePAM no",
                    "StrictModes no",  # pytest's tmp folders are not ~/.ssh-shaped
                    "LogLevel VERBOSE",
                ]
            )
            + "\n"
        )
        self.log = root / "sshd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"{self.user}@127.0.0.1"

    @property
    def ssh_opts(self) -> str:
        """DEPLOY_SSH_OPTS: this key, this host key, no user ssh config."""
        return (
            f"-F /dev/null -p {self.port} -i {self.root / 'client_key'} -o IdentitiesOnly=yes "
            f"-o UserKnownHostsFile={self.root / 'known_hosts'} -o StrictHostKeyChecking=yes"
        )

    def start(self) -> Sshd:
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log.read_text()}")
            r = subprocess.run(
                ["ssh", "-o", "BatchMode=yes", *self.ssh_opts.split(), self.target, "true"],
                capture_output=True,
                text=True,
            )
            if r.returncode == 0:
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"cannot log in through sshd: {r.stderr}\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    reason = _ensure_tools()
    if reason:
        pytest.skip(f"deploy over ssh needs sshd and rsync: {reason}")
    server = Sshd(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with Mosquitto(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """What deploy.sh ships, copied once: the test sees one code version from start to end,
    even while the working tree changes under it."""
    root = tmp_path_factory.mktemp("checkout")
    skip = shutil.ignore_patterns("__pycache__")
    for name in ("deploy", "edge", "engines"):
        shutil.copytree(REPO / name, root / name, ignore=skip)
    for name in ("deploy.sh", "pyproject.toml"):
        shutil.copy2(REPO / name, root / name)
    return root


def deploy(
    checkout: Path, sshd: Sshd, *args: str, timeout: float = 240
) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEPLOY_SSH_OPTS": sshd.ssh_opts, "DEPLOY_PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", str(checkout / "deploy.sh"), sshd.target, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(f"$ deploy.sh {sshd.target} {' '.join(args)}  -> {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def write_station(folder: Path, port: int, bundle: Path, spool: str | None = None) -> Path:
    """Station config next to a frames/ folder (shipped with the release: a relative path)."""
    write_frames(folder / "frames", DEFECTIVE, 10)
    lines = [
        "station: {line: line9, name: deploytest}",
        f"bundle: {bundle}",
        "source: {uri: frames/, loop: true, rate: 5}",
        f"mqtt: {{host: 127.0.0.1, port: {port}"
        + (f", spool: {spool}" if spool else "")
        + ", connect_timeout_s: 5}",
        "metrics: {interval_s: 2}",
    ]
    path = folder / "station.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def station_status(listener: Listener) -> dict | None:
    """Latest payload on the station's own status topic (not <base>/check/status)."""
    topic = f"{listener.topic_base}/status"
    found = [e for e in listener.of_kind("status") if e.topic == topic]
    return found[-1].payload if found else None


def wait_online(listener: Listener, model: str, timeout: float = 30) -> dict:
    def ok() -> bool:
        s = station_status(listener)
        return bool(s) and s["state"] == "online" and s["model"] == model

    assert listener.wait_for(ok, timeout), (
        f"no online status of {model}: {station_status(listener)}"
    )
    return station_status(listener)


def wait_rejects_of(listener: Listener, model: str, n: int, timeout: float = 30) -> None:
    """n more reject events of `model` than there are now."""
    start = sum(r["model"]["name"] == model for r in listener.rejects())
    got = listener.wait_for(
        lambda: sum(r["model"]["name"] == model for r in listener.rejects()) >= start + n, timeout
    )
    assert got, f"fewer than {n} new rejects from {model} in {timeout} s"


def release_id(out: str) -> str:
    m = re.search(r"stage: release ([0-9a-f]{12})", out)
    assert m, out
    return m.group(1)


@pytest.mark.slow
@pytest.mark.broker
def test_deploy_over_ssh_switch_and_roll_back(checkout, sshd, broker, tmp_path):
    prefix = tmp_path / "device" / "opt-lineinspect"
    work = tmp_path / "workstation"
    bundles = {m: make_bundle(work / f"bundle-{m}", name=f"fake-{m}") for m in "abc"}
    config = write_station(work / "station", broker.port, bundles["a"])
    common = ["--config", str(config), "--prefix", str(prefix), "--no-service"]
    common += ["--health-timeout", "40"]

    listener = Listener(broker.host, broker.port, "lineinspect/line9/deploytest").start()
    try:
        # --dry-run: every step printed, nothing created on the device.
        r = deploy(checkout, sshd, "--bundle", str(bundles["a"]), *common, "--dry-run")
        assert r.returncode == 0, r.stderr
        assert "[dry-run]" in r.stdout and "== [11/11] prune" in r.stdout
        assert "TensorRT not found on device: running the ONNX Runtime backend" in r.stdout
        assert not prefix.exists()

        # First deploy: the station comes online and publishes reject events.
        r = deploy(checkout, sshd, "--bundle", str(bundles["a"]), *common)
        assert r.returncode == 0, r.stderr
        rel_a = release_id(r.stdout)
        assert os.readlink(prefix / "current") == f"releases/{rel_a}"
        status = wait_online(listener, "fake-a")
        assert status["backend"] == "onnxruntime"
        wait_rejects_of(listener, "fake-a", 2)
        pid = (prefix / "run" / "supervisor.pid").read_text().strip()

        # Same inputs again: nothing changes, and it says so.
        r = deploy(checkout, sshd, "--bundle", str(bundles["a"]), *common)
        assert r.returncode == 0, r.stderr
        assert "nothing copied" in r.stdout and "venv" in r.stdout and "reused" in r.stdout
        assert f"release {rel_a} is already current and online" in r.stdout
        assert (prefix / "run" / "supervisor.pid").read_text().strip() == pid

        # A tampered bundle fails `edge check` before the switch: the first release never stops.
        model = bundles["b"] / "model.onnx"
        model.write_bytes(model.read_bytes()[:-1] + bytes([model.read_bytes()[-1] ^ 1]))
        # The heartbeat republishes the retained status (new "time") every heartbeat_s; a
        # restart is what bumps bd_seq (birth/death sequence, kept in the spool).
        bd_seq = station_status(listener)["bd_seq"]
        r = deploy(checkout, sshd, "--bundle", str(bundles["b"]), *common)
        assert r.returncode == 1
        assert "sha256 mismatch" in r.stdout
        assert f"release {rel_a} stays current and was never stopped" in r.stdout
        assert os.readlink(prefix / "current") == f"releases/{rel_a}"
        assert (prefix / "run" / "supervisor.pid").read_text().strip() == pid
        wait_rejects_of(listener, "fake-a", 2)
        now = station_status(listener)
        assert now["state"] == "online" and now["bd_seq"] == bd_seq  # not restarted meanwhile

        # A good new bundle replaces it.
        r = deploy(checkout, sshd, "--bundle", str(bundles["c"]), *common)
        assert r.returncode == 0, r.stderr
        rel_c = release_id(r.stdout)
        wait_online(listener, "fake-c")
        wait_rejects_of(listener, "fake-c", 2)

        # A release that passes the check but cannot run (its spool path is under a regular
        # file) is switched to, fails its health check and is switched back automatically.
        (work / "not-a-dir").write_text("")
        bad = write_station(
            work / "station-bad", broker.port, bundles["a"], spool=str(work / "not-a-dir/s.db")
        )
        r = deploy(checkout, sshd, "--bundle", str(bundles["a"]), "--config", str(bad), *common[2:])
        assert r.returncode == 1
        assert "switching back to " + rel_c in r.stdout
        assert f"rollback: release {rel_c} is current and online again" in r.stdout
        assert os.readlink(prefix / "current") == f"releases/{rel_c}"
        assert os.readlink(prefix / "previous") == f"releases/{rel_a}"
        wait_online(listener, "fake-c")
        wait_rejects_of(listener, "fake-c", 2)

        # --rollback: back to the release before.
        r = deploy(checkout, sshd, "--rollback", "--prefix", str(prefix))
        assert r.returncode == 0, r.stderr
        assert os.readlink(prefix / "current") == f"releases/{rel_a}"
        wait_online(listener, "fake-a")
        wait_rejects_of(listener, "fake-a", 2)
    finally:
        listener.stop()
        r = deploy(checkout, sshd, "--stop", "--prefix", str(prefix))
        assert r.returncode == 0, r.stderr
    assert not (prefix / "run" / "supervisor.pid").exists()


@pytest.mark.slow
def test_deployed_release_holds_no_secret_readable_by_others(checkout, sshd, tmp_path):
    """A broker password and an RTSP camera's password in the station YAML: after a deploy,
    neither is in a file on the device that others can read, nor in deploy.sh's output."""
    prefix = tmp_path / "device" / "opt-lineinspect"
    work = tmp_path / "workstation"
    bundle = make_bundle(work / "bundle")
    mqtt_pw, cam_pw = "mqtt-pw-5e1f0c", "cam-pw-7d2a9b"
    config = work / "station.yaml"
    config.write_text(
        "station: {line: line9, name: secrets}\n"
        f"bundle: {bundle}\n"
        f"source: {{uri: 'rtsp://cam:{cam_pw}@127.0.0.1:{free_port()}/s', retry_open: false}}\n"
        f"mqtt: {{host: 127.0.0.1, port: {free_port()}, username: station, password: {mqtt_pw},"
        " connect_timeout_s: 2}\n"
    )
    r = deploy(checkout, sshd, "--bundle", str(bundle), "--config", str(config), "--prefix",
               str(prefix), "--no-service", "--health-timeout", "5")  # fmt: skip
    # No camera answers at that address: `edge check` (which accepts the credentials_file the
    # release refers to) fails after the release was shipped, which is what is looked at.
    assert r.returncode == 1 and "failed at check" in r.stderr, r.stdout + r.stderr
    assert mqtt_pw not in r.stdout + r.stderr and cam_pw not in r.stdout + r.stderr

    creds = prefix / "credentials" / "line9-secrets.yaml"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert yaml.safe_load(creds.read_text()) == {
        "mqtt_username": "station",
        "mqtt_password": mqtt_pw,
    }
    (rel,) = (prefix / "releases").iterdir()
    cfg = yaml.safe_load((rel / "station.yaml").read_text())
    assert cfg["credentials_file"] == str(creds) and "password" not in cfg["mqtt"]
    assert stat.S_IMODE((rel / "station.yaml").stat().st_mode) == 0o600  # it has the RTSP URI
    assert json.loads((rel / "RELEASE").read_text())["source"].startswith("rtsp://cam:***@")
    readable = []
    for p in prefix.rglob("*"):
        # venvs/ holds what pip installed, nothing from the station config.
        if p.is_symlink() or not p.is_file() or p.relative_to(prefix).parts[0] == "venvs":
            continue
        readable.append(p)
        if p.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            text = p.read_bytes()
            assert mqtt_pw.encode() not in text and cam_pw.encode() not in text, p
    assert rel / "station.yaml" in readable and creds in readable  # the walk saw them


def test_shell_scripts_pass_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = [DEPLOY, *sorted((REPO / "deploy").glob("*.sh"))]
    r = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_engine_build_imports_only_what_the_device_has(tmp_path):
    """The device gets edge/ and engines/ and edge's dependencies: `python -m engines` and the
    `engines build` module must load without train/, torch or the onnx package."""
    for pkg in ("edge", "engines"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import importlib.abc, runpy, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'train', 'onnx', 'calibration', 'thresholding'):\n"
        "            raise ImportError(f'{name} is not on the device')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import engines.build\n"
        "sys.argv = ['engines', 'build', '--help']\n"
        "try:\n    runpy.run_module('engines', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "--precision" in r.stdout


def test_bad_arguments_are_one_line_errors(tmp_path):
    config = tmp_path / "station.yaml"
    config.write_text("")
    r = subprocess.run(
        ["bash", str(DEPLOY), "local", "--bundle", str(tmp_path / "none"), "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: --bundle {tmp_path / 'none'}: not a directory"
    ]
    r = subprocess.run(
        ["bash", str(DEPLOY), "local", "--rollback", "--prefix", "relative/dir"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "absolute path" in r.stderr


def test_systemd_unit_passes_systemd_analyze(tmp_path):
    """The unit deploy.sh installs (rendered by remote.sh from the release) is one systemd
    accepts without a warning: Restart=always, after network-online, journal logging, run as
    an unprivileged user with the hardening options, Type=notify with a watchdog."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    prefix = tmp_path / "prefix"
    rel = prefix / "releases" / "0123456789ab"
    rel.mkdir(parents=True)
    shutil.copytree(REPO / "deploy", rel / "deploy")
    (rel / "WRITABLE").write_text("/var/lib/lineinspect-frames\n")
    (prefix / "current").symlink_to("releases/0123456789ab")
    r = subprocess.run(
        ["bash", str(REPO / "deploy/remote.sh"), "--prefix", str(prefix), "--station",
         "line9/unit_test", "--user", "lineinspect", "unit", "0123456789ab"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    unit = tmp_path / "lineinspect-line9-unit_test.service"
    unit.write_text(r.stdout)
    lines = r.stdout.splitlines()
    for line in (
        "Restart=always", "After=network-online.target", "StandardOutput=journal",
        "User=lineinspect", "Type=notify", "NotifyAccess=main", "NoNewPrivileges=yes",
        "ProtectSystem=strict", "PrivateTmp=yes", "CapabilityBoundingSet=",
        "AmbientCapabilities=", f"ReadWritePaths=-{prefix}/data -/var/lib/lineinspect-frames",
    ):  # fmt: skip
        assert line in lines, line
    assert any(re.fullmatch(r"WatchdogSec=\d+", x) for x in lines)
    # The prefix is under /tmp here, not a home: home folders stay hidden from the station.
    assert "ProtectHome=yes" in lines
    assert f"ExecStart={prefix}/current/deploy/station.sh" in r.stdout
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert v.returncode == 0 and unit.name not in v.stderr, v.stderr


def test_local_dry_run_prints_every_step_and_changes_nothing(tmp_path):
    """`local` (no ssh) with --dry-run: the plan for this machine, nothing written to --prefix."""
    bundle = make_bundle(tmp_path / "bundle")
    config = write_station(tmp_path / "station", free_port(), bundle)
    prefix = tmp_path / "prefix"
    r = subprocess.run(
        ["bash", str(DEPLOY), "local", "--bundle", str(bundle), "--config", str(config),
         "--prefix", str(prefix), "--no-service", "--dry-run"],
        capture_output=True, text=True, env={**os.environ, "DEPLOY_PYTHON": sys.executable},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    steps = re.findall(r"^== \[(\d+)/11\] (\w+)", r.stdout, re.M)
    assert [name for _, name in steps] == [
        "stage", "preflight", "ship", "venv", "engine", "check", "service", "switch", "restart",
        "health", "prune",
    ]  # fmt: skip
    assert re.search(r"^\[dry-run\] rsync .* " + re.escape(f"{prefix}/releases/"), r.stdout, re.M)
    assert "-m edge check" in r.stdout and "supervise.sh" in r.stdout
    assert r.stdout.rstrip().endswith("== dry run: nothing was changed on local")
    assert not prefix.exists()


def test_stage_rewrites_the_config_for_the_device(tmp_path):
    """Relative workstation files are shipped, station state goes to <prefix>/data, device
    paths are kept; the release id depends on the content only."""
    bundle = make_bundle(tmp_path / "bundle")
    station = tmp_path / "station"
    write_frames(station / "frames", {1}, 3)
    (station / "roi.png").write_bytes((station / "frames" / "frame_000.png").read_bytes())
    (station / "station.yaml").write_text(
        "bundle: elsewhere\n"
        "source: {uri: file://frames/, loop: true}\n"
        "postprocess: {roi_mask: roi.png}\n"
        "mqtt: {spool: spool.sqlite, tls: {ca_certs: /etc/ssl/certs/ca.pem}}\n"
        "evidence: {dir: evidence}\n"
        "recalibration: {dir: /var/lib/frames}\n"
    )

    def stage(out: Path) -> dict:
        r = subprocess.run(
            [sys.executable, str(REPO / "deploy/stage.py"), "--repo", str(REPO), "--config",
             str(station / "station.yaml"), "--bundle", str(bundle), "--prefix", "/opt/li",
             "--out", str(out)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    info = stage(tmp_path / "r1")
    cfg = yaml.safe_load((tmp_path / "r1" / "station.yaml").read_text())
    assert cfg["bundle"] == "bundle"
    assert cfg["source"]["uri"] == "file://files/frames/"
    assert cfg["postprocess"]["roi_mask"] == "files/roi.png"
    assert cfg["mqtt"]["spool"] == "/opt/li/data/spool.sqlite"
    assert cfg["mqtt"]["tls"]["ca_certs"] == "/etc/ssl/certs/ca.pem"  # a device path: kept
    assert cfg["evidence"]["dir"] == "/opt/li/data/evidence"
    assert cfg["recalibration"]["dir"] == "/var/lib/frames"
    assert sorted(p.name for p in (tmp_path / "r1" / "files" / "frames").iterdir()) == [
        "frame_000.png", "frame_001.png", "frame_002.png",
    ]  # fmt: skip
    assert not (tmp_path / "r1" / "code" / "train").exists()
    assert (info["camera"], info["exclusive"]) == ("", False)

    assert stage(tmp_path / "r2")["id"] == info["id"]
    (bundle / "thresholds.yaml").write_text(
        (bundle / "thresholds.yaml").read_text().replace("0.5", "0.6")
    )
    assert stage(tmp_path / "r3")["id"] != info["id"]
