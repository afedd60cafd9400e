"""End-to-end demo: synthetic line data -> train -> export -> calibrate -> edge run -> MQTT.

Every step runs the same command line a user would, printed before it runs. A private mosquitto
on a free loopback port carries the reject events; a separate subscriber process
(`python -m edge listen`) receives them, and the demo checks them against the synthetic labels.

Usage: .venv/bin/python scripts/demo.py [--out demo_out] [--category pcb] [--parts 60]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from edge.broker import Mosquitto  # noqa: E402  (the one broker launcher)

PY = sys.executable
ROI_MARGIN = 16  # px at 256: the belt around the part; defects lie well inside


def step(title: str, *argv: str) -> None:
    print(f"\n== {title}\n$ {shlex.join(['python', *argv])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([PY, *argv], cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"demo: step '{title}' failed with exit {proc.returncode}")
    print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)


def write_station(path: Path, bundle: Path, line: Path, spool: Path, port: int) -> None:
    path.write_text(
        f"station: {{line: demo, name: station1}}\n"
        f"bundle: {bundle}\n"
        f"backend: onnxruntime\n"
        f"mode: triggered\n"
        f"source: {{uri: 'file://{line}/'}}\n"
        f"postprocess: {{roi_mask: roi.png}}\n"
        f"mqtt: {{host: 127.0.0.1, port: {port}, spool: {spool}}}\n"
        f"metrics: {{interval_s: 2.0}}\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--category", default="brushed_metal")
    ap.add_argument("--parts", type=int, default=60, help="parts replayed on the line")
    ap.add_argument("--defect-rate", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=None, help="override the training default")
    args = ap.parse_args()
    t_start = time.perf_counter()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, run, bundle, line = out / "data", out / "run", out / "bundle", out / "line"
    cat = data / args.category

    step(
        "1/6 synthetic line data (MVTec layout)",
        "-m",
        "train",
        "synth",
        str(data),
        "--categories",
        args.category,
        "--train-good",
        "60",
        "--test-good",
        "150",
        "--test-defect",
        "5",
    )
    fit = ["-m", "train", "fit", "--model", "stpm", "--data", str(cat), "--out", str(run)]
    if args.epochs:
        fit += ["--epochs", str(args.epochs)]
    step("2/6 train the stpm baseline on good parts only", *fit)
    step(
        "3/6 export the bundle (ONNX + parity check + manifest)",
        "-m",
        "engines",
        "export",
        str(run),
        "--out",
        str(bundle),
    )
    # The station inspects the part, not the conveyor around it: an ROI mask over the model's
    # view (white = inspected) keeps the belt edge out of the region test. Calibration applies
    # the same station view (--station), so thresholds are fitted on what the line will see.
    roi = np.zeros((256, 256), np.uint8)
    roi[ROI_MARGIN:-ROI_MARGIN, ROI_MARGIN:-ROI_MARGIN] = 255
    cv2.imwrite(str(out / "roi.png"), roi)
    station = out / "station.yaml"
    write_station(station, bundle, line, out / "spool.sqlite", port=1883)
    # Held-out good parts (never seen in training) set the threshold.
    step(
        "4/6 calibrate the image threshold on held-out good parts",
        "-m",
        "calibration",
        "fit",
        str(bundle),
        "--good",
        str(cat / "test" / "good"),
        "--target-frr",
        "0.02",
        "--station",
        str(station),
        "--quiet",
    )
    step(
        "5/6 a line replay of unseen parts",
        "-m",
        "train",
        "line",
        str(line),
        "--category",
        args.category,
        "--parts",
        str(args.parts),
        "--defect-rate",
        str(args.defect_rate),
    )
    labels = {Path(r["frame"]).stem: r for r in json.loads((line / "labels.json").read_text())}

    print(
        "\n== 6/6 edge pipeline on the replayed camera, rejects over a real mosquitto", flush=True
    )
    with Mosquitto(out) as broker:
        spool = out / "spool.sqlite"
        spool.unlink(missing_ok=True)
        write_station(station, bundle, line, spool, port=broker.port)
        print(f"   mosquitto on 127.0.0.1:{broker.port}; station config {station}")
        listen_cmd = [PY, "-m", "edge", "listen", str(station), "--json"]
        print(f"$ {shlex.join(['python', *listen_cmd[1:]])} &")
        listener = subprocess.Popen(listen_cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)  # let the subscriber connect before the first part
        summary_path = out / "edge_summary.json"
        step("edge run", "-m", "edge", "run", str(station), "--summary-json", str(summary_path))
        summary = json.loads(summary_path.read_text())
        time.sleep(1.0)  # the last events are acknowledged by now; let the subscriber print them
        listener.terminate()
        stdout, _ = listener.communicate(timeout=10)

    rejects = {}
    for raw in stdout.splitlines():
        msg = json.loads(raw)
        if msg["topic"].endswith("/reject"):
            ev = msg["payload"]
            rejects.setdefault(ev["event_id"], ev)  # consumers drop duplicates by event id
    print(f"\nreject events received by the subscriber ({len(rejects)}):")
    truly, false_rejects = 0, 0
    for ev in sorted(rejects.values(), key=lambda e: e["frame"]):
        lab = labels.get(str(ev["part_id"]))
        defective = bool(lab and lab["defective"])
        truly += defective
        false_rejects += not defective
        regions = ", ".join(f"bbox={r['bbox']} area={r['area']}" for r in ev["regions"][:3])
        why = "score" if ev["score"] > ev["image_threshold"] else "region"
        print(
            f"  part {ev['part_id']}  score {ev['score']:.4f} (threshold "
            f"{ev['image_threshold']:.4f}, rejected by {why})  "
            f"{'DEFECT ' + lab['defect'] if defective else 'good part (false reject)'}  "
            f"latency {ev['latency_ms']:.0f} ms  regions [{regions}]"
        )
    n_def = sum(r["defective"] for r in labels.values())
    rejected_parts = {str(ev["part_id"]) for ev in rejects.values()}
    escapes = sorted(k for k, r in labels.items() if r["defective"] and k not in rejected_parts)
    n_good = len(labels) - n_def
    print(
        f"\nsummary: parts inspected {summary['frames']}, rejects {len(rejects)}, "
        f"of which truly defective {truly}, false rejects {false_rejects} (of {n_good} good), "
        f"defective parts {n_def}, escapes {len(escapes)}{' ' + str(escapes) if escapes else ''}; "
        f"{summary.get('fps', 0):.1f} parts/s; demo took {time.perf_counter() - t_start:.0f} s"
    )
    ok = not escapes and false_rejects * 20 <= n_good and summary["frames"] == len(labels)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
