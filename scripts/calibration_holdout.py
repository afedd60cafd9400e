"""Does `calibration fit --strategy frr` keep its promise on parts it has not seen?

Scores every test/good image of an MVTec-layout category once with the bundle (edge's backend),
then, for several random halvings, fits the thresholds on one half and counts the device's
false rejects (edge.postprocess, the same decision the line makes) on the other half. The check
passes when every split's realised false-reject count is at or below the upper end of the
central 95% binomial interval of the target rate.

    .venv/bin/python scripts/calibration_holdout.py BUNDLE DATA [--target-frr 0.02] [--splits 20]

Prints one JSON document (per-split thresholds and realised rates, and the verdict).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import binom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration import dataset  # noqa: E402
from calibration.scoring import score_samples  # noqa: E402
from edge.bundle import Bundle  # noqa: E402
from thresholding.decision import device_decisions  # noqa: E402
from thresholding.fit import fit_scored  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("data", help="MVTec-layout category (its test/good images are used)")
    ap.add_argument("--target-frr", type=float, default=0.02)
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="fp32")
    a = ap.parse_args(argv)

    bundle = Bundle(a.bundle)
    good = [s for s in dataset.mvtec_test(a.data) if s.good]
    scored = score_samples(bundle, good, a.precision, "onnxruntime", progress=False)
    rng = np.random.default_rng(a.seed)
    n = len(good)
    splits = []
    for _ in range(a.splits):
        perm = rng.permutation(n)
        fit_idx, test_idx = np.zeros(n, bool), np.zeros(n, bool)
        fit_idx[perm[: n // 2]] = True
        test_idx[perm[n // 2 :]] = True
        res = fit_scored(scored.subset(fit_idx), "frr", target_frr=a.target_frr)
        th = res.thresholds
        held = scored.subset(test_idx)
        rejected = device_decisions(held.maps, held.scores, th)
        k, m = int(rejected.sum()), int(test_idx.sum())
        splits.append(
            {
                "image_threshold": th.image_threshold,
                "pixel_threshold": th.pixel_threshold,
                "min_region_area": th.min_region_area,
                "fit_good": int(fit_idx.sum()),
                "fit_false_rejects": th.stats["fit_set"]["false_rejects"],
                "fit_frr_upper_bound": th.stats["fit_set"]["frr_upper_bound"],
                "held_out_good": m,
                "held_out_false_rejects": k,
                "held_out_frr": k / m,
                # Of those, rejected by the region test while the score was below threshold.
                "held_out_region_only": int(np.sum(rejected & (held.scores <= th.image_threshold))),
            }
        )
    m = splits[0]["held_out_good"]
    # Central 95% interval of the false-reject count if the true rate were exactly the target.
    lo, hi = binom.interval(0.95, m, a.target_frr)
    worst = max(s["held_out_false_rejects"] for s in splits)
    out = {
        "bundle": str(a.bundle),
        "data": str(a.data),
        "good_images": n,
        "target_frr": a.target_frr,
        "held_out_binomial_95_interval": [int(lo), int(hi)],
        "held_out_interval_rate": [lo / m, hi / m],
        "mean_held_out_frr": float(np.mean([s["held_out_frr"] for s in splits])),
        "region_only_share": sum(s["held_out_region_only"] for s in splits)
        / max(sum(s["held_out_false_rejects"] for s in splits), 1),
        "worst_held_out_false_rejects": worst,
        "pass": bool(worst <= hi),
        "splits": splits,
    }
    print(json.dumps(out, indent=2))
    return 0 if out["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
