"""Reject-delivery fault table: each scenario against a real mosquitto and the real station.

    python scripts/fault_table.py [--only a,b] [--json FILE] [--workdir DIR] [--keep]

Runs the scenarios of tests/faults.py one after the other (about 3 minutes in all), prints
progress on stderr and a Markdown table on stdout: events sent (rejects owed), received,
duplicates, lost, not stored (counted by the station when its spool was full), backlog (events in
the spool when the fault cleared), time for that backlog to drain, notes. Exit status 1 when any
scenario lost an event or failed a check, 0 otherwise (skipped scenarios do not count).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.broker import find_mosquitto  # noqa: E402
from tests.faults import SCENARIOS, Outcome, Skip, markdown_table, run_scenario  # noqa: E402


def _mosquitto_version() -> str:
    binary = find_mosquitto()
    if binary is None:
        return "not installed"
    out = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else binary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--only", default=None, help=f"comma-separated subset of: {', '.join(SCENARIOS)}"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the outcomes as JSON")
    p.add_argument("--workdir", default=None, help="where scenarios run (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (logs, spools, configs)")
    args = p.parse_args(argv)

    names = list(SCENARIOS) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"error: unknown scenario(s) {unknown}; known: {list(SCENARIOS)}", file=sys.stderr)
        return 2
    if find_mosquitto() is None:
        print("error: mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lineinspect-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)

    outcomes: list[Outcome] = []
    skipped: dict[str, str] = {}
    t_all = time.monotonic()
    try:
        for k, name in enumerate(names, 1):
            t0 = time.monotonic()

            def say(msg: str, k: int = k, name: str = name, t0: float = t0) -> None:
                print(
                    f"[{k}/{len(names)} {name} +{time.monotonic() - t0:4.1f}s] {msg}",
                    file=sys.stderr,
                    flush=True,
                )

            say(SCENARIOS[name][2])
            try:
                out = run_scenario(name, workdir, say)
            except Skip as exc:
                skipped[name] = str(exc)
                say(f"SKIPPED: {exc}")
                continue
            outcomes.append(out)
            verdict = "ok" if out.ok else "FAILED"
            say(
                f"{verdict}: sent {out.sent}, received {out.received}, lost {out.lost}, "
                f"duplicates {out.duplicates}, not stored {out.not_stored}, drain {out.drain_s} s"
            )
            for problem in out.problems:
                say(f"  problem: {problem}")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = round(time.monotonic() - t_all, 1)

    print(markdown_table(outcomes))
    for name, why in skipped.items():
        print(f"\nskipped {name}: {why}")
    env = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "mosquitto": _mosquitto_version(),
        "elapsed_s": elapsed,
    }
    print(f"\n{len(outcomes)} scenario(s) in {elapsed:.0f} s; {env['mosquitto']}", flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "environment": env,
                    "outcomes": [o.as_dict() for o in outcomes],
                    "skipped": skipped,
                },
                indent=2,
            )
            + "\n"
        )
    if args.keep or args.workdir:
        print(f"workdir: {workdir}", file=sys.stderr)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
