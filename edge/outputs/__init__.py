"""Where a station's verdicts go: MQTT (always: its rejects, status and metrics) and the
outputs its config adds, behind one Protocol (edge.ports.Output), fanned out by `Outputs`.

    OUTPUTS   config section -> factory(cfg, alarm) -> a started output (explicit registry)
    wrap()    the station's MQTT publisher + its configured outputs -> the station's publisher

The OPC UA output needs the `opcua` extra (asyncua, LGPL); it is imported only when configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from edge.errors import OutputError
from edge.outputs.fanout import Outputs
from edge.outputs.mqtt import MqttOutput
from edge.outputs.queued import QueuedOutput

if TYPE_CHECKING:
    from edge.ports import Output, Publisher

__all__ = ["OUTPUTS", "MqttOutput", "Outputs", "QueuedOutput", "opcua_output", "wrap"]

Factory = Callable[[Any, Callable[[str, Any], None]], "Output"]

# A server's first open builds asyncua's standard address space in Python: 3.3 s (asyncua 2.1,
# Python 3.11) to 5.1 s (asyncua 1.1, Python 3.8) on the 2-core x86 development VM, longer on a
# Jetson's cores; the client's `timeout_s` (5 s) is no bound for it. A failed open (a port in
# use, a bad certificate) reports at once, so only a slow start waits this long.
SERVER_START_S = 60.0


def opcua_output(cfg: Any, alarm: Callable[[str, Any], None], required: bool | None = None):
    """The `opcua:` section as a started QueuedOutput (server or client mode)."""
    try:
        from edge.opcua.client import ClientLink
        from edge.opcua.server import ServerLink
    except ImportError as exc:
        raise OutputError(
            f"{cfg.path}: opcua: needs the `opcua` extra (pip install 'lineinspect[opcua]'): {exc}"
        ) from exc
    oc = cfg.opcua
    link_cls = ServerLink if oc.mode == "server" else ClientLink
    out = QueuedOutput(
        "opcua",
        link_cls(oc, cfg.station.line, cfg.station.name),
        queue_size=oc.queue_size,
        alarm=alarm,
        reconnect_min_s=oc.reconnect_min_s,
        reconnect_max_s=oc.reconnect_max_s,
    )
    # A server that cannot listen is a configuration error in every case.
    must = oc.require_at_start or oc.mode == "server" if required is None else required
    wait = SERVER_START_S if oc.mode == "server" else oc.timeout_s + 2.0
    out.start(required=must, timeout_s=wait)
    return out


OUTPUTS: dict[str, Factory] = {"opcua": opcua_output}


def configured(cfg: Any) -> list[str]:
    """The config sections of cfg that name an output besides MQTT."""
    return [key for key in OUTPUTS if getattr(cfg, key, None) is not None]


def wrap(publisher: Publisher, cfg: Any, **kw: Any) -> Any:
    """The station's publisher: `publisher` alone, or an Outputs with every configured output
    (each started; on a failure the ones already started are closed, and it raises)."""
    keys = configured(cfg)
    if not keys:
        return publisher
    fan = Outputs(publisher, [], results=cfg.mqtt.publish_results)
    try:
        for key in keys:
            fan.outputs.append(OUTPUTS[key](cfg, fan.alarm, **kw))
    except BaseException:
        for out in fan.outputs[1:]:
            out.close()
        raise
    return fan
