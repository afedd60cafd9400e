"""The operator view (edge/ui) and the drift alarm, end to end: a real mosquitto, the real
station process replaying frames with the view on, and headless Chromium driven over the
DevTools protocol (tests/cdp.py). Plus what needs no browser: auth, hostile paths, read-only."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from edge.__main__ import main
from edge.listen import Listener
from tests.broker import free_port
from tests.fakebundle import GREY, defect_frame, make_bundle

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SHAPE = (180, 240)
# Good parts: a patch of grey + d, d uniform in 2..21, so score = d/128 (tests/fakebundle.py) and
# exactly 10 % of good parts score above the calibration's p90 (19/128): the drift watch's p0.
GOOD_D = (2, 21)
SHIFT_D = (16, 35)  # shifted: 80 % above p90, still below the image threshold (0.5)
STATS = {"good": {"p50": 11 / 128, "p90": 19 / 128, "p99": 21 / 128, "n": 1000}}


def part(rng: random.Random, d_range: tuple[int, int]) -> np.ndarray:
    img = np.full((*SHAPE, 3), GREY, np.uint8)
    x, y = rng.randrange(10, SHAPE[1] - 60), rng.randrange(10, SHAPE[0] - 50)
    img[y : y + 40, x : x + 50] = GREY + rng.randint(*d_range)
    return img


def write_line(folder: Path, plan: list[tuple[str, int]], seed: int = 0) -> Path:
    """PNG frames in order; plan: (kind, count) with kind good | shift | defect."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for kind, n in plan:
        for _ in range(n):
            if kind == "defect":
                x, y = rng.randrange(10, SHAPE[1] - 60), rng.randrange(10, SHAPE[0] - 50)
                img = defect_frame(SHAPE, (x, y, 40, 30))
            else:
                img = part(rng, SHIFT_D if kind == "shift" else GOOD_D)
            cv2.imwrite(str(folder / f"part_{i:04d}.png"), img)
            i += 1
    return folder


def station_yaml(tmp_path: Path, frames: Path, broker_port: int, **extra) -> Path:
    bundle = make_bundle(tmp_path / "bundle", (64, 64), thresholds={"stats": STATS})
    cfg = {
        "station": {"line": "lineV", "name": "cam1"},
        "bundle": str(bundle),
        "source": {"uri": str(frames), "rate": 10.0},
        "mqtt": {"port": broker_port, "spool": "spool.db", "connect_timeout_s": 5.0},
        "evidence": {"dir": "evidence"},
        "heartbeat_s": 1.0,
    }
    cfg.update(extra)
    path = tmp_path / "station.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def spawn(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge", *argv],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()


def wait_http(url: str, timeout: float = 30.0, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url}: no answer within {timeout} s")


