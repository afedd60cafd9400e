"""Fault scenarios for reject delivery: the real station process against a real mosquitto.

Shared by tests/test_faults.py (one test per scenario) and scripts/fault_table.py (the table).

Each scenario builds a line of PNG frames for the tiny fake bundle (tests/fakebundle.py: a grey
frame is good, a frame with a black patch is defective, decisions are exact), runs
`python -m edge run station.yaml` as a subprocess, injects one fault, clears it, and counts what a
reject gate received. The gate is `edge.listen.Listener` with a persistent session (fixed client
id, clean start off) on a broker with persistence, so events the broker accepted while the gate
was reconnecting are queued for it, as a real reject gate must listen.

Counting rule (per scenario, by part id = frame file stem, which every event carries):
    sent        defective parts the station inspected (the rejects it owes the gate)
    received    of those, parts with at least one reject event at the gate
    duplicates  copies the gate dropped by event id + extra event ids for an already seen part
    not_stored  rejects the station counted as NOT stored (spool full): loud, never silent
    lost        sent - received - not_stored; must be 0 unless `alarmed` (lost and not
                alarmed must be 0 in every scenario)
    alarmed     the alarm the fault must raise, where it was seen: the retained `status` topic
                (at the gate), the station's counters (summary/metrics) or the gate's own
                counters and GAP lines; empty when it did not appear (a failed check)
    backlog     reject events waiting in the spool file when the fault was cleared
    drain_s     fault cleared -> the last of those backlog events at the gate (None: no backlog)
A station SIGKILLed mid-run is restarted on the parts it had not decided yet (decisions are made
in frame order, so the last decided part is the highest one seen in a result, a reject or the
spool); "sent" is then every defective part of the line, over both runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge.listen import Listener
from tests.broker import Mosquitto, find_mosquitto, free_port
from tests.certs import have_openssl, make_ca, make_cert, tls_listener_conf
from tests.fakebundle import make_bundle, write_frames

REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 64)  # fake model input
FRAME_SHAPE = (96, 128)
LINE, NAME = "faults", "st1"
BASE = f"lineinspect/{LINE}/{NAME}"
GATE_ID = "reject-gate"
RATE = 8.0  # frames/s replayed by the station: runs last seconds, so faults land mid-run
OUTAGE_S = 3.0  # how long a mid-run fault lasts (at RATE, ~24 parts go by)
PASSWORD_ENV = "LINEINSPECT_MQTT_PASSWORD"


class Skip(Exception):  # noqa: N818 - a signal, like pytest's
    """The scenario needs a tool this machine lacks (mosquitto_passwd, openssl)."""


@dataclass
class Outcome:
    scenario: str
    sent: int = 0
    received: int = 0
    duplicates: int = 0
    lost: int = 0
    not_stored: int = 0
    backlog: int = 0
    drain_s: float | None = None
    alarmed: str = ""  # where the expected alarm was seen (see the module doc); "" = not seen
    wall_s: float = 0.0
    missing: list[str] = field(default_factory=list)  # sent parts without a reject at the gate
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # failed checks besides loss

    @property
    def lost_unalarmed(self) -> int:
        return 0 if self.alarmed else self.lost

    @property
    def ok(self) -> bool:
        return self.lost_unalarmed == 0 and not self.problems

    def check(self, cond: bool, problem: str) -> bool:
        if not cond:
            self.problems.append(problem)
        return cond

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lost_unalarmed": self.lost_unalarmed, "ok": self.ok}

    def alarm(self, seen: bool, where: str, problem: str) -> bool:
        """Record the expected alarm as seen (`where`), or a failed check."""
        if self.check(seen, problem):
            self.alarmed = "; ".join(filter(None, [self.alarmed, where]))
        return seen


def part_id(i: int) -> str:
    return f"frame_{i:03d}"  # write_frames' file stems: the source's part_id


def part_index(pid: str) -> int:
    return int(str(pid).rsplit("_", 1)[1])


def spooled_parts(path: Path) -> list[str]:
    """Part ids of the events in a spool file, oldest first (works while a station has it open)."""
    if not path.exists():
        return []
    conn = sqlite3.connect(str(path), timeout=10)
    try:
        rows = conn.execute("SELECT payload FROM events ORDER BY seq").fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()
    return [str(json.loads(r[0]).get("part_id")) for r in rows]


# -- schemas --------------------------------------------------------------------------------------

_VALIDATORS: dict[str, Any] = {}


def validate(kind: str, payload: Any) -> list[str]:
    """Messages of every JSON Schema violation of one payload (edge/schemas/<kind>.json)."""
    if kind not in _VALIDATORS:
        from jsonschema import Draft202012Validator

        schema = json.loads((REPO / "edge" / "schemas" / f"{kind}.json").read_text())
        _VALIDATORS[kind] = Draft202012Validator(schema)
    return [e.message for e in _VALIDATORS[kind].iter_errors(payload)]


# -- the station process --------------------------------------------------------------------------


class Station:
    """One `python -m edge run CONFIG` subprocess; stdout and stderr go to a log file."""

    def __init__(
        self, cfg: Path, workdir: Path, tag: str, env: dict[str, str], verbose: bool = False
    ) -> None:
        self.tag = tag
        self.summary_path = workdir / f"summary-{tag}.json"
        self.log_path = workdir / f"station-{tag}.log"
        cmd = [
            sys.executable,
            "-m",
            "edge",
            "run",
            str(cfg),
            "--summary-json",
            str(self.summary_path),
        ]
        if verbose:
            cmd.append("-v")
        self._log = open(self.log_path, "wb")  # closed in wait()/kill()
        self.t_start = time.time()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **env},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    def wait_log(self, pattern: str, timeout: float, n: int = 1) -> bool:
        """Wait until `pattern` (regex) occurs n times in the log; False on timeout or exit."""
        deadline = time.monotonic() + timeout
        while self.count(pattern) < n:
            if time.monotonic() > deadline or not self.alive:
                return self.count(pattern) >= n
            time.sleep(0.05)
        return True

    def wait(self, timeout: float) -> int | None:
        """Exit status, or None when it had to be killed after `timeout` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def summary(self) -> dict[str, Any]:
        try:
            return json.loads(self.summary_path.read_text())
        except FileNotFoundError:
            return {}

    def error_lines(self) -> list[str]:
        return [ln for ln in self.log().splitlines() if ln.startswith("error: ")]


# -- the rig: frames, bundle, broker, gate, stations ----------------------------------------------


