"""calibration fit / evaluate end to end on the tiny ONNX bundle of tests/fakebundle.py.

The fake model's map is mean_c |x - 128| / 128 and its score the map's max, so grey images with
Gaussian noise are good parts with a spread of scores, and a dark patch is a defect exactly where
it is drawn.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from scipy.stats import binom

from calibration.__main__ import main
from calibration.evaluate import evaluate
from calibration.fit import fit_thresholds
from edge.bundle import Bundle
from edge.postprocess import PostProcessor
from tests.fakebundle import make_bundle

SIZE = (32, 32)


def good_image(rng):
    sigma = rng.uniform(3, 10)
    img = 128 + rng.normal(0, sigma, (*SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def defect_image(rng, value=30, box=None):
    img = good_image(rng)
    x, y = rng.integers(4, 20, 2) if box is None else box[:2]
    w, h = (6, 6) if box is None else box[2:]
    img[y : y + h, x : x + w] = value
    mask = np.zeros(SIZE, np.uint8)
    mask[y : y + h, x : x + w] = 255
    return img, mask


def write_good(folder, n, seed=0):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:04d}.png"), good_image(rng))
    return folder


def write_mvtec(root, n_good, kinds=("blob",), n_def=6, seed=1, value=30, box=None):
    """MVTec layout: test/good, test/<kind>, ground_truth/<kind>/<name>_mask.png."""
    root = Path(root)
    write_good(root / "test" / "good", n_good, seed)
    rng = np.random.default_rng(seed + 100)
    for kind in kinds:
        (root / "test" / kind).mkdir(parents=True)
        (root / "ground_truth" / kind).mkdir(parents=True)
        for i in range(n_def):
            img, mask = defect_image(rng, value, box)
            cv2.imwrite(str(root / "test" / kind / f"{i:03d}.png"), img)
            cv2.imwrite(str(root / "ground_truth" / kind / f"{i:03d}_mask.png"), mask)
    return root


def tree_digest(folder) -> dict:
    """name -> sha256 of every file under folder (hidden and temporary files included)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def bundle(tmp_path):
    return make_bundle(tmp_path / "bundle", SIZE, with_thresholds=False)


# ------------------------------------------------------------------ fit
def test_fit_frr_writes_thresholds_edge_loads_and_backup(tmp_path, bundle, capsys):
    good = write_good(tmp_path / "good", 200)
    assert main(["fit", str(bundle), "--good", str(good), "--target-frr", "0.02", "-q"]) == 0
    out = capsys.readouterr()
    assert "thresholds.yaml: image threshold" in out.out and "report:" in out.out
    th = Bundle(bundle).thresholds()  # the device's loader accepts it
    assert th.method == "frr" and th.targets["target_frr"] == 0.02
    assert th.model_sha256 == Bundle(bundle).model_sha256("fp32")
    fs = th.stats["fit_set"]
    assert fs["good"] == 200 and fs["frr_upper_bound"] <= 0.02
    assert th.stats["region"]["rule"] == "tied"
    # Pixel threshold half-way between the good background and the image threshold.
    bg = th.stats["region"]["background"]
    assert th.pixel_threshold == pytest.approx(bg + 0.5 * (th.image_threshold - bg), rel=1e-6)
    assert (bundle / "report.html").is_file()
    assert not (bundle / "thresholds.yaml.bak").exists()

    first = (bundle / "thresholds.yaml").read_text()
    assert main(["fit", str(bundle), "--good", str(good), "--target-frr", "0.05", "-q"]) == 0
    assert (bundle / "thresholds.yaml.bak").read_text() == first
    assert Bundle(bundle).thresholds().targets["target_frr"] == 0.05


def test_fit_counts_are_edges_decisions(tmp_path, bundle):
    good = write_good(tmp_path / "good", 160)
    res = fit_thresholds(bundle, good=good, target_frr=0.05, write=False, progress=False)
    th = res.thresholds
    post = PostProcessor(th.image_threshold, th.pixel_threshold, th.min_region_area, SIZE)
    rejected = [
        post(m, s, (*SIZE, 3)).reject
        for m, s in zip(res.scored.maps, res.scored.scores, strict=True)
    ]
    assert sum(rejected) == th.stats["fit_set"]["false_rejects"]
    assert not res.warnings  # 160 >= 59 images needed for 5%
    assert not (bundle / "thresholds.yaml").exists()  # write=False


