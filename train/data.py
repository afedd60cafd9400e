"""Good-image datasets for training: MVTec category dir (uses train/good) or a plain folder.

Images go through edge.preprocess.to_input, exactly what the device does, then become float
tensors of raw pixels (the model normalises inside its graph).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from edge.errors import DataError
from edge.preprocess import list_images, read_image, to_input

# Augmentations that cannot turn a good part into a plausible defect *for some parts only*: a
# flip is harmless for isotropic textures (carpet, grid, wood) but makes a misoriented part look
# normal for objects (transistor, screw), so none is on by default and each is opt-in.
# rot90 (a random quarter turn) suits textures and parts that come down the line in any
# orientation; with flips it gives all 8 symmetries of the square.
AUGMENTATIONS = ("hflip", "vflip", "rot90")


def good_image_dir(data: str | Path) -> Path:
    """MVTec category dir -> its train/good; a plain folder -> itself. Raises DataError."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: data folder does not exist")
    mvtec = data / "train" / "good"
    return mvtec if mvtec.is_dir() else data


def list_good_images(data: str | Path) -> list[Path]:
    """Sorted good-image files of an MVTec category dir or plain folder. Raises DataError."""
    return list_images(good_image_dir(data))


def fingerprint(files: list[Path]) -> str:
    """sha256 over the sorted file names and the sha256 of each file's bytes (provenance)."""
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.name):
        try:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError as exc:
            raise DataError(f"{p}: cannot read: {exc.strerror or exc}") from exc
        h.update(p.name.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


def split(files: list[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """Deterministic train/validation split of good images.

    Files are ranked by the sha1 of their name, so the split depends on neither the seed nor the
    listing order, and adding images keeps existing ones on their side. At least one image
    stays on each side when there are two or more and val_fraction > 0.

    Returns: (train files, val files), each sorted by name.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * len(files)))
    if val_fraction > 0 and len(files) >= 2:
        n_val = min(max(n_val, 1), len(files) - 1)
    else:
        n_val = 0
    files = sorted(files, key=lambda p: p.name)
    ranked = sorted(files, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())
    val = set(ranked[:n_val])
    return [p for p in files if p not in val], [p for p in files if p in val]


class GoodImages(Dataset):
    """Images -> float32 (3,S,S) RGB 0..255 tensors.

    Args:
        files: image paths.
        image_size: S (square model input).
        augment: subset of AUGMENTATIONS, applied with probability 0.5 each (uses torch's RNG,
            so the fit seed makes it reproducible).
        cache: keep decoded uint8 images in memory (60 images at 256 = 12 MB); decode once.
        crop: return a random crop x crop window of the S x S input (0 = the whole input).
            The models are fully convolutional, so a window is a smaller view of the same
            surface: at half the side a sample costs a quarter, and a CPU budget buys four
            times the (more varied) samples. Uses torch's RNG, like `augment`. An epoch then
            draws (S // crop)^2 windows per image, so it still covers about the images' area.
    """

    def __init__(
        self,
        files: list[Path],
        image_size: int,
        augment: list[str] | tuple[str, ...] = (),
        cache: bool = True,
        crop: int = 0,
    ):
        bad = sorted(set(augment) - set(AUGMENTATIONS))
        if bad:
            raise ValueError(f"unknown augmentation {bad} (valid: {', '.join(AUGMENTATIONS)})")
        self.files = list(files)
        self.size = (int(image_size), int(image_size))
        self.augment = tuple(augment)
        if not 0 <= crop <= image_size:
            raise ValueError(f"crop must be in 0..{image_size} (the image size), got {crop}")
        self.crop = int(crop)
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        repeats = (self.size[0] // self.crop) ** 2 if self.crop else 1
        return len(self.files) * repeats

    def load(self, i: int) -> np.ndarray:
        """(3,S,S) uint8 RGB of image i (what the device would feed the graph)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img = to_input(read_image(self.files[i]), self.size)
        if self._cache is not None:
            self._cache[i] = img
        return img

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(self.load(i % len(self.files))).float()  # (3,S,S) 0..255
        if self.crop and self.crop < x.shape[-1]:
            y0, x0 = (int(v) for v in torch.randint(0, x.shape[-1] - self.crop + 1, (2,)))
            x = x[:, y0 : y0 + self.crop, x0 : x0 + self.crop]
        if "hflip" in self.augment and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if "vflip" in self.augment and torch.rand(()) < 0.5:
            x = x.flip(-2)
        if "rot90" in self.augment:
            x = torch.rot90(x, int(torch.randint(0, 4, ())), (-2, -1))
        return x


def load_good_images(
    data: str | Path,
    image_size: int,
    val_fraction: float = 0.1,
    augment: list[str] | tuple[str, ...] = (),
    crop: int = 0,
) -> tuple[GoodImages, GoodImages, dict]:
    """Training and validation sets plus provenance (`augment` and `crop` apply to the
    training set only: see GoodImages).

    Every image is decoded once here, so an unreadable file fails now, naming it.

    Returns:
        (train set, val set (never augmented), {"data_dir", "data_fingerprint", "images",
        "train_images", "val_images"}).
    Raises:
        DataError naming the folder or file: missing/empty folder, unreadable image.
    """
    folder = good_image_dir(data)
    files = list_images(folder)
    train_files, val_files = split(files, val_fraction)
    train = GoodImages(train_files, image_size, augment, crop=crop)
    val = GoodImages(val_files, image_size)
    for ds in (train, val):
        for i in range(len(ds.files)):
            ds.load(i)
    info = {
        "data_dir": str(folder),
        "data_fingerprint": fingerprint(files),
        "images": len(files),
        "train_images": len(train_files),
        "val_images": len(val_files),
    }
    return train, val, info