class Rig:
    """Everything one scenario runs on, under `workdir/<scenario>`; close() stops it all."""

    def __init__(
        self,
        workdir: str | Path,
        scenario: str,
        *,
        n_frames: int = 60,
        every: int = 4,
        poison: str | None = None,
        poisoned: tuple[int, ...] = (),
        say: Callable[[str], None] = lambda msg: None,
    ) -> None:
        self.dir = Path(workdir) / scenario
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.say = say
        self.n_frames = n_frames
        # Defective: frames 1, 1+every, ... (frame 0 good: the first part never decides a test).
        # Poisoned frames (tests/fakebundle.py) make a `poison` graph misbehave; they are defects
        # for every graph, and a part without a verdict is owed a reject too.
        self.poison = poison
        self.poisoned = set(poisoned)
        self.defective = {i for i in range(n_frames) if i % every == 1} - self.poisoned
        self.expected = {part_id(i) for i in self.defective | self.poisoned}
        self.bundle = make_bundle(self.dir / "bundle", SIZE, poison=poison)
        self.frames = write_frames(
            self.dir / "frames", self.defective, n_frames, FRAME_SHAPE, poisoned=self.poisoned
        )
        self.spool = self.dir / "spool.sqlite"
        self.env: dict[str, str] = {}
        self._brokers: list[Mosquitto] = []
        self._gates: list[Listener] = []
        self._stations: list[Station] = []
        self._mounts: list[Path] = []

    def mount(self, path: Path, *args: str) -> Path:
        """`mount ARGS path` (root only, else Skip); unmounted by close()."""
        if os.geteuid() != 0 or shutil.which("mount") is None:
            raise Skip("mounting a file system for the spool needs root")
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", *args, str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            raise Skip(f"cannot mount a file system for the spool: {r.stderr.strip()}")
        self._mounts.append(path)
        return path

    def broker(self, **kw: Any) -> Mosquitto:
        if find_mosquitto() is None:
            raise Skip("mosquitto is not installed")
        kw.setdefault("persistence", True)
        b = Mosquitto(self.dir, **kw)
        self._brokers.append(b)
        return b

    def gate(self, broker: Mosquitto, protocol: str = "5", **kw: Any) -> Listener:
        """The reject gate: persistent session, QoS 1, fixed client id."""
        g = Listener(
            broker.host,
            broker.port,
            BASE,
            client_id=GATE_ID,
            persistent=True,
            protocol=protocol,
            reconnect_max_s=1.0,
            **kw,
        )
        self._gates.append(g)
        return g.start(timeout=10)

    def config(
        self,
        port: int,
        tag: str = "station",
        frames: Path | None = None,
        rate: float = RATE,
        extra: dict[str, Any] | None = None,
        **mqtt: Any,
    ) -> Path:
        """A station YAML: the fake bundle, the frames at RATE, the broker, this rig's spool."""
        m = {
            "host": "127.0.0.1",
            "port": port,
            "spool": str(self.spool),
            "connect_timeout_s": 10.0,
            "reconnect_max_s": 1.0,
            "publish_results": True,  # progress: which parts the station has decided
        }
        m.update(mqtt)
        d = {
            "station": {"line": LINE, "name": NAME},
            "bundle": str(self.bundle),
            "source": {"uri": str(frames or self.frames), "rate": rate},
            "mqtt": m,
            "metrics": {"interval_s": 1.0},
            "runtime": {"inference_threads": 1},  # a shared 2-core machine
            **(extra or {}),
        }
        path = self.dir / f"{tag}.yaml"
        path.write_text(yaml.safe_dump(d))
        return path

    def station(self, cfg: Path, tag: str, env: dict[str, str] | None = None, **kw: Any) -> Station:
        st = Station(cfg, self.dir, tag, {**self.env, **(env or {})}, **kw)
        self._stations.append(st)
        return st

    def frames_range(self, start: int, stop: int) -> Path:
        """A folder with frames start..stop-1 (same names, so the same part ids)."""
        sub = self.dir / f"frames-{start}-{stop}"
        sub.mkdir()
        for i in range(start, stop):
            shutil.copy2(self.frames / f"{part_id(i)}.png", sub / f"{part_id(i)}.png")
        return sub

    def remaining_frames(self, after: int) -> Path:
        """A folder with the frames after index `after` (same names, so the same part ids)."""
        rest = self.dir / f"frames-after-{after}"
        rest.mkdir()
        for i in range(after + 1, self.n_frames):
            shutil.copy2(self.frames / f"{part_id(i)}.png", rest / f"{part_id(i)}.png")
        return rest

    def close(self) -> None:
        for st in self._stations:
            st.kill()
        for g in self._gates:
            g.stop()
        for b in self._brokers:
            b.kill()
        for path in reversed(self._mounts):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- counting -------------------------------------------------------------------------------------


def first_arrivals(gate: Listener) -> dict[str, float]:
    """part id -> epoch time its first reject event reached the gate."""
    out: dict[str, float] = {}
    for e in gate.of_kind("reject"):
        if isinstance(e.payload, dict):
            out.setdefault(str(e.payload.get("part_id")), e.received)
    return out


def wait_parts(gate: Listener, parts: set[str], timeout: float) -> bool:
    return gate.wait_for(lambda: parts <= first_arrivals(gate).keys(), timeout)


def decided_parts(gate: Listener, spool: Path) -> set[str]:
    """Parts a (killed) station is known to have decided: results, rejects, spooled rejects."""
    seen = set(spooled_parts(spool))
    for e in gate.events:
        if e.kind in ("result", "reject") and isinstance(e.payload, dict):
            seen.add(str(e.payload.get("part_id")))
    return seen


def tally(rig: Rig, gate: Listener, out: Outcome, *, sent: set[str] | None = None) -> None:
    """Fill sent/received/duplicates/lost from what the gate holds; check every payload."""
    sent = rig.expected if sent is None else sent
    event_ids: dict[str, set[str]] = {}
    for p in gate.rejects():
        event_ids.setdefault(str(p.get("part_id")), set()).add(str(p.get("event_id")))
    out.sent = len(sent)
    out.received = len(sent & event_ids.keys())
    out.duplicates = gate.duplicates + sum(len(ids) - 1 for ids in event_ids.values())
    out.lost = out.sent - out.received - out.not_stored
    unexpected = sorted(event_ids.keys() - rig.expected)
    out.check(not unexpected, f"rejects for parts that are not defective: {unexpected}")
    passed = sorted(
        {
            str(e.payload.get("part_id"))
            for e in gate.of_kind("result")
            if isinstance(e.payload, dict) and e.payload.get("decision") == "pass"
        }
        & sent,
        key=part_index,
    )
    out.check(not passed, f"defective or unverified parts passed: {passed}")
    unverified = {str(p.get("part_id")) for p in gate.rejects() if p.get("reason") == "unverified"}
    owed = {part_id(i) for i in rig.poisoned} & sent
    out.check(
        rig.poison not in ("nan", "fail")
        or owed <= unverified | set(missing_parts(sent, event_ids)),
        f"poisoned parts not rejected as unverified: {sorted(owed - unverified)}",
    )
    missing = sorted(sent - event_ids.keys(), key=part_index)
    if missing:
        out.notes.append(f"not received: {', '.join(missing)}")
    out.missing = missing
    bad: list[str] = []
    for e in gate.events:
        if e.kind in ("reject", "result", "status", "metrics"):
            bad += [f"{e.kind}: {m}" for m in validate(e.kind, e.payload)]
    out.check(not bad, f"payloads violating their JSON Schema: {bad[:3]}")


