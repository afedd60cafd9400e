"""`python -m calibration fit --from-station DIR`: refit from a station's kept sample and show
the thresholds and rates before and after, printed and in report.html."""

from __future__ import annotations

import json

from calibration.__main__ import main
from tests.fakebundle import make_bundle
from tests.test_calibration import SIZE, write_good


def test_refit_from_station_sample_before_and_after(tmp_path, capsys):
    bundle = make_bundle(tmp_path / "bundle", SIZE, with_thresholds=False)
    calib = write_good(tmp_path / "calib", 60, seed=0)
    assert main(["fit", str(bundle), "--good", str(calib), "--target-frr", "0.05", "-q"]) == 0
    capsys.readouterr()
    sample = write_good(tmp_path / "sample", 60, seed=3)
    (sample / "recalibration.json").write_text(json.dumps({"station": "s1", "crop": None}))
    argv = ["fit", str(bundle), "--from-station", str(sample), "--target-frr", "0.05", "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out
    for row in ("image threshold", "good-score p90", "sample parts rejected"):
        line = next(ln for ln in out.splitlines() if ln.startswith(row))
        assert len(line.split()) >= 4, line  # a before and an after value
    html = (bundle / "report.html").read_text()
    assert "before and after" in html
    assert html.index("<h1>") < html.index("before and after") < html.index("<h2>Scores")


def test_from_station_needs_a_station_sample(tmp_path, capsys):
    bundle = make_bundle(tmp_path / "bundle", SIZE)
    folder = write_good(tmp_path / "plain", 10)
    assert main(["fit", str(bundle), "--from-station", str(folder), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "recalibration.json" in err and "--good" in err
