"""LineInspect device runtime: sources, backends, post-processing, MQTT, pipeline. No torch here."""

from __future__ import annotations

__version__ = "0.1.0"
