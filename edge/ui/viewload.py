"""Viewers as load, for `edge bench --viewers N`: the operator view on an opened pipeline and N
clients that do what the page does (one event stream each, every live frame fetched with the
anomaly-map overlay, every reject thumbnail), in another process so their work is not
counted as the station's.

    load = ViewLoad(pipeline.stations, 3)    # view on a free loopback port, 3 viewers connected
    pipeline.run()
    stats = load.close()                      # {"viewers": 3, "frames": ..., "rejects": ...}

    python -m edge.ui.viewload URL N          # the clients (stdout: their counts, on SIGTERM)
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from edge.config import UiConfig


class ViewLoad:
    def __init__(self, stations: list[Any], viewers: int, timeout_s: float = 30.0) -> None:
        from edge.ui.view import OperatorView

        self.view = OperatorView(UiConfig(port=0))
        self.view.attach(stations)
        self.view.start()
        url = f"http://127.0.0.1:{self.view.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge.ui.viewload", url, str(viewers)],
            stdout=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + timeout_s
        while self.view.hub.viewers < viewers:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"{viewers} viewer(s) did not connect to {url}")
            time.sleep(0.05)

    def close(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.view.close()
        stats = json.loads(out) if out.strip() else {}
        stats.update(encoded=self.view.encoder.encoded, handoff_dropped=self.view.encoder.dropped)
        return stats


# ---------------------------------------------------------------------------- the clients
class _Client(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.frames = self.rejects = self.missed = 0

    def _get(self, path: str) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                self.missed += 1  # a frame already replaced by newer ones: the page skips it too
        finally:
            conn.close()

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        conn.request("GET", "/events")
        stream = conn.getresponse()
        event = ""
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event in ("frame", "reject"):
                d = json.loads(line[6:])
                if event == "frame":
                    self._get(f"/live/{d['cam']}/{d['seq']}.jpg?overlay=1")
                    self.frames += 1
                else:
                    self._get(f"/reject/{d['id']}.jpg")
                    self.rejects += 1


def main(argv: list[str]) -> int:
    url, n = argv[0], int(argv[1])
    clients = [_Client(url) for _ in range(n)]
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    for c in clients:
        c.start()
    while not done.wait(0.5):
        pass
    counts = {
        "viewers": n,
        "frames": sum(c.frames for c in clients),
        "rejects": sum(c.rejects for c in clients),
        "missed": sum(c.missed for c in clients),
    }
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
