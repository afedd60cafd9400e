"""Hot reload of thresholds.yaml: applied when valid, refused (old kept) when not."""

from __future__ import annotations

import logging
import os

import pytest
import yaml

from edge.bundle import Bundle, Thresholds
from edge.postprocess import PostProcessor
from edge.reload import ThresholdsWatcher
from tests.fakebundle import make_bundle


@pytest.fixture
def bundle(tmp_path):
    return Bundle(make_bundle(tmp_path / "b", (32, 32)))


def write(bundle, text_or_dict, bump_ns=1_000_000):
    """Rewrite thresholds.yaml and move its mtime on (coarse-mtime filesystems)."""
    p = bundle.thresholds_path
    st = p.stat() if p.exists() else None
    if isinstance(text_or_dict, dict):
        # Fitted on this bundle's graph unless the case says otherwise.
        text_or_dict = {"model_sha256": bundle.model_sha256(), **text_or_dict}
    text = text_or_dict if isinstance(text_or_dict, str) else yaml.safe_dump(text_or_dict)
    p.write_text(text)
    if st is not None:
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + bump_ns))


def watcher(bundle, **kw):
    post = PostProcessor(0.5, 0.5, 4, (32, 32))
    th = bundle.thresholds()

    def apply(t):
        post.set_thresholds(t.image_threshold, t.pixel_threshold, t.min_region_area)

    kw.setdefault("check_interval_s", 0.0)
    return ThresholdsWatcher(bundle, apply, th, label="L/S", **kw), post


def test_valid_change_is_applied_and_logged(bundle, caplog):
    w, post = watcher(bundle)
    assert not w.poll()  # unchanged
    write(bundle, {"image_threshold": 0.7, "pixel_threshold": 0.6, "min_region_area": 9})
    with caplog.at_level(logging.INFO, logger="edge.reload"):
        assert w.poll()
    assert (post.image_threshold, post.pixel_threshold, post.min_region_area) == (0.7, 0.6, 9)
    assert w.reloads == 1 and w.refused == 0
    assert "thresholds reloaded" in caplog.text and "image 0.7" in caplog.text
    assert "(was image 0.5" in caplog.text
    assert not w.poll()  # read once per change


@pytest.mark.parametrize(
    "bad, why",
    [
        ("image_threshold: [unclosed\n", "malformed YAML"),
        ({"image_threshold": 0.7}, "missing required key pixel_threshold"),
        ({"image_threshold": ".nan", "pixel_threshold": 0.5}, "expected a number"),
        ({"image_threshold": float("inf"), "pixel_threshold": 0.5}, "finite"),
        ({"image_threshold": 0.7, "pixel_threshold": 0.5, "min_region_area": -1}, ">= 0"),
        ({"image_threshold": 0.7, "pixel_threshold": 0.5, "model_sha256": "ab" * 32}, "not in"),
        ({"image_threshold": 0.7, "pixel_threshold": 0.5, "colour": "red"}, "unknown key"),
        ({"image_threshold": 0.7, "pixel_threshold": 0.5, "model_sha256": ""}, "model hash"),
    ],
    ids=["yaml", "missing", "string", "inf", "negative", "other-model", "unknown", "no-hash"],
)
def test_bad_file_is_refused_and_old_kept(bundle, caplog, bad, why):
    w, post = watcher(bundle)
    write(bundle, bad)
    with caplog.at_level(logging.ERROR, logger="edge.reload"):
        assert not w.poll()
    assert (post.image_threshold, post.pixel_threshold, post.min_region_area) == (0.5, 0.5, 4)
    assert w.refused == 1 and w.reloads == 0
    assert "refused" in caplog.text and why in caplog.text and "keeping" in caplog.text
    assert not w.poll() and w.refused == 1  # not re-read (nor re-logged) until it changes
    write(bundle, {"image_threshold": 0.8, "pixel_threshold": 0.4}, bump_ns=2_000_000)
    assert w.poll() and post.image_threshold == 0.8 and post.min_region_area == 0


def test_file_missing_during_replace_is_refused_then_picked_up(bundle, caplog):
    w, post = watcher(bundle)
    bundle.thresholds_path.unlink()
    assert not w.poll() and w.refused == 1 and "disappeared" in caplog.text
    bundle.write_thresholds(Thresholds(0.9, 0.3, 2, model_sha256=bundle.model_sha256()))
    assert w.poll() and post.image_threshold == 0.9 and post.min_region_area == 2


def test_request_rereads_without_change_and_interval_limits_stats(bundle):
    w, post = watcher(bundle, check_interval_s=3600, watch=True)
    assert not w.poll(now=1e9)  # first check
    write(bundle, {"image_threshold": 0.6, "pixel_threshold": 0.5})
    assert not w.poll(now=1e9 + 1)  # within the interval: not even a stat
    w.request()  # SIGHUP
    assert w.poll(now=1e9 + 2) and post.image_threshold == 0.6
    w.request()
    assert w.poll(now=1e9 + 3) and w.reloads == 2  # re-applied although unchanged


def test_watch_off_reloads_only_on_request(bundle):
    w, post = watcher(bundle, watch=False)
    write(bundle, {"image_threshold": 0.6, "pixel_threshold": 0.5})
    assert not w.poll()
    w.request()
    assert w.poll() and post.image_threshold == 0.6
