"""Error types. Library code raises these; only the CLIs print them and exit non-zero, all of
them through `run_cli`."""

from __future__ import annotations

import sys
from typing import Callable


class LineInspectError(Exception):
    """Base class: a problem the user can act on. The message names the file, key or value."""


class ConfigError(LineInspectError):
    """A YAML file is malformed, has an unknown key, a wrong type or an invalid value."""


class InvalidValue(ConfigError, ValueError):
    """A value out of range: a config key, a field of a bundle file, a command-line option.

    The message names the key (or option) and the value; a config loader adds the file. Also a
    ValueError, so a validate() that the typed config loader wraps with the file name
    (edge.typedconfig) raises it the same way as plain ValueError checks elsewhere."""


class BundleError(LineInspectError):
    """A bundle file is missing, tampered with (hash mismatch) or inconsistent."""


class WriteError(LineInspectError, OSError):
    """A file cannot be written (edge.atomic): the message names it. Also an OSError (with its
    errno), so code that handles a full disk as an OSError keeps doing so."""


class SourceError(LineInspectError):
    """A camera/video source cannot be opened."""


class BackendError(LineInspectError):
    """An inference backend cannot load or run a model."""


class BrokerError(LineInspectError):
    """The MQTT broker cannot be reached or refused us."""


class OutputError(LineInspectError):
    """An output other than MQTT (OPC UA) is misconfigured, unreachable or refused us."""


class DataError(LineInspectError):
    """An image set is empty, unreadable or not in the expected layout."""


def run_cli(
    command: Callable[[], int | None],
    *,
    redact: Callable[[str], str] = str,
    also: tuple[type[BaseException], ...] = (),
) -> int:
    """Run one CLI command the way every LineInspect CLI reports failure.

    A LineInspectError (and, while a CLI still lets library code raise them, the classes in
    `also`) prints one line `error: <message>` on stderr and returns 2; Ctrl-C prints
    `error: interrupted` and returns 130; anything else is a bug and keeps its traceback.
    redact: applied to the message (edge hides URI credentials)."""
    try:
        return int(command() or 0)
    except (LineInspectError, *also) as exc:
        print(f"error: {redact(' '.join(str(exc).split()))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
