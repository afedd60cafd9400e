"""Benchmark the anomaly models: train, export, evaluate every (variant, category) cell.

    python scripts/bench_models.py --data synth                     # stpm, dskd, mtkd defaults
    python scripts/bench_models.py --data synth --ablation dskd --report docs/models_ablation

Each cell is `train.fit` (configs/train_<model>.yaml + overrides) -> `engines.export.export`
(ONNX + parity) -> `calibration.evaluate.evaluate` (ONNX Runtime, FP32), plus an ONNX Runtime CPU
latency run (with the bundle's size and the memory the ONNX Runtime session added), parameter
count and FLOPs (torch.utils.flop_counter, batch 1). `--seeds 0,1,2` repeats every cell per
seed (cells under seed<k>/) and reports means with the spread over seeds. Results go to
<out>/<variant>/<category>/result.json; a cell with a result is skipped, an interrupted training
resumes from its last.pt, so the script can be stopped and re-run, or run one model/category at
a time, and the table is rebuilt from every result present. The report (<report>.md and .json)
records the conditions (image size, epochs, threads, CPU, load average) next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (model kind, model_args overrides). The DSKD ablation of the paper's modules.
ABLATIONS = {
    "dskd": {
        "stpm": ("stpm", {}),
        "dskd": ("dskd", {}),
        # the old defaults (Sd fed by Se, running-mean maps, plain loss), then one change
        # back at a time: what each of today's defaults buys
        # today's training on crops vs whole images (the defaults before crops: 8 whole
        # images a step, 20 epochs, at most 300 steps)
        "dskd-whole-images": (
            "dskd",
            {
                "train.crop": 0,
                "train.batch_size": 8,
                "train.epochs": 20,
                "train.max_steps": 300,
                "train.early_stop_patience": 5,
            },
        ),
        "dskd-rot90-flips": ("dskd", {"train.augment": ["hflip", "vflip", "rot90"]}),
        "dskd-feature-pool": ("dskd", {"feature_pool": 3}),
        "dskd-2025": (
            "dskd",
            {
                "sd_input": "se",
                "map_norm": "running",
                "hard_fraction": 1.0,
                "match_scales": None,
                "train.lr_schedule": "constant",
            },
        ),
        "dskd-sd-from-se": ("dskd", {"sd_input": "se"}),
        "dskd-plain-loss": ("dskd", {"hard_fraction": 1.0}),
        "dskd-all-scales": ("dskd", {"match_scales": None}),
        "dskd-constant-lr": ("dskd", {"train.lr_schedule": "constant"}),
        "dskd-border-rings": ("dskd", {"norm_rings": 2}),
        "dskd-se-only": ("dskd", {"students": "se"}),  # reported as "STPM + normalisation"
        "dskd-sd-only": ("dskd", {"students": "sd"}),
        "dskd-no-embedding": ("dskd", {"embedding": False}),
        "dskd-no-interaction": ("dskd", {"interaction": False}),
        "dskd-coarsest-scale": ("dskd", {"match_scales": [2]}),
        "dskd-scales-product": ("dskd", {"combine_scales": "product"}),
        "dskd-students-max": ("dskd", {"combine_students": "max"}),
        "dskd-running-norm": ("dskd", {"map_norm": "running"}),
        "dskd-raw-maps": ("dskd", {"map_norm": "none"}),
        "dskd-map-max": ("dskd", {"map_combine_scales": "max", "map_sigma": 8.0}),
    },
    "mtkd": {
        "stpm": ("stpm", {}),
        "mtkd": ("mtkd", {}),
        "mtkd-uniform": ("mtkd", {"weights": "uniform"}),
        "mtkd-no-recon": ("mtkd", {"reconstruction": False}),
        "mtkd-uniform-no-recon": ("mtkd", {"weights": "uniform", "reconstruction": False}),
        "mtkd-ae-coarsest": ("mtkd", {"ae_scale": 2}),
        "mtkd-whole-images": ("mtkd", {"train.crop": 0}),
        # the paper's variant reconstructs whole images: no crops
        "mtkd-paper": ("mtkd", {"variant": "paper", "teachers": None, "train.crop": 0}),
    },
}
METRICS = ("image_auroc", "pixel_auroc", "pro")


def _parse_variant(text: str) -> tuple[str, str, dict]:
    """'name:kind:key=val,key=val' (values parsed as YAML) -> (name, kind, overrides)."""
    import yaml

    parts = text.split(":", 2)
    if len(parts) < 2:
        raise ValueError(f"--variant {text!r}: expected name:kind[:key=value,...]")
    args = {}
    if len(parts) == 3 and parts[2]:
        for item in re.split(r",(?![^\[]*\])", parts[2]):  # commas inside [..] are a list
            key, _, val = item.partition("=")
            args[key.strip()] = yaml.safe_load(val)
    return parts[0], parts[1], args


def count_flops(model, size: int) -> int:
    """FLOPs (2 x multiply-accumulates) of one eval forward at batch 1."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return int(fc.get_total_flops())


