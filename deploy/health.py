"""Health check of a deployed station, run on the device by deploy/remote.sh.

    health.py RELEASE_DIR [--timeout S] [--since EPOCH] [--settle S]

Healthy = the broker holds a retained `online` status on `<prefix>/<line>/<station>/status`
published by this release (its config sha256 and model sha256, time >= --since), and no `offline`
follows within --settle seconds. Exit 0 healthy, 1 not (the last status seen is printed), 2 error
(config unreadable, broker unreachable).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any


def status_time(payload: dict[str, Any]) -> float:
    t = payload.get("time")
    if isinstance(t, (int, float)):
        return float(t)
    try:
        return datetime.fromisoformat(str(t)).timestamp()
    except ValueError:
        return 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="health.py", description=__doc__.split("\n")[0])
    p.add_argument("release", type=Path)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for online")
    p.add_argument("--since", type=float, default=0.0, help="ignore statuses older (epoch s)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds online must hold")
    args = p.parse_args(argv)

    from edge import config
    from edge.bundle import Bundle
    from edge.errors import LineInspectError
    from edge.listen import Listener

    try:
        cfg = config.load(args.release / "station.yaml")
        model_sha = Bundle(cfg.bundle).model_sha256(cfg.precision)
        listener = Listener.from_config(cfg).start(timeout=cfg.mqtt.connect_timeout_s)
    except LineInspectError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    try:

        def mine(s: Any) -> bool:
            return (
                isinstance(s, dict)
                and s.get("config_sha256") == cfg.sha256
                and s.get("model_sha256") == model_sha
                and status_time(s) >= args.since - 1.0  # publish times are millisecond-rounded
            )

        topic = f"{cfg.topic_base}/status"

        def last() -> Any:
            # Only the station's own topic: `edge check` leaves a retained status on
            # <base>/check/status, which the listener also files under "status".
            found = [e.payload for e in listener.of_kind("status") if e.topic == topic]
            return found[-1] if found else None

        def online() -> bool:
            s = last()
            return mine(s) and s.get("state") == "online"

        ok = listener.wait_for(online, args.timeout)
        if ok:
            # A station that crashes right after connecting leaves its last will: wait for it.
            time.sleep(args.settle)
            ok = online()
        status = last()
    finally:
        listener.stop()
    if ok:
        print(
            f"online: {topic} model {status.get('model')} ({model_sha[:12]}), "
            f"backend {status.get('backend')} {status.get('precision')}, since {status.get('time')}"
        )
        return 0
    if status is None:
        seen = "no status message at all"
    else:
        whose = "this release" if mine(status) else "another release or an earlier start"
        seen = (
            f"last status {status.get('state')!r} from {whose} "
            f"(model {status.get('model')}, time {status.get('time')}"
            + (f", reason {status['reason']!r}" if status.get("reason") else "")
            + ")"
        )
    print(f"not online within {args.timeout:.0f} s on {topic}: {seen}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
