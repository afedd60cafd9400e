"""Station metrics: rolling windows (bounded memory), and the Prometheus text exposition.

The same snapshot dict (`Station.snapshot()`) is published on MQTT (`<base>/metrics`) and,
with `python -m edge run --metrics-port N`, served at http://host:N/metrics in the Prometheus
text format (version 0.0.4), one label set per station.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PERCENTILES = (50, 95, 99)
_QUANTILE = {"p50": "0.5", "p95": "0.95", "p99": "0.99", "max": "1"}  # Prometheus labels


class LatencyWindows:
    """Rolling windows (bounded deques) of stage latencies in seconds -> percentiles in ms.

    Appended by one thread, read by any: `list(deque)` copies under the GIL in one C call.
    """

    def __init__(self, stages: Iterable[str], maxlen: int = 2048):
        self._w = {s: deque(maxlen=maxlen) for s in stages}

    def add(self, stage: str, seconds: float) -> None:
        self._w[stage].append(max(0.0, seconds))

    def count(self, stage: str) -> int:
        """Values in the stage's window now."""
        return len(self._w[stage])

    def percentiles(self) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for stage, win in self._w.items():
            values = list(win)
            if values:
                p = np.percentile(np.asarray(values), PERCENTILES) * 1000.0
                out[stage] = {f"p{q}": round(float(v), 3) for q, v in zip(PERCENTILES, p)}
            else:
                out[stage] = {f"p{q}": None for q in PERCENTILES}
        return out


def quantiles(values: Iterable[float]) -> dict[str, float | None]:
    """Scores -> {p50, p95, p99, max, n} (None while empty)."""
    arr = np.asarray(list(values), dtype=np.float64)
    keys = ("p50", "p95", "p99", "max")
    if not arr.size:
        return {**dict.fromkeys(keys), "n": 0}
    q = np.quantile(arr, [0.5, 0.95, 0.99, 1.0])
    return {**{k: round(float(v), 6) for k, v in zip(keys, q)}, "n": int(arr.size)}


# ------------------------------------------------------------------------------- Prometheus
def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(v: Any) -> str | None:
    if isinstance(v, bool):
        return "1" if v else "0"
    if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v) if isinstance(v, float) else str(v)


class _Family:
    def __init__(self, name: str, kind: str, help_: str):
        self.name, self.kind, self.help = name, kind, help_
        self.samples: list[str] = []

    def add(self, value: Any, **labels: Any) -> None:
        text = _num(value)
        if text is not None:
            self.samples.append(f"{self.name}{_labels(labels)} {text}")


# name, type, help, how to read it from a snapshot
_SCALARS: list[tuple[str, str, str, Callable[[dict], Any]]] = [
    ("lineinspect_frames_total", "counter", "Parts decided.", lambda s: s["frames"]),
    ("lineinspect_captured_total", "counter", "Frames captured.", lambda s: s["captured"]),
    ("lineinspect_rejects_total", "counter", "Parts rejected.", lambda s: s["rejects"]),
    ("lineinspect_drops_total", "counter", "Frames dropped under overload.", lambda s: s["drops"]),
    ("lineinspect_fps", "gauge", "Parts per second over the last interval.", lambda s: s["fps"]),
    (
        "lineinspect_reject_rate",
        "gauge",
        "Rejected fraction of the recent window of parts.",
        lambda s: s["reject_rate"],
    ),
    ("lineinspect_uptime_seconds", "gauge", "Seconds since start.", lambda s: s["uptime_s"]),
    (
        "lineinspect_source_connected",
        "gauge",
        "1 while the camera delivers frames (file sources: 1).",
        lambda s: s["source"].get("connected", True),
    ),
    (
        "lineinspect_source_reconnects_total",
        "counter",
        "Successful camera reconnects.",
        lambda s: s["source"].get("reconnects", 0),
    ),
    (
        "lineinspect_source_reconnect_attempts_total",
        "counter",
        "Camera (re)connection attempts.",
        lambda s: s["source"].get("reconnect_attempts", 0),
    ),
    (
        "lineinspect_source_corrupt_total",
        "counter",
        "Corrupt or empty frames skipped.",
        lambda s: s["source"].get("corrupt", 0),
    ),
    (
        "lineinspect_thresholds_reloads_total",
        "counter",
        "Threshold files applied by hot reload.",
        lambda s: s["thresholds"]["reloads"],
    ),
    (
        "lineinspect_thresholds_refused_total",
        "counter",
        "Threshold files refused by hot reload.",
        lambda s: s["thresholds"]["refused"],
    ),
    (
        "lineinspect_mqtt_connected",
        "gauge",
        "1 while connected to the broker.",
        lambda s: s.get("mqtt", {}).get("connected"),
    ),
    (
        "lineinspect_mqtt_spooled",
        "gauge",
        "Reject events waiting for the broker's acknowledgement.",
        lambda s: s.get("mqtt", {}).get("spooled"),
    ),
]


