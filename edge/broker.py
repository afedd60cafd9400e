"""The one mosquitto launcher (tests, the demo and `edge bench`): own config file, own
loopback port, own data directory. Nothing on a station needs it; it starts a broker only for
those who ask (`edge bench` without --broker).

with Mosquitto(tmp_path, persistence=True) as broker:
    ... broker.host, broker.port ...
    broker.kill()      # SIGKILL: clients see their sockets die
    broker.restart()   # same port, same config (and persisted state, with persistence=True)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from edge.errors import BrokerError

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    for path in MOSQUITTO_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("mosquitto")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """One mosquitto process. `extra_conf` lines are appended to the generated config."""

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: str | Path,
        *,
        persistence: bool = False,
        autosave_interval: int = 1,
        extra_conf: str = "",
        port: int | None = None,
        allow_anonymous: bool = True,
    ) -> None:
        self.binary = find_mosquitto()
        if self.binary is None:
            raise BrokerError("mosquitto not found: apt-get install mosquitto")
        self.dir = Path(workdir) / f"mosquitto-{id(self):x}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.extra_conf = extra_conf
        self.allow_anonymous = allow_anonymous
        self.port = port or free_port()
        self.conf_path = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def write_conf(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "persistence_file mosquitto.db",
            # Save after every change: a SIGKILLed broker comes back with its sessions.
            "autosave_on_changes true",
            f"autosave_interval {self.autosave_interval}",
            # Nagle off: else a PUBACK written while the one before it is unacknowledged at the
            # TCP level waits for the station's delayed ACK (40 ms; docs/mqtt.md).
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to 'mosquitto' and cannot write here
        if self.extra_conf:
            lines.append(self.extra_conf)
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 5.0) -> Mosquitto:
        if self.running:
            return self
        self.write_conf()
        log = open(self.log_path, "ab")  # closed in _reap
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._log = log
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reap()
                raise BrokerError(
                    f"mosquitto exited with {self.proc.returncode} on port {self.port}:\n{self.log()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise BrokerError(
            f"mosquitto did not listen on {self.port} within {timeout} s:\n{self.log()}"
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (mosquitto saves its persistence file), wait."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, nothing saved beyond the last autosave."""
        if self.running:
            self.proc.kill()
            self.proc.wait()
        self._reap()

    def restart(self, timeout: float = 5.0) -> Mosquitto:
        self.stop()
        return self.start(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _reap(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()
            self._log = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