def test_fit_warns_when_too_few_good_images(tmp_path, bundle, capsys):
    good = write_good(tmp_path / "good", 40)
    assert main(["fit", str(bundle), "--good", str(good), "--target-frr", "0.02", "-q"]) == 0
    err = capsys.readouterr().err
    assert "40 good images cannot show FRR <= 0.02" in err and "149 are needed" in err


def test_fit_from_masks_catches_defects(tmp_path, bundle):
    data = write_mvtec(tmp_path / "cat", 150, kinds=("blob", "scratch"))
    res = fit_thresholds(bundle, data=data, target_frr=0.02, write=False, progress=False)
    th = res.thresholds
    region = th.stats["region"]
    assert region["rule"] == "fixed" and region["pixel_f1"] > 0.8
    # Above nearly all good noise, below the dark patches (map (128 - 30) / 128 = 0.77).
    assert th.stats["good_pixels"]["p99.9"] < th.pixel_threshold < 0.76
    fs = th.stats["fit_set"]
    assert fs["escapes"] == 0 and set(fs["per_defect"]) == {"blob", "scratch"}


@pytest.mark.parametrize("strategy", ["f1", "escape"])
def test_fit_with_defect_folder_and_masks(tmp_path, bundle, strategy):
    data = write_mvtec(tmp_path / "cat", 60)
    good = data / "test" / "good"
    defects, masks = data / "test" / "blob", data / "ground_truth" / "blob"
    res = fit_thresholds(
        bundle,
        good=good,
        defects=defects,
        masks=masks,
        strategy=strategy,
        write=False,
        progress=False,
    )
    fs = res.thresholds.stats["fit_set"]
    assert fs["defects"] == 6 and fs["escapes"] == 0
    assert res.thresholds.method == strategy


def test_region_test_catches_a_faint_broad_defect(tmp_path, bundle):
    """Without masks the tied pixel threshold lets a large faint patch (peak below the image
    threshold) be rejected by its region, as the device does."""
    good = write_good(tmp_path / "good", 150)
    res = fit_thresholds(bundle, good=good, target_frr=0.02, write=False, progress=False)
    th = res.thresholds
    # A 14x14 patch whose map value sits between the pixel and the image thresholds.
    level = (th.pixel_threshold + th.image_threshold) / 2
    img = np.full((*SIZE, 3), 128, np.uint8)
    img[8:22, 8:22] = int(round(128 - level * 128))
    amap = np.abs(img.astype(np.float32) - 128).mean(axis=2) / 128
    assert amap.max() < th.image_threshold and th.min_region_area <= 14 * 14
    post = PostProcessor(th.image_threshold, th.pixel_threshold, th.min_region_area, SIZE)
    assert post(amap, float(amap.max()), (*SIZE, 3)).reject


# ------------------------------------------------------------------ malformed input
def _empty(t, b):
    (t / "empty").mkdir()
    return ["--good", str(t / "empty")]


def _only_text(t, b):
    (t / "txt").mkdir()
    (t / "txt" / "a.txt").write_text("x")
    return ["--good", str(t / "txt")]


def _broken_png(t, b):
    g = write_good(t / "g", 5)
    (g / "zz_broken.png").write_bytes(b"not a png at all")
    return ["--good", str(g)]


def _tampered(t, b):
    with open(b / "model.onnx", "ab") as f:
        f.write(b"\0")
    return ["--good", str(write_good(t / "g", 5))]


def _removed(name):
    def make(t, b):
        (b / name).unlink()
        return ["--good", str(write_good(t / "g", 5))]

    return make


def _broken_mask(t, b):
    write_mvtec(t / "c", 5)
    (t / "c" / "ground_truth" / "blob" / "000_mask.png").write_text("junk")
    return ["--data", str(t / "c")]


def _with(*extra):
    return lambda t, b: ["--good", str(write_good(t / "g", 5)), *extra]


