"""Frame sources: image folders and video files (solid), live sources (reconnect logic)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.errors import SourceError
from edge.sources import (
    SOURCES,
    EndOfStream,
    ImageFolderSource,
    LiveSource,
    VideoFileSource,
    create_source,
)


def make_folder(folder: Path, n: int = 3, shape=(24, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # Written out of order: the source must sort by name.
    for i in reversed(range(n)):
        img = np.full((*shape, 3), i * 10, np.uint8)
        cv2.imwrite(str(folder / f"img_{i:02d}.png"), img)
    (folder / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    return folder


def make_video(path: Path, n: int = 12, shape=(48, 64)) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (shape[1], shape[0]))
    assert w.isOpened()
    for i in range(n):
        w.write(np.full((*shape, 3), (i * 20) % 256, np.uint8))
    w.release()
    return path


def drain(src, limit: int = 1000) -> list:
    out = []
    with pytest.raises(EndOfStream):
        for _ in range(limit):
            f = src.read(timeout=1.0)
            if f is not None:
                out.append(f)
    return out


def test_registry_is_explicit():
    assert {"file", "v4l2", "csi", "rtsp", "gst"} <= set(SOURCES)
    with pytest.raises(SourceError, match="unknown source scheme"):
        create_source("ftp://cam/x")


def test_image_folder_order_seq_and_end(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    for uri in (str(folder), f"file://{folder}/"):
        src = create_source(uri)
        assert isinstance(src, ImageFolderSource)
        src.open()
        frames = drain(src)
        src.close()
        assert [f.source for f in frames] == ["img_00.png", "img_01.png", "img_02.png"]
        assert [f.part_id for f in frames] == ["img_00", "img_01", "img_02"]
        assert [f.seq for f in frames] == [0, 1, 2]
        assert [int(f.image[0, 0, 0]) for f in frames] == [0, 10, 20]
        f = frames[0]
        assert f.image.shape == (24, 32, 3) and f.image.dtype == np.uint8
        assert abs(f.capture_time - time.time()) < 60
        # EndOfStream is sticky: reading again still ends.
        src.open()
        drain(src)


def test_image_folder_loop_keeps_seq_monotonic(tmp_path):
    src = create_source(str(make_folder(tmp_path / "imgs")), loop=True)
    src.open()
    frames = [src.read(1.0) for _ in range(7)]
    src.close()
    assert [f.seq for f in frames] == list(range(7))
    assert [f.source for f in frames][3:6] == ["img_00.png", "img_01.png", "img_02.png"]
    assert src.stats()["loops"] == 2


def test_corrupt_images_skipped_and_counted(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    (folder / "img_01.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt
    (folder / "img_05.jpg").write_bytes(b"")  # empty
    src = create_source(str(folder))
    src.open()
    frames = drain(src)
    assert [f.source for f in frames] == ["img_00.png", "img_02.png"]
    assert [f.seq for f in frames] == [0, 1]
    assert src.stats()["corrupt"] == 2 and src.stats()["frames"] == 2


def test_triggered_folder_hands_out_unreadable_parts(tmp_path):
    # A triggered line must judge every part: the unreadable one comes out flagged, not skipped.
    folder = make_folder(tmp_path / "imgs")
    (folder / "img_01.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    src = create_source(str(folder), keep_unreadable=True)
    src.open()
    frames = drain(src)
    assert [f.source for f in frames] == ["img_00.png", "img_01.png", "img_02.png"]
    bad = frames[1]
    assert bad.error and "img_01.png" in bad.error and bad.image.size == 0
    assert bad.part_id == "img_01" and frames[0].error is None
    assert src.stats()["corrupt"] == 1


def test_looping_folder_of_only_corrupt_images_ends(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    src = create_source(str(folder), loop=True)
    src.open()
    drain(src)  # no infinite loop


def test_rate_paces_replay_and_times_out(tmp_path):
    src = create_source(str(make_folder(tmp_path / "imgs")), rate=20.0)
    src.open()
    t = time.monotonic()
    assert src.read(1.0) is not None
    assert src.read(1.0) is not None
    assert src.read(1.0) is not None
    assert time.monotonic() - t >= 0.09  # 3 frames at 20 fps: >= 2 periods
    src2 = create_source(str(make_folder(tmp_path / "imgs2")), rate=2.0)
    src2.open()
    assert src2.read(0.01) is not None  # first frame is due at once
    assert src2.read(0.01) is None  # next is due in 0.5 s: timeout -> None, not an error


def test_video_file_frames(tmp_path):
    path = make_video(tmp_path / "clip.avi", n=12)
    for uri in (str(path), f"file://{path}"):
        src = create_source(uri)
        assert isinstance(src, VideoFileSource)
        src.open()
        frames = drain(src)
        src.close()
        assert len(frames) == 12
        assert [f.seq for f in frames] == list(range(12))
        assert frames[0].image.shape == (48, 64, 3)
        assert frames[0].source == "clip.avi"


def test_video_file_loop(tmp_path):
    src = create_source(str(make_video(tmp_path / "clip.avi", n=4)), loop=True)
    src.open()
    frames = [src.read(1.0) for _ in range(10)]
    src.close()
    assert [f.seq for f in frames] == list(range(10))
    assert src.stats()["loops"] == 2


def test_truncated_video_survives(tmp_path):
    path = make_video(tmp_path / "clip.avi", n=20)
    data = path.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) * 3 // 5])
    src = create_source(str(cut))
    src.open()
    frames = drain(src)
    src.close()
    assert 0 < len(frames) < 20


@pytest.mark.parametrize(
    "uri",
    ["{tmp}/missing", "file://{tmp}/missing.mp4", "file:///nonexistent/dir/", "{tmp}/empty"],
)
def test_unopenable_source_names_uri(tmp_path, uri):
    (tmp_path / "empty").mkdir()
    uri = uri.format(tmp=tmp_path)
    with pytest.raises(SourceError) as e:
        create_source(uri).open()
    assert uri in str(e.value)


def test_not_a_video_file(tmp_path):
    p = tmp_path / "x.mp4"
    p.write_bytes(b"this is not a video")
    with pytest.raises(SourceError, match=str(p)):
        create_source(str(p)).open()


def test_missing_v4l2_device(tmp_path):
    with pytest.raises(SourceError, match="v4l2:///dev/video_nonexistent"):
        create_source("v4l2:///dev/video_nonexistent").open()


def test_gstreamer_sources_need_gstreamer_opencv():
    from edge import sources

    if sources._has_gstreamer():
        pytest.skip("this OpenCV has GStreamer")
    with pytest.raises(SourceError, match="GStreamer"):
        create_source("csi://0").open()


def test_csi_pipeline_string():
    s = create_source("csi://1", width=1280, height=720, rate=60)
    pipe = s._target()
    assert "nvarguscamerasrc sensor-id=1" in pipe and "width=1280, height=720" in pipe
    assert "framerate=60/1" in pipe and pipe.endswith("sync=false")
    g = create_source("gst://videotestsrc")._target()
    assert g.startswith("videotestsrc") and "appsink" in g


class FakeCamera:
    """cv2.VideoCapture stand-in that fails after `fail_after` frames."""

    def __init__(self, fail_after: int):
        self.left = fail_after

    def read(self):
        if self.left <= 0:
            return False, None
        self.left -= 1
        return True, np.zeros((8, 8, 3), np.uint8)

    def release(self):
        pass


class FlakyLive(LiveSource):
    """Opens twice (first open + one reconnect) with 3 frames each, then the camera is gone."""

    def __init__(self, **kw):
        super().__init__("fake://cam", reconnect_min_s=0.01, reconnect_max_s=0.05, **kw)
        self.opens = 0

    def _open_capture(self):
        self.opens += 1
        return FakeCamera(3) if self.opens <= 2 else None


def test_live_source_reconnects_with_backoff_and_times_out():
    src = FlakyLive(buffer=16)
    src.open()
    frames = []
    deadline = time.monotonic() + 5
    while len(frames) < 6 and time.monotonic() < deadline:
        f = src.read(timeout=0.2)
        if f is not None:
            frames.append(f)
    assert [f.seq for f in frames] == list(range(6))
    assert src.read(timeout=0.05) is None  # camera gone: timeouts, not exceptions
    st = src.stats()
    src.close()
    assert st["reconnects"] == 1 and st["read_failures"] >= 2 and src.opens >= 3


def test_live_source_drops_oldest_when_consumer_is_slow():
    src = FlakyLive(buffer=2)
    src.open()
    time.sleep(0.3)  # 6 frames grabbed, nobody reading
    got = []
    while (f := src.read(timeout=0.05)) is not None:
        got.append(f.seq)
    src.close()
    assert got == [4, 5] and src.stats()["dropped"] == 4


def test_triggered_live_source_never_drops_a_frame():
    # One frame is one part on a triggered line: a slow consumer holds the camera back.
    src = FlakyLive(buffer=2, block=True)
    src.open()
    time.sleep(0.3)  # the camera has 6 frames to give, nobody reading
    got = []
    while (f := src.read(timeout=0.3)) is not None:
        got.append(f.seq)
    src.close()
    assert got == [0, 1, 2, 3, 4, 5] and src.stats()["dropped"] == 0


def test_live_source_unopenable_names_uri():
    class Dead(LiveSource):
        def _open_capture(self):
            return None

    with pytest.raises(SourceError, match="fake://dead"):
        Dead("fake://dead").open()


# ------------------------------------------------------------------ camera misbehaviour
class ScriptedCamera:
    """cv2.VideoCapture stand-in playing a script: "f" frame, "e" empty frame, "x" read fails."""

    def __init__(self, script: str, delay_s: float = 0.0):
        self.script = list(script)
        self.delay_s = delay_s

    def read(self):
        time.sleep(self.delay_s)
        if not self.script:
            return False, None
        step = self.script.pop(0)
        if step == "x":
            return False, None
        if step == "e":
            return True, np.zeros((0, 0, 3), np.uint8)
        return True, np.full((8, 8, 3), 7, np.uint8)

    def release(self):
        pass


class ScriptedLive(LiveSource):
    """Each open returns the next camera of `cameras` (None = open fails)."""

    def __init__(self, cameras, **kw):
        kw.setdefault("reconnect_min_s", 0.01)
        kw.setdefault("reconnect_max_s", 0.02)
        super().__init__("fake://scripted", **kw)
        self.cameras = list(cameras)

    def _open_capture(self):
        return self.cameras.pop(0) if self.cameras else None


def read_n(src, n, timeout=5.0):
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        f = src.read(timeout=0.1)
        if f is not None:
            got.append(f)
    return got


def test_live_empty_frames_are_counted_and_skipped():
    src = ScriptedLive([ScriptedCamera("fefef")], buffer=16)
    src.open()
    frames = read_n(src, 3)
    src.close()
    assert [f.seq for f in frames] == [0, 1, 2]
    assert all(f.image.size for f in frames)
    assert src.stats()["corrupt"] == 2


def test_live_camera_missing_at_start_is_waited_for():
    # Two failed opens (the camera is not there yet), then it comes up with 3 frames.
    camera = ScriptedCamera("f" * 200, delay_s=0.005)  # keeps delivering while we look
    src = ScriptedLive([None, None, camera], retry_open=True, buffer=16)
    src.open()  # no SourceError: retries in the background
    frames = read_n(src, 3)
    st = src.stats()
    src.close()
    assert [f.seq for f in frames] == [0, 1, 2]
    assert st["reconnect_attempts"] == 2 and st["reconnects"] == 1
    assert "cannot open" in st["last_error"]


def test_live_camera_missing_without_retry_raises():
    with pytest.raises(SourceError, match="fake://scripted"):
        ScriptedLive([None]).open()


def test_stop_capture_keeps_buffered_frames():
    src = ScriptedLive([ScriptedCamera("ffff")], buffer=8)
    src.open()
    deadline = time.monotonic() + 5
    while src.stats()["frames"] < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    src.stop_capture()
    got = []
    while (f := src.read(0)) is not None:  # timeout 0: never blocks
        got.append(f.seq)
    assert got == [0, 1, 2, 3]


def test_rtsp_closed_port(tmp_path):
    """A real FFmpeg open against a port nobody listens on: refused now, or retried."""
    from tests.broker import free_port

    uri = f"rtsp://127.0.0.1:{free_port()}/cam"
    with pytest.raises(SourceError, match=uri):
        create_source(uri).open()
    src = create_source(uri, retry_open=True, reconnect_min_s=0.05, reconnect_max_s=0.1)
    src.open()
    t = time.monotonic()
    assert src.read(timeout=0.6) is None  # a timeout, not an exception
    assert time.monotonic() - t < 5
    deadline = time.monotonic() + 5
    while src.stats()["reconnect_attempts"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    src.close()
    st = src.stats()
    assert st["connected"] is False and st["reconnect_attempts"] >= 2 and st["reconnects"] == 0


def test_truncated_video_is_reported(tmp_path):
    path = make_video(tmp_path / "clip.avi", n=20)
    data = path.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) * 3 // 5])
    src = create_source(str(cut))
    src.open()
    frames = drain(src)
    st = src.stats()
    assert st["truncated"] == 1 and st["frames"] == len(frames) < 20
    full = create_source(str(path))
    full.open()
    drain(full)
    assert full.stats()["truncated"] == 0


def test_source_options_from_config():
    from edge.config import SourceConfig
    from edge.sources import source_options

    live = source_options(SourceConfig(uri="rtsp://cam/x", reconnect_max_s=3.0, buffer=2))
    assert live["retry_open"] is True and live["reconnect_max_s"] == 3.0 and live["buffer"] == 2
    assert source_options(SourceConfig(uri="rtsp://cam/x"), retry_open=False)["retry_open"] is False
    files = source_options(SourceConfig(uri="/data/frames", loop=True, rate=5.0))
    assert files == {"loop": True, "rate": 5.0, "width": 0, "height": 0, "keep_unreadable": False}
    trig = source_options(SourceConfig(uri="rtsp://cam/x"), triggered=True)
    assert trig["block"] is True and trig["keep_unreadable"] is True
    assert source_options(SourceConfig(uri="rtsp://cam/x"))["block"] is False


def test_rtsp_credentials_never_in_errors_logs_or_stats(caplog):
    from tests.broker import free_port

    port = free_port()
    uri = f"rtsp://li:Cam-s3cret@127.0.0.1:{port}/cam"
    with pytest.raises(SourceError) as e:
        create_source(uri).open()
    assert "Cam-s3cret" not in str(e.value) and f"rtsp://***@127.0.0.1:{port}/cam" in str(e.value)
    src = create_source(uri, retry_open=True, reconnect_min_s=0.05, reconnect_max_s=0.1)
    with caplog.at_level(logging.DEBUG):
        src.open()
        src.read(timeout=0.3)
        src.close()
    assert "Cam-s3cret" not in caplog.text and "***@" in caplog.text
    assert "Cam-s3cret" not in str(src.stats())
