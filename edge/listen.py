"""Listen to a station's topics: for tests, the demo and a technician at the line.

`Listener` subscribes ``<base>/#`` at QoS 1, drops duplicate reject events by event_id (the
publisher may send one twice after a reconnect, never zero times) and collects what arrives.
It acknowledges a message to the broker (paho manual ack) only once it was handled (`on_event`
returned); an event whose handler raised is neither acknowledged nor recorded, so the broker
delivers it again on the next connection of a persistent session. It watches each station's
`seq`/`bd_seq` and reports gaps (`gaps()`; `edge listen` prints them).

    python -m edge listen CONFIG [--count N] [--timeout S] [--json] [--client-id ID]

prints one line per message and exits after N reject events (0) or at the timeout (1 when fewer
than N came, 0 without --count). With --client-id it keeps a persistent broker session under that
id: rejects published while it is away are queued by the broker and printed when it comes back.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from edge.config import TlsConfig
from edge.errors import BrokerError, LineInspectError
from edge.mqtt.connection import (
    PASSWORD_ENV,
    DiagnosingClient,
    connect_async,
    describe_error,
    new_client,
)

log = logging.getLogger("lineinspect.listen")

KINDS = ("reject", "result", "status", "metrics")


@dataclass
class Event:
    kind: str  # reject | result | status | metrics | other
    topic: str
    payload: Any  # decoded JSON, or None when the payload is not JSON
    raw: bytes
    retained: bool
    received: float = field(default_factory=time.time)


class Listener:
    """Subscribes to `<topic_base>/#` and collects events; reject duplicates are dropped.

    `persistent=True` keeps a broker session under a stable `client_id` (clean_start False with a
    session expiry on MQTT 5, clean_session False on 3.1.1): a consumer that must not miss a
    reject while it is offline (the reject gate) listens this way.

    Duplicates are recognised among the last `dedupe_window` reject ids. `keep_events=False`
    keeps no history (`events`, `of_kind`, `wait_status` see nothing; `on_event` and the
    counters still work): memory stays flat in a consumer that runs for months.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        topic_base: str = "lineinspect",
        *,
        client_id: str | None = None,
        protocol: str = "5",
        qos: int = 1,
        persistent: bool = False,
        session_expiry_s: int = 3600,
        username: str | None = None,
        password: str | None = None,
        tls: TlsConfig | None = None,
        keepalive: int = 30,
        reconnect_max_s: float = 2.0,
        on_event: Callable[[Event], None] | None = None,
        dedupe_window: int = 100_000,
        keep_events: bool = True,
    ) -> None:
        if persistent and not client_id:
            raise ValueError("a persistent Listener needs a stable client_id")
        self.host, self.port = host, port
        self.topic_base = topic_base.rstrip("/")
        self.client_id = client_id or f"lineinspect-listen-{uuid.uuid4().hex[:12]}"
        self.protocol = protocol
        self.qos = qos
        self.persistent = persistent
        self.session_expiry_s = session_expiry_s
        self.username, self.password, self.tls = username, password, tls
        self.keepalive = keepalive
        self.reconnect_max_s = reconnect_max_s
        self.on_event = on_event
        if dedupe_window < 1:
            raise ValueError(f"dedupe_window must be >= 1, got {dedupe_window}")
        self.dedupe_window = dedupe_window
        self.keep_events = keep_events

        # Everything, in arrival order, reject duplicates excluded (empty when not keep_events:
        # a long-running consumer that only uses on_event must not grow without bound).
        self.events: list[Event] = []
        self.reject_count = 0  # distinct reject events received
        self.duplicates = 0
        self.bad_payloads = 0  # not JSON
        self.errors = 0  # exceptions while handling a message (logged; message not acknowledged)
        self.connects = 0
        # (station topic base, bd_seq) -> [highest seq seen, set of missing seqs below it]
        self._seqs: dict[tuple[str, int], list] = {}
        self.gap_events: list[str] = []  # one line per gap seen (and per gap filled later)
        # The most recent dedupe_window reject ids: a publisher re-sends an event within seconds
        # to minutes of the first copy (reconnect, restart), so a bounded window is enough.
        self._reject_ids: OrderedDict[str, None] = OrderedDict()
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._connack_rc: Any = None
        self._client: DiagnosingClient | None = None

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> Listener:
        """A Listener for a StationConfig's broker and topic base (a fresh, random client id)."""
        m = cfg.mqtt
        kwargs.setdefault("username", m.username)
        kwargs.setdefault(
            "password", m.password if m.password is not None else os.environ.get(PASSWORD_ENV)
        )
        kwargs.setdefault("tls", m.tls)
        kwargs.setdefault("protocol", m.protocol)
        return cls(m.host, m.port, cfg.topic_base, **kwargs)

    # -- life cycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Listener:
        """Connect and subscribe; raise BrokerError when that does not happen within timeout."""
        try:
            client = new_client(
                self.client_id,
                protocol=self.protocol,
                persistent=self.persistent,
                username=self.username,
                password=self.password,
                tls=self.tls,
                reconnect_max_s=self.reconnect_max_s,
                manual_ack=True,  # acknowledge only what was handled (see _on_message)
            )
        except (OSError, ValueError) as exc:
            raise BrokerError(
                f"cannot reach MQTT broker at {self.host}:{self.port}: TLS setup failed: {exc}"
            ) from exc
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        connect_async(
            client,
            self.host,
            self.port,
            self.keepalive,
            protocol=self.protocol,
            persistent=self.persistent,
            session_expiry_s=self.session_expiry_s,
        )
        self._client = client
        client.loop_start()
        if not self._subscribed.wait(timeout):
            rc = self._connack_rc
            self.stop()
            err = client.last_connect_error
            if rc is not None:
                reason = f"connection refused by the broker: {rc}"
            else:
                reason = describe_error(err) if err is not None else "no CONNACK from the broker"
            raise BrokerError(
                f"cannot reach MQTT broker at {self.host}:{self.port}: {reason} (waited {timeout:.1f} s)"
            )
        return self

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def redeliver(self, timeout: float = 10.0) -> Listener:
        """Reconnect the persistent session: the broker delivers again what a failed handler did
        not acknowledge (MQTT redelivers only on a new connection, never on the same one)."""
        if not self.persistent:
            raise ValueError("only a persistent session gets unacknowledged messages again")
        self.stop()
        self._subscribed.clear()
        return self.start(timeout)

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- paho callbacks --------------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack_rc = reason_code
        if reason_code.is_failure:
            log.warning("broker %s:%s refused the listener: %s", self.host, self.port, reason_code)
            return
        self.connects += 1
        client.subscribe(f"{self.topic_base}/#", qos=self.qos)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if all(not rc.is_failure for rc in reason_codes):
            self._subscribed.set()
        else:
            log.error("subscription to %s/# refused: %s", self.topic_base, reason_codes)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        try:
            self._collect(msg)
        except Exception:  # paho would otherwise stop its loop; count it and keep listening
            # Not acknowledged: with a persistent session the broker delivers it again on the
            # next connection, so a failed handler costs a delay, never the event.
            self.errors += 1
            log.exception(
                "cannot handle a message on %s; not acknowledged (redelivered on reconnect)",
                msg.topic,
            )
            return
        if msg.qos > 0:
            client.ack(msg.mid, msg.qos)

    def _track_seq(self, topic: str, payload: dict) -> None:
        seq, bd = payload.get("seq"), payload.get("bd_seq")
        if not isinstance(seq, int) or not isinstance(bd, int):
            return
        base = topic.rsplit("/", 1)[0]
        state = self._seqs.setdefault((base, bd), [0, set()])
        top, missing = state
        if seq > top + 1:
            missing.update(range(top + 1, seq))
            line = f"GAP {base} bd_seq={bd}: seq {top + 1}..{seq - 1} missing (got {seq})"
            self.gap_events.append(line)
            log.warning("%s", line)
        elif seq in missing:
            missing.discard(seq)
            self.gap_events.append(f"GAP FILLED {base} bd_seq={bd}: seq {seq} arrived late")
        state[0] = max(top, seq)

    def gaps(self) -> dict[str, list[int]]:
        """Reject seqs missing right now, per `<base> bd_seq=N` (late arrivals fill them)."""
        with self._cond:
            return {
                f"{base} bd_seq={bd}": sorted(missing)
                for (base, bd), (_, missing) in self._seqs.items()
                if missing
            }

    def _collect(self, msg: mqtt.MQTTMessage) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        if kind not in KINDS:
            kind = "other"
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = None
            self.bad_payloads += 1
        event = Event(kind, msg.topic, payload, bytes(msg.payload), bool(msg.retain))
        eid = None
        if kind == "reject" and isinstance(payload, dict):
            eid = payload.get("event_id")
            with self._cond:
                if eid is not None and eid in self._reject_ids:
                    self.duplicates += 1
                    return  # handled before: acknowledged again, not handled twice
        # The handler first: only an event it took is recorded (and then acknowledged).
        if self.on_event is not None:
            self.on_event(event)
        with self._cond:
            if kind == "reject":
                if eid is not None:
                    self._reject_ids[eid] = None
                    if len(self._reject_ids) > self.dedupe_window:
                        self._reject_ids.popitem(last=False)
                if isinstance(payload, dict):
                    self._track_seq(msg.topic, payload)
                self.reject_count += 1
            if self.keep_events:
                self.events.append(event)
            self._cond.notify_all()

    # -- queries ---------------------------------------------------------------------------------

    def of_kind(self, kind: str) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.kind == kind]

    def rejects(self) -> list[dict]:
        """Reject payloads, duplicates dropped, in arrival order."""
        return [e.payload for e in self.of_kind("reject")]

    def last_status(self) -> dict | None:
        statuses = self.of_kind("status")
        return statuses[-1].payload if statuses else None

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until predicate() (evaluated on every new message) is true, or timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def wait_rejects(self, n: int, timeout: float) -> bool:
        return self.wait_for(lambda: self.reject_count >= n, timeout)

    def wait_status(self, state: str, timeout: float) -> dict | None:
        """Wait for a status message whose state is `state`; returns its payload."""
        found: list[dict] = []

        def check() -> bool:
            for e in reversed(self.events):
                if e.kind == "status" and isinstance(e.payload, dict):
                    if e.payload.get("state") == state:
                        found.append(e.payload)
                        return True
                    return False
            return False

        return found[0] if self.wait_for(check, timeout) else None


