"""The one way files are written: a temp file in the same folder, fsync, rename.

A crash, a power cut or a full disk leaves the old file or the new one, never half of one;
the folder is synced after the rename, so the new file is there after a power cut too.
Used for bundle files (manifest, ONNX graphs, parity samples), thresholds and calibration
reports, TensorRT engines and their sidecars, evidence and recalibration samples, run summaries
and benchmark reports. Scratch files in temporary folders (a throw-away graph to score, a test
broker's config) are written plainly.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

from edge.errors import WriteError

Data = Union[str, bytes, bytearray, memoryview]


def atomic_write(path: str | Path, data: Data, mode: int = 0o644) -> None:
    """Write `data` (text, or any buffer: bytes, a TensorRT IHostMemory through memoryview)
    to `path` atomically and durably. mode: the new file's permissions (mkstemp makes 0600;
    bundle files are read by the station's user).

    Raises WriteError (an OSError, errno kept) naming the file; the old file is untouched."""
    path = Path(path)
    blob = data.encode() if isinstance(data, str) else memoryview(data)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_dir(path.parent)  # the rename itself survives a power cut only once synced
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
