"""`python -m engines`: export (and later quantize/build)."""

from __future__ import annotations

import argparse
import logging
import sys

from edge.errors import LineInspectError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("export", help="training run -> bundle with model.onnx (parity-checked)")
    p.add_argument("run_dir", help="training output folder (holds checkpoint.pt)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--batch", type=int, default=1, help="fixed batch size of the graph input")
    p.add_argument(
        "--images", help="folder of real images for the parity run (default: training data)"
    )
    p.add_argument("--name", help="model name recorded in the manifest")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.cmd == "export":
            from engines.export import export

            out, rep = export(
                args.run_dir, args.out, batch=args.batch, images=args.images, name=args.name
            )
            print(
                f"bundle {out}: parity ok on {rep.images} images "
                f"(map max abs diff {rep.map_max_abs:.2e} of range {rep.map_range:.3g}, "
                f"score rel diff {rep.score_max_rel:.2e})"
            )
    except (LineInspectError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