def render_prometheus(snapshots: list[dict[str, Any]]) -> str:
    """Station snapshots -> Prometheus text exposition format 0.0.4."""
    fams: dict[str, _Family] = {}

    def fam(name: str, kind: str, help_: str) -> _Family:
        if name not in fams:
            fams[name] = _Family(name, kind, help_)
        return fams[name]

    for s in snapshots:
        ids = {"line": s["line"], "station": s["station"]}
        for name, kind, help_, get in _SCALARS:
            try:
                value = get(s)
            except (KeyError, TypeError):
                continue
            fam(name, kind, help_).add(value, **ids)
        f = fam("lineinspect_errors_total", "counter", "Errors by stage (counted, not fatal).")
        for stage, n in s["errors"].items():
            f.add(n, **ids, stage=stage)
        f = fam(
            "lineinspect_latency_ms",
            "gauge",
            "Per-stage latency percentiles over the recent window, milliseconds.",
        )
        for stage, pct in s["latency_ms"].items():
            for key, v in pct.items():
                f.add(v, **ids, stage=stage, quantile=_QUANTILE[key])
        f = fam(
            "lineinspect_good_score",
            "gauge",
            "Recent image-score quantiles of accepted parts (drift watch).",
        )
        for key, v in s["score_quantiles"].items():
            if key in _QUANTILE:
                f.add(v, **ids, quantile=_QUANTILE[key])
        f = fam("lineinspect_threshold", "gauge", "Thresholds in force.")
        for key in ("image_threshold", "pixel_threshold", "min_region_area"):
            f.add(s["thresholds"].get(key), **ids, kind=key)
        outputs = (s.get("mqtt") or {}).get("outputs") or {}  # edge.outputs.Outputs.stats()
        f = fam("lineinspect_output_up", "gauge", "1 while an output reaches its peer.")
        for name, h in outputs.items():
            f.add(h.get("state") == "up", **ids, output=name)
        f = fam("lineinspect_output_lost_total", "counter", "Verdicts an output did not deliver.")
        for name, h in outputs.items():
            if "lost" in h:
                f.add(h["lost"], **ids, output=name)
        ev = s.get("evidence") or {}
        f = fam("lineinspect_evidence_total", "counter", "Evidence/recalibration files by outcome.")
        for key in ("evidence_written", "recalibration_written", "dropped", "errors"):
            if key in ev:
                f.add(ev[key], **ids, outcome=key)
    lines: list[str] = []
    for f in fams.values():
        if f.samples:
            lines += [f"# HELP {f.name} {f.help}", f"# TYPE {f.name} {f.kind}", *f.samples]
    return "\n".join(lines) + "\n"


class BoundedHTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` at a time; the rest are closed at
    once (counted). With the handler's socket timeout, idle or slow clients cannot pile up
    threads or file descriptors next to the pipeline."""

    daemon_threads = True
    label = "metrics http"  # names the server in its log lines
    request_queue_size = 1024  # a burst of connections waits in the kernel, not in SYN retries

    def __init__(self, addr: tuple[str, int], handler: type, max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning(
                    "%s: connection limit reached; %d connection(s) refused so far",
                    self.label,
                    self.refused,
                )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsServer:
    """HTTP server for /metrics in a daemon thread. port 0 = any free port (see .port).

    Binds 127.0.0.1 unless told otherwise (scrape through an SSH tunnel or a local agent);
    a connection idle for `timeout_s` is closed and at most `max_connections` are served at a
    time, so a flood of idle connections costs neither threads nor the pipeline's cores."""

    def __init__(
        self,
        provider: Callable[[], list[dict[str, Any]]],
        port: int,
        host: str = "127.0.0.1",
        *,
        timeout_s: float = 5.0,
        max_connections: int = 8,
    ):
        self.provider = provider
        self.host = host

        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s  # socket timeout: an idle or slow client is dropped

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics here")
                    return
                try:
                    body = render_prometheus(outer.provider()).encode()
                except Exception as exc:  # a scrape must never take the station down
                    log.exception("metrics rendering failed")
                    self.send_error(500, f"metrics rendering failed: {exc}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("metrics http: " + fmt, *args)

        try:
            self._server = BoundedHTTPServer((host, port), Handler, max_connections)
        except OSError as exc:
            from edge.errors import ConfigError

            raise ConfigError(
                f"--metrics-port {port}: cannot listen: {exc.strerror or exc}"
            ) from exc
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("Prometheus metrics on http://%s:%d/metrics", self.host or "0.0.0.0", self.port)
        return self

    @property
    def refused(self) -> int:
        """Connections closed at once because max_connections were open."""
        return self._server.refused

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()  # waits for serve_forever: only when it runs
        self._server.server_close()
