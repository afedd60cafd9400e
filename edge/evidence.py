"""Evidence and recalibration samples: images kept on disk, off the inspection's critical path.

    evidence/       <time>_<seq>_<part>_reject.jpg   frame + heatmap overlay + region boxes
                    <time>_<seq>_<part>_reject.json  sidecar: the event, thresholds, map stats
                    (every reject, and a sample of passes as ..._pass.jpg/.json)
    recalibration/  <time>_<seq>_<part>.png          raw frames of a sample of ACCEPTED parts,
                    recalibration.json               what a refit needs to know (crop, model)

The post-processing thread only decides and enqueues (`offer`); one low-priority writer thread per
station encodes and writes, so a slow disk or a big frame never delays a decision. When the
writer falls behind its small queue is full: a queued pass sample makes room for a reject, else
the new item is dropped and counted. Each folder is bounded by a byte quota: the oldest files
(names start with the UTC capture time) are deleted first, also across restarts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.atomic import atomic_write
from edge.errors import ConfigError

log = logging.getLogger(__name__)

# <YYYYmmddTHHMMSS.ffffffZ>_<seq>_<part>[_<kind>]: sortable by capture time.
_NAME = re.compile(r"^\d{8}T\d{6}\.\d{6}Z_\d+_")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")  # no dots: the stem ends at the suffix


def stem_for(capture_time: float, seq: int, part_id: str, kind: str = "") -> str:
    """File stem that sorts by capture time: 20250131T120000.123456Z_000000042_part[_kind]."""
    ts = datetime.fromtimestamp(capture_time, timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    part = _UNSAFE.sub("-", str(part_id))[:64] or "part"
    return f"{ts}_{seq:09d}_{part}" + (f"_{kind}" if kind else "")


class QuotaDir:
    """A folder of files grouped by stem, bounded in bytes; oldest stems are deleted first.

    Only files whose names this module writes (time-stamped stems) are counted and deleted;
    anything else in the folder is left alone. Not thread-safe: one writer thread owns it.
    """

    def __init__(self, path: str | Path, quota_bytes: float):
        self.path = Path(path)
        self.quota = int(quota_bytes)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot create folder: {exc.strerror or exc}") from exc
        if not os.access(self.path, os.W_OK):
            raise ConfigError(f"{self.path}: folder is not writable")
        # stem -> (bytes, file names), oldest first
        self._groups: OrderedDict[str, tuple[int, list[str]]] = OrderedDict()
        self.bytes = 0
        self.deleted = 0
        found: dict[str, tuple[int, list[str]]] = {}
        for p in self.path.iterdir():
            if _NAME.match(p.name) and p.is_file():
                stem = p.name.rsplit(".", 1)[0]
                nbytes, names = found.get(stem, (0, []))
                found[stem] = (nbytes + p.stat().st_size, [*names, p.name])
        for stem in sorted(found):
            self._groups[stem] = found[stem]
            self.bytes += found[stem][0]
        self._evict()

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, stem: str, names: list[str], nbytes: int) -> None:
        """Account for files `names` just written under `stem`, then enforce the quota."""
        old_bytes, old_names = self._groups.pop(stem, (0, []))
        self._groups[stem] = (old_bytes + nbytes, old_names + names)
        self.bytes += nbytes
        self._evict()

    def _evict(self) -> None:
        while self.bytes > self.quota and self._groups:
            _, (nbytes, names) = self._groups.popitem(last=False)
            for name in names:
                (self.path / name).unlink(missing_ok=True)
            self.bytes -= nbytes
            self.deleted += 1


def heatmap_overlay(
    image: np.ndarray,
    amap: np.ndarray,
    view: tuple[int, int, int, int],
    pixel_threshold: float,
    boxes: list[list[int]],
    text: str = "",
) -> np.ndarray:
    """Frame with the anomaly map blended over the model's view and region boxes drawn.

    image (H0,W0,3) uint8 BGR (or (H0,W0) gray); amap (H,W) float32 at model resolution;
    view (x0, y0, w, h) in frame pixels; boxes [x, y, w, h] in frame pixels. The colour scale
    puts the pixel threshold mid-scale (green in JET), so the same colour means the same thing
    on every image.
    """
    out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
    x0, y0, w, h = view
    if w > 0 and h > 0:
        scale = 2.0 * pixel_threshold if pixel_threshold > 0 else float(amap.max()) or 1.0
        norm = np.clip(amap * (255.0 / scale), 0, 255).astype(np.uint8)
        heat = cv2.applyColorMap(
            cv2.resize(norm, (w, h), interpolation=cv2.INTER_LINEAR), cv2.COLORMAP_JET
        )
        roi = out[y0 : y0 + h, x0 : x0 + w]
        cv2.addWeighted(roi, 0.55, heat, 0.45, 0.0, dst=roi)
    thick = max(2, round(max(out.shape[:2]) / 400))
    for bx, by, bw, bh in boxes:
        cv2.rectangle(out, (bx, by), (bx + bw - 1, by + bh - 1), (0, 0, 255), thick)
    if text:
        # Scaled to fit the frame's width: small frames get small text, never cut off.
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 1.0, thick)
        size = min(1.5, (out.shape[1] - 16) / max(tw, 1))
        org = (8, 8 + int(th * size))
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, size, (0, 0, 0), thick + 2)
        cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, size, (255, 255, 255), thick)
    return out


class Sampler:
    """Deterministic fraction: keeps exactly round(n * rate) of n offers, evenly spaced."""

    def __init__(self, rate: float):
        self.rate = float(rate)
        self._acc = 0.0

    def __call__(self) -> bool:
        if self.rate <= 0:
            return False
        self._acc += self.rate
        if self._acc >= 1.0 - 1e-9:
            self._acc -= 1.0
            return True
        return False


@dataclass
class _Job:
    kind: str  # "evidence" | "recalibration"
    stem: str
    frame: Any  # edge.sources.Frame
    amap: np.ndarray | None = None
    decision: Any = None
    event: dict | None = None
    view: tuple[int, int, int, int] = (0, 0, 0, 0)
    thresholds: dict | None = None

    @property
    def important(self) -> bool:
        return self.kind == "evidence" and bool(self.decision and self.decision.reject)


class EvidenceWriter:
    """Writes evidence (rejects + sampled passes) and recalibration samples for one station.

    Args:
        evidence_dir / evidence_quota_mb / sample_pass_rate / jpeg_quality: evidence settings
            (evidence_dir None = no evidence).
        recal_dir / recal_quota_mb / recal_rate: recalibration settings (recal_dir None = none).
        info: written to recalibration/recalibration.json (station, crop, model input, bundle).
        queue_size: frames waiting for the writer (each holds a full frame in memory).
    """

    def __init__(
        self,
        *,
        evidence_dir: str | None = None,
        evidence_quota_mb: float = 500.0,
        sample_pass_rate: float = 0.0,
        jpeg_quality: int = 90,
        recal_dir: str | None = None,
        recal_quota_mb: float = 1000.0,
        recal_rate: float = 0.0,
        info: dict | None = None,
        queue_size: int = 8,
        reserve_dir: str | None = None,
        reserve_mb: float = 0.0,
    ):
        mb = 1024 * 1024
        # The spool comes first: no evidence or sample is written while the spool's file system
        # has less than reserve_mb free (counted as skipped_for_spool).
        self.reserve_dir = reserve_dir
        self.reserve_bytes = int(reserve_mb * mb)
        self.evidence = QuotaDir(evidence_dir, evidence_quota_mb * mb) if evidence_dir else None
        self.recal = QuotaDir(recal_dir, recal_quota_mb * mb) if recal_dir else None
        self._pass_sampler = Sampler(sample_pass_rate)
        self._recal_sampler = Sampler(recal_rate)
        self.jpeg_quality = int(jpeg_quality)
        self.queue_size = max(1, queue_size)
        self._jobs: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.counts = {
            "evidence_written": 0,
            "recalibration_written": 0,
            "dropped": 0,
            "errors": 0,
            "skipped_for_spool": 0,
        }
        if self.recal is not None:
            atomic_write(
                self.recal.path / "recalibration.json",
                (json.dumps(info or {}, indent=2) + "\n").encode(),
            )

    @property
    def enabled(self) -> bool:
        return self.evidence is not None or self.recal is not None

    # ------------------------------------------------------------------ producer side
    def offer(
        self,
        frame: Any,
        amap: np.ndarray,
        decision: Any,
        event: dict,
        view: tuple[int, int, int, int],
        thresholds: dict,
    ) -> str | None:
        """Called once per decided part. Returns the evidence JPEG path when one will be written.

        Cheap: sampling decisions and an enqueue; no encoding, no I/O.
        """
        path = None
        if self.evidence is not None and (decision.reject or self._pass_sampler()):
            kind = "reject" if decision.reject else "pass"
            stem = stem_for(frame.capture_time, frame.seq, frame.part_id, kind)
            job = _Job("evidence", stem, frame, amap, decision, None, view, thresholds)
            path = str(self.evidence.path / f"{stem}.jpg")
            job.event = {**event, "evidence": path}
            if not self._enqueue(job):
                path = None
        if self.recal is not None and not decision.reject and self._recal_sampler():
            stem = stem_for(frame.capture_time, frame.seq, frame.part_id)
            self._enqueue(_Job("recalibration", stem, frame))
        return path

    def _enqueue(self, job: _Job) -> bool:
        with self._cv:
            if self._closing:
                self.counts["dropped"] += 1
                return False
            if len(self._jobs) >= self.queue_size:
                victim = None
                if job.important:
                    victim = next((j for j in self._jobs if not j.important), None)
                if victim is None:
                    self.counts["dropped"] += 1
                    return False
                self._jobs.remove(victim)
                self.counts["dropped"] += 1
            self._jobs.append(job)
            self._cv.notify()
        return True

    # ------------------------------------------------------------------ writer thread
    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="evidence", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (within timeout_s), then stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("evidence writer did not finish within %.0fs", timeout_s)
            self._thread = None

    def _run(self) -> None:
        try:
            # Encoding a big JPEG/PNG takes a core for tens of ms: let inference have it first.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (OSError, AttributeError) as exc:
            log.info("evidence writer keeps normal priority: %s", exc)
        while True:
            with self._cv:
                while not self._jobs and not self._closing:
                    self._cv.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
            try:
                self._write(job)
            except Exception as exc:  # a full disk must not stop the line; counted and logged
                self.counts["errors"] += 1
                n = self.counts["errors"]
                if n <= 5 or n % 100 == 0:
                    log.error("cannot write %s %s (error #%d): %s", job.kind, job.stem, n, exc)

    def _spool_room(self) -> bool:
        if self.reserve_dir is None or self.reserve_bytes <= 0:
            return True
        try:
            free = shutil.disk_usage(self.reserve_dir).free
        except OSError as exc:
            raise OSError(f"cannot check free space for the spool reserve: {exc}") from exc
        if free >= self.reserve_bytes:
            return True
        self.counts["skipped_for_spool"] += 1
        n = self.counts["skipped_for_spool"]
        if n == 1 or n % 100 == 0:
            log.warning(
                "%s has %.0f MB free, below the spool reserve (%.0f MB): %s not written (%d so far)",
                self.reserve_dir,
                free / 2**20,
                self.reserve_bytes / 2**20,
                "evidence/recalibration file",
                n,
            )
        return False

    def _write(self, job: _Job) -> None:
        if not self._spool_room():
            return
        if job.kind == "recalibration":
            ok, png = cv2.imencode(".png", job.frame.image)
            if not ok:
                raise OSError("PNG encoding failed")
            atomic_write(self.recal.path / f"{job.stem}.png", png.tobytes())
            self.recal.add(job.stem, [f"{job.stem}.png"], len(png))
            self.counts["recalibration_written"] += 1
            return
        d = job.decision
        th = job.thresholds or {}
        text = (
            f"{'REJECT' if d.reject else 'pass'} {job.frame.part_id} "
            f"score {d.score:.3g}/{th.get('image_threshold', float('nan')):.3g}"
        )
        img = heatmap_overlay(
            job.frame.image,
            job.amap,
            job.view,
            float(th.get("pixel_threshold", 0.0)),
            [r.bbox for r in d.regions],
            text,
        )
        ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise OSError("JPEG encoding failed")
        sidecar = {
            "decision": "reject" if d.reject else "pass",
            "image": f"{job.stem}.jpg",
            "frame_shape": list(job.frame.image.shape),
            "view": list(job.view),
            "thresholds": th,
            "map": {
                "max": float(job.amap.max()),
                "mean": float(job.amap.mean()),
                "shape": list(job.amap.shape),
            },
            "regions_total": int(getattr(d, "regions_total", len(d.regions))),
            "event": job.event,
            "written": time.time(),
        }
        side = json.dumps(sidecar, indent=1, default=_json_default).encode()
        atomic_write(self.evidence.path / f"{job.stem}.jpg", jpg.tobytes())
        atomic_write(self.evidence.path / f"{job.stem}.json", side)
        self.evidence.add(job.stem, [f"{job.stem}.jpg", f"{job.stem}.json"], len(jpg) + len(side))
        self.counts["evidence_written"] += 1

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counts)
        out["queued"] = len(self._jobs)
        for name, qd in (("evidence", self.evidence), ("recalibration", self.recal)):
            if qd is not None:
                out[f"{name}_bytes"] = qd.bytes
                out[f"{name}_files"] = len(qd)
                out[f"{name}_deleted"] = qd.deleted
        return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def from_config(cfg: Any, info: dict | None = None) -> EvidenceWriter | None:
    """EvidenceWriter for a StationConfig's evidence + recalibration sections (None if neither)."""
    ev, rc = cfg.evidence, cfg.recalibration
    if not ev.dir and not (rc.dir and rc.sample_rate > 0):
        return None
    return EvidenceWriter(
        evidence_dir=ev.dir,
        evidence_quota_mb=ev.quota_mb,
        sample_pass_rate=ev.sample_pass_rate,
        jpeg_quality=ev.jpeg_quality,
        recal_dir=rc.dir if rc.sample_rate > 0 else None,
        recal_quota_mb=rc.quota_mb,
        recal_rate=rc.sample_rate,
        info=info,
        queue_size=ev.queue_size,
        reserve_dir=str(Path(cfg.mqtt.spool).parent),
        reserve_mb=cfg.mqtt.spool_reserve_mb,
    )
