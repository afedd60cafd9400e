"""MQTT for a station: the publisher (reject events that are never lost, results, status,
metrics) and what it is made of.

    publisher.py   Publisher: the station's outputs, the worker thread, status and alarms
    connection.py  building and configuring the paho client (shared with `edge listen`),
                   connection diagnostics, event encoding
    ledger.py      the in-flight ledger: QoS 1 publishes awaiting their PUBACK, what an ack means
    spoolsync.py   when a re-send pass over the spool starts, and how far it may go
    alarms.py      the spool fill alarm levels and the alarms by kind

Topics and delivery guarantees: see edge/mqtt/publisher.py and docs/mqtt.md.
"""

from __future__ import annotations

from edge.errors import BrokerError
from edge.mqtt.alarms import ALARM_LEVELS
from edge.mqtt.connection import PASSWORD_ENV, DiagnosingClient, describe_error, encode_event
from edge.mqtt.ledger import NO_SUBSCRIBERS
from edge.mqtt.publisher import ACK_WINDOWS, Publisher
from edge.mqtt.spoolsync import NO_SUBSCRIBER_RETRY_S
from edge.mqtt.worker import ACK_ALARM_S
from edge.spool import SpoolError, SpoolFullError

__all__ = [
    "ACK_ALARM_S",
    "ACK_WINDOWS",
    "ALARM_LEVELS",
    "NO_SUBSCRIBERS",
    "NO_SUBSCRIBER_RETRY_S",
    "PASSWORD_ENV",
    "BrokerError",
    "DiagnosingClient",
    "Publisher",
    "SpoolError",
    "SpoolFullError",
    "describe_error",
    "encode_event",
]
