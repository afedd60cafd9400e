"""The station runtime: camera -> decision -> MQTT, as concurrent stages with small queues.

    plan.py      configs -> Plan -> opened Pipeline (the one assembly path: run, check, bench)
    pipeline.py  Pipeline: stations + engines run as one unit; drain, flush, close
    station.py   Station: one camera's capture and post (decide, evidence, publish) threads
    engine.py    Engine: one loaded model and its thread, shared and batched across stations
    inbox.py     Item, Control (run flags), Inbox (bounded per-station FIFO before an engine)
    counters.py  Counters (one lock) and the metrics / snapshot / summary reports

The collaborators are typed by edge.ports (Source, Backend, Publisher, EvidenceSink).
"""
