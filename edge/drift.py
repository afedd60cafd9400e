"""Drift watch: are the good parts still scoring like the calibration's good parts?

Method: a one-sided Bernoulli CUSUM on exceedances of the calibration's good-score quantile
(p90 by default, from thresholds.yaml `stats.good`). Every accepted part is one Bernoulli trial,
x = 1 when its score is above that line. In control x ~ Bernoulli(p0 = 0.10) by construction,
whatever the shape of the model's score distribution; the alarm tests for a rise to
p1 = shift x p0 (3 x: 30 %) with the log-likelihood-ratio CUSUM

    S_t = max(0, S_{t-1} + x_t ln(p1/p0) + (1 - x_t) ln((1 - p1)/(1 - p0)))

and raises when S_t > h. Why this and not a Gaussian CUSUM/EWMA on the raw score: anomaly
scores are skewed and their spread differs per model, so a z-score CUSUM's false-alarm rate
would be unknown; the exceedance indicator has a known distribution, so the in-control average
run length (ARL0) is computed exactly from (p0, shift, h) alone (docs/operator_view.md). It is
also immune to the truncation of accepted parts at the image threshold (which lies above p90).
Why not a two-sample test over a window: it needs a window of scores held per test and gives a
delay of at least that window; the CUSUM is O(1) per part and is the fastest detector for a
given false-alarm rate (Lorden/Moustakides).

Once raised, S is capped at h, so the alarm clears a bounded number of in-control parts after
the shift ends (S back at 0: about h / 0.25 ~ 40 parts with no exceedance, ~85 at p0).

Single-threaded: `observe` runs on the station's post thread; `state()` may be read from another
thread (it copies plain values).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


class DriftWatch:
    """Bernoulli CUSUM on good-part scores above a calibration quantile (see the module doc).

    Args:
        line: score above which a good part counts as an exceedance (the calibration quantile).
        p0: in-control exceedance probability (1 - quantile). shift: p1 = shift * p0.
        h: decision threshold on the CUSUM. alarm: (text or None) -> None, called on raise
        (text) and on clear (None); the station wires it to the publisher's retained alarm.
    """

    def __init__(
        self,
        line: float,
        p0: float,
        shift: float = 3.0,
        h: float = 10.0,
        alarm: Callable[[str | None], None] | None = None,
        label: str = "",
        quantile: str = "p90",
    ) -> None:
        if not 0.0 < p0 < 1.0 or not 1.0 < shift < 1.0 / p0 or h <= 0:
            raise ValueError(
                f"drift: need 0 < p0 < 1, 1 < shift < 1/p0, h > 0; got {p0}, {shift}, {h}"
            )
        self.p0, self.p1, self.h = p0, shift * p0, h
        self.up = math.log(self.p1 / p0)
        self.down = math.log((1.0 - self.p1) / (1.0 - p0))  # < 0
        self.alarm = alarm
        self.label = label
        self.quantile = quantile
        self._lock = threading.Lock()
        self.line = float(line)
        self._reset()

    def _reset(self) -> None:
        self.s = 0.0
        self.window = 0  # good parts since S last was 0: the excursion the evidence covers
        self.exceed = 0  # exceedances among them
        self.raised = False
        self.n = 0
        self.alarms = 0
        self.last_text: str | None = None

    def rebase(self, line: float) -> None:
        """New thresholds (hot reload): a new reference line, the statistic restarts at 0."""
        with self._lock:
            self.line = float(line)
            was = self.raised
            self._reset()
        if was and self.alarm is not None:
            self.alarm(None)

    def on_part(self, frame: Any, amap: Any, decision: Any, event: dict) -> None:
        """A station observer (Station.observers): accepted parts only."""
        if not decision.reject:
            self.observe(decision.score)

    def observe(self, score: float) -> None:
        """One accepted part's score (non-finite scores are never accepted parts)."""
        x = score > self.line
        with self._lock:
            self.n += 1
            self.s = max(0.0, self.s + (self.up if x else self.down))
            if self.s > 0.0:
                self.window += 1
                self.exceed += int(x)
            else:
                self.window = self.exceed = 0
            change: str | None = None
            if not self.raised and self.s > self.h:
                self.raised = True
                self.alarms += 1
                self.last_text = change = self._text()
            elif self.raised:
                self.s = min(self.s, self.h)  # bounded time to clear once the shift ends
                if self.s <= 0.0:
                    self.raised = False
                    change = ""
        # The publisher logs the alarm and its clearing (edge.mqtt.alarms).
        if change is not None and self.alarm is not None:
            self.alarm(change or None)

    def _text(self) -> str:
        rate = self.exceed / self.window if self.window else 0.0
        return (
            f"drift: {self.exceed} of the last {self.window} good parts scored above the "
            f"calibration's good {self.quantile} {self.line:.4g} ({rate:.0%}, expected "
            f"{self.p0:.0%}); CUSUM {self.s:.2f} > {self.h:g}"
        )

    def state(self) -> dict[str, Any]:
        """The statistic and its evidence, for the view and the metrics."""
        with self._lock:
            return {
                "raised": self.raised,
                "statistic": round(self.s, 3),
                "threshold": self.h,
                "window": self.window,
                "exceedances": self.exceed,
                "line": self.line,
                "quantile": self.quantile,
                "p0": self.p0,
                "p1": self.p1,
                "parts": self.n,
                "alarms": self.alarms,
                "text": self.last_text if self.raised else None,
            }


def reference_line(stats: dict[str, Any], quantile: str) -> float | None:
    """The calibration's good-score quantile from thresholds.yaml `stats`, or None."""
    good = (stats or {}).get("good") or {}
    value = good.get(quantile)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def from_config(cfg: Any, thresholds: Any, publisher: Any, label: str) -> DriftWatch | None:
    """The station's DriftWatch (cfg: edge.config.DriftConfig), or None when off or when the
    thresholds carry no good-score statistics to compare with (logged)."""
    if not cfg.enabled:
        return None
    line = reference_line(thresholds.stats, cfg.quantile)
    if line is None:
        log.warning(
            "%s: drift watch off: thresholds.yaml has no stats.good.%s (fit it with "
            "`python -m calibration fit`)",
            label,
            cfg.quantile,
        )
        return None

    def alarm(text: str | None) -> None:
        if text is None:
            clear = getattr(publisher, "clear_alarm", None)
            if clear is not None:
                clear("drift")
        else:
            raise_ = getattr(publisher, "raise_alarm", None)
            if raise_ is not None:
                raise_("drift", text)

    return DriftWatch(
        line,
        1.0 - QUANTILES[cfg.quantile],
        cfg.shift,
        cfg.threshold,
        alarm,
        label,
        cfg.quantile,
    )
