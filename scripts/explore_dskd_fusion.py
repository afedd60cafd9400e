"""Eval-only variants of the DSKD score and map fusion on trained checkpoints (no retraining).

    python scripts/explore_dskd_fusion.py <bench out> <real-surface data> hubble,ihc,moon,retina

Reads <bench out>/dskd/<category>/seed2/run/checkpoint.pt (a `bench_models.py --seeds 2` run),
computes every test image's normalised per-scale distances once, then image AUROC (score = map
max, or mean of its top 1 %) and pixel AUROC for each scale fusion (mean, max, product), student
fusion (mean, max) and smoothing (sigma 4, 8). Prints one line per category and the means.
Exploratory: nothing beat the default for the score (docs/models.md, "Benchmark").
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration.dataset import mvtec_test, read_mask  # noqa: E402
from calibration.metrics import image_auroc, pixel_auroc  # noqa: E402
from train.checkpoint import load_checkpoint  # noqa: E402
from train.models.common import GaussianBlur, combine, upsample  # noqa: E402


def category(model, data: Path) -> dict[str, dict[str, float]]:
    S = model.size[0]
    n = len(model.match)
    ups, masks, labels = [], [], []
    with torch.no_grad():
        for s in mvtec_test(data):
            img = cv2.cvtColor(cv2.imread(str(s.path)), cv2.COLOR_BGR2RGB)
            img = cv2.resize(img, (S, S), interpolation=cv2.INTER_AREA)
            x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
            d = model.distances(x)
            flat = model.scale([m for k in model.active for m in d[k]])  # (student, scale) maps
            strides = model.match_strides * len(model.active)
            ups.append([upsample(f, model.size, st) for f, st in zip(flat, strides, strict=True)])
            masks.append(read_mask(s.mask, (S, S)) if s.mask else np.zeros((S, S), bool))
            labels.append(0 if s.good else 1)
    labels, masks = np.array(labels), np.stack(masks)
    out = {}
    for cs, cst, sigma in itertools.product(
        ["mean", "max", "product"], ["mean", "max"], [4.0, 8.0]
    ):
        blur = GaussianBlur(sigma, model.size)
        maps = np.stack(
            [
                blur(
                    combine(
                        [combine(u[j * n : (j + 1) * n], cs) for j in range(len(model.active))], cst
                    )
                )[0, 0].numpy()
                for u in ups
            ]
        )
        flat = maps.reshape(len(maps), -1)
        top = np.sort(flat, axis=1)[:, -max(1, flat.shape[1] // 100) :].mean(1)
        out[f"{cs}/{cst}/s{sigma:g}"] = {
            "image_max": image_auroc(labels, flat.max(1)),
            "image_top1": image_auroc(labels, top),
            "pixel": pixel_auroc(masks, maps),
        }
    return out


def main() -> None:
    root, data, cats = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
    torch.set_num_threads(2)
    res = {}
    for cat in cats:
        model, _ = load_checkpoint(root / "dskd" / cat / "seed2" / "run" / "checkpoint.pt")
        res[cat] = category(model, data / cat)
        print(
            cat,
            json.dumps({k: {m: round(v, 3) for m, v in r.items()} for k, r in res[cat].items()}),
        )
    for key in next(iter(res.values())):
        means = {
            m: round(float(np.mean([res[c][key][m] for c in res])), 4) for m in res[cats[0]][key]
        }
        print("mean", key, means)


if __name__ == "__main__":
    main()
