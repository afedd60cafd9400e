"""Device command line: `python -m edge run|check|listen`.

Any LineInspectError (bad config, bundle, source, backend, broker) prints one line
`error: <message>` on stderr and exits 2; a clean run exits 0.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edge import __version__, config, outputs
from edge.atomic import atomic_write
from edge.errors import SourceError, run_cli
from edge.redact import redact_uri

log = logging.getLogger("edge")


def _setup_logging(verbose: int, quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


# ---------------------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    from edge.runtime import plan

    cfgs = [config.load(p) for p in args.config]
    station_plan = plan.build(cfgs)  # everything read and validated before anything opens
    server = None
    if args.metrics_port is not None:
        from edge.metrics import MetricsServer

        # Bind before anything opens: a taken port fails before the camera starts.
        server = MetricsServer(list, args.metrics_port, args.metrics_host)
    try:
        view = _operator_view(cfgs, args)  # bound now too: a taken port fails early
    except BaseException:
        if server is not None:
            server.close()
        raise
    try:
        pipeline = plan.open_pipeline(station_plan, max_frames=args.max_frames)
    except BaseException:
        for s in (server, view):
            if s is not None:
                s.close()
        raise
    if server is not None:
        server.provider = pipeline.snapshots
        server.start()
    if view is not None:
        view.attach(pipeline.stations)
        view.start()

    def on_signal(signum: int, _frame: Any) -> None:
        if pipeline.stopping:
            # Second signal: the operator wants out now, drained or not.
            raise KeyboardInterrupt
        log.info("%s: stopping capture, draining", signal.Signals(signum).name)
        pipeline.stop()

    def on_hup(signum: int, _frame: Any) -> None:
        log.info("SIGHUP: re-reading thresholds.yaml before the next frame")
        pipeline.request_reload()

    handlers = {signal.SIGTERM: on_signal, signal.SIGINT: on_signal, signal.SIGHUP: on_hup}
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        summary = pipeline.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for s in (server, view):
            if s is not None:
                s.close()
    for st in summary.get("stations", {"": summary}).values():
        log.info(
            "done%s: %d frames, %d rejects, %d drops, %d errors, %.1f fps",
            f" {st['line']}/{st['station']}" if "station" in st else "",
            st["frames"],
            st["rejects"],
            st["drops"],
            st["errors"],
            st["fps"],
        )
    if args.summary_json:
        atomic_write(args.summary_json, json.dumps(summary, indent=2) + "\n")
    return 0


def _operator_view(cfgs: list[Any], args: argparse.Namespace) -> Any:
    """The process's operator view (edge/ui), bound, or None: from the first config's `ui:`
    section, `--ui-port`/`--ui-host` overriding it; the token from that config's
    credentials_file."""
    ui = copy.deepcopy(cfgs[0].ui)
    if args.ui_port is not None:
        ui.port = args.ui_port
    if args.ui_host is not None:
        ui.host = args.ui_host
    if ui.port is None:
        return None
    for cfg in cfgs[1:]:
        if cfg.ui.port is not None and (cfg.ui.port, cfg.ui.host) != (ui.port, ui.host):
            log.warning("%s: ui section ignored: one view per process (%s)", cfg.path, cfgs[0].path)
    from edge.ui.view import OperatorView

    return OperatorView(ui, cfgs[0].ui_token)


# -------------------------------------------------------------------------------------- check
def _ok(what: str, detail: str) -> None:
    print(f"ok    {what:<10} {detail}", flush=True)


def _check_publisher(cfg: Any, _status: dict[str, Any], spool_dir: Path) -> Any:
    """A throwaway publisher that leaves a running station on the same broker undisturbed."""
    from edge.mqtt import Publisher

    mq = copy.deepcopy(cfg.mqtt)
    # A second client with the station's client id would kick the running service off the
    # broker, and its spool must not be replayed from here: own id, throwaway spool.
    mq.client_id = f"{cfg.mqtt.client_id}-check"
    mq.spool = str(spool_dir / "spool.sqlite")
    # Its own topic, nothing retained: a check leaves no trace a gate or deploy could
    # mistake for the station's status.
    status = {"station": cfg.station.name, "line": cfg.station.line, "check": True}
    pub = Publisher(mq, f"{cfg.topic_base}/check", status, retain_status=False)
    try:
        pub.start()
        return outputs.wrap(pub, _check_outputs(cfg), required=True)
    except BaseException:
        pub.close(timeout_s=2)
        raise


def _check_outputs(cfg: Any) -> Any:
    """The config `check` opens outputs with: each must be reached now. A server-mode OPC UA
    output listens on a free port of its host instead (a running station holds its own)."""
    if cfg.opcua is None or cfg.opcua.mode != "server":
        return cfg
    from edge.opcua.config import free_endpoint

    cfg = copy.copy(cfg)
    cfg.opcua = copy.copy(cfg.opcua)
    cfg.opcua.endpoint = free_endpoint(cfg.opcua.endpoint)
    return cfg


def cmd_check(args: argparse.Namespace) -> int:
    """Validate everything `run` needs, one step at a time, printing what was found."""
    for i, path in enumerate(args.config):
        if i:
            print()
        _check_one(path)
    print("all checks passed")
    return 0


def _check_one(path: str) -> None:
    """The steps `run` takes (edge.runtime.plan), each printed, then one frame decided."""
    from edge.runtime import plan as plan_mod

    cfg = config.load(path)
    plan = plan_mod.build([cfg], report=_ok, verify=True)
    with tempfile.TemporaryDirectory(prefix="lineinspect-check-") as tmp:
        # Fail now rather than wait for the camera: `check` is asked whether it is there.
        pipeline = plan_mod.open_pipeline(
            plan,
            publisher_factory=functools.partial(_check_publisher, spool_dir=Path(tmp)),
            retry_open=False,
            report=_ok,
        )
        try:
            _check_frame(cfg, pipeline.station)
        finally:
            pipeline.close()


def _check_frame(cfg: Any, st: Any) -> None:
    """Read one frame from the opened source and decide it, as the station would."""
    import numpy as np

    from edge.preprocess import to_input
    from edge.sources import EndOfStream

    timeout = max(cfg.source.timeout_s, 5.0)
    deadline = time.monotonic() + timeout
    frame = None
    while frame is None and time.monotonic() < deadline:
        try:
            frame = st.source.read(timeout=max(0.0, deadline - time.monotonic()))
        except EndOfStream:
            raise SourceError(f"{redact_uri(cfg.source.uri)}: no readable frame") from None
    if frame is None:
        raise SourceError(f"{redact_uri(cfg.source.uri)}: no frame within {timeout:.0f}s")
    stats = st.source.stats()
    skipped = f", {stats['corrupt']} unreadable skipped" if stats.get("corrupt") else ""
    _ok(
        "source",
        f"{redact_uri(cfg.source.uri)}: frame {frame.image.shape[1]}x{frame.image.shape[0]} "
        f"from {frame.source}{skipped}",
    )
    backend = st.engine.backend
    t = time.monotonic()
    maps, scores = backend.infer(to_input(frame.image, st.size, st.crop)[None])
    ms = (time.monotonic() - t) * 1000
    d = st.post(maps[0], float(scores[0]), frame.image.shape)
    _ok(
        "inference",
        f"{ms:.1f} ms, score {d.score:.4g}, map max {float(np.max(maps)):.4g}, "
        f"{len(d.regions)} regions -> {'reject' if d.reject else 'pass'}",
    )


# ------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: `-v` before or after the subcommand both work without one overriding the other.
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="debug logging"
    )

    p = argparse.ArgumentParser(
        prog="python -m edge", description="LineInspect device runtime.", parents=[common]
    )
    p.add_argument("--version", action="version", version=f"lineinspect edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", parents=[common], help="run the station (until stopped/end of file)")
    r.add_argument(
        "config",
        nargs="+",
        help="station YAML; several = several cameras in one process (one model loaded per "
        "distinct bundle, shared)",
    )
    r.add_argument(
        "--max-frames",
        type=int,
        default=None,
        metavar="N",
        help="stop capture after N frames (then drain)",
    )
    r.add_argument(
        "--summary-json",
        default=None,
        metavar="FILE",
        help="write the run summary (counts, fps, latency percentiles) as JSON",
    )
    r.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve the metrics in Prometheus text format at http://HOST:PORT/metrics",
    )
    r.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics endpoint listens on (default 127.0.0.1: this machine only; "
        "0.0.0.0 exposes it to the network, unauthenticated)",
    )
    r.add_argument(
        "--ui-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve the operator view (live frames, rejects, scores, alarms) at "
        "http://HOST:PORT/ (overrides ui.port; 0 = any free port)",
    )
    r.add_argument(
        "--ui-host",
        default=None,
        metavar="HOST",
        help="address the view listens on (overrides ui.host, default 127.0.0.1); any other "
        "address needs ui_token in the credentials_file",
    )
    r.set_defaults(func=cmd_run)

    c = sub.add_parser(
        "check",
        parents=[common],
        help="validate config, bundle, thresholds, source, backend and broker",
    )
    c.add_argument("config", nargs="+", help="station YAML (several: each is checked)")
    c.set_defaults(func=cmd_check)

    b = sub.add_parser(
        "bench",
        parents=[common],
        help="measure the bare backend and the full pipeline on the same frames (JSON)",
    )
    from edge.bench import add_arguments as bench_arguments

    bench_arguments(b)

    try:
        import edge.listen as listen
    except ModuleNotFoundError as exc:
        if exc.name != "edge.listen":
            raise
    else:
        listen.add_parser(sub)
        lp = sub.choices.get("listen")
        if lp is not None and lp.get_default("func") is None:
            lp.set_defaults(func=listen.run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `check` prints its own findings; its INFO logs would only repeat them.
    _setup_logging(getattr(args, "verbose", 0), quiet=args.command in ("check", "bench"))
    return run_cli(lambda: args.func(args), redact=redact_uri)


if __name__ == "__main__":
    sys.exit(main())
