"""Drift watch figures for docs/operator_view.md: detection delay and false alarms.

1. The real station (edge.runtime.plan, the test bundle of tests/fakebundle.py: score = patch
   deviation / 128, so each frame's score is chosen exactly) replays a long stable line, then
   shifts of several sizes, each followed by a return to normal; an observer notes the part at
   which the `drift` alarm is raised and cleared.
2. The same DriftWatch alone on many simulated runs: the delay distribution per shift size and
   false alarms over a long in-control stream (the station adds nothing to the arithmetic).

    python scripts/drift_figures.py --out runs/drift [--stable 5000] [--sim-parts 2000000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge import config  # noqa: E402
from edge.broker import Mosquitto  # noqa: E402
from edge.drift import DriftWatch  # noqa: E402
from edge.listen import Listener  # noqa: E402
from edge.runtime import plan  # noqa: E402
from tests.fakebundle import GREY, make_bundle  # noqa: E402

LINE = 19 / 128  # the calibration's good p90 for these parts: P(score > LINE) = 0.1 in control
STATS = {"good": {"p50": 11 / 128, "p90": LINE, "p99": 21 / 128, "n": 1000}}
SHIFTS = (0.2, 0.3, 0.5, 0.8, 1.0)  # exceedance probability during a shift (in control: 0.1)


def frame(rng: random.Random, p_exceed: float) -> np.ndarray:
    img = np.full((96, 128, 3), GREY, np.uint8)
    d = rng.randint(20, 35) if rng.random() < p_exceed else rng.randint(2, 19)
    img[20:60, 30:80] = GREY + d
    return img


def station_replay(work: Path, stable: int, shift_len: int, after: int) -> dict:
    rng = random.Random(7)
    frames = work / "frames"
    frames.mkdir()
    segments = [("stable", 0.1, stable)]
    for p in SHIFTS:
        segments += [(f"shift {p}", p, shift_len), ("normal", 0.1, after)]
    starts, i = [], 0
    for name, p, n in segments:
        starts.append((name, i, n))
        for _ in range(n):
            cv2.imwrite(str(frames / f"f_{i:06d}.png"), frame(rng, p))
            i += 1
    bundle = make_bundle(work / "bundle", (64, 64), thresholds={"stats": STATS})
    events: list[tuple[str, int]] = []
    with Mosquitto(work) as broker:
        data = {
            "station": {"line": "drift", "name": "s1"},
            "bundle": str(bundle),
            "source": {"uri": str(frames)},
            "mqtt": {"port": broker.port, "spool": str(work / "spool.db")},
            "metrics": {"interval_s": 60.0},
        }
        cfg = config.from_mapping(data, base=work, source="<drift figures>")
        with Listener(broker.host, broker.port, cfg.topic_base, keep_events=False):
            pipe = plan.open_pipeline(plan.build([cfg]))
            st = pipe.station
            state = {"raised": False}

            def watch(fr, amap, decision, event):
                if st.drift.raised != state["raised"]:
                    state["raised"] = st.drift.raised
                    events.append(("raised" if st.drift.raised else "cleared", fr.seq))

            st.observers.append(watch)
            t0 = time.monotonic()
            summary = pipe.run()
            wall = time.monotonic() - t0
    out = {"frames": summary["frames"], "fps": summary["fps"], "wall_s": round(wall, 1)}
    rows = []
    for name, start, n in starts:
        inside = [(k, s) for k, s in events if start <= s < start + n]
        rows.append({"segment": name, "first_part": start, "parts": n, "events": inside})
    out["segments"] = rows
    out["false_alarms_stable"] = sum(1 for k, _ in rows[0]["events"] if k == "raised")
    for r in rows[1:]:
        if r["segment"].startswith("shift"):
            raised = [s for k, s in r["events"] if k == "raised"]
            r["delay_parts"] = raised[0] - r["first_part"] + 1 if raised else None
        else:
            cleared = [s for k, s in r["events"] if k == "cleared"]
            r["clear_after_parts"] = cleared[0] - r["first_part"] + 1 if cleared else None
    return out


def simulate(parts: int, runs: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    w = DriftWatch(LINE, 0.1, 3.0, 10.0)
    chunk = 100_000
    for _ in range(parts // chunk):
        x = rng.random(chunk) < 0.1
        for e in x:
            w.observe(LINE + 1 if e else 0.0)
    false = {"parts": parts, "false_alarms": w.alarms}
    delays = {}
    for p in SHIFTS:
        d = []
        for _ in range(runs):
            w = DriftWatch(LINE, 0.1, 3.0, 10.0)
            for _ in range(2000):  # in control first: the statistic is wherever it wanders
                w.observe(LINE + 1 if rng.random() < 0.1 else 0.0)
            if w.raised:
                continue
            n = 0
            while not w.raised and n < 20000:
                n += 1
                w.observe(LINE + 1 if rng.random() < p else 0.0)
            d.append(n)
        q = np.percentile(d, [50, 90, 99])
        delays[str(p)] = {
            "mean": round(float(np.mean(d)), 1),
            **{k: float(v) for k, v in zip(("p50", "p90", "p99"), q, strict=True)},
        }
    return {"in_control": false, "delay_parts": delays, "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stable", type=int, default=5000)
    ap.add_argument("--sim-parts", type=int, default=2_000_000)
    ap.add_argument("--runs", type=int, default=500)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="drift-") as tmp:
        station = station_replay(Path(tmp), args.stable, 200, 300)
    sim = simulate(args.sim_parts, args.runs)
    result = {"station_replay": station, "simulated": sim}
    (out / "drift_figures.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
