"""The bundle: the directory contract between engines (writer), calibration and edge (readers).

    bundle/manifest.yaml    what the model is, its I/O, sha256 of every shipped file, provenance
    bundle/model.onnx       uint8 NCHW RGB in; normalisation, anomaly map, smoothing, score inside
    bundle/thresholds.yaml  written by calibration (outside the graph: recalibrating needs no rebuild)

Every file is verified against the manifest's sha256 when it is opened, so a tampered or truncated
model never reaches a backend.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from edge import typedconfig
from edge.atomic import atomic_write
from edge.errors import BundleError, ConfigError, InvalidValue

MANIFEST = "manifest.yaml"
THRESHOLDS = "thresholds.yaml"
FORMAT = "lineinspect-bundle/1"
# Graph file per precision. fp32 is always present; the others are written by `engines quantize`.
PRECISION_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


@dataclass
class InputSpec:
    height: int
    width: int
    name: str = "image"
    batch: int = 1
    dtype: str = "uint8"
    layout: str = "NCHW"
    color: str = "RGB"


@dataclass
class OutputSpec:
    anomaly_map: str = "anomaly_map"  # float32 (B,1,H,W) at input resolution
    score: str = "score"  # float32 (B,)


@dataclass
class FileEntry:
    sha256: str
    bytes: int


@dataclass
class Manifest:
    name: str
    model: str  # registry name: stpm, dskd, mtkd
    backbone: str
    input: InputSpec
    files: dict[str, FileEntry]
    format: str = FORMAT
    version: str = "1"
    outputs: OutputSpec = field(default_factory=OutputSpec)
    model_args: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.format != FORMAT:
            raise InvalidValue(
                f"format: unsupported bundle format {self.format!r}, want {FORMAT!r}"
            )


@dataclass
class Thresholds:
    image_threshold: float  # score above this -> reject
    pixel_threshold: float  # anomaly-map value above this -> defective pixel
    min_region_area: int = 0  # regions smaller than this (pixels at model resolution) are ignored
    method: str = "frr"
    model_sha256: str = ""  # sha256 of the graph these were fitted on
    precision: str = "fp32"
    targets: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def validate(self) -> None:
        if self.min_region_area < 0:
            raise InvalidValue(f"min_region_area: must be >= 0, got {self.min_region_area}")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_member(root: Path, name: str, manifest: Path) -> None:
    """Refuse a manifest entry that is not a plain file path inside the bundle.

    A manifest comes with the bundle, from wherever the bundle came from: an entry such as
    `../../x`, `/etc/shadow` or a symlink would make the station read, and deploy copy, a file
    outside the bundle (and deploy write it outside its release).
    """
    path = PurePosixPath(name)
    why = ""
    if not name or any(ord(c) < 32 or c in "\\\x7f" for c in name):
        why = "an empty name, or one with a control character or backslash"
    elif path.is_absolute():
        why = "an absolute path"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        why = "a path with '..', '.' or an empty part"
    else:
        at = root
        for part in path.parts:  # no link anywhere on the way: the file is in the bundle
            at = at / part
            if at.is_symlink():
                why = f"a symlink ({at.relative_to(root)})"
                break
    if why:
        raise BundleError(
            f"{manifest}: files: {name!r} is {why}; bundle files must be plain relative paths "
            "inside the bundle"
        )


class Bundle:
    """A verified bundle directory.

    Args:
        root: bundle directory.
    Raises:
        BundleError: missing manifest or file, or a file whose hash differs from the manifest.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise BundleError(f"{self.root}: bundle directory not found")
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{mpath}: missing bundle manifest")
        try:
            self.manifest = typedconfig.load(Manifest, mpath)
        except ConfigError as exc:
            raise BundleError(str(exc)) from exc
        if "model.onnx" not in self.manifest.files:
            raise BundleError(f"{mpath}: files: no entry for model.onnx")
        for name in self.manifest.files:
            check_member(self.root, name, mpath)
        for name in self.manifest.files:
            if not (self.root / name).is_file():
                raise BundleError(f"{self.root / name}: missing bundle file (listed in {MANIFEST})")

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) the graph takes."""
        return self.manifest.input.height, self.manifest.input.width

    def verify(self, name: str) -> Path:
        """Path of bundle file `name` after checking its sha256 against the manifest."""
        entry = self.manifest.files.get(name)
        path = self.root / name
        if entry is None:
            raise BundleError(f"{path}: not listed in {self.root / MANIFEST}")
        if not path.is_file():
            raise BundleError(f"{path}: missing bundle file (listed in {MANIFEST})")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise BundleError(
                f"{path}: sha256 mismatch, manifest says {entry.sha256}, file has {actual} "
                "(tampered or corrupted; re-export the bundle)"
            )
        return path

    def verify_all(self) -> None:
        for name in self.manifest.files:
            self.verify(name)

    def model_path(self, precision: str = "fp32") -> Path:
        """Verified ONNX graph for `precision` (fp32, fp16, int8)."""
        if precision not in PRECISION_FILES:
            raise BundleError(
                f"unknown precision {precision!r}, expected one of {list(PRECISION_FILES)}"
            )
        name = PRECISION_FILES[precision]
        if name not in self.manifest.files:
            check = self.manifest.quantization.get("decision_check", {}).get(precision)
            if check and not check.get("passed", True):
                why = "; ".join(check.get("failures", []))
                raise BundleError(
                    f"{self.root / name}: no {precision} graph in this bundle: `engines quantize` "
                    f"refused it (it decided unlike FP32: {why})"
                )
            raise BundleError(
                f"{self.root / name}: no {precision} graph in this bundle (run `engines quantize`)"
            )
        return self.verify(name)

    def model_sha256(self, precision: str = "fp32") -> str:
        return self.manifest.files[PRECISION_FILES[precision]].sha256

    @property
    def thresholds_path(self) -> Path:
        return self.root / THRESHOLDS

    def thresholds(self, required: bool = True) -> Thresholds | None:
        """Load thresholds.yaml; refuse thresholds fitted on another model."""
        path = self.thresholds_path
        if not path.is_file():
            if required:
                raise BundleError(
                    f"{path}: missing; run `python -m calibration fit {self.root} --good <dir>` first"
                )
            return None
        try:
            th = typedconfig.load(Thresholds, path)
        except ConfigError as exc:
            raise BundleError(str(exc)) from exc
        known = {e.sha256 for e in self.manifest.files.values()}
        if th.model_sha256 and th.model_sha256 not in known:
            raise BundleError(
                f"{path}: fitted for model sha256 {th.model_sha256[:12]}, which is not in this "
                "bundle; re-run `calibration fit`"
            )
        return th

    def write_thresholds(self, th: Thresholds) -> Path:
        """Write thresholds.yaml atomically, keeping the previous one as thresholds.yaml.bak.

        The old file is copied (not moved) first, so a station watching the file never sees it
        missing.
        """
        path = self.thresholds_path
        text = yaml.safe_dump(typedconfig.to_dict(th), sort_keys=False)
        if path.is_file():
            shutil.copy2(path, path.with_name(THRESHOLDS + ".bak"))
        atomic_write(path, text)
        return path


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    """Hash every listed file (manifest.files keys) and write manifest.yaml."""
    root = Path(root)
    for name in list(manifest.files):
        p = root / name
        manifest.files[name] = FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
    path = root / MANIFEST
    atomic_write(path, yaml.safe_dump(typedconfig.to_dict(manifest), sort_keys=False))
    return path
