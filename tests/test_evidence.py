"""Evidence (rejects + sampled passes) and recalibration samples: contents, sampling, quotas."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from edge.errors import ConfigError
from edge.evidence import EvidenceWriter, QuotaDir, Sampler, heatmap_overlay, stem_for
from edge.postprocess import Decision, Region
from edge.sources import Frame


def frame(seq, part=None, shape=(96, 128), t=None):
    img = np.full((*shape, 3), 128, np.uint8)
    return Frame(img, seq, t if t is not None else 1_700_000_000.0 + seq, part or f"p{seq}", "x")


def decision(reject, score=0.9):
    regions = [Region([40, 30, 24, 20], 120, 0.95)] if reject else []
    return Decision(reject, score, regions, len(regions))


TH = {"image_threshold": 0.5, "pixel_threshold": 0.5, "min_region_area": 4}
VIEW = (0, 0, 128, 96)


def amap(hot=True):
    m = np.zeros((64, 64), np.float32)
    if hot:
        m[20:30, 20:30] = 0.9
    return m


def offer(w, seq, reject, **kw):
    f = frame(seq, **kw)
    ev = {"event_id": f"e{seq}", "part_id": f.part_id, "score": 0.9 if reject else 0.1}
    return w.offer(f, amap(reject), decision(reject, ev["score"]), ev, VIEW, TH)


def test_stem_sorts_by_time_and_is_safe():
    a = stem_for(1_700_000_000.5, 7, "lot 4/part:9", "reject")
    b = stem_for(1_700_000_001.0, 3, "x")
    assert a < b and "/" not in a and " " not in a and ":" not in a.split("Z", 1)[1]
    assert a.endswith("_000000007_lot-4-part-9_reject")


def test_sampler_is_exact_and_even():
    s = Sampler(0.25)
    picks = [s() for _ in range(100)]
    assert sum(picks) == 25 and picks[3] and not picks[0]
    assert not any(Sampler(0.0)() for _ in range(10)) and all(Sampler(1.0)() for _ in range(10))


def test_quota_dir_deletes_oldest_first_also_after_restart(tmp_path):
    q = QuotaDir(tmp_path, quota_bytes=250)
    (tmp_path / "notes.txt").write_text("not ours" * 100)  # never counted nor deleted
    for i in range(4):
        stem = stem_for(1_700_000_000 + i, i, "p")
        (tmp_path / f"{stem}.jpg").write_bytes(b"j" * 60)
        (tmp_path / f"{stem}.json").write_bytes(b"s" * 40)
        q.add(stem, [f"{stem}.jpg", f"{stem}.json"], 100)
    kept = sorted(p.name for p in tmp_path.glob("*.jpg"))
    assert len(kept) == 2 and kept[0].startswith(stem_for(1_700_000_002, 2, "p"))
    assert q.bytes == 200 and q.deleted == 2 and (tmp_path / "notes.txt").exists()
    # A restart with a smaller quota finds the files and trims them, oldest first.
    q2 = QuotaDir(tmp_path, quota_bytes=150)
    assert len(q2) == 1 and q2.bytes == 100
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == kept[1:]


def test_quota_dir_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="cannot create folder"):
        QuotaDir(f / "sub", 1000)


def test_overlay_draws_heat_and_boxes():
    img = np.full((96, 128, 3), 128, np.uint8)
    out = heatmap_overlay(img, amap(), (10, 5, 100, 80), 0.5, [[40, 30, 24, 20]], "REJECT")
    assert out.shape == img.shape and (img == 128).all()  # input untouched
    assert tuple(out[49, 50]) == (0, 0, 255)  # bottom box edge in red (BGR)
    assert (out[:5, 110:] == 128).all()  # outside the view and text: unchanged
    hot = out[5 + 35, 10 + 39]  # centre of the hot square mapped into the view
    cold = out[5 + 70, 10 + 90]
    assert not np.array_equal(hot, cold)


def test_rejects_and_sampled_passes_written_with_sidecars(tmp_path):
    w = EvidenceWriter(evidence_dir=str(tmp_path / "ev"), sample_pass_rate=0.5, queue_size=16)
    w.start()
    paths = [offer(w, i, reject=i in (1, 4)) for i in range(8)]
    w.close()
    # Rejects always; passes at 0.5: the 2nd, 4th, 6th of the six passes.
    assert paths[1] and paths[4] and sum(p is not None for p in paths) == 5
    st = w.stats()
    assert st["evidence_written"] == 5 and st["dropped"] == 0 and st["errors"] == 0
    for i in (1, 4):
        jpg = paths[i]
        img = cv2.imread(jpg)
        assert img.shape == (96, 128, 3) and jpg.endswith("_reject.jpg")
        side = json.loads(open(jpg[:-4] + ".json").read())
        assert side["decision"] == "reject" and side["event"]["event_id"] == f"e{i}"
        assert side["event"]["evidence"] == jpg and side["thresholds"] == TH
        assert side["map"]["max"] == pytest.approx(0.9) and side["view"] == list(VIEW)
    assert len(list((tmp_path / "ev").glob("*_pass.jpg"))) == 3


def test_recalibration_keeps_accepted_raw_frames_only(tmp_path):
    w = EvidenceWriter(
        recal_dir=str(tmp_path / "rc"), recal_rate=1.0, info={"crop": None}, queue_size=16
    )
    w.start()
    for i in range(6):
        assert offer(w, i, reject=i % 3 == 0) is None  # no evidence folder: no evidence path
    w.close()
    pngs = sorted((tmp_path / "rc").glob("*.png"))
    assert [p.stem.split("_")[2] for p in pngs] == ["p1", "p2", "p4", "p5"]
    raw = cv2.imread(str(pngs[0]))
    assert raw.shape == (96, 128, 3) and (raw == 128).all()  # the raw frame, no overlay
    assert json.loads((tmp_path / "rc" / "recalibration.json").read_text()) == {"crop": None}
    assert w.stats()["recalibration_written"] == 4


def test_quota_bounds_the_folders(tmp_path):
    w = EvidenceWriter(
        evidence_dir=str(tmp_path / "ev"),
        evidence_quota_mb=0.02,  # ~20 kB: a handful of small JPEGs
        recal_dir=str(tmp_path / "rc"),
        recal_quota_mb=0.002,
        recal_rate=1.0,
        queue_size=64,  # room for all 40 jobs: this test is about the quota, not the queue
    )
    w.start()
    for i in range(40):
        offer(w, i, reject=i % 2 == 0)
    w.close()
    st = w.stats()
    total = sum(p.stat().st_size for p in (tmp_path / "ev").glob("2*"))
    assert total <= 0.02 * 2**20 and st["evidence_deleted"] > 0
    rc = sum(p.stat().st_size for p in (tmp_path / "rc").glob("*.png"))
    assert rc <= 0.002 * 2**20 and st["recalibration_deleted"] > 0
    # The newest are the ones kept.
    newest = max(p.name for p in (tmp_path / "ev").glob("*.jpg"))
    assert "_000000038_" in newest


def test_full_queue_drops_passes_before_rejects(tmp_path):
    w = EvidenceWriter(evidence_dir=str(tmp_path / "ev"), sample_pass_rate=1.0, queue_size=2)
    # Not started: nothing is written, the queue fills.
    assert offer(w, 0, reject=False) and offer(w, 1, reject=False)
    assert offer(w, 2, reject=False) is None  # full: the new pass sample is dropped
    assert offer(w, 3, reject=True)  # a reject evicts a queued pass sample
    assert offer(w, 4, reject=True)
    assert offer(w, 5, reject=True) is None  # only rejects queued: the new one is dropped
    assert w.stats()["dropped"] == 4
    w.start()
    w.close()
    assert sorted(p.name.split("_")[2] for p in (tmp_path / "ev").glob("*.jpg")) == ["p3", "p4"]


def test_write_errors_are_counted_not_raised(tmp_path, caplog):
    w = EvidenceWriter(evidence_dir=str(tmp_path / "ev"))
    (tmp_path / "ev").rmdir()
    (tmp_path / "ev").write_text("the folder is gone: a file took its name")
    w.start()
    assert offer(w, 0, reject=True)
    w.close()
    assert w.stats()["errors"] == 1 and w.stats()["evidence_written"] == 0
    assert "cannot write evidence" in caplog.text


def test_spool_reserve_stops_evidence_before_the_spool_runs_out(tmp_path):
    import shutil

    from edge.evidence import EvidenceWriter

    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    w = EvidenceWriter(
        recal_dir=str(tmp_path / "recal"),
        recal_rate=1.0,
        reserve_dir=str(tmp_path),
        reserve_mb=free_mb * 2,  # more than is free: the spool's reserve is already reached
    )
    assert not w._spool_room() and w.counts["skipped_for_spool"] == 1
    w.reserve_bytes = 0
    assert w._spool_room()