def missing_parts(sent: set[str], event_ids: dict[str, set[str]]) -> list[str]:
    return sorted(sent - event_ids.keys(), key=part_index)


def drain_time(gate: Listener, backlog: list[str], t_clear: float) -> float | None:
    """Seconds from t_clear until every backlog part had arrived; None when there was no
    backlog, or when some of it never arrived (then `lost` says so)."""
    arrivals = first_arrivals(gate)
    if not backlog or any(p not in arrivals for p in backlog):
        return None
    return round(max(0.0, max(arrivals[p] for p in backlog) - t_clear), 2)


def finish_run(out: Outcome, st: Station, rig: Rig, *, frames: int | None = None) -> dict:
    """Wait for a station run to end on its own; check exit 0, frames, an empty spool."""
    rc = st.wait(60)
    out.check(rc == 0, f"station {st.tag} exit status {rc}: {st.error_lines() or st.log()[-500:]}")
    s = st.summary()
    want = rig.n_frames if frames is None else frames
    out.check(s.get("frames") == want, f"station {st.tag} inspected {s.get('frames')} of {want}")
    pub = s.get("publisher", {})
    out.check(pub.get("spooled") == 0, f"station {st.tag} left {pub.get('spooled')} spooled")
    return s


def check_running(out: Outcome, st: Station, during: str) -> None:
    out.check(st.alive, f"station exited (status {st.proc.poll()}) during {during}: no retrying")


def wait_progress(out: Outcome, gate: Listener, rejects: int, timeout: float = 30) -> bool:
    return out.check(
        gate.wait_for(lambda: gate.reject_count >= rejects, timeout),
        f"the gate saw {gate.reject_count} rejects, waited for {rejects}",
    )


# -- scenarios ------------------------------------------------------------------------------------


def broker_down_at_start(rig: Rig, out: Outcome) -> None:
    """The broker is down when the station starts and comes up 10 s later."""
    broker = rig.broker().start()
    gate = rig.gate(broker)  # the gate's session exists before the outage, as on a real line
    broker.stop()
    cfg = rig.config(broker.port, connect_timeout_s=30.0, rate=0.0)
    st = rig.station(cfg, "run")
    rig.say("station started with the broker down; broker up in 10 s")
    t_down = time.time()
    time.sleep(10.0)
    # A slow start-up (a loaded machine) may not have tried yet: the broker stays down until then.
    out.check(
        st.wait_log("cannot connect to MQTT broker", 20), "no warning about the unreachable broker"
    )
    check_running(out, st, "the broker outage at start-up")
    broker.start()
    t_up = time.time()
    out.notes.append(f"broker down {t_up - t_down:.0f} s")
    s = finish_run(out, st, rig)
    fails = s.get("publisher", {}).get("connect_failures", 0)
    out.alarm(fails >= 1, f"counters: connect_failures {fails}", "connect failures not counted")
    wait_parts(gate, rig.expected, 20)
    tally(rig, gate, out)
    # Nothing can be spooled: the station waits for its broker before it opens the source.
    out.drain_s = drain_time(gate, sorted(rig.expected), t_up)
    out.notes.append(
        "station waits up to connect_timeout_s (30) for the broker before inspecting; "
        "drain = broker up -> last reject (whole run, unpaced)"
    )


def broker_killed(rig: Rig, out: Outcome, protocol: str = "5") -> None:
    """The broker is SIGKILLed mid-run and restarted OUTAGE_S later."""
    broker = rig.broker().start()
    gate = rig.gate(broker, protocol=protocol)
    st = rig.station(rig.config(broker.port, protocol=protocol), "run")
    if not wait_progress(out, gate, 2):
        return
    broker.kill()
    rig.say(f"broker SIGKILLed after {gate.reject_count} rejects; restart in {OUTAGE_S:.0f} s")
    time.sleep(OUTAGE_S)
    check_running(out, st, "the broker outage")
    backlog = spooled_parts(rig.spool)
    broker.start()
    t_clear = time.time()
    s = finish_run(out, st, rig)
    wait_parts(gate, rig.expected, 20)
    tally(rig, gate, out)
    out.backlog = len(backlog)
    out.check(out.backlog > 0, "no reject was spooled during the outage: nothing was tested")
    out.drain_s = drain_time(gate, backlog, t_clear)
    pub = s.get("publisher", {})
    out.alarm(
        pub.get("disconnects", 0) >= 1 and pub.get("reconnects", 0) >= 1,
        f"counters: disconnects {pub.get('disconnects')}, reconnects {pub.get('reconnects')}",
        f"publisher disconnects/reconnects: {pub.get('disconnects')}/{pub.get('reconnects')}",
    )
    out.notes.append(f"MQTT {protocol}; outage {OUTAGE_S:.0f} s at {RATE:.0f} parts/s")


def broker_killed_v311(rig: Rig, out: Outcome) -> None:
    broker_killed(rig, out, protocol="3.1.1")


def _restart_after_kill(rig: Rig, out: Outcome, gate: Listener, port: int) -> None:
    """Resume a SIGKILLed station on the parts it had not decided; count over both runs."""
    time.sleep(1.0)  # results the dead station published are still on their way to the gate
    backlog = spooled_parts(rig.spool)
    decided = decided_parts(gate, rig.spool)
    last = max((part_index(p) for p in decided), default=-1)
    out.check(last < rig.n_frames - 1, "the station had decided every part before the kill")
    rest = rig.remaining_frames(last)
    rig.say(f"killed after part {last}; {len(backlog)} reject(s) in the spool; restarting")
    st2 = rig.station(rig.config(port, tag="station2", frames=rest), "run2")
    t_clear = st2.t_start
    finish_run(out, st2, rig, frames=rig.n_frames - 1 - last)
    wait_parts(gate, rig.expected, 20)
    births = sorted(
        {e.payload.get("bd_seq") for e in gate.of_kind("status") if isinstance(e.payload, dict)}
        - {None}
    )
    out.alarm(
        len(births) >= 2,
        f"status: new bd_seq {births[-1] if births else '?'} (a restart)",
        f"the restart is not visible as a new bd_seq on status: {births}",
    )
    tally(rig, gate, out)
    out.backlog = len(backlog)
    out.drain_s = drain_time(gate, backlog, t_clear)
    out.notes.append(
        f"run 1 killed after deciding parts 0-{last}, run 2 inspected the {rig.n_frames - 1 - last} "
        "after them with the same spool; drain includes station start-up"
    )