# -- command line --------------------------------------------------------------------------------


def format_event(event: Event) -> str:
    p = event.payload if isinstance(event.payload, dict) else {}
    retained = " (retained)" if event.retained else ""
    if event.payload is None:
        return f"{event.kind.upper()} {event.topic}: {event.raw[:200]!r}{retained}"
    if event.kind == "reject":
        return (
            f"REJECT part={p.get('part_id')} frame={p.get('frame')} score={_num(p.get('score'))} "
            f"regions={len(p.get('regions') or [])} event={p.get('event_id')}"
        )
    if event.kind == "result":
        return (
            f"RESULT part={p.get('part_id')} decision={p.get('decision')} "
            f"score={_num(p.get('score'))} regions={len(p.get('regions') or [])}"
        )
    if event.kind == "status":
        alarm = f" alarm={p['alarm']!r}" if p.get("alarm") else ""
        reason = f" reason={p['reason']!r}" if p.get("reason") else ""
        return (
            f"STATUS {p.get('state')} {p.get('line')}/{p.get('station')} model={p.get('model')}"
            f"{alarm}{reason}{retained}"
        )
    if event.kind == "metrics":
        return (
            f"METRICS fps={_num(p.get('fps'))} frames={p.get('frames')} drops={p.get('drops')} "
            f"rejects={p.get('rejects')} reject_rate={_num(p.get('reject_rate'))}"
        )
    return f"{event.topic} {json.dumps(event.payload)}{retained}"


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `listen` sub-command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "listen",
        help="print the MQTT events of a station",
        description="Subscribe to <prefix>/<line>/<station>/# and print one line per message.",
    )
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="station YAML (broker address, credentials, topic prefix)")
    p.add_argument("--count", type=int, default=None, help="exit after this many reject events")
    p.add_argument("--timeout", type=float, default=None, help="exit after this many seconds")
    p.add_argument("--json", action="store_true", help="print raw JSON lines")
    p.add_argument(
        "--client-id",
        default=None,
        metavar="ID",
        help="keep a persistent broker session under this id (as a reject gate should): "
        "events published while this listener is away are delivered when it comes back",
    )


