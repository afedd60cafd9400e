"""Real photographed surfaces with painted defects, in the MVTec AD layout.

Two uses of `train.painter` on real pixels:

* `generate_real(out)`: the models benchmark's real-surface set. Parts are crops of photographs
  that ship inside PyPI packages (so the set rebuilds offline, byte-identically): scikit-image's
  `moon` (regolith), `ihc` (stained tissue), `hubble_deep_field` (star field) and `retina`
  (fundus). Train crops come from the top 60 % of each photo and test crops from the bottom
  40 %, so no test pixel was ever seen in training; each crop gets the part-to-part variation a
  line camera sees (quarter turns and flips, scale +-8 %, exposure +-8 %, sensor noise).
* `paint_folder(src, out)`: a user's own good images, split into train/test by a hash of the
  file name, with masked defects painted on copies of the held-out ones, so escapes can be
  estimated and thresholds calibrated before a single real defect has been collected.

scikit-image's texture photos `brick`, `gravel`, `grass` and `cell` are deliberately not used:
an independent held-out accuracy check is built from them.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import zlib
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from edge.errors import DataError
from edge.preprocess import list_images, read_image
from train.painter import PAINTERS, paint_defect
from train.synth import _clear_pngs

REAL_VERSION = "1.0"

# name -> (package data file, region (x0, y0, x1, y1) as fractions of the photo, crop px).
# Crop sizes put a part at a similar physical scale in every photo; regions skip the black
# surround of the fundus photo.
SOURCES: dict[str, tuple[str, tuple[float, float, float, float], int]] = {
    "moon": ("moon.png", (0.0, 0.0, 1.0, 1.0), 176),
    "ihc": ("ihc.png", (0.0, 0.0, 1.0, 1.0), 176),
    "hubble": ("hubble_deep_field.jpg", (0.0, 0.0, 1.0, 1.0), 256),
    "retina": ("retina.jpg", (0.22, 0.22, 0.78, 0.78), 300),
}
_TRAIN_BAND = 0.6  # train crops from rows [0, 0.6) of the region, test crops from [0.6, 1)
MIN_SIDE = 32


def _photo(name: str) -> np.ndarray:
    """(H,W,3) uint8 BGR photo shipped by scikit-image. Raises DataError when not installed."""
    file = SOURCES[name][0]
    try:
        path = importlib.resources.files("skimage") / "data" / file
    except ModuleNotFoundError as exc:
        raise DataError(
            "the real-surface set needs scikit-image (pip install scikit-image)"
        ) from exc
    return read_image(str(path))


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    return np.random.default_rng(
        [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else k for k in keys]
    )


def _crop(photo: np.ndarray, name: str, band: str, size: int, rng: np.random.Generator):
    """One part: a random crop inside the band, with camera-like variation. (S,S,3) uint8."""
    _, (fx0, fy0, fx1, fy1), crop = SOURCES[name]
    h, w = photo.shape[:2]
    x0, x1 = int(fx0 * w), int(fx1 * w)
    y0, y1 = int(fy0 * h), int(fy1 * h)
    ysplit = y0 + int(_TRAIN_BAND * (y1 - y0))
    y0, y1 = (y0, ysplit) if band == "train" else (ysplit, y1)
    c = int(round(crop * rng.uniform(0.92, 1.08)))
    c = min(c, x1 - x0, y1 - y0)
    x = int(rng.integers(x0, x1 - c + 1))
    y = int(rng.integers(y0, y1 - c + 1))
    part = cv2.resize(photo[y : y + c, x : x + c], (size, size), interpolation=cv2.INTER_AREA)
    part = np.rot90(part, int(rng.integers(4)))
    if rng.random() < 0.5:
        part = part[:, ::-1]
    part = part.astype(np.float32) * rng.uniform(0.92, 1.08) + rng.normal(0, 2.0, part.shape)
    return np.clip(np.rint(part), 0, 255).astype(np.uint8)


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise DataError(f"{path}: could not write")


def _write_defects(
    root: Path, goods: list[np.ndarray], defects: list[str], per_defect: int, rng_of
) -> None:
    """test/<defect>/NNN.png + ground_truth/<defect>/NNN_mask.png, painted on copies of goods
    (taken in turn across defects, so with enough goods every defect has parts of its own)."""
    for j, d in enumerate(defects):
        _clear_pngs(root / "test" / d, "*.png")
        _clear_pngs(root / "ground_truth" / d, "*.png")
        for i in range(per_defect):
            img, mask = paint_defect(goods[(j * per_defect + i) % len(goods)], d, rng_of(d, i))
            _write(root / "test" / d / f"{i:03d}.png", img)
            _write(root / "ground_truth" / d / f"{i:03d}_mask.png", mask)


def generate_real(
    out: str | Path,
    categories: list[str] | None = None,
    image_size: int = 256,
    train_good: int = 60,
    test_good: int = 30,
    test_defect: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write the real-surface set under `out` (one MVTec category per photo) + meta.yaml."""
    cats = list(SOURCES) if categories is None else list(categories)
    unknown = sorted(set(cats) - set(SOURCES))
    if unknown:
        raise DataError(f"unknown real surface {unknown} (valid: {', '.join(SOURCES)})")
    if image_size < MIN_SIDE or min(train_good, test_good, test_defect) < 0:
        raise DataError("image_size must be >= 32 and the counts >= 0")
    out = Path(out)
    defects = list(PAINTERS)
    total = len(cats) * (train_good + test_good + test_defect * len(defects))
    with tqdm(total=total, desc="real surfaces", unit="img", disable=not progress) as bar:
        for cat in cats:
            photo, root = _photo(cat), out / cat
            for band, split, n in (
                ("train", "train/good", train_good),
                ("test", "test/good", test_good),
            ):
                _clear_pngs(root / split, "*.png")
                for i in range(n):
                    _write(
                        root / split / f"{i:03d}.png",
                        _crop(photo, cat, band, image_size, _rng(seed, cat, split, i)),
                    )
                    bar.update()
            # Defects go on parts of their own (not on the test/good ones): a defect image and
            # its good twin in one test set would make the test easier than the line.
            goods = [
                _crop(photo, cat, "test", image_size, _rng(seed, cat, "defect-base", i))
                for i in range(test_defect * len(defects))
            ]
            _write_defects(
                root, goods, defects, test_defect, lambda d, i, c=cat: _rng(seed, c, d, i)
            )
            bar.update(test_defect * len(defects))
    meta = {
        "generator": "train.realsurf",
        "version": REAL_VERSION,
        "seed": int(seed),
        "image_size": int(image_size),
        "categories": cats,
        "defects": defects,
        "counts": {"train_good": train_good, "test_good": test_good, "test_defect": test_defect},
        "layout": "mvtec_ad",
    }
    (out / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return meta


def paint_folder(
    src: str | Path,
    out: str | Path,
    test_fraction: float = 0.3,
    test_defect: int = 5,
    defects: list[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """A user's folder of good images -> MVTec layout with painted, masked defects.

    Images keep their size. The split into train/good and test/good ranks files by a hash of
    their name (adding images keeps the others where they were); defects are painted on copies
    of the test/good images, so nothing painted was seen in training.

    Raises:
        DataError naming the folder or file: no images, fewer than 2, unreadable or smaller
            than 32 px on a side; a bad fraction or count.
    """
    src, out = Path(src), Path(out)
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if test_defect < 1:
        raise DataError(f"test_defect must be >= 1, got {test_defect}")
    defs = list(PAINTERS) if defects is None else list(defects)
    unknown = sorted(set(defs) - set(PAINTERS))
    if unknown:
        raise DataError(f"unknown defect {unknown} (valid: {', '.join(PAINTERS)})")
    files = list_images(src)
    if len(files) < 2:
        raise DataError(f"{src}: needs at least 2 good images (train and test), found {len(files)}")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise DataError(f"{out}: must not be inside the source folder {src}")
    images = {}
    for f in files:
        img = read_image(f)
        if min(img.shape[:2]) < MIN_SIDE:
            raise DataError(f"{f}: {img.shape[1]}x{img.shape[0]} px is too small (min {MIN_SIDE})")
        images[f] = img
    ranked = sorted(files, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())
    n_test = min(max(1, int(round(test_fraction * len(files)))), len(files) - 1)
    test = sorted(ranked[:n_test])
    train = sorted(ranked[n_test:])
    bar = tqdm(total=len(files) + len(defs) * test_defect, desc="paint", disable=not progress)
    for split, group in (("train/good", train), ("test/good", test)):
        _clear_pngs(out / split, "*.png")
        for f in group:
            _write(out / split / f"{f.stem}.png", images[f])
            bar.update()
    goods = [images[f] for f in test]
    _write_defects(out, goods, defs, test_defect, lambda d, i: _rng(seed, "from", d, i))
    bar.update(len(defs) * test_defect)
    bar.close()
    meta = {
        "generator": "train.realsurf.paint_folder",
        "version": REAL_VERSION,
        "source": str(src),
        "seed": int(seed),
        "defects": defs,
        "counts": {"train_good": len(train), "test_good": len(test), "test_defect": test_defect},
        "layout": "mvtec_ad",
    }
    (out / "meta.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return meta