def _rss_mb() -> float:
    """This process's resident memory now (Linux /proc), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def onnx_latency_ms(onnx_path: Path, image: Path, size: int, threads: int, runs: int) -> dict:
    """ONNX Runtime CPU latency of model.onnx on one real image over `runs`: the minimum (the
    cost with the CPU to itself; on a shared machine the median also measures the neighbours),
    the median and the 90th percentile."""
    import numpy as np
    import onnxruntime as ort

    from edge.preprocess import load_batch

    rss0 = _rss_mb()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = load_batch([image], (size, size))
    x = np.repeat(x, inp.shape[0], axis=0)
    for _ in range(3):
        sess.run(None, {inp.name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {inp.name: x})
        times.append((time.perf_counter() - t0) * 1000.0 / len(x))
    times.sort()
    return {
        "rss_mb": _rss_mb() - rss0,
        "min": times[0],
        "median": statistics.median(times),
        "p90": times[int(0.9 * (len(times) - 1))],
    }


def run_cell(
    name: str, kind: str, model_args: dict, data: Path, out: Path, a: argparse.Namespace
) -> dict:
    """Train, export, evaluate one (variant, category); returns the result dict."""
    import torch

    from calibration.evaluate import evaluate
    from engines.export import export
    from train.checkpoint import load_checkpoint
    from train.fit import fit, load_config

    run, bundle = out / "run", out / "bundle"
    cfg_file = ROOT / "configs" / f"train_{kind}.yaml"
    overrides = {
        "model": kind,
        "data": str(data),
        "out": str(run),
        "image_size": a.image_size,
        "epochs": a.epochs,
        "seed": a.seed,
        "threads": a.threads,
        "device": a.device,
    }
    # "train.<key>" entries of a variant override the training config, the rest model_args
    train_over = {k[6:]: v for k, v in model_args.items() if k.startswith("train.")}
    model_args = {k: v for k, v in model_args.items() if not k.startswith("train.")}
    cfg = load_config(cfg_file if cfg_file.is_file() else None, {**overrides, **train_over})
    cfg.model_args = {**cfg.model_args, **model_args}
    ckpt = run / "checkpoint.pt"
    if not ckpt.is_file():
        fit(cfg, resume=(run / "last.pt").is_file(), progress=a.progress)
    model, meta = load_checkpoint(ckpt)
    prov = meta["provenance"]
    export(run, bundle)
    ev = evaluate(bundle, data, precision="fp32", backend="onnxruntime", progress=a.progress)
    summary = ev.summary if hasattr(ev, "summary") else ev  # Evaluation or plain dict
    size = int(meta["args"]["image_size"])
    return {
        "variant": name,
        "model": kind,
        "category": data.name,
        "model_args": meta["args"],
        "image_auroc": summary["image_auroc"],
        "pixel_auroc": summary["pixel_auroc"],
        "pro": summary.get("pro", summary.get("au_pro")),
        "images": summary["images"],
        "eval_seconds_per_image": summary["seconds_per_image"],
        "train_minutes": prov.get("train_seconds", float("nan")) / 60.0,
        "epochs_run": prov.get("epochs_run"),
        "stopped_early": prov.get("stopped_early"),
        "train_images": prov.get("images"),
        **cell_latency(bundle, data, size, a),
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(
            p.numel() for n, p in model.named_parameters() if not n.startswith("teacher")
        ),
        "gflops": count_flops(model, size) / 1e9,
        "conditions": {
            "image_size": size,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "threads": a.threads or torch.get_num_threads(),
            "device": cfg.device,
            "cpu_count": os.cpu_count(),
            "loadavg_end": os.getloadavg()[0],
            "host": platform.node(),
            "torch": str(torch.__version__),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }


def cell_latency(bundle: Path, data: Path, size: int, a: argparse.Namespace) -> dict:
    """A cell's ms_per_image fields: model.onnx on the category's first good test image."""
    test_image = sorted((data / "test" / "good").glob("*.png"))[0]
    lat = onnx_latency_ms(bundle / "model.onnx", test_image, size, a.threads, a.latency_runs)
    return {
        "bundle_mb": (bundle / "model.onnx").stat().st_size / 1e6,
        "rss_mb": lat["rss_mb"],
        "ms_per_image": lat["median"],
        "ms_per_image_min": lat["min"],
        "ms_per_image_p90": lat["p90"],
    }


def remeasure_latency(r: dict, cell: Path, data: Path, a: argparse.Namespace) -> None:
    """Replace a result's ONNX Runtime latency figures with a measurement taken now (a cell
    whose bundle is gone keeps its earlier figures, and says so)."""
    if not (cell / "bundle" / "model.onnx").is_file():
        print(f"   {r['variant']}/{r['category']}: no bundle here, latency kept", flush=True)
        return
    r.update(cell_latency(cell / "bundle", data, int(r["conditions"]["image_size"]), a))
    r["conditions"]["latency_measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
    r["conditions"]["loadavg_latency"] = os.getloadavg()[0]
    print(f"   {r['variant']}/{r['category']}: {r['ms_per_image']:.1f} ms/img", flush=True)


def _cell_dir(out: Path, name: str, cat: str, seed: int, a: argparse.Namespace) -> Path:
    """<out>/<variant>/<category>/ for a single-seed run (the old layout), else .../seed<k>/."""
    return out / name / cat / f"seed{seed}" if a.seeds else out / name / cat


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def write_report(results: list[dict], order: list[str], report: Path, command: str) -> None:
    """Markdown + JSON: per (variant, category) the mean over seeds, per variant the mean over
    categories with the spread over seeds (std of the per-seed category means)."""
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    names = [n for n in order if n in by_variant] + sorted(set(by_variant) - set(order))
    keys = (*METRICS, "train_minutes", "ms_per_image", "ms_per_image_min", "bundle_mb", "rss_mb")
    means, lines = {}, []
    for n in names:
        rows = by_variant[n]
        seeds = sorted({r.get("seed", 0) for r in rows})
        cats = sorted({r["category"] for r in rows})
        for cat in cats:
            cr = [r for r in rows if r["category"] == cat]
            m = {k: _mean(cr, k) for k in keys}
            sd = ""
            if len(cr) > 1:
                sd = f" ± {statistics.stdev(r['image_auroc'] for r in cr):.3f}"
            c = cr[0]["conditions"]
            ep = statistics.fmean(r["epochs_run"] or 0 for r in cr)
            lines.append(
                f"| {n} | {cat} | {_fmt(m['image_auroc'])}{sd} | {_fmt(m['pixel_auroc'])} "
                f"| {_fmt(m['pro'])} | {_fmt(m['train_minutes'], 1)} | {_fmt(m['ms_per_image'], 1)} "
                f"| {_fmt(m['bundle_mb'], 1)} | {cr[0]['params'] / 1e6:.2f} | {cr[0]['gflops']:.2f} "
                f"| {len(cr)} | {c['image_size']} px, {ep:.0f}/{c['epochs']} ep, {c['threads']} thr |"
            )
        per_seed = []
        for sd in seeds:
            sr = [r for r in rows if r.get("seed", 0) == sd]
            if len(sr) == len(cats):  # a seed counts once every category has it
                per_seed.append({k: _mean(sr, k) for k in METRICS})
        m = {k: _mean(rows, k) for k in keys}
        m.update(
            categories=len(cats),
            seeds=len(per_seed),
            params=rows[0]["params"],
            gflops=rows[0]["gflops"],
        )
        for k in METRICS:
            vals = [p[k] for p in per_seed if p[k] is not None]
            m[f"{k}_seed_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        means[n] = m
        spread = f" ± {m['image_auroc_seed_std']:.3f}" if m["image_auroc_seed_std"] else ""
        lines.append(
            f"| **{n}** | **mean of {len(cats)}** | **{_fmt(m['image_auroc'])}**{spread} "
            f"| **{_fmt(m['pixel_auroc'])}** | **{_fmt(m['pro'])}** "
            f"| {_fmt(m['train_minutes'], 1)} | {_fmt(m['ms_per_image'], 1)} "
            f"| {_fmt(m['bundle_mb'], 1)} | {m['params'] / 1e6:.2f} | {m['gflops']:.2f} "
            f"| {len(per_seed)} seeds | |"
        )
    head = (
        "| variant | category | image AUROC (± seed std) | pixel AUROC | PRO | train min "
        "| ms/img (ORT CPU) | bundle MB | params (M) | GFLOPs | runs | conditions |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    md = f"Command: `{command}`\n\n" + head + "\n".join(lines) + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".md").write_text(md)
    report.with_suffix(".json").write_text(
        json.dumps({"command": command, "means": means, "cells": results}, indent=1)
    )
    print(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="synthetic set (python -m train synth OUT)")
    p.add_argument("--out", default="runs/bench", help="cells: <out>/<variant>/<category>/")
    p.add_argument(
        "--models", default="stpm,dskd,mtkd,patchcore", help="model kinds with their defaults"
    )
    p.add_argument("--ablation", choices=sorted(ABLATIONS), help="run an ablation set instead")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="name:kind[:key=val,...]; keys are model_args, or train.<key> for the training config",
    )
    p.add_argument("--only", help="comma-separated variant names to run (others: table only)")
    p.add_argument("--categories", help="comma-separated (default: every category in --data)")
    p.add_argument("--image-size", type=int, help="default: the config's (256)")
    p.add_argument("--epochs", type=int, help="default: the config's")
    p.add_argument("--seed", type=int)
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (cells under seed<k>/)")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime CPU threads")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument(
        "--report",
        help="writes .md and .json (default <out>/report: a docs/ table is written on purpose)",
    )
    p.add_argument("--no-run", action="store_true", help="only rebuild the report")
    p.add_argument(
        "--relatency",
        action="store_true",
        help="re-measure every present cell's ONNX Runtime latency now, one after the other "
        "(a quiet machine gives comparable figures; training runs measure amid other work)",
    )
    p.add_argument("--progress", action="store_true", help="tqdm bars")
    a = p.parse_args(argv)

    from edge.errors import LineInspectError

    data, out = Path(a.data), Path(a.out)
    if a.ablation:
        variants = ABLATIONS[a.ablation]
    else:
        variants = {k.strip(): (k.strip(), {}) for k in a.models.split(",") if k.strip()}
    for text in a.variant:
        name, kind, args = _parse_variant(text)
        variants[name] = (kind, args)
    cats = (
        [c.strip() for c in a.categories.split(",")]
        if a.categories
        else sorted(d.name for d in data.iterdir() if (d / "test").is_dir())
    )
    only = set(a.only.split(",")) if a.only else set(variants)
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed or 0]
    # Seed-major order: a stopped run has every model on every category for the first seeds.
    for seed in seeds:
        for cat in cats:
            for name, (kind, args) in variants.items():
                cell = _cell_dir(out, name, cat, seed, a)
                res = cell / "result.json"
                if a.no_run or name not in only or res.is_file():
                    continue
                cell.mkdir(parents=True, exist_ok=True)
                print(f"== {name} / {cat} / seed {seed}", flush=True)
                a.seed = seed
                try:
                    r = run_cell(name, kind, args, data / cat, cell, a)
                except (LineInspectError, ValueError) as exc:
                    print(f"error: {name}/{cat}: {exc}", file=sys.stderr)
                    return 2
                r["seed"] = seed
                res.write_text(json.dumps(r, indent=1))
                print(
                    f"   image AUROC {r['image_auroc']:.3f} pixel AUROC {r['pixel_auroc']:.3f} "
                    f"PRO {_fmt(r['pro'])} train {r['train_minutes']:.1f} min "
                    f"{r['ms_per_image']:.1f} ms/img",
                    flush=True,
                )
    results = []
    for name in variants:
        for cat in cats:
            for seed in seeds:
                cell = _cell_dir(out, name, cat, seed, a)
                res = cell / "result.json"
                if res.is_file():
                    r = json.loads(res.read_text())
                    r.setdefault("seed", seed)
                    if a.relatency:
                        remeasure_latency(r, cell, data / cat, a)
                        res.write_text(json.dumps(r, indent=1))
                    results.append(r)
    command = "python scripts/bench_models.py " + " ".join(argv or sys.argv[1:])
    write_report(results, list(variants), Path(a.report or out / "report"), command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
