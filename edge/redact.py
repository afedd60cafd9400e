"""Credentials never leave the process: one helper for every URI that is printed or logged."""

from __future__ import annotations

import re

# scheme://user:password@host... or scheme://user@host...: the userinfo part, up to the last
# '@' before the path (a password may itself contain '@' or ':').
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")


def redact_uri(uri: object) -> str:
    """`rtsp://user:pass@cam/x` -> `rtsp://***@cam/x`; any text without credentials unchanged.

    Works on a URI inside a longer message too (an OpenCV or GStreamer error that quotes it)."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", str(uri))
