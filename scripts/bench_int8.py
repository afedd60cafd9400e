"""INT8 on real surfaces: quantize bundles (decision check + mixed precision), evaluate, time.

    python scripts/bench_int8.py --cell runs/bench-real/dskd/moon/seed0 --data runs/real/moon \\
        [--cell ... --data ...] --out runs/int8 --report docs/engines_int8

For every (bundle, category) pair, one after the other: copy the bundle to <out>, run
`engines quantize --calib <category>/train/good --eval <category>` (the always-on decision check
on the held-out good images calibration did not use, the mixed-precision search when INT8 fails
it), then ONNX Runtime CPU latency of the FP32, FP16 and INT8 graphs on one test image. Writes
<report>.md and .json (and prints the JSON): AUROC per precision and their deltas in points, the
decision-check figures, how many layers stayed in float, ms/image.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench_models import onnx_latency_ms  # noqa: E402


def run_pair(cell: Path, data: Path, out: Path, a: argparse.Namespace) -> dict:
    from edge.bundle import PRECISION_FILES, Bundle
    from engines.qcheck import Budget
    from engines.quantize import QuantizeError, quantize

    name = f"{cell.parent.parent.name}-{cell.parent.name}-{cell.name}"
    bundle = out / name
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(cell / "bundle" if (cell / "bundle").is_dir() else cell, bundle)
    t0 = time.perf_counter()
    refused = None
    try:
        budget = Budget(
            max_flip_rate=a.max_flip_rate,
            max_score_error=a.max_score_error,
            max_map_error=a.max_map_error,
        )
        rep = quantize(
            bundle, data / "train" / "good", data, calib_count=a.calib_count, budget=budget
        )
        ev = rep.eval
    except QuantizeError as exc:
        refused, ev = str(exc), None
    q = Bundle(bundle).manifest.quantization
    test_image = sorted((data / "test" / "good").glob("*.png"))[0]
    size = Bundle(bundle).image_size[0]
    lat = {}
    for p, f in PRECISION_FILES.items():
        if (bundle / f).is_file():
            lat[p] = onnx_latency_ms(bundle / f, test_image, size, a.threads, a.latency_runs)[
                "median"
            ]
    return {
        "cell": str(cell),
        "data": str(data),
        "model": Bundle(bundle).manifest.model,
        "seconds": round(time.perf_counter() - t0, 1),
        "refused": refused,
        "eval": ev,
        "decision_check": q.get("decision_check"),
        "int8_quantized_layers": q.get("int8", {}).get("quantized_layers"),
        "int8_float_layers": len(q.get("int8", {}).get("float_layers", {})),
        "ms_per_image": lat,
        "loadavg": os.getloadavg()[0],
    }


def _pts(ev: dict | None, p: str, k: str) -> str:
    if not ev or ev.get(p, {}).get(k) is None:
        return "-"
    return f"{100 * ev[p][k]:.2f}"


def _delta(ev: dict | None, p: str, k: str) -> str:
    if not ev or ev.get(p, {}).get(f"{k}_drop_points") is None:
        return "-"
    return f"{-ev[p][f'{k}_drop_points']:+.2f}"


def write_report(rows: list[dict], report: Path, command: str) -> None:
    lines = [
        f"Command: `{command}`",
        "",
        "| bundle | FP32 image / pixel AUROC | FP16 Δ image / pixel | INT8 Δ image / pixel "
        "| INT8 decisions changed | INT8 score / map error | layers INT8 (float) "
        "| ms/img FP32 / FP16 / INT8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ev, dc = r["eval"], r["decision_check"] or {}
        i8 = dc.get("int8", {})
        ms = r["ms_per_image"]
        lines.append(
            f"| {Path(r['cell']).parent.parent.name} {Path(r['data']).name} "
            f"| {_pts(ev, 'fp32', 'image_auroc')} / {_pts(ev, 'fp32', 'pixel_auroc')} "
            f"| {_delta(ev, 'fp16', 'image_auroc')} / {_delta(ev, 'fp16', 'pixel_auroc')} "
            f"| {_delta(ev, 'int8', 'image_auroc')} / {_delta(ev, 'int8', 'pixel_auroc')} "
            f"| {i8.get('flips', '-')}/{i8.get('images', '-')} "
            f"| {i8.get('score_error', float('nan')):.3f} / {i8.get('map_error', float('nan')):.3f} "
            f"| {r['int8_quantized_layers']} ({r['int8_float_layers']}) "
            f"| {' / '.join(f'{ms[p]:.1f}' if p in ms else '-' for p in ('fp32', 'fp16', 'int8'))} |"
        )
        if r["refused"]:
            lines.append(f"|  | refused: {r['refused'][:300]} |||||||")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".md").write_text("\n".join(lines) + "\n")
    report.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cell", action="append", required=True, help="benchmark cell or bundle dir")
    p.add_argument("--data", action="append", required=True, help="its MVTec category (paired)")
    p.add_argument("--out", default="runs/int8")
    p.add_argument("--report", default="docs/engines_int8")
    p.add_argument("--calib-count", type=int, default=32)
    p.add_argument("--max-flip-rate", type=float, default=0.01)
    p.add_argument("--max-score-error", type=float, default=0.05)
    p.add_argument("--max-map-error", type=float, default=0.10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency-runs", type=int, default=20)
    a = p.parse_args(argv)
    if len(a.cell) != len(a.data):
        print("error: give one --data per --cell", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for cell, data in zip(a.cell, a.data, strict=True):
        print(f"== {cell}", flush=True)
        rows.append(run_pair(Path(cell), Path(data), out, a))
    command = "python scripts/bench_int8.py " + " ".join(argv or sys.argv[1:])
    write_report(rows, Path(a.report), command)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