def get(url: str, headers: dict | None = None, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# A MutationObserver notes when each reject tile enters the gallery (browser clock = this clock).
SEEN_JS = """
window.__seen = {};
new MutationObserver(() => {
  for (const b of document.querySelectorAll('#gallery .reject'))
    if (!(b.dataset.eventId in window.__seen)) window.__seen[b.dataset.eventId] = Date.now();
}).observe(document.querySelector('#gallery'), {childList: true});
true
"""


@pytest.mark.broker
@pytest.mark.slow
def test_view_in_chromium_live_gallery_and_drift(tmp_path, mosquitto):
    from tests.cdp import Browser

    plan = [("good", 19), ("defect", 1)] * 5 + [("shift", 60)] + [("good", 19), ("defect", 1)] * 12
    frames = write_line(tmp_path / "frames", plan)
    cfg = station_yaml(tmp_path, frames, mosquitto.port)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    base = "lineinspect/lineV/cam1"
    with Listener(mosquitto.host, mosquitto.port, base) as listener:
        proc = spawn("run", str(cfg), "--ui-port", str(port))
        try:
            wait_http(url)
            with Browser(tmp_path) as b:
                b.goto(url)
                b.eval(SEEN_JS)
                t_watch = time.time()
                assert b.wait_for("document.querySelector('#live-0')?.naturalWidth > 0", 20)
                live = b.screenshot(clip_selector="#live-0")
                time.sleep(1.0)
                assert b.wait_for("document.querySelector('#live-0').complete", 5)
                assert b.screenshot(clip_selector="#live-0") != live, "live image did not change"

                # a reject in the gallery within 1 s of its MQTT event
                def fresh():
                    return [e for e in listener.of_kind("reject") if e.received > t_watch + 0.1]

                assert listener.wait_for(fresh, 30), "no reject over MQTT"
                ev, received = fresh()[0].payload, fresh()[0].received
                sel = f"window.__seen[{json.dumps(ev['event_id'])}]"
                seen_ms = b.wait_for(sel, 10)
                assert seen_ms, "reject never reached the gallery"
                delay = seen_ms / 1000.0 - received
                print(f"reject in gallery {delay * 1000:.0f} ms after its MQTT event")
                assert delay < 1.0, f"gallery {delay:.2f} s behind MQTT"
                # every reject so far is in the gallery, once (state + events, none lost between)
                ids = json.dumps([e.payload["event_id"] for e in listener.of_kind("reject")])
                shown = (
                    "[...document.querySelectorAll('#gallery .reject')].map(t => t.dataset.eventId)"
                )
                assert b.wait_for(f"{ids}.every(i => {shown}.includes(i))", 5), (ids, b.eval(shown))
                assert len(set(b.eval(shown))) == len(b.eval(shown))
                # the gallery tile opens the evidence and its JSON
                b.eval(f"document.querySelector('[data-event-id=\"{ev['event_id']}\"]').click()")
                text = b.wait_for(
                    "(() => { const t = document.querySelector('#detail-json').textContent;"
                    " return t.length > 5 && t !== '…' ? t : null; })()",
                    10,
                )
                assert json.loads(text)["event_id"] == ev["event_id"]
                links = b.eval("[...document.querySelectorAll('#detail-links a')].map(a => a.href)")
                assert len(links) == 2 and all(get(u)[0] == 200 for u in links)
                assert b.wait_for("document.querySelector('#detail-img').naturalWidth > 0", 10)
                b.screenshot(DOCS / "operator_view_reject.png")
                b.eval("document.querySelector('#detail').close()")
                # drift raised during the shift, with its evidence; cleared after it
                drift = b.wait_for(
                    "document.querySelector('#alarms .alarm.drift')?.textContent", 60
                )
                assert drift and "CUSUM" in drift and "p90" in drift, drift
                assert any(
                    "drift" in (e.payload.get("alarm") or "")
                    for e in listener.of_kind("status")
                    if isinstance(e.payload, dict)
                ), "no retained drift alarm on status"
                b.screenshot(DOCS / "operator_view.png")
                b.viewport(390, 844, mobile=True, scale=2)
                time.sleep(1.5)
                b.screenshot(DOCS / "operator_view_phone.png")
                b.viewport(1280, 1000)
                assert b.wait_for("!document.querySelector('#alarms .alarm.drift')", 60), (
                    "drift alarm did not clear after the shift"
                )
                assert not b.errors, b.errors
        finally:
            err = stop(proc)
    assert "ALARM drift" in err and "alarm drift cleared" in err, err[-3000:]


def test_exposed_view_needs_a_token(tmp_path, capsys):
    frames = write_line(tmp_path / "frames", [("good", 3)])
    cfg = station_yaml(tmp_path, frames, free_port(), ui={"port": free_port(), "host": "0.0.0.0"})
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ui.host 0.0.0.0" in err and "ui_token" in err


@pytest.mark.broker
def test_token_401_read_only_and_hostile_paths(tmp_path, mosquitto):
    frames = write_line(tmp_path / "frames", [("good", 5), ("defect", 1), ("good", 300)])
    creds = tmp_path / "creds.yaml"
    creds.write_text(yaml.safe_dump({"ui_token": "s3cret-token"}))
    creds.chmod(0o600)
    port = free_port()
    cfg = station_yaml(
        tmp_path,
        frames,
        mosquitto.port,
        credentials_file=str(creds),
        ui={"port": port, "host": "0.0.0.0"},
    )
    (tmp_path / "evidence").mkdir()
    (tmp_path / "secret.txt").write_text("not for viewers")
    os.symlink(tmp_path / "secret.txt", tmp_path / "evidence" / "20250101T000000.000000Z_1_x.json")
    url = f"http://127.0.0.1:{port}"
    basic = {"Authorization": "Basic " + base64.b64encode(b"op:s3cret-token").decode()}
    proc = spawn("run", str(cfg))
    try:
        wait_http(url + "/")
        status, body = get(url + "/")
        assert status == 401
        assert get(url + "/api/state", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(url + "/", {"Authorization": "Basic !!!"})[0] == 401
        status, body = get(url + "/", basic)
        assert status == 200 and b"LineInspect" in body
        assert get(url + "/api/state", {"Authorization": "Bearer s3cret-token"})[0] == 200
        # read-only: no method but GET
        for method in ("POST", "PUT", "DELETE"):
            assert get(url + "/api/state", basic, method)[0] == 405
        # hostile evidence and static paths
        for path in (
            "/evidence/0/..%2f..%2fstation.yaml",
            "/evidence/0/../../station.yaml",
            "/evidence/0/20250101T000000.000000Z_1_x.json",  # a planted symlink
            "/evidence/9/x.jpg",
            "/static/../config.py",
            "/static/%2e%2e/http.py",
        ):
            status, body = get(url + path, basic)
            assert status == 404 and b"not for viewers" not in body, path
    finally:
        stop(proc)


@pytest.mark.broker
def test_bench_with_viewers_reports_what_they_saw(tmp_path, mosquitto):
    frames = write_line(tmp_path / "frames", [("good", 9), ("defect", 1)])
    bundle = make_bundle(tmp_path / "bundle", (64, 64))
    out = tmp_path / "bench.json"
    argv = ["bench", "--bundle", str(bundle), "--source", str(frames), "--frames", "60"]
    argv += ["--rounds", "1", "--latency-load", "0", "--viewers", "2", "--json", str(out)]
    argv += ["--broker", f"127.0.0.1:{mosquitto.port}"]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    view = r["rounds"][0]["pipeline"]["view"]
    assert r["settings"]["viewers"] == 2 and view["viewers"] == 2
    # rejects reached the viewers (the last ones may still be on their way at the end of the
    # run); live frames were encoded (at most fps per second) and fetched
    assert 2 <= view["rejects"] <= 2 * r["rounds"][0]["pipeline"]["rejects"]
    assert view["encoded"] >= 1 and view["frames"] >= 2 and view["missed"] == 0
