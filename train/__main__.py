"""python -m train {synth,line,fit}: synthetic data and model fitting on a workstation."""

from __future__ import annotations

import argparse
import sys

from edge.errors import InvalidValue, run_cli


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _cmd_synth(a: argparse.Namespace) -> None:
    if a.source and a.real:
        raise InvalidValue("--from and --real exclude each other")
    if a.source:
        from train.realsurf import paint_folder

        meta = paint_folder(
            a.source,
            a.out,
            test_fraction=a.test_fraction,
            test_defect=a.test_defect if a.test_defect is not None else 5,
            seed=a.seed,
        )
        c = meta["counts"]
        print(
            f"wrote {a.out}: {c['train_good']} train/good, {c['test_good']} test/good, "
            f"{c['test_defect']} painted images of each of {len(meta['defects'])} defects"
        )
        return
    if a.real:
        from train.realsurf import generate_real

        generate_real(
            a.out,
            categories=_csv(a.categories) if a.categories else None,
            image_size=a.image_size,
            train_good=a.train_good,
            test_good=a.test_good if a.test_good is not None else 30,
            test_defect=a.test_defect if a.test_defect is not None else 5,
            seed=a.seed,
        )
        print(f"wrote {a.out}")
        return
    from train.synth import generate

    generate(
        a.out,
        categories=_csv(a.categories) if a.categories else None,
        image_size=a.image_size,
        train_good=a.train_good,
        test_good=a.test_good if a.test_good is not None else 20,
        test_defect=a.test_defect if a.test_defect is not None else 8,
        seed=a.seed,
    )
    print(f"wrote {a.out}")


def _cmd_line(a: argparse.Namespace) -> None:
    from train.synth import generate_line_sequence

    labels = generate_line_sequence(
        a.out, a.category, a.parts, a.defect_rate, image_size=a.image_size, seed=a.seed
    )
    bad = sum(1 for x in labels if x["defective"])
    print(f"wrote {len(labels)} parts ({bad} defective) to {a.out}")


def _cmd_fit(a: argparse.Namespace) -> None:
    from train.fit import fit, load_config

    overrides = {
        "model": a.model,
        "data": a.data,
        "out": a.out,
        "backbone": a.backbone,
        "image_size": a.image_size,
        "epochs": a.epochs,
        "max_steps": a.max_steps,
        "seed": a.seed,
        "batch_size": a.batch_size,
        "crop": a.crop,
        "device": a.device,
    }
    cfg = load_config(a.config, overrides)
    path = fit(cfg, resume=a.resume)
    print(f"checkpoint: {path}")


def main(argv: list[str] | None = None) -> int:
    from train.models import MODELS

    p = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser(
        "synth",
        help="generate an MVTec-layout data set: synthetic parts, real surfaces (--real), "
        "or your own good images with painted defects (--from)",
    )
    s.add_argument("out", help="output folder")
    s.add_argument(
        "--from",
        dest="source",
        metavar="DIR",
        help="paint masked defects onto copies of your own good images (a folder); writes "
        "OUT/train/good, OUT/test/{good,<defect>}, OUT/ground_truth/<defect>",
    )
    s.add_argument("--test-fraction", type=float, default=0.3, help="with --from: held out")
    s.add_argument(
        "--real",
        action="store_true",
        help="the real-surface benchmark set (photographs shipped by scikit-image)",
    )
    s.add_argument("--categories", help="comma-separated categories (default: all)")
    s.add_argument("--image-size", type=int, default=256)
    s.add_argument("--train-good", type=int, default=60)
    s.add_argument("--test-good", type=int, help="default 20 (synthetic), 30 (--real)")
    s.add_argument(
        "--test-defect", type=int, help="images per defect type (default 8 synthetic, 5 else)"
    )
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("line", help="generate a synthetic line replay (one image per part)")
    s.add_argument("out", help="output folder (frames, masks/, labels.json)")
    s.add_argument("--category", required=True)
    s.add_argument("--parts", type=int, required=True)
    s.add_argument("--defect-rate", type=float, required=True)
    s.add_argument("--image-size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_line)

    s = sub.add_parser(
        "fit",
        help="train a model on good images",
        description="Train a model on good images. Flags override the --config YAML; the "
        "resolved config is saved as <out>/config.yaml.",
    )
    s.add_argument("--model", choices=sorted(MODELS), help="model kind (default stpm)")
    s.add_argument("--data", help="MVTec category dir (uses train/good) or folder of good images")
    s.add_argument("--out", help="run directory (checkpoint.pt, last.pt, config.yaml, ...)")
    s.add_argument("--config", help="training YAML (e.g. configs/train_stpm.yaml)")
    s.add_argument("--backbone", help="teacher backbone (default efficientnet_lite0)")
    s.add_argument("--image-size", type=int)
    s.add_argument("--epochs", type=int)
    s.add_argument("--max-steps", type=int, help="optimizer steps cap (0 = none; default 300)")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--crop", type=int, help="train on random crops of this size (0 = whole)")
    s.add_argument("--seed", type=int)
    s.add_argument("--device", choices=["cpu", "cuda"])
    s.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    s.set_defaults(func=_cmd_fit)

    a = p.parse_args(argv)
    # train/ still raises ValueError for a bad model argument or data option (reported the same
    # way: one line, exit 2); everything else is a bug and keeps its traceback.
    return run_cli(lambda: a.func(a), also=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