def _bad_sidecar(t, b):
    g = write_good(t / "g", 5)
    (g / "recalibration.json").write_text('{"crop": [1, 2]}')
    return ["--good", str(g)]


MALFORMED = {
    "malformed line-sample sidecar": (_bad_sidecar, "crop: expected [x, y, w, h]"),
    "empty folder": (_empty, "no images"),
    "only non-image files": (_only_text, "no images"),
    "unreadable image": (_broken_png, "zz_broken.png: not a readable image"),
    "missing folder": (lambda t, b: ["--good", str(t / "nope")], "not a directory"),
    "tampered model": (_tampered, "sha256 mismatch"),
    "missing model": (_removed("model.onnx"), "missing bundle file"),
    "missing manifest": (_removed("manifest.yaml"), "missing bundle manifest"),
    "bad target": (_with("--target-frr", "1.5"), "target-frr"),
    "f1 without defects": (_with("--strategy", "f1"), "needs defective images"),
    "unreadable mask": (_broken_mask, "000_mask.png: not a readable mask image"),
    "masks without defects": (_with("--masks", "/tmp"), "--masks needs --defects"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_input_errors_and_changes_no_file(tmp_path, case, capsys):
    bundle = make_bundle(tmp_path / "bundle", SIZE)  # with a thresholds.yaml to protect
    (bundle / "report.html").write_text("<html>old report</html>")
    make_args, message = MALFORMED[case]
    args = make_args(tmp_path, bundle)
    before = tree_digest(bundle)
    assert main(["fit", str(bundle), *args, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert tree_digest(bundle) == before


def test_non_image_files_beside_images_are_skipped_with_a_warning(tmp_path, bundle, capsys):
    good = write_good(tmp_path / "good", 20)
    (good / "labels.json").write_text("{}")
    assert main(["fit", str(bundle), "--good", str(good), "--target-frr", "0.1", "-q"]) == 0
    assert "ignored 1 files that are not images by name (labels.json)" in capsys.readouterr().err


def test_a_broken_previous_thresholds_file_is_replaced_and_kept(tmp_path, bundle):
    (bundle / "thresholds.yaml").write_text("image_threshold: [oops\n")
    good = write_good(tmp_path / "good", 30)
    assert main(["fit", str(bundle), "--good", str(good), "--target-frr", "0.1", "-q"]) == 0
    assert (bundle / "thresholds.yaml.bak").read_text() == "image_threshold: [oops\n"
    assert Bundle(bundle).thresholds().method == "frr"


# ------------------------------------------------------------------ evaluate
def test_evaluate_without_thresholds_reports_rates_absent(tmp_path, bundle):
    data = write_mvtec(tmp_path / "cat", 20, kinds=("blob", "scratch"))
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(bundle), "--data", str(data), "--json", str(out), "-q"]) == 0
    res = yaml.safe_load(out.read_text())
    assert res["image_auroc"] == pytest.approx(1.0) and res["pro"] > 0.9
    assert res["pixel_auroc"] > 0.95 and res["f1_max"] == pytest.approx(1.0)
    for key in ("thresholds", "f1", "false_reject_rate", "escape_rate", "frr_upper_bound"):
        assert key in res and res[key] is None
    assert res["per_defect"]["blob"]["escape_rate"] is None
    assert res["per_defect"]["scratch"]["image_auroc"] == pytest.approx(1.0)


def test_evaluate_rates_use_edges_decision_region_test_included(tmp_path):
    """A faint broad patch: score below the image threshold, region above the pixel threshold.
    A score-only count would call it an escape; the device rejects it."""
    bundle = make_bundle(
        tmp_path / "b",
        SIZE,
        thresholds={"image_threshold": 0.6, "pixel_threshold": 0.3, "min_region_area": 20},
    )
    # value 64 -> map 0.5 over a 10x10 patch: 100 px > 0.3, peak 0.5 < 0.6.
    data = write_mvtec(tmp_path / "cat", 10, n_def=4, value=64, box=(8, 8, 10, 10))
    ev = evaluate(bundle, data, progress=False)
    s = ev.summary
    assert s["escape_rate"] == 0.0 and s["escapes"] == 0
    assert all(ev.scored.scores[~ev.scored.good] < 0.6)  # the score alone would pass them
    assert s["false_reject_rate"] == 0.0 and s["f1"] == pytest.approx(1.0)
    assert s["per_defect"]["blob"]["escape_rate"] == 0.0


def test_fit_on_half_holds_on_the_other_half(tmp_path, bundle):
    """The acceptance check on the fake model: fit frr 0.02 on 200 good images, then the
    realised false-reject rate of edge's decision on 200 others is inside the binomial 95%
    interval of the target or below it."""
    fit_dir = write_good(tmp_path / "fit", 200, seed=10)
    data = write_mvtec(tmp_path / "held", 200, seed=20)
    assert main(["fit", str(bundle), "--good", str(fit_dir), "--target-frr", "0.02", "-q"]) == 0
    ev = evaluate(bundle, data, progress=False).summary
    _, hi = binom.interval(0.95, 200, 0.02)
    assert ev["false_rejects"] <= hi
    assert ev["false_reject_rate"] is not None


# ------------------------------------------------------------------ station view
def test_fit_uses_the_station_crop_and_roi(tmp_path):
    bundle = make_bundle(tmp_path / "b", SIZE, with_thresholds=False)
    frames = bordered_frames(tmp_path / "frames", 60)
    roi = np.full(SIZE, 255, np.uint8)
    roi[:, :4] = 0
    cv2.imwrite(str(tmp_path / "roi.png"), roi)
    station = tmp_path / "station.yaml"
    station.write_text(
        f"bundle: {bundle}\nsource: {{uri: 'file://{frames}/'}}\n"
        "preprocess: {crop: [32, 16, 32, 32]}\npostprocess: {roi_mask: roi.png}\n"
    )
    res = fit_thresholds(
        bundle, good=frames, station=station, target_frr=0.1, write=False, progress=False
    )
    th = res.thresholds
    assert th.image_threshold < 0.5  # the black border was cropped away
    assert th.stats["station"]["crop"] == [32, 16, 32, 32] and th.stats["station"]["roi"]


def bordered_frames(folder, n, seed=3):
    """Frames 64x96, black outside the 32x32 part at x=32, y=16 (black maps to 1 if not cropped)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        big = np.zeros((64, 96, 3), np.uint8)
        big[16:48, 32:64] = good_image(rng)
        cv2.imwrite(str(folder / f"20261122T030000.{i:06d}Z_{i}_p{i}.png"), big)
    return folder


def test_fit_on_a_station_sample_of_accepted_frames_uses_its_crop(tmp_path, bundle, capsys):
    """The folder edge keeps for recalibration: raw frames + recalibration.json (crop, model)."""
    sample = bordered_frames(tmp_path / "recalibration", 40)
    (sample / "recalibration.json").write_text(
        json.dumps({"station": "s1", "line": "l1", "crop": [32, 16, 32, 32], "note": "raw"})
    )
    assert main(["fit", str(bundle), "--good", str(sample), "--target-frr", "0.1", "-q"]) == 0
    assert "ignored" not in capsys.readouterr().err  # the sidecar is expected, not junk
    th = Bundle(bundle).thresholds()
    assert th.image_threshold < 0.5  # the black border was cropped away
    assert th.stats["line_sample"] == {"station": "s1", "line": "l1", "crop": [32, 16, 32, 32]}
    # Refit on the same accepted frames: all of them are below the threshold now in force.
    assert main(["fit", str(bundle), "--good", str(sample), "--target-frr", "0.1", "-q"]) == 0
    assert "cannot raise the threshold" in capsys.readouterr().err


def test_edge_run_refuses_a_bundle_without_thresholds(tmp_path):
    bundle = make_bundle(tmp_path / "b", SIZE, with_thresholds=False)
    frames = write_good(tmp_path / "frames", 2)
    station = tmp_path / "station.yaml"
    station.write_text(
        f"bundle: {bundle}\nbackend: onnxruntime\nsource: {{uri: 'file://{frames}/'}}\n"
        "mqtt: {host: 127.0.0.1, port: 1, connect_timeout_s: 1}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "edge", "run", str(station)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert "thresholds.yaml: missing" in proc.stderr and "calibration fit" in proc.stderr
