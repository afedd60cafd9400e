"""Error types. Library code raises these; only the CLIs print them and exit non-zero."""

from __future__ import annotations


class LineInspectError(Exception):
    """Base class: a problem the user can act on. The message names the file, key or value."""


class ConfigError(LineInspectError):
    """A YAML file is malformed, has an unknown key, a wrong type or an invalid value."""


class BundleError(LineInspectError):
    """A bundle file is missing, tampered with (hash mismatch) or inconsistent."""


class SourceError(LineInspectError):
    """A camera/video source cannot be opened."""


class BackendError(LineInspectError):
    """An inference backend cannot load or run a model."""


class BrokerError(LineInspectError):
    """The MQTT broker cannot be reached or refused us."""


class DataError(LineInspectError):
    """An image set is empty, unreadable or not in the expected layout."""