def run(args: argparse.Namespace) -> int:
    """0: done (count reached, or timeout without --count); 1: timeout before count; 2: error."""
    from edge.config import load

    try:
        cfg = load(args.config)
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()

        def handle(event: Event) -> None:
            # Printed before the broker gets its acknowledgement: a failed print (closed pipe)
            # leaves the event unacknowledged, to be delivered again.
            if args.json:
                line = {"topic": event.topic, "retained": event.retained, "payload": event.payload}
                print(json.dumps(line), flush=True)
            else:
                print(format_event(event), flush=True)
            events.put(event)

        listener = Listener.from_config(
            cfg,
            on_event=handle,
            client_id=args.client_id,
            persistent=args.client_id is not None,
            keep_events=False,
        )
        listener.start(timeout=cfg.mqtt.connect_timeout_s)
    except LineInspectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    rejects = 0
    printed_gaps = 0
    try:
        while args.count is None or rejects < args.count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                event = events.get(timeout=0.5 if left is None else min(left, 0.5))
            except queue.Empty:
                continue
            rejects += event.kind == "reject"
            while printed_gaps < len(listener.gap_events):
                print(listener.gap_events[printed_gaps], file=sys.stderr, flush=True)
                printed_gaps += 1
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
    for where, seqs in listener.gaps().items():
        print(f"GAP {where}: reject seq(s) never received: {seqs}", file=sys.stderr)
    if args.count is not None and rejects < args.count:
        print(f"timeout: {rejects} of {args.count} reject events", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge listen", description=__doc__.split("\n")[0]
    )
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
