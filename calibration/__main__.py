"""`python -m calibration`: fit thresholds for a bundle, evaluate a bundle."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge.atomic import atomic_write
from edge.errors import run_cli

PRECISIONS = ["fp32", "fp16", "int8"]


def _fit(args: argparse.Namespace) -> int:
    from calibration.fit import fit_thresholds

    section, old, rows = None, None, []
    if args.from_station:
        from calibration import recalibrate
        from edge.bundle import Bundle

        recalibrate.check_sample(args.from_station)
        old = Bundle(args.bundle).thresholds(required=False)  # what the line runs now

        def section(result):
            rows[:] = recalibrate.before_after(result, old)
            return recalibrate.as_html(rows, args.from_station)

    res = fit_thresholds(
        args.bundle,
        good=args.good or args.from_station,
        data=args.data,
        defects=args.defects,
        masks=args.masks,
        strategy=args.strategy,
        target_frr=args.target_frr,
        max_escape=args.max_escape,
        precision=args.precision,
        backend=args.backend,
        pixel_ratio=args.pixel_ratio,
        min_area=args.min_area,
        station=args.station,
        report=not args.no_report,
        progress=not args.quiet,
        report_section=section,
    )
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    th = res.thresholds
    fs = th.stats["fit_set"]
    line = (
        f"{res.path}: image threshold {th.image_threshold:.5g} ({th.method}), pixel threshold "
        f"{th.pixel_threshold:.5g}, min region area {th.min_region_area} px; "
        f"fit set: {fs['false_rejects']}/{fs['good']} good rejected "
        f"(95% upper bound {fs['frr_upper_bound']:.2%})"
    )
    if fs["defects"]:
        line += f", {fs['escapes']}/{fs['defects']} defects escaped"
    print(line)
    if args.from_station:
        from calibration import recalibrate

        print(recalibrate.as_text(rows or recalibrate.before_after(res, old)))
    if res.report_path is not None:
        print(f"report: {res.report_path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from calibration.evaluate import evaluate

    ev = evaluate(
        args.bundle, args.data, args.precision, args.backend, args.station, not args.quiet
    )
    html = None
    if args.report:
        from calibration.report import evaluation_report
        from edge.bundle import Bundle

        html = evaluation_report(Bundle(args.bundle), ev)
    text = json.dumps(ev.summary, indent=2)
    if args.json:
        atomic_write(Path(args.json), text + "\n")
    if html is not None:
        atomic_write(Path(args.report), html)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibration", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser(
        "fit",
        help="fit thresholds.yaml (and report.html) for a bundle",
        description="Score images with the bundle through edge's backend and fit the image "
        "threshold, pixel threshold and minimum region area. Writes thresholds.yaml (the old "
        "one kept as thresholds.yaml.bak) and report.html in the bundle; writes nothing on error.",
    )
    p.add_argument("bundle")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--good", help="folder of good images held out from training (e.g. accepted line frames)"
    )
    src.add_argument("--data", help="MVTec-layout category dir (uses test/ and ground_truth/)")
    src.add_argument(
        "--from-station",
        metavar="DIR",
        help="a station's recalibration sample (recalibration.dir, with recalibration.json): "
        "refit on it and show the thresholds and rates before and after (also in report.html)",
    )
    p.add_argument("--defects", help="folder of defective images")
    p.add_argument("--masks", help="folder of <name>_mask.png for --defects")
    p.add_argument("--strategy", choices=["frr", "f1", "escape"], default="frr")
    p.add_argument(
        "--target-frr",
        type=float,
        default=0.01,
        help="frr: false-reject rate to stay under with 95%% confidence (default 0.01)",
    )
    p.add_argument(
        "--max-escape", type=float, default=0.0, help="escape: escape-rate budget (default 0)"
    )
    p.add_argument(
        "--pixel-ratio",
        type=float,
        default=0.5,
        help="without masks: pixel threshold this far from the good background to the image "
        "threshold (default 0.5, half height)",
    )
    p.add_argument("--min-area", type=int, help="fix the minimum region area (pixels) instead")
    p.add_argument(
        "--station", help="station YAML: use its crop, ROI mask and min-area override as the line"
    )
    p.add_argument("--precision", choices=PRECISIONS, help="graph to run (default fp32)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--no-report", action="store_true", help="do not write report.html")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_fit)

    p = sub.add_parser("evaluate", help="AUROC / AU-PRO / rates of a bundle on an MVTec-layout set")
    p.add_argument("bundle")
    p.add_argument("--data", required=True, help="MVTec-layout category dir")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--report", help="write an HTML report here")
    p.add_argument("--station", help="station YAML: use its crop, ROI mask and min-area override")
    p.add_argument("--precision", choices=PRECISIONS, help="graph to run (default fp32)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_evaluate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
