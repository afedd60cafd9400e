"""The drift watch (edge/drift.py): raises on a shift of good-part scores, clears after it,
stays quiet on in-control scores, and its evidence says what it saw."""

from __future__ import annotations

import numpy as np
import pytest

from edge.drift import DriftWatch, reference_line


class Alarms:
    def __init__(self) -> None:
        self.log: list[str | None] = []

    def __call__(self, text: str | None) -> None:
        self.log.append(text)


def good(rng: np.random.Generator, n: int, p_exceed: float) -> np.ndarray:
    """Scores whose probability of exceeding the line 1.0 is p_exceed."""
    return np.where(rng.random(n) < p_exceed, rng.uniform(1.0, 2.0, n), rng.uniform(0.0, 1.0, n))


def test_raises_on_a_shift_with_evidence_and_clears_after_it():
    rng = np.random.default_rng(0)
    alarms = Alarms()
    w = DriftWatch(1.0, 0.1, 3.0, 10.0, alarms)
    for s in good(rng, 500, 0.1):
        w.observe(float(s))
    assert not w.raised
    shifted = good(rng, 100, 0.8)
    delay = None
    for i, s in enumerate(shifted):
        w.observe(float(s))
        if w.raised and delay is None:
            delay = i + 1
    assert delay is not None and delay <= 30
    text = alarms.log[0]
    assert text and "CUSUM" in text and "p90" in text and "> 10" in text
    state = w.state()
    assert state["raised"] and state["statistic"] <= 10.0 and state["window"] >= delay
    for s in good(rng, 300, 0.1):
        w.observe(float(s))
    assert not w.raised and alarms.log == [text, None]


def test_quiet_on_in_control_scores():
    rng = np.random.default_rng(1)
    w = DriftWatch(1.0, 0.1, 3.0, 10.0)
    for s in good(rng, 20000, 0.1):
        w.observe(float(s))
    assert w.alarms == 0  # ARL0 ~ 290k parts: a false alarm here would be a 7 % event


def test_only_accepted_parts_count_and_rebase_clears():
    alarms = Alarms()
    w = DriftWatch(1.0, 0.1, 3.0, 2.0, alarms)

    class D:
        def __init__(self, reject: bool, score: float) -> None:
            self.reject, self.score = reject, score

    for _ in range(10):
        w.on_part(None, None, D(True, 5.0), {})  # rejects are not good parts
    assert w.n == 0 and not w.raised
    for _ in range(3):
        w.on_part(None, None, D(False, 5.0), {})
    assert w.raised
    w.rebase(10.0)
    assert not w.raised and w.line == 10.0 and alarms.log[-1] is None


def test_settings_and_reference_line():
    with pytest.raises(ValueError, match="shift"):
        DriftWatch(1.0, 0.1, 12.0)
    assert reference_line({"good": {"p90": 0.25}}, "p90") == 0.25
    assert reference_line({}, "p90") is None
    assert reference_line({"good": {"p90": float("nan")}}, "p90") is None
