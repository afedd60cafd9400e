"""LineInspect device runtime: sources, backends, post-processing, MQTT, pipeline. No torch here."""

__version__ = "0.1.0"
