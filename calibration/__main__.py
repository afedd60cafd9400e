"""`python -m calibration`: fit thresholds for a bundle, evaluate a bundle."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge.errors import LineInspectError


def _fit(args: argparse.Namespace) -> int:
    from calibration.fit import fit_thresholds

    res = fit_thresholds(
        args.bundle,
        good=args.good,
        data=args.data,
        defects=args.defects,
        masks=args.masks,
        strategy=args.strategy,
        target_frr=args.target_frr,
        max_escape=args.max_escape,
        precision=args.precision,
        backend=args.backend,
        progress=not args.quiet,
    )
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    th = res.thresholds
    print(
        f"{res.path}: image threshold {th.image_threshold:.5g} ({th.method}), pixel threshold "
        f"{th.pixel_threshold:.5g}, min region area {th.min_region_area} px; "
        f"good scores p50 {th.stats['good']['p50']:.4g} max {th.stats['good']['max']:.4g} "
        f"(n={th.stats['good']['n']})"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from calibration.evaluate import evaluate

    res = evaluate(args.bundle, args.data, args.precision, args.backend, progress=not args.quiet)
    text = json.dumps(res, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibration", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("fit", help="fit thresholds.yaml for a bundle")
    p.add_argument("bundle")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--good", help="folder of good images (held out from training)")
    src.add_argument("--data", help="MVTec-layout category dir (uses test/ and ground_truth/)")
    p.add_argument("--defects", help="folder of defective images")
    p.add_argument("--masks", help="folder of <name>_mask.png for --defects")
    p.add_argument("--strategy", choices=["frr", "f1", "escape"], default="frr")
    p.add_argument("--target-frr", type=float, default=0.01, help="false-reject rate bound (frr)")
    p.add_argument("--max-escape", type=float, default=0.0, help="escape-rate budget (escape)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_fit)

    p = sub.add_parser("evaluate", help="AUROC / PRO / rates of a bundle on an MVTec-layout set")
    p.add_argument("bundle")
    p.add_argument("--data", required=True, help="MVTec-layout category dir")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_evaluate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (LineInspectError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
