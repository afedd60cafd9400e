"""The station pipeline's public names, kept where callers (tests, scripts) import them from.

The runtime itself lives in edge/runtime/ (see its package docstring); configs are assembled
into a pipeline by edge.runtime.plan.
"""

from __future__ import annotations

from edge.runtime.counters import ERROR_STAGES, Counters
from edge.runtime.engine import FATAL_INFER_FAILURES, Engine, warmup
from edge.runtime.inbox import POLL_S, Control, Inbox, Item
from edge.runtime.pipeline import Pipeline
from edge.runtime.plan import warn_thresholds_precision
from edge.runtime.station import STAGES, Station, StationSettings

__all__ = [
    "ERROR_STAGES",
    "FATAL_INFER_FAILURES",
    "POLL_S",
    "STAGES",
    "Control",
    "Counters",
    "Engine",
    "Inbox",
    "Item",
    "Pipeline",
    "Station",
    "StationSettings",
    "warmup",
    "warn_thresholds_precision",
]
