"""report.html: standalone (plots embedded), and it renders in a real browser (headless chromium)."""

import re
import subprocess

import cv2
import pytest

from calibration.__main__ import main
from tests.cdp import FLAGS, chromium_or_skip
from tests.fakebundle import make_bundle
from tests.test_calibration import SIZE, write_good, write_mvtec


def screenshot(html_path, png_path, tmp_path, height=3000):
    """Render a local HTML file headlessly to a PNG (1200 px wide)."""
    cmd = [
        chromium_or_skip(),
        *FLAGS,
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--screenshot={png_path}",
        f"--window-size=1200,{height}",
        html_path.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    img = cv2.imread(str(png_path))
    assert img is not None, "chromium wrote no screenshot"
    return img


def hue_pixels(img_bgr, lo, hi):
    """Saturated pixels with OpenCV hue in [lo, hi] (teal = good parts ~85, orange = defects ~10);
    hue survives the plots' transparency, exact RGB does not."""
    hsv = cv2.cvtColor(img_bgr, cv2.COLOR_BGR2HSV)
    return int(((hsv[..., 0] >= lo) & (hsv[..., 0] <= hi) & (hsv[..., 1] > 60)).sum())


TEAL, ORANGE = (78, 92), (5, 15)


def without_images(html_path, out_path):
    """The same page with every embedded image blanked: the control for the colour counts."""
    text = re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', html_path.read_text())
    out_path.write_text(text)
    return out_path


@pytest.fixture
def fitted(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", SIZE, with_thresholds=False)
    data = write_mvtec(tmp_path / "cat", 80, kinds=("blob", "scratch"))
    assert main(["fit", str(bundle), "--data", str(data), "--target-frr", "0.05", "-q"]) == 0
    return bundle, data


def test_report_is_standalone_with_every_plot(fitted):
    bundle, _ = fitted
    html = (bundle / "report.html").read_text()
    images = re.findall(r'<img[^>]*src="([^"]*)"', html)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    # histograms, rates, ROC/PR, pixels + gallery tiles (good parts and defects)
    assert len(images) >= 4 + 2
    for section in ("Scores", "False rejects and escapes", "ROC and precision-recall", "Escapes"):
        assert section in html or section.replace("Escapes", "Defective parts closest") in html
    assert "blob" in html and "scratch" in html  # per defect type table
    assert not re.search(r'(src|href)="(https?:|/)', html)  # nothing outside the file


def test_report_renders_headless_with_plots(fitted, tmp_path):
    bundle, _ = fitted
    img = screenshot(bundle / "report.html", tmp_path / "report.png", tmp_path)
    assert img.shape[1] == 1200 and img.std() > 20  # not a blank page
    bare = without_images(bundle / "report.html", tmp_path / "bare.html")
    control = screenshot(bare, tmp_path / "bare.png", tmp_path)
    # The plots (good-part teal, defect orange) add far more colour than the page's own styling.
    assert hue_pixels(img, *TEAL) > 3 * hue_pixels(control, *TEAL) + 1000
    assert hue_pixels(img, *ORANGE) > 3 * hue_pixels(control, *ORANGE) + 1000


def test_good_only_report_and_evaluate_report_render(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", SIZE, with_thresholds=False)
    good = write_good(tmp_path / "good", 60)
    assert main(["fit", str(bundle), "--good", str(good), "--target-frr", "0.05", "-q"]) == 0
    html = (bundle / "report.html").read_text()
    assert "need both good and defective images" in html  # says why ROC/PR are missing
    data = write_mvtec(tmp_path / "cat", 30)
    out = tmp_path / "eval.html"
    assert main(["evaluate", str(bundle), "--data", str(data), "--report", str(out), "-q"]) == 0
    assert "AU-PRO" in out.read_text()
    img = screenshot(out, tmp_path / "eval.png", tmp_path, height=2000)
    control = screenshot(without_images(out, tmp_path / "bare.html"), tmp_path / "b.png", tmp_path)
    assert hue_pixels(img, *TEAL) > 3 * hue_pixels(control, *TEAL) + 1000
