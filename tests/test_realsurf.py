"""Surface-aware painter, the real-surface set, and `train synth --from` on a user's images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from edge.errors import DataError
from train import painter, realsurf

ROOT = Path(__file__).resolve().parents[1]


def _photo(seed: int, shape=(96, 128)) -> np.ndarray:
    """A textured 'good part': smooth colour field plus grain, like a photographed surface."""
    rng = np.random.default_rng(seed)
    low = cv2.resize(rng.normal(0, 1, (6, 8, 3)).astype(np.float32), shape[::-1])
    img = 120 + 30 * low + rng.normal(0, 6, (*shape, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("defect", sorted(painter.PAINTERS))
def test_every_painter_changes_exactly_its_mask_and_is_visible(defect):
    good = _photo(0)
    bad, mask = painter.paint_defect(good, defect, np.random.default_rng(3))
    assert bad.shape == good.shape and mask.shape == good.shape[:2] and mask.dtype == np.uint8
    m = mask > 0
    assert m.any() and set(np.unique(mask)) <= {0, 255}
    # exact mask: nothing outside it changed; inside, the change is visible on this surface
    assert np.array_equal(bad[~m], good[~m])
    change = np.abs(bad.astype(int) - good.astype(int))[m].max(axis=1).mean()
    assert change >= 0.6 * painter.Surface(good.astype(np.float32)).std
    # inside the safe box, away from the frame border
    ys, xs = np.nonzero(m)
    h, w = m.shape
    assert ys.min() >= 0.12 * h - 1 and ys.max() < 0.88 * h + 1
    assert xs.min() >= 0.12 * w - 1 and xs.max() < 0.88 * w + 1
    # deterministic per generator seed
    again, mask2 = painter.paint_defect(good, defect, np.random.default_rng(3))
    assert np.array_equal(again, bad) and np.array_equal(mask2, mask)


def test_painter_colours_come_from_the_surface():
    # the same stain on a dark and on a bright surface: the change scales with each surface
    dark, bright = _photo(1) // 4, np.clip(_photo(1).astype(int) + 90, 0, 255).astype(np.uint8)
    for img in (dark, bright):
        out, mask = painter.paint_defect(img, "crack", np.random.default_rng(0))
        m = mask > 0
        assert out[m].mean() < img[m].mean()  # a crack is darker than the surface it is in
    with pytest.raises(ValueError, match="unknown defect"):
        painter.paint_defect(dark, "smudge", np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least 32"):
        painter.paint_defect(dark[:20, :20], "crack", np.random.default_rng(0))


def test_generate_real_is_deterministic_with_disjoint_bands(tmp_path):
    kw = dict(categories=["moon"], image_size=64, train_good=2, test_good=2, test_defect=1)
    a = realsurf.generate_real(tmp_path / "a", progress=False, **kw)
    realsurf.generate_real(tmp_path / "b", progress=False, **kw)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 2 + 2 + 2 * len(painter.PAINTERS)  # defect images + their masks
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert a["categories"] == ["moon"] and a["defects"] == list(painter.PAINTERS)
    # the held-out check's photos are never sources
    assert not {"brick", "gravel", "grass", "cell"} & set(realsurf.SOURCES)
    with pytest.raises(DataError, match="unknown real surface"):
        realsurf.generate_real(tmp_path / "c", categories=["nope"], progress=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train", "synth", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_synth_from_a_folder_of_own_images(tmp_path):
    src = tmp_path / "mine"
    src.mkdir()
    for i in range(6):
        cv2.imwrite(str(src / f"part{i}.jpg"), _photo(i))
    out = tmp_path / "set"
    r = _cli(str(out), "--from", str(src), "--test-defect", "2")
    assert r.returncode == 0, r.stderr
    meta = yaml.safe_load((out / "meta.yaml").read_text())
    train = sorted((out / "train" / "good").iterdir())
    test = sorted((out / "test" / "good").iterdir())
    assert len(train) + len(test) == 6 and len(test) == meta["counts"]["test_good"] == 2
    assert not {p.name for p in train} & {p.name for p in test}
    for d in painter.PAINTERS:
        imgs = sorted((out / "test" / d).glob("*.png"))
        masks = sorted((out / "ground_truth" / d).glob("*_mask.png"))
        assert len(imgs) == len(masks) == 2
        img = cv2.imread(str(imgs[0]))
        assert img.shape == (96, 128, 3)  # the user's images keep their size


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "no images"),
        (lambda d: (d / "a.png").write_bytes(b"not a png"), "a.png: not a readable image"),
        (
            lambda d: [cv2.imwrite(str(d / n), _photo(0, (20, 20))) for n in ("a.png", "b.png")],
            "too small",
        ),
    ],
)
def test_synth_from_refuses_bad_input_in_one_line(tmp_path, setup, message):
    src = tmp_path / "mine"
    src.mkdir()
    setup(src)
    if message != "no images":
        cv2.imwrite(str(src / "z_ok.png"), _photo(1))
    r = _cli(str(tmp_path / "out"), "--from", str(src))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))
