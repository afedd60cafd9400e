"""The tests' mosquitto: the project's one launcher, edge/broker.py.

with Mosquitto(tmp_path, persistence=True) as broker:
    ... broker.host, broker.port ...
    broker.kill()      # SIGKILL: clients see their sockets die
    broker.restart()   # same port, same config (and persisted state, with persistence=True)
"""

from __future__ import annotations

from edge.broker import Mosquitto, find_mosquitto, free_port

__all__ = ["Mosquitto", "find_mosquitto", "free_port"]
