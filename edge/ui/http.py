"""The operator view's HTTP server: stdlib ThreadingHTTPServer, Server-Sent Events, GET only.

    /                          the page (edge/ui/static/index.html; its JS and CSS beside it)
    /static/<file>             the page's files, read into memory at start (a fixed set)
    /api/state                 cameras, score history, gallery, status (JSON)
    /events                    Server-Sent Events: status (1/s), frame, reject
    /live/<cam>/<seq>.jpg      a live frame (?overlay=1: with the anomaly map)
    /reject/<id>.jpg           a gallery thumbnail; /reject/<id>/full.jpg; /reject/<id>.json
    /evidence/<cam>/<file>     the station's evidence JPEG/JSON (name checked, no paths)

Every connection has a socket timeout and at most `max_connections` are open (the rest are
closed at once, edge.metrics.BoundedHTTPServer). With a token, every request needs it (HTTP
Basic with the token as password, or `Authorization: Bearer`); other methods get 405.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from edge.errors import ConfigError
from edge.metrics import BoundedHTTPServer
from edge.ui.feed import public

log = logging.getLogger(__name__)

STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Evidence file names as edge.evidence.stem_for writes them: no separators, no dots but the suffix.
EVIDENCE_NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z_\d+_[A-Za-z0-9_-]+\.(jpg|json)$")
LIVE = re.compile(r"^/live/(\d{1,3})/(\d{1,12})\.jpg$")
REJECT = re.compile(r"^/reject/(\d{1,12})(\.jpg|/full\.jpg|\.json)$")
EVIDENCE = re.compile(r"^/evidence/(\d{1,3})/([^/]{1,200})$")
PING_S = 15.0  # a comment line on an idle event stream: proxies and phones keep it open
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Nothing from anywhere else, no inline script: the page's own files only.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}


def _static_files() -> dict[str, bytes]:
    root = Path(__file__).resolve().parent / "static"  # package data (pyproject)
    return {name: (root / name).read_bytes() for name in STATIC}


class ViewServer:
    """HTTP server for one OperatorView, in a daemon thread. port 0 = any free port."""

    def __init__(self, view: Any, settings: Any, token: str | None) -> None:
        self.view = view
        self.host = settings.host
        self.token = token
        self.static = _static_files()
        self.stopping = threading.Event()
        handler = _handler(self, settings.timeout_s)
        try:
            self._server = BoundedHTTPServer(
                (settings.host, settings.port), handler, settings.max_connections
            )
        except OSError as exc:
            raise ConfigError(
                f"ui.port {settings.port} on {settings.host}: cannot listen: {exc.strerror or exc}"
            ) from exc
        self._server.label = "ui http"
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ui-http", daemon=True
        )

    @property
    def refused(self) -> int:
        return self._server.refused

    def start(self) -> None:
        self._thread.start()
        auth = "token required" if self.token else "no token (this machine only)"
        log.info("operator view on http://%s:%d/ (%s)", self.host, self.port, auth)

    def close(self) -> None:
        self.stopping.set()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def authorized(self, header: str | None) -> bool:
        if not self.token:
            return True
        if not header:
            return False
        kind, _, value = header.partition(" ")
        given = ""
        if kind.lower() == "bearer":
            given = value.strip()
        elif kind.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        return hmac.compare_digest(given.encode(), self.token.encode())


def _handler(server: ViewServer, timeout_s: float) -> type:
    view = server.view

    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_s  # socket timeout: a stalled or slow viewer is dropped
        server_version = "LineInspect"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if not server.authorized(self.headers.get("Authorization")):
                self._send(401, b"token required\n", "text/plain", auth=True)
                return
            url = urlsplit(self.path)
            path = url.path
            try:
                if path in ("/", "/index.html"):
                    self._send(200, server.static["index.html"], STATIC["index.html"])
                elif path.startswith("/static/") and path[8:] in STATIC:
                    self._send(200, server.static[path[8:]], STATIC[path[8:]], cache=True)
                elif path == "/api/state":
                    self._json(view.state())
                elif path == "/events":
                    self._events()
                elif LIVE.match(path):
                    cam, seq = (int(g) for g in LIVE.match(path).groups())
                    overlay = parse_qs(url.query).get("overlay", ["0"])[0] == "1"
                    self._live(cam, seq, overlay)
                elif REJECT.match(path):
                    rid, what = REJECT.match(path).groups()
                    self._reject(int(rid), what)
                elif EVIDENCE.match(path):
                    cam, name = EVIDENCE.match(path).groups()
                    self._evidence(int(cam), name)
                else:
                    self._send(404, b"not found\n", "text/plain")
            except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
                log.debug("ui http: %s: viewer went away: %s", path, exc)

        def _refuse(self) -> None:
            self._send(405, b"read-only\n", "text/plain", allow=True)

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815 - http.server's names

        def _send(
            self,
            code: int,
            body: bytes,
            ctype: str,
            *,
            cache: bool = False,
            auth: bool = False,
            allow: bool = False,
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=300" if cache else "no-store")
            for k, v in HEADERS.items():
                self.send_header(k, v)
            if auth:
                self.send_header("WWW-Authenticate", 'Basic realm="LineInspect", charset="UTF-8"')
            if allow:
                self.send_header("Allow", "GET")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj: Any) -> None:
            self._send(200, json.dumps(obj, default=str).encode(), "application/json")

        def _feed(self, cam: int) -> Any:
            return view.feeds[cam] if 0 <= cam < len(view.feeds) else None

        def _live(self, cam: int, seq: int, overlay: bool) -> None:
            feed = self._feed(cam)
            for s, plain, over in list(feed.live) if feed else []:
                if s == seq:
                    self._send(200, over if overlay else plain, "image/jpeg")
                    return
            self._send(404, b"frame gone\n", "text/plain")  # a newer one is on its way

        def _reject(self, rid: int, what: str) -> None:
            for item in (r for f in view.feeds for r in list(f.rejects)):
                if item["id"] == rid:
                    if what == ".json":
                        self._json({**public(item), "event": item["_event"]})
                    else:
                        body = item["_thumb"] if what == ".jpg" else item["_full"]
                        self._send(200, body, "image/jpeg")
                    return
            self._send(404, b"no such reject (the gallery keeps the last ones)\n", "text/plain")

        def _evidence(self, cam: int, name: str) -> None:
            feed = self._feed(cam)
            qd = (
                getattr(getattr(feed.station, "evidence", None), "evidence", None) if feed else None
            )
            if qd is None or not EVIDENCE_NAME.fullmatch(name):
                self._send(404, b"no such evidence file\n", "text/plain")
                return
            root = Path(qd.path).resolve()
            path = (root / name).resolve()
            # The name cannot hold a separator; a symlink planted in the folder still cannot
            # lead out of it.
            if path.parent != root or not path.is_file():
                self._send(404, b"no such evidence file (deleted by the quota?)\n", "text/plain")
                return
            ctype = "image/jpeg" if name.endswith(".jpg") else "application/json"
            self._send(200, path.read_bytes(), ctype)

        def _events(self) -> None:
            viewer = view.hub.subscribe()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                for k, v in HEADERS.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(b"retry: 2000\n\n")
                self.wfile.flush()
                while not server.stopping.is_set():
                    msgs = viewer.take(PING_S)
                    self.wfile.write(b"".join(msgs) if msgs else b": ping\n\n")
                    self.wfile.flush()
            finally:
                view.hub.unsubscribe(viewer)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("ui http: " + fmt, *args)

    return Handler
