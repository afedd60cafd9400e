"""The one way files are written: a temp file in the same folder, fsync, rename.

A crash, a power cut or a full disk leaves the old file or the new one, never half of one.
Used for bundle files, thresholds, TensorRT engines and their sidecars, evidence and
recalibration samples, run summaries and benchmark reports.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

Data = Union[str, bytes, bytearray, memoryview]


def atomic_write(path: str | Path, data: Data, mode: int = 0o644) -> None:
    """Write `data` (text, or any buffer: bytes, a TensorRT IHostMemory through memoryview)
    to `path` atomically and durably. mode: the new file's permissions (mkstemp makes 0600;
    bundle files are read by the station's user)."""
    path = Path(path)
    blob = data.encode() if isinstance(data, str) else memoryview(data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
