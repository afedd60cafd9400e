"""Synthetic line-data generator: determinism, MVTec layout, masks, errors, line replay."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from train import synth

SMALL = dict(image_size=64, train_good=2, test_good=1, test_defect=1, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_registries_cover_the_brief():
    assert len(synth.CATEGORIES) >= 3
    assert {"scratch", "spot", "crack", "missing"} <= set(synth.DEFECTS)


def test_generate_is_byte_identical_across_runs(tmp_path):
    a = synth.generate(tmp_path / "a", seed=3, **SMALL)
    b = synth.generate(tmp_path / "b", seed=3, **SMALL)
    assert a == b
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa.keys() == fb.keys() and fa == fb
    c = synth.generate(tmp_path / "c", seed=4, **SMALL)
    assert c["seed"] == 4 and _files(tmp_path / "c") != fa


def test_subsets_are_stable(tmp_path):
    # Per-image rng streams: asking for fewer images or categories never changes the others.
    big = dict(SMALL, train_good=3)
    synth.generate(tmp_path / "all", **big)
    synth.generate(tmp_path / "one", categories=["pcb"], defects=["crack"], **SMALL)
    for rel in ("pcb/train/good/000.png", "pcb/train/good/001.png", "pcb/test/crack/000.png"):
        assert (tmp_path / "all" / rel).read_bytes() == (tmp_path / "one" / rel).read_bytes()


def test_mvtec_layout_and_masks(tmp_path):
    out = tmp_path / "set"
    meta = synth.generate(out, seed=1, **dict(SMALL, test_defect=2))
    assert yaml.safe_load((out / "meta.yaml").read_text()) == meta
    assert meta["image_size"] == 64 and meta["version"] == synth.GENERATOR_VERSION
    assert set(meta["categories"]) == set(synth.CATEGORIES)
    for cat in synth.CATEGORIES:
        assert sorted(p.name for p in (out / cat / "train/good").iterdir()) == [
            "000.png",
            "001.png",
        ]
        assert [p.name for p in (out / cat / "test/good").iterdir()] == ["000.png"]
        assert not (out / cat / "ground_truth/good").exists()
        assert {p.name for p in (out / cat / "test").iterdir()} == {"good", *synth.DEFECTS}
        for defect in synth.DEFECTS:
            imgs = sorted((out / cat / "test" / defect).glob("*.png"))
            assert [p.name for p in imgs] == ["000.png", "001.png"]
            for p in imgs:
                img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
                mask_path = out / cat / "ground_truth" / defect / f"{p.stem}_mask.png"
                mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
                assert img.shape == (64, 64, 3) and img.dtype == np.uint8
                assert mask.shape == (64, 64) and mask.dtype == np.uint8
                assert set(np.unique(mask)) == {0, 255}, f"{cat}/{defect}: empty or non-binary"


def test_rerun_with_fewer_images_drops_stale_files(tmp_path):
    synth.generate(tmp_path, categories=["pcb"], defects=["spot"], **dict(SMALL, test_defect=3))
    synth.generate(tmp_path, categories=["pcb"], defects=["spot"], **SMALL)
    assert len(list((tmp_path / "pcb/test/spot").glob("*.png"))) == 1
    assert len(list((tmp_path / "pcb/ground_truth/spot").glob("*.png"))) == 1


@pytest.mark.parametrize("category", sorted(synth.CATEGORIES))
def test_defects_alter_exactly_the_masked_pixels(category):
    for k, defect in enumerate(synth.DEFECTS):
        rng = np.random.default_rng([11, k])
        good = synth.render_part(category, rng, 128)
        bad, mask = synth.add_defect(good, defect, rng)
        assert bad.shape == good.shape and bad.dtype == np.uint8 and mask.shape == (128, 128)
        inside = mask > 0
        diff = np.abs(bad.astype(np.int16) - good.astype(np.int16)).max(axis=2)
        assert 0.0005 < inside.mean() < 0.06, f"{category}/{defect} area {inside.mean():.4f}"
        assert diff[inside].mean() > 15, f"{category}/{defect} too faint"
        assert np.array_equal(bad[~inside], good[~inside]), f"{category}/{defect} leaks outside"


def test_good_parts_vary_but_stay_one_product():
    for cat in synth.CATEGORIES:
        a = synth.render_part(cat, np.random.default_rng(1), 96)
        b = synth.render_part(cat, np.random.default_rng(2), 96)
        assert a.shape == (96, 96, 3) and a.dtype == np.uint8
        assert not np.array_equal(a, b)  # texture and nuisance differ per instance ...
        assert abs(float(a.mean()) - float(b.mean())) < 20  # ... but it is the same product
        assert np.array_equal(synth.render_part(cat, np.random.default_rng(1), 96), a)


def test_unknown_names_raise_value_error(tmp_path):
    img = synth.render_part("pcb", np.random.default_rng(0), 64)
    with pytest.raises(ValueError, match="'granite'.*brushed_metal"):
        synth.render_part("granite", np.random.default_rng(0), 64)
    with pytest.raises(ValueError, match="'dent'.*scratch"):
        synth.add_defect(img, "dent", np.random.default_rng(0))
    with pytest.raises(ValueError, match="granite"):
        synth.generate(tmp_path, categories=["granite"], **SMALL)
    with pytest.raises(ValueError, match="dent"):
        synth.generate(tmp_path, defects=["dent"], **SMALL)
    with pytest.raises(ValueError, match="granite"):
        synth.generate_line_sequence(tmp_path, "granite", 2, 0.5, image_size=64)
    with pytest.raises(ValueError, match="defect_rate"):
        synth.generate_line_sequence(tmp_path, "pcb", 2, 1.5, image_size=64)
    assert not list(tmp_path.rglob("*.png"))  # validation happens before anything is written


def test_line_sequence_labels(tmp_path):
    labels = synth.generate_line_sequence(tmp_path / "line", "woven_fabric", 12, 0.4, 64, seed=5)
    assert labels == json.loads((tmp_path / "line/labels.json").read_text())
    assert [r["frame"] for r in labels] == [f"{i:05d}.png" for i in range(12)]
    assert [r["index"] for r in labels] == list(range(12))
    assert 0 < sum(r["defective"] for r in labels) < 12
    for r in labels:
        assert (tmp_path / "line" / r["frame"]).is_file()
        if r["defective"]:
            assert r["defect"] in synth.DEFECTS and r["mask"] == f"masks/{r['frame'][:5]}_mask.png"
            assert cv2.imread(str(tmp_path / "line" / r["mask"]), cv2.IMREAD_GRAYSCALE).max() == 255
        else:
            assert r["defect"] is None and r["mask"] is None
    assert len(list((tmp_path / "line/masks").iterdir())) == sum(r["defective"] for r in labels)
    # Deterministic, and the line's parts are not the training images.
    again = synth.generate_line_sequence(tmp_path / "again", "woven_fabric", 12, 0.4, 64, seed=5)
    assert again == labels
    assert _files(tmp_path / "line") == _files(tmp_path / "again")
    synth.generate(tmp_path / "set", categories=["woven_fabric"], seed=5, **SMALL)
    train0 = (tmp_path / "set/woven_fabric/train/good/000.png").read_bytes()
    assert (tmp_path / "line/00000.png").read_bytes() != train0
    none = synth.generate_line_sequence(tmp_path / "n", "pcb", 3, 0.0, 64)
    every = synth.generate_line_sequence(tmp_path / "e", "pcb", 3, 1.0, 64)
    assert not any(r["defective"] for r in none) and all(r["defective"] for r in every)
