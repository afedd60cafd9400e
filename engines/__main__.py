"""`python -m engines`: export (workstation), quantize (workstation), build (device).

Only `export` needs torch, and it is imported inside its subcommand: the device runs `build`
with edge's dependencies plus TensorRT and pycuda.
"""

from __future__ import annotations

import argparse
import logging
import sys

from edge.errors import run_cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engines", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("export", help="training run -> bundle with model.onnx (parity-checked)")
    p.add_argument("run_dir", help="training output folder (holds checkpoint.pt)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--batch", type=int, default=1, help="fixed batch size of the graph input")
    p.add_argument(
        "--images", help="folder of real images for the parity run (default: training data)"
    )
    p.add_argument("--parity-images", type=int, default=8, help="how many parity images")
    p.add_argument("--name", help="model name recorded in the manifest")
    p.add_argument("--no-clean", action="store_true", help="skip onnxslim graph cleaning")

    q = sub.add_parser("quantize", help="bundle -> model.fp16.onnx + model.int8.onnx (Q/DQ)")
    q.add_argument("bundle", help="bundle directory (from `engines export`)")
    q.add_argument("--calib", required=True, help="folder of good images for INT8 calibration")
    q.add_argument("--eval", help="MVTec-layout category: AUROC of fp32/fp16/int8 + budget check")
    q.add_argument(
        "--calib-count", type=int, default=32, help="at most this many calibration images"
    )
    q.add_argument(
        "--method",
        choices=("percentile", "minmax", "entropy"),
        default="percentile",
        help="INT8 activation range calibration (default percentile 99.999%%)",
    )
    q.add_argument(
        "--keep-float",
        action="append",
        default=[],
        metavar="REGEX",
        help="keep nodes whose name matches in float (repeatable)",
    )
    q.add_argument("--backend", default="onnxruntime", help="backend for --eval")
    q.add_argument(
        "--check",
        help="held-out good images for the FP32 decision check (default: the --calib images "
        "that calibration did not use)",
    )
    q.add_argument(
        "--allow-over-budget",
        action="store_true",
        help="write a graph that fails the decision check anyway (recorded in the manifest)",
    )
    q.add_argument(
        "--no-mixed",
        action="store_true",
        help="do not keep sensitive layers in FP32 when INT8 fails the check",
    )
    q.add_argument("--max-flip-rate", type=float, help="budget: decisions changed (default 0.01)")
    q.add_argument(
        "--max-score-error", type=float, help="budget: of the image threshold's margin (0.05)"
    )
    q.add_argument(
        "--max-map-error", type=float, help="budget: of the pixel threshold's margin (0.10)"
    )

    b = sub.add_parser("build", help="(device) bundle -> TensorRT engine, cached, parity-checked")
    b.add_argument("bundle", help="bundle directory")
    b.add_argument("--precision", choices=("fp32", "fp16", "int8"), required=True)
    b.add_argument("--workspace", type=int, default=1024, help="builder workspace limit in MB")
    b.add_argument("--timing-cache", help="timing cache file (default: in the engines/ cache)")
    b.add_argument("--images", help="parity images (default: the bundle's samples/)")
    b.add_argument("--force", action="store_true", help="rebuild even if a valid engine exists")
    b.add_argument("--device", type=int, default=0, help="CUDA device index")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The model code under train/ raises ValueError for a bad argument of a checkpoint.
    return run_cli(lambda: _run(args), also=(ValueError,))


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "export":
        from engines.export import export

        out, rep = export(
            args.run_dir,
            args.out,
            batch=args.batch,
            images=args.images,
            parity_count=args.parity_images,
            name=args.name,
            clean=not args.no_clean,
        )
        print(f"bundle {out}: parity ok on {rep.summary()}")
    elif args.cmd == "quantize":
        from dataclasses import replace

        from engines.qcheck import Budget
        from engines.quantize import format_table, quantize

        limits = {
            "max_flip_rate": args.max_flip_rate,
            "max_score_error": args.max_score_error,
            "max_map_error": args.max_map_error,
        }
        budget = replace(Budget(), **{k: v for k, v in limits.items() if v is not None})
        rep = quantize(
            args.bundle,
            args.calib,
            args.eval,
            calib_count=args.calib_count,
            method=args.method,
            keep_float=args.keep_float,
            backend=args.backend,
            check=args.check,
            budget=budget,
            allow_over_budget=args.allow_over_budget,
            mixed=not args.no_mixed,
        )
        for c in rep.checks.values():
            print(c.line())
        print(
            f"wrote {rep.fp16} and {rep.int8} ({rep.quantized_layers} layers INT8, "
            f"{len(rep.float_layers)} kept in float, {rep.calib_images} calibration images)"
        )
        if rep.eval is not None:
            print(
                f"\nAUROC on {rep.eval['data']} ({rep.eval['images']} images, "
                f"{rep.eval['backend']}):"
            )
            print(format_table(rep.eval))
        if rep.over_budget:
            print(
                "error: accuracy budget exceeded: " + "; ".join(rep.over_budget),
                file=sys.stderr,
            )
            return 2
    elif args.cmd == "build":
        from engines.build import build

        res = build(
            args.bundle,
            args.precision,
            workspace_mb=args.workspace,
            timing_cache=args.timing_cache,
            images=args.images,
            force=args.force,
            device=args.device,
        )
        state = "reused" if res.reused else "built"
        print(f"{state} {res.engine} ({res.parity.summary() if res.parity else 'no parity'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