def station_killed(rig: Rig, out: Outcome) -> None:
    """The station is SIGKILLed mid-run, then started again (same spool, same client id)."""
    broker = rig.broker().start()
    gate = rig.gate(broker)
    st = rig.station(rig.config(broker.port), "run1")
    if not wait_progress(out, gate, 4):
        return
    st.kill()
    offline = gate.wait_status("offline", 5)
    out.alarm(
        offline is not None and offline.get("reason") == "connection lost (last will)",
        "status: offline (last will)",
        f"no last-will offline status after the SIGKILL: {offline}",
    )
    _restart_after_kill(rig, out, gate, broker.port)


def station_killed_with_backlog(rig: Rig, out: Outcome) -> None:
    """The broker dies, rejects pile up in the spool, then the station is SIGKILLed too."""
    broker = rig.broker().start()
    gate = rig.gate(broker)
    st = rig.station(rig.config(broker.port), "run1")
    if not wait_progress(out, gate, 2):
        return
    broker.kill()
    deadline = time.monotonic() + 20
    while len(spooled_parts(rig.spool)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    st.kill()
    out.check(len(spooled_parts(rig.spool)) >= 3, "fewer than 3 rejects spooled before the kill")
    broker.start()
    _restart_after_kill(rig, out, gate, broker.port)


def spool_overflow(rig: Rig, out: Outcome) -> None:
    """The broker stays away longer than a 10-event spool holds."""
    spool_max = 10
    broker = rig.broker().start()
    gate = rig.gate(broker)
    st = rig.station(rig.config(broker.port, spool_max_events=spool_max), "run")
    if not wait_progress(out, gate, 2):
        return
    broker.stop()
    rig.say("broker stopped; waiting for the station to refuse 3 rejects (spool full)")
    out.check(
        st.wait_log(r"publish error #3\b", 30), "the station did not report 3 spool-full rejects"
    )
    check_running(out, st, "the spool overflow")
    backlog = spooled_parts(rig.spool)
    broker.start()
    t_clear = time.time()
    s = finish_run(out, st, rig)
    pub = s.get("publisher", {})
    out.not_stored = int(pub.get("spool_full", 0))
    publish_errors = s.get("errors_by_stage", {}).get("publish")
    out.check(
        publish_errors == out.not_stored,
        f"station publish errors {publish_errors} != publisher spool_full {out.not_stored}",
    )
    deliverable = len(rig.expected) - out.not_stored
    gate.wait_for(lambda: len(first_arrivals(gate).keys() & rig.expected) >= deliverable, 20)
    tally(rig, gate, out)
    log = st.log()
    out.backlog = len(backlog)
    out.check(out.backlog == spool_max, f"backlog {out.backlog}, spool bound {spool_max}")
    # The station names the first 5 events it could not store: exactly those must be missing.
    named = re.findall(r"publish error #\d+ \(frame \d+ part (\S+?)\): spool .* is full", log)
    out.check(
        named and set(named) <= set(out.missing),
        f"parts the station reported as not stored {named} vs missing {out.missing}",
    )
    out.check(out.not_stored >= 3, f"only {out.not_stored} rejects not stored by the full spool")
    out.drain_s = drain_time(gate, backlog, t_clear)
    # The alarm: in the log at 50 and 90 % before the first refusal, on status after reconnect.
    first_refusal = log.find("publish error #1")
    for level in (50, 90, 100):
        at = log.find(f"is {level}% full")
        out.check(at >= 0, f"no {level}% alarm in the station log")
        if level < 100:
            out.check(at < first_refusal, f"the {level}% alarm came after the first refusal")
    alarms = [e.payload.get("alarm") for e in gate.of_kind("status") if isinstance(e.payload, dict)]
    out.alarm(
        "spool 100% full" in alarms,
        f"status: 'spool 100% full'; counters: spool_full {out.not_stored}",
        f"no 100% alarm on the status topic: {alarms}",
    )
    last = gate.last_status() or {}
    out.check(last.get("alarm") is None, f"alarm not cleared on status after draining: {last}")
    out.notes.append(
        f"spool_max_events {spool_max}; log alarms at 50/90/100 %, status alarm "
        f"'spool 100% full' after reconnect, cleared when drained; not stored = the spool_full counter"
    )


def _mid_run_fault(
    rig: Rig,
    out: Outcome,
    broker: Mosquitto,
    st: Station,
    gate: Listener,
    *,
    inject: Callable[[], None],
    clear: Callable[[], None],
    failure_log: str,
) -> dict:
    """Common shape: run, inject (broker restarted), hold OUTAGE_S, clear (restarted), drain."""
    if not wait_progress(out, gate, 2):
        return {}
    inject()
    out.check(st.wait_log(failure_log, 10), f"no {failure_log!r} in the station log")
    time.sleep(OUTAGE_S)
    check_running(out, st, "the fault")
    backlog = spooled_parts(rig.spool)
    clear()
    t_clear = time.time()
    s = finish_run(out, st, rig)
    wait_parts(gate, rig.expected, 20)
    tally(rig, gate, out)
    out.backlog = len(backlog)
    out.check(out.backlog > 0, "no reject was spooled during the fault: nothing was tested")
    out.drain_s = drain_time(gate, backlog, t_clear)
    return s


def wrong_password(rig: Rig, out: Outcome) -> None:
    """Start-up with a wrong password; then the password rotated on the broker mid-run."""
    if shutil.which("mosquitto_passwd") is None:
        raise Skip("mosquitto_passwd is not installed")
    good, bad, rotated, gate_pw = "Li-good-7f3a", "Li-bad-91c2", "Li-rotated-55e0", "Gate-pw-2b8d"
    pwfile = rig.dir / "passwd"

    def passwd(user: str, pw: str) -> None:
        args = ["-b", "-c"] if not pwfile.exists() else ["-b"]
        subprocess.run(["mosquitto_passwd", *args, str(pwfile), user, pw], check=True)

    passwd("li", good)
    passwd("gate", gate_pw)
    broker = rig.broker(allow_anonymous=False, extra_conf=f"password_file {pwfile}").start()
    gate = rig.gate(broker, username="gate", password=gate_pw)
    cfg = rig.config(broker.port, username="li", connect_timeout_s=5.0)

    # 1. Start-up refused: one clear line, exit 2 at once, not a retry loop.
    st0 = rig.station(cfg, "bad-start", env={PASSWORD_ENV: bad}, verbose=True)
    rc = st0.wait(30)
    errors = st0.error_lines()
    out.check(rc == 2, f"a refused start-up exited with {rc}, expected 2")
    out.check(
        len(errors) == 1 and "refused by the broker" in errors[0],
        f"start-up error is not one clear line: {errors}",
    )
    out.check(not spooled_parts(rig.spool), "a refused start-up left events in the spool")

    # 2. Mid-run: the broker comes back with the station's password rotated.
    st = rig.station(cfg, "run", env={PASSWORD_ENV: good}, verbose=True)

    def inject() -> None:
        passwd("li", rotated)
        broker.restart()

    def clear() -> None:
        passwd("li", good)
        broker.restart()

    s = _mid_run_fault(
        rig, out, broker, st, gate, inject=inject, clear=clear, failure_log="refused the connection"
    )
    refusals = s.get("publisher", {}).get("connect_refusals", 0)
    out.alarm(
        refusals >= 1, f"counters: connect_refusals {refusals}", "connect refusals not counted"
    )
    logs = st0.log() + st.log()
    leaked = [pw for pw in (good, bad, rotated) if pw in logs]
    out.check(not leaked, f"password(s) in the station log (-v): {leaked}")
    out.notes.append(
        f"start-up: exit 2 `{errors[0][:90] if errors else '?'}...`; mid-run: {refusals} "
        "refused reconnects counted, station kept inspecting; no password in the -v logs"
    )


def tls_untrusted(rig: Rig, out: Outcome) -> None:
    """Start-up against a broker certificate the station does not trust; then the broker's
    certificate replaced mid-run by one from another CA."""
    if not have_openssl():
        raise Skip("openssl is not installed")
    certs = rig.dir / "certs"
    certs.mkdir()
    ca, rogue_ca = make_ca(certs, "ca"), make_ca(certs, "rogue-ca")
    server = make_cert(certs, "server", ca, server=True)
    rogue = make_cert(certs, "rogue-server", rogue_ca, server=True)
    tls_port = free_port()
    # The gate listens on the plain listener; the station talks TLS on tls_port.
    broker = rig.broker(extra_conf=tls_listener_conf(tls_port, ca, server)).start()
    gate = rig.gate(broker)

    st0 = rig.station(
        rig.config(
            tls_port, tag="untrusted", tls={"ca_certs": str(rogue_ca.crt)}, connect_timeout_s=3.0
        ),
        "bad-start",
    )
    rc = st0.wait(30)
    errors = st0.error_lines()
    out.check(rc == 2, f"an untrusted broker at start-up: exit {rc}, expected 2")
    out.check(
        len(errors) == 1 and "certificate verify failed" in errors[0],
        f"start-up error is not one clear line: {errors}",
    )

    st = rig.station(rig.config(tls_port, tls={"ca_certs": str(ca.crt)}), "run")

    def inject() -> None:
        broker.extra_conf = tls_listener_conf(tls_port, rogue_ca, rogue)
        broker.restart()

    def clear() -> None:
        broker.extra_conf = tls_listener_conf(tls_port, ca, server)
        broker.restart()

    s = _mid_run_fault(
        rig,
        out,
        broker,
        st,
        gate,
        inject=inject,
        clear=clear,
        failure_log="certificate verify failed",
    )
    failures = s.get("publisher", {}).get("connect_failures", 0)
    out.alarm(failures >= 1, f"counters: connect_failures {failures}", "TLS failures not counted")
    out.notes.append(
        f"start-up: exit 2 (`certificate verify failed`); mid-run: broker certificate from "
        f"another CA, {failures} failed reconnects counted, station kept inspecting"
    )


def acl_refused(rig: Rig, out: Outcome) -> None:
    """The broker's ACL refuses the reject topic (MQTT 5 PUBACK reason code) until it is fixed."""
    spool_max = 20
    acl = rig.dir / "acl"
    acl.write_text(
        f"topic read #\ntopic readwrite {BASE}/status\ntopic write {BASE}/result\n"
        f"topic write {BASE}/metrics\n"
    )
    broker = rig.broker(extra_conf=f"acl_file {acl}").start()
    gate = rig.gate(broker)
    st = rig.station(rig.config(broker.port, spool_max_events=spool_max), "run")
    # Refused, kept, counted: half the spool fills and the 50 % alarm goes out on status, live.
    out.check(st.wait_log("refused reject", 30, n=spool_max // 2), "PUBACK refusals not logged")
    out.alarm(
        gate.wait_for(lambda: "spool 50% full" in _alarms(gate), 10),
        "status: 'spool 50% full'",
        f"no 50% alarm on the status topic while refused: {_alarms(gate)}",
    )
    check_running(out, st, "the ACL refusals")
    out.check(gate.reject_count == 0, f"{gate.reject_count} refused rejects reached the gate")
    backlog = spooled_parts(rig.spool)
    broker.extra_conf = ""  # the topic is allowed again
    broker.restart()
    t_clear = time.time()
    s = finish_run(out, st, rig)
    wait_parts(gate, rig.expected, 20)
    tally(rig, gate, out)
    out.backlog = len(backlog)
    out.drain_s = drain_time(gate, backlog, t_clear)
    refused = s.get("publisher", {}).get("refused", 0)
    out.alarm(
        refused >= spool_max // 2, f"counters: refused {refused}", f"refused PUBACKs: {refused}"
    )
    out.notes.append(
        f"{refused} PUBACKs 'Not authorized' counted, events kept; status alarm 'spool 50% full' "
        "while refused; fixed by an ACL change + broker restart"
    )


def _alarms(gate: Listener) -> list[str]:
    return [
        e.payload.get("alarm")
        for e in gate.of_kind("status")
        if isinstance(e.payload, dict) and e.payload.get("alarm")
    ]


def _alarm_seen(gate: Listener, text: str) -> bool:
    return any(text in a for a in _alarms(gate))


def _alarm_clear(gate: Listener, text: str) -> bool:
    last = gate.last_status() or {}
    return text not in str(last.get("alarm") or "")


def _run_to_end(rig: Rig, out: Outcome, st: Station, gate: Listener) -> dict:
    s = finish_run(out, st, rig)
    wait_parts(gate, rig.expected, 20)
    tally(rig, gate, out)
    return s


def _poisoned(rig: Rig, out: Outcome, cause: str, stage: str) -> None:
    """Poisoned frames among good and defective ones: each must be an `unverified` reject."""
    broker = rig.broker().start()
    gate = rig.gate(broker)
    st = rig.station(rig.config(broker.port), "run")
    s = _run_to_end(rig, out, st, gate)
    n = len(rig.poisoned)
    causes = {
        str(p.get("part_id")): str(p.get("cause"))
        for p in gate.rejects()
        if p.get("reason") == "unverified"
    }
    want = {part_id(i) for i in rig.poisoned}
    out.check(set(causes) == want, f"unverified rejects {sorted(causes)}, poisoned {sorted(want)}")
    out.check(
        all(cause in c for c in causes.values()), f"causes {set(causes.values())} lack {cause!r}"
    )
    metrics = [e.payload for e in gate.of_kind("metrics") if isinstance(e.payload, dict)]
    m_unv = max((m.get("unverified", 0) for m in metrics), default=0)
    errors = s.get("errors_by_stage", {}).get(stage, 0) if stage else n
    out.alarm(
        s.get("unverified") == n and m_unv == n and errors == n,
        f"counters: unverified {s.get('unverified')} (summary and metrics topic)"
        + (f", errors_by_stage.{stage} {errors}" if stage else ""),
        f"unverified counted {s.get('unverified')} / metrics {m_unv} / {stage} errors {errors}, "
        f"poisoned {n}",
    )
    first = next(iter(causes.values()), "")
    out.notes.append(f"{n} poisoned frames among {rig.n_frames}; reject cause `{first[:70]}`")


def nan_output(rig: Rig, out: Outcome) -> None:
    """The model outputs NaN for some parts (tests/fakebundle.py poison='nan')."""
    _poisoned(rig, out, "non-finite model output", "")


def failing_inference(rig: Rig, out: Outcome) -> None:
    """Inference raises for some parts (poison='fail': onnxruntime's Gather out of range)."""
    _poisoned(rig, out, "inference failed", "infer")


def _spool_write_fault(
    rig: Rig, out: Outcome, inject: Callable[[], None], clear: Callable[[], None] | None
) -> dict:
    """Broker and gate up; the spool's file system fails mid-run (inject), maybe recovers."""
    broker = rig.broker().start()
    gate = rig.gate(broker)
    st = rig.station(rig.config(broker.port), "run")
    if not wait_progress(out, gate, 2):
        return {}
    inject()
    out.alarm(
        gate.wait_for(lambda: _alarm_seen(gate, "spool write failed"), 15),
        "status: 'spool write failed ... sent but not stored'",
        f"no spool write alarm on status: {_alarms(gate)}",
    )
    check_running(out, st, "the spool failure")
    time.sleep(OUTAGE_S)
    if clear is not None:
        clear()
        out.check(
            gate.wait_for(lambda: _alarm_clear(gate, "spool write failed"), 15),
            f"spool write alarm not cleared after the fault: {gate.last_status()}",
        )
    rc = st.wait(60)
    out.check(rc == 0, f"station exit status {rc}: {st.error_lines() or st.log()[-500:]}")
    s = st.summary()
    out.check(s.get("frames") == rig.n_frames, f"inspected {s.get('frames')} of {rig.n_frames}")
    wait_parts(gate, rig.expected, 20)
    tally(rig, gate, out)
    pub = s.get("publisher", {})
    failed = s.get("errors_by_stage", {}).get("publish", 0)
    # Every failed write is counted (spool_errors); the station counts as a publish error only
    # the rejects the broker had not acknowledged either when the write failed (the others
    # were delivered: publish_reject returns at the first of PUBACK and fsync).
    errors = pub.get("spool_errors", 0)
    out.check(errors >= 1 and errors >= failed, f"counters: {pub}")
    out.alarmed += f"; counters: spool_errors {errors}"
    out.notes.append(
        f"{errors} rejects not stored but sent live ({failed} of them not yet acknowledged "
        "when the write failed: station publish errors; broker up; with the broker also down "
        "they would be lost, alarmed)"
        + (
            f"; {pub['spooled']} acked event(s) left in the spool (acks failed too): sent again "
            "at the next start, duplicates not losses"
            if pub.get("spooled")
            else ""
        )
    )
    return s


def spool_readonly(rig: Rig, out: Outcome) -> None:
    """The spool's ext4 file system goes read-only mid-run (errors=remount-ro after an I/O error,
    as a failing SD card does; triggered through /sys/fs/ext4/<dev>/trigger_fs_error)."""
    img = rig.dir / "spool-fs.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    if shutil.which("mkfs.ext4") is None:
        raise Skip("mkfs.ext4 is not installed")
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    mnt = rig.mount(rig.dir / "spool-fs", "-o", "loop,errors=remount-ro", str(img))
    rig.spool = mnt / "spool.sqlite"
    dev = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", str(mnt)], capture_output=True, text=True
    ).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(dev).name / "trigger_fs_error"
    if not trigger.exists():
        raise Skip(f"{trigger} does not exist (kernel without ext4 error injection)")

    def inject() -> None:
        trigger.write_text("lineinspect fault test\n")
        opts = subprocess.run(
            ["findmnt", "-n", "-o", "OPTIONS", str(mnt)], capture_output=True, text=True
        ).stdout
        out.notes.append(f"mount options after the error: {opts.strip().split(',')[-1]}")

    _spool_write_fault(rig, out, inject, None)
    out.notes.append("not recoverable while running (fsck and remount): alarm held to the end")


def spool_disk_full(rig: Rig, out: Outcome) -> None:
    """The spool's file system (a 2 MiB tmpfs) fills up mid-run, then space is freed."""
    mnt = rig.mount(rig.dir / "spool-fs", "-t", "tmpfs", "-o", "size=2m", "tmpfs")
    rig.spool = mnt / "spool.sqlite"
    ballast = mnt / "ballast"

    def inject() -> None:
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)

    _spool_write_fault(rig, out, inject, ballast.unlink)
    out.notes.append("tmpfs 2 MiB filled by a ballast file, freed after 3 s; alarm cleared")


def spool_deleted(rig: Rig, out: Outcome) -> None:
    """The spool file is deleted while rejects wait in it (broker down), then the broker returns."""
    broker = rig.broker().start()
    gate = rig.gate(broker)
    st = rig.station(rig.config(broker.port), "run")
    if not wait_progress(out, gate, 2):
        return
    broker.stop()
    deadline = time.monotonic() + 20
    while len(spooled_parts(rig.spool)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    held = len(spooled_parts(rig.spool))
    for suffix in ("", "-wal", "-shm"):
        Path(str(rig.spool) + suffix).unlink(missing_ok=True)
    rig.say(f"spool deleted with {held} reject(s) in it")
    out.check(st.wait_log("deleted or replaced while open", 10), "deletion not detected")
    check_running(out, st, "the spool deletion")
    time.sleep(1.0)
    backlog = spooled_parts(rig.spool)
    broker.start()
    t_clear = time.time()
    s = _run_to_end(rig, out, st, gate)
    out.backlog = len(backlog)
    out.drain_s = drain_time(gate, backlog, t_clear)
    rec = s.get("publisher", {}).get("spool_recreated", 0)
    out.alarm(
        gate.wait_for(lambda: _alarm_seen(gate, "deleted or replaced"), 10) and rec >= 1,
        f"status: 'spool ... deleted or replaced while running; recreated'; counters: "
        f"spool_recreated {rec}",
        f"no spool-recreated alarm on status ({_alarms(gate)}) or counter ({rec})",
    )
    out.notes.append(
        f"deleted with {held} reject(s) waiting (broker down): carried over from the open file"
    )


def spool_corrupt_at_start(rig: Rig, out: Outcome) -> None:
    """Run 1 leaves rejects in the spool (broker down); the file is damaged (a garbage page);
    run 2 starts on it with the broker up."""
    broker = rig.broker().start()
    gate = rig.gate(broker)
    broker.stop()
    split = 20
    cfg1 = rig.config(
        broker.port,
        tag="run1",
        frames=rig.frames_range(0, split),
        rate=0.0,
        require_broker_at_start=False,
        connect_timeout_s=1.0,
    )
    st1 = rig.station(cfg1, "run1")
    st1.wait(60)
    held = spooled_parts(rig.spool)
    out.check(len(held) >= 3, f"run 1 left {len(held)} rejects in the spool")
    conn = sqlite3.connect(str(rig.spool))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    (root,) = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'"
    ).fetchone()
    (psize,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    with open(rig.spool, "r+b") as f:  # the event_id index's page: the rows stay readable
        f.seek((root - 1) * psize)
        f.write(b"\xa5" * psize)
    broker.start()
    t_clear = time.time()
    st = rig.station(rig.config(broker.port, frames=rig.frames_range(split, rig.n_frames)), "run2")
    finish_run(out, st, rig, frames=rig.n_frames - split)
    wait_parts(gate, rig.expected, 20)
    tally(rig, gate, out)
    out.backlog = len(held)
    out.drain_s = drain_time(gate, held, t_clear)
    out.alarm(
        gate.wait_for(lambda: _alarm_seen(gate, "was corrupt"), 10),
        "status: 'spool ... was corrupt; moved to ...corrupt-..., N event(s) recovered'",
        f"no corrupt-spool alarm on status: {_alarms(gate)}",
    )
    out.check(bool(list(rig.dir.glob("spool.sqlite.corrupt-*"))), "corrupt file not kept aside")
    text = next((a for a in _alarms(gate) if "was corrupt" in a), "")
    m = re.search(r"(\d+) event\(s\) recovered", text)
    out.notes.append(
        f"run 1 left {len(held)} rejects (broker down), index page overwritten; "
        f"{m.group(1) if m else '?'} recovered into a fresh spool; drain includes start-up"
    )


def gate_handler_failure(rig: Rig, out: Outcome) -> None:
    """The gate's handler raises for 3 s (its actuator is away), then works again."""
    broker = rig.broker().start()
    failing = threading.Event()

    def handler(event: Any) -> None:
        if failing.is_set():
            raise RuntimeError("reject actuator not ready (injected)")

    gate = rig.gate(broker, on_event=handler)
    st = rig.station(rig.config(broker.port), "run")
    if not wait_progress(out, gate, 2):
        return
    failing.set()
    time.sleep(OUTAGE_S)
    failing.clear()
    errors = gate.errors
    out.check(errors >= 1, "the handler never failed: nothing was tested")
    # Unacknowledged messages are delivered again only on a new connection of the session.
    time.sleep(1.0)
    missing_then = gate.gaps()
    gate.redeliver()
    t_clear = time.time()
    _run_to_end(rig, out, st, gate)
    gaps = [g for g in gate.gap_events if g.startswith("GAP ")]
    filled = [g for g in gate.gap_events if g.startswith("GAP FILLED")]
    out.alarm(
        bool(gaps) and bool(missing_then),
        f"gate: {errors} handler errors (not acknowledged), {len(gaps)} GAP line(s)",
        f"failed handler not visible at the gate: gaps {gate.gap_events}",
    )
    out.check(not gate.gaps(), f"seq gaps left at the end: {gate.gaps()}")
    backlog = sorted({p for seqs in missing_then.values() for p in seqs})
    out.backlog = len(backlog)
    late = [e.received for e in gate.of_kind("reject") if e.received >= t_clear]
    out.drain_s = round(min(late) - t_clear, 2) if late else None
    out.notes.append(
        f"{len(filled)} gap(s) filled by the broker's redelivery after the gate reconnected its "
        "session (an unacknowledged message comes back only on a new connection)"
    )


def no_subscriber(rig: Rig, out: Outcome) -> None:
    """Nobody subscribes to the rejects (PUBACK reason 16) until the gate comes up."""
    broker = rig.broker().start()
    st = rig.station(rig.config(broker.port), "run")
    out.check(st.wait_log("ALARM no_subscribers", 20), "no 'no subscriber' alarm in the log")
    time.sleep(OUTAGE_S)
    check_running(out, st, "the time without a subscriber")
    backlog = spooled_parts(rig.spool)
    gate = rig.gate(broker)  # gets the retained status first
    t_clear = time.time()
    s = _run_to_end(rig, out, st, gate)
    statuses = [e.payload for e in gate.of_kind("status") if isinstance(e.payload, dict)]
    first = statuses[0] if statuses else {}
    n16 = s.get("publisher", {}).get("no_subscribers", 0)
    out.alarm(
        "no subscriber" in str(first.get("alarm")) and n16 >= 1,
        f"status (retained): 'no subscriber on .../reject'; counters: no_subscribers {n16}",
        f"first status at the gate {first}, no_subscribers {n16}",
    )
    out.check(not (gate.last_status() or {}).get("alarm"), "alarm not cleared after delivery")
    out.backlog = len(backlog)
    out.drain_s = drain_time(gate, backlog, t_clear)
    out.notes.append(
        f"{n16} PUBACKs 'No matching subscribers' (16): events kept, retried every 2 s"
    )


def broker_not_acknowledging(rig: Rig, out: Outcome) -> None:
    """The broker freezes (SIGSTOP: sockets open, nothing acknowledged) for 8 s, then SIGCONT."""
    broker = rig.broker().start()
    gate = rig.gate(broker)
    st = rig.station(rig.config(broker.port, max_inflight=3), "run")
    if not wait_progress(out, gate, 2):
        return
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        out.check(st.wait_log("has not acknowledged", 15), "no not-acknowledging alarm in the log")
        time.sleep(1.0)
        check_running(out, st, "the frozen broker")
        backlog = spooled_parts(rig.spool)
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    t_clear = time.time()
    s = _run_to_end(rig, out, st, gate)
    held = s.get("publisher", {}).get("held_back", 0)
    out.alarm(
        gate.wait_for(lambda: _alarm_seen(gate, "has not acknowledged"), 10),
        f"status: 'broker ... has not acknowledged for 5+ s'; counters: held_back {held}",
        f"no not-acknowledging alarm on status: {_alarms(gate)}",
    )
    out.check(not (gate.last_status() or {}).get("alarm"), "alarm not cleared after SIGCONT")
    out.backlog = len(backlog)
    out.drain_s = drain_time(gate, backlog, t_clear)
    out.notes.append(
        "max_inflight 3: later rejects held back in the spool; the alarm reaches the gate once "
        "the broker runs again (a frozen broker delivers nothing: the heartbeat stops too)"
    )


def stalled_pipeline(rig: Rig, out: Outcome) -> None:
    """One part takes seconds to infer (poison='slow'), with stall_s 1 and heartbeat_s 0.5."""
    broker = rig.broker().start()
    gate = rig.gate(broker)
    extra = {"stall_s": 1.0, "heartbeat_s": 0.5}
    st = rig.station(rig.config(broker.port, extra=extra), "run")
    raised = gate.wait_for(lambda: _alarm_seen(gate, "stalled"), 30)
    out.alarm(
        raised,
        "status: 'stalled: N captured frame(s) not decided for 1 s', heartbeat stalled: true",
        f"no stalled alarm on status: {_alarms(gate)}",
    )
    cleared = gate.wait_for(lambda: _alarm_clear(gate, "stalled"), 30)
    out.check(cleared, f"stalled alarm not cleared: {gate.last_status()}")
    stalled_beats = [
        e.payload
        for e in gate.of_kind("status")
        if isinstance(e.payload, dict) and (e.payload.get("heartbeat") or {}).get("stalled")
    ]
    out.check(bool(stalled_beats) or not raised, "no heartbeat said stalled: true")
    _run_to_end(rig, out, st, gate)
    out.notes.append(
        f"poisoned part {', '.join(part_id(i) for i in sorted(rig.poisoned))} took seconds to "
        "infer; alarm raised and cleared on status; its verdict is its own (a defect): rejected"
    )


# name -> (function, Rig options, one line for the table)
SCENARIOS: dict[str, tuple[Callable[[Rig, Outcome], None], dict[str, Any], str]] = {
    "broker_down_at_start": (
        broker_down_at_start,
        {"n_frames": 30},
        "broker down at start, up 10 s later",
    ),
    "broker_killed": (broker_killed, {}, "broker SIGKILLed mid-run, restarted 3 s later"),
    "broker_killed_v311": (broker_killed_v311, {}, "the same over MQTT 3.1.1"),
    "station_killed": (station_killed, {}, "station SIGKILLed mid-run, restarted"),
    "station_killed_with_backlog": (
        station_killed_with_backlog,
        {},
        "broker down, rejects spooled, station SIGKILLed, both restarted",
    ),
    "spool_overflow": (spool_overflow, {"every": 2}, "broker away longer than the spool holds"),
    "wrong_password": (wrong_password, {}, "wrong password at start-up; password rotated mid-run"),
    "tls_untrusted": (tls_untrusted, {}, "untrusted broker certificate at start-up and mid-run"),
    "acl_refused": (acl_refused, {"every": 2}, "ACL refuses the reject topic, then allows it"),
    "nan_output": (
        nan_output,
        {"n_frames": 32, "poison": "nan", "poisoned": (3, 11, 19, 27)},
        "the model outputs NaN for 4 parts",
    ),
    "failing_inference": (
        failing_inference,
        {"n_frames": 32, "poison": "fail", "poisoned": (3, 11, 19, 27)},
        "inference raises for 4 parts",
    ),
    "spool_readonly": (
        spool_readonly,
        {"n_frames": 48},
        "spool file system turns read-only mid-run (ext4 errors=remount-ro)",
    ),
    "spool_disk_full": (
        spool_disk_full,
        {"n_frames": 48},
        "spool file system full mid-run (2 MiB tmpfs), then space freed",
    ),
    "spool_deleted": (spool_deleted, {}, "spool file deleted while rejects wait in it"),
    "spool_corrupt_at_start": (
        spool_corrupt_at_start,
        {"n_frames": 40},
        "spool file damaged while the station was down",
    ),
    "gate_handler_failure": (
        gate_handler_failure,
        {"n_frames": 48},
        "gate handler raises for 3 s, then recovers",
    ),
    "no_subscriber": (no_subscriber, {"n_frames": 40}, "no subscriber for the rejects (PUBACK 16)"),
    "broker_not_acknowledging": (
        broker_not_acknowledging,
        {"n_frames": 120},
        "broker frozen (SIGSTOP) ~8 s, then SIGCONT",
    ),
    "stalled_pipeline": (
        stalled_pipeline,
        {"n_frames": 32, "poison": "slow", "poisoned": (15,)},
        "one inference takes seconds (stalled pipeline)",
    ),
}


def run_scenario(
    name: str, workdir: str | Path, say: Callable[[str], None] = lambda m: None
) -> Outcome:
    """Run one scenario in workdir/<name>. Raises Skip when a needed tool is missing."""
    fn, opts, _ = SCENARIOS[name]
    out = Outcome(name)
    t0 = time.monotonic()
    rig = Rig(workdir, name, say=say, **opts)
    try:
        fn(rig, out)
    finally:
        rig.close()
        out.wall_s = round(time.monotonic() - t0, 1)
    return out


def markdown_table(outcomes: list[Outcome]) -> str:
    head = (
        "| scenario | sent | received | duplicates | lost | not stored (counted) | backlog "
        "| drain (s) | alarmed | notes |\n|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
    )
    rows = []
    for o in outcomes:
        drain = "-" if o.drain_s is None else f"{o.drain_s:.2f}"
        notes = "; ".join(o.notes + [f"**FAILED: {p}**" for p in o.problems])
        rows.append(
            f"| {o.scenario} | {o.sent} | {o.received} | {o.duplicates} | {o.lost} | {o.not_stored} "
            f"| {o.backlog} | {drain} | {o.alarmed or 'NO'} | {notes.replace('|', '/')} |"
        )
    return "\n".join([head, *rows])


# The OPC UA output's scenarios (client mode, a real asyncua server as the PLC).
from tests.faults_opcua import SCENARIOS as _OPCUA_SCENARIOS  # noqa: E402

SCENARIOS.update(_OPCUA_SCENARIOS)
