"""Where a reject's capture -> PUBACK time goes: the latency phase of `edge bench`, with
timestamps hooked into the publisher and paho (publish call, socket write, PUBACK).

    python scripts/probe_reject_path.py --bundle B --source file://frames/ --frames 120 \\
        --reject-all --rate 24 [--nagle]

--nagle turns TCP_NODELAY off on both ends (the station's socket and the private broker), as
they were before, to show the delayed-ACK stall (docs/edge.md). Prints percentiles (ms) per
event kind: capture -> publish call, publish call -> written to the socket, written -> PUBACK.
A diagnostic: it patches internals, and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho

from edge import bench
from edge.broker import Mosquitto
from edge.listen import Listener
from edge.mqtt import connection
from edge.mqtt import publisher as P

MARKS: dict[int, dict] = {}  # message id -> {"kind", "cap", "pub", "sent", "ack"}
LOCK = threading.Lock()


def hook() -> None:
    publish_locked = P.Publisher._publish_locked
    packet_write = paho.Client._packet_write
    on_publish = P.Publisher._on_publish

    def _publish_locked(
        self, topic, payload, qos, retain=False, event_id=None, window=None, t_capture=None
    ):
        t = time.monotonic()
        info = publish_locked(self, topic, payload, qos, retain, event_id, window, t_capture)
        if info is not None and t_capture is not None:
            with LOCK:
                MARKS[info.mid] = {"kind": window, "cap": t_capture, "pub": t}
        return info

    def _packet_write(self):
        queued = [(p["mid"], p["command"]) for p in self._out_packet]
        rc = packet_write(self)
        t = time.monotonic()
        with LOCK:
            for mid, command in queued:
                m = MARKS.get(mid)
                if m is not None and "sent" not in m and command & 0xF0 == paho.PUBLISH:
                    m["sent"] = t
        return rc

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        t = time.monotonic()
        with LOCK:
            m = MARKS.get(mid)
            if m is not None and "ack" not in m:
                m["ack"] = t
        return on_publish(self, client, userdata, mid, reason_code, properties)

    P.Publisher._publish_locked = _publish_locked
    paho.Client._packet_write = _packet_write
    P.Publisher._on_publish = _on_publish


def pct(values: list[float]) -> list[float] | None:
    a = np.asarray(values) * 1000.0
    return [round(float(np.percentile(a, q)), 1) for q in (50, 90, 99)] if a.size else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_arguments(ap)
    ap.add_argument("--rate", type=float, default=24.0, help="source rate, img/s")
    ap.add_argument("--nagle", action="store_true", help="TCP_NODELAY off on both ends")
    a = ap.parse_args()
    import cv2

    cv2.setNumThreads(a.opencv_threads)
    hook()
    extra = ""
    if a.nagle:
        connection._no_delay = lambda client, userdata, sock: None
        extra = "set_tcp_nodelay false"
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp), extra_conf=extra).start()
        try:
            cfg = bench._station_cfg(
                a, broker.host, broker.port, Path(tmp), results=True, rate=a.rate
            )
            with Listener(broker.host, broker.port, cfg.topic_base) as listener:
                out = bench.bench_pipeline(cfg, a.frames, listener, reject_all=a.reject_all)
        finally:
            broker.kill()
    report = {}
    for kind in ("result_acked", "reject_acked"):
        ms = [m for m in MARKS.values() if m["kind"] == kind and {"sent", "ack"} <= set(m)]
        report[kind] = {
            "n": len(ms),
            "capture_to_publish": pct([m["pub"] - m["cap"] for m in ms]),
            "publish_to_written": pct([m["sent"] - m["pub"] for m in ms]),
            "written_to_puback": pct([m["ack"] - m["sent"] for m in ms]),
            "capture_to_puback": pct([m["ack"] - m["cap"] for m in ms]),
        }
    report["delivered_ms"] = out["delivered_ms"]
    report["delivered_reject_ms"] = out["delivered_reject_ms"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
