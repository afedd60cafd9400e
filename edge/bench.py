"""`python -m edge bench`: what the pipeline costs on top of the bare backend, in one run.

    python -m edge bench --bundle BUNDLE --source URI [--frames N] [--json FILE]

1. Reads N frames from the source and preprocesses them (decode + resize, outside any timing).
2. Rounds (default 4), each: the bare backend on those preprocessed frames, one after the other
   (images/s, per-call latency, process CPU per image), then the full pipeline
   (built by edge.runtime.plan as `edge run` builds it, triggered mode, nothing dropped, station defaults: rejects go out
   over MQTT through the spool) on the same N frames from the same source, decoding them again,
   with a real broker. Alternating the two in short rounds keeps a shared machine's changing
   load out of the ratio; the ratio reported is the median of the rounds' ratios.
3. Latency: the pipeline again, publishing every part's result at QoS 1, with the source paced
   at `--latency-load` (0.5) x the throughput just measured (a line runs with headroom; at
   saturation every frame waits for the ones before it by definition). End-to-end latency =
   capture -> the broker's PUBACK for that part's event, taken by the station's publisher
   (`result_acked` for every part, `reject_acked` for the rejects). A subscriber on the broker
   also times capture -> delivered to it (`delivered_ms`, a later point than the ack).
4. Optional `--soak SECONDS`: a looping replay for that long with RSS sampled every second, to
   show memory stays flat.

No broker given (--broker HOST:PORT): a private mosquitto on a free loopback port is started.
Prints a summary and writes everything as JSON; it asserts nothing (tests do not time things).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge import config as config_mod
from edge.atomic import atomic_write
from edge.broker import Mosquitto
from edge.errors import ConfigError, SourceError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle directory (with thresholds.yaml)")
    p.add_argument("--source", required=True, help="source URI (file://video, file://dir/, ...)")
    p.add_argument("--frames", type=int, default=200, help="frames per measurement (200)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results here")
    p.add_argument("--rounds", type=int, default=4, help="bare/pipeline alternations (4)")
    p.add_argument("--backend", default="onnxruntime", help="backend name (onnxruntime)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"))
    p.add_argument("--threads", type=int, default=0, help="inference threads, 0 = per core")
    p.add_argument("--spin", action="store_true", help="let ONNX Runtime threads busy-wait")
    p.add_argument("--opencv-threads", type=int, default=1)
    p.add_argument("--queue-size", type=int, default=4)
    p.add_argument("--broker", default=None, metavar="HOST:PORT", help="default: private one")
    p.add_argument(
        "--latency-load",
        type=float,
        default=0.5,
        help="latency phase: source rate as a fraction of the pipeline's measured throughput "
        "(0.5; 0 = skip)",
    )
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="RSS soak run")
    p.add_argument(
        "--viewers",
        type=int,
        default=0,
        metavar="N",
        help="throughput phase with the operator view on and N viewers connected (edge/ui)",
    )
    p.add_argument(
        "--opcua",
        action="store_true",
        help="also serve every verdict over OPC UA (server mode, loopback, no security; needs "
        "the `opcua` extra) and report decision -> OPC UA write",
    )
    p.add_argument(
        "--reject-all",
        action="store_true",
        help="image and pixel thresholds 0 in every pipeline run: every part is a reject, "
        "spooled and published (the reject path under stress, a weak model's worst case)",
    )
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------ helpers
def _pct(values: list[float] | np.ndarray, qs=(50, 95, 99)) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    if not arr.size:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": round(float(v), 3) for q, v in zip(qs, np.percentile(arr, qs))}


def rss_mb() -> float:
    """Current resident set size (MB), from /proc (getrusage only knows the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _station_cfg(
    args: argparse.Namespace, host: str, port: int, work: Path, results: bool = False, **source: Any
):
    """A station config for the run, in memory. results: publish every part (the latency phase
    needs them; the throughput phase runs as a station does by default: rejects only)."""
    data = {
        "station": {"line": "bench", "name": "station1"},
        "bundle": str(Path(args.bundle).resolve()),
        "backend": args.backend,
        "precision": args.precision,
        "mode": "triggered",
        "queue_size": args.queue_size,
        # relative to where bench runs
        "source": {"uri": args.source, "loop": True, **source},
        "mqtt": {
            "host": host,
            "port": port,
            "spool": str(work / "spool.sqlite"),
            "publish_results": results,
            "result_qos": 1 if results else 0,
            "client_id": f"lineinspect-bench-{os.getpid()}",
        },
        "metrics": {"interval_s": 5.0},
        "thresholds": {"watch": False},
        **_opcua_section(args),
        "runtime": {
            "inference_threads": args.threads,
            "spin": bool(args.spin),
            "opencv_threads": args.opencv_threads,
        },
    }
    return config_mod.from_mapping(data, base=Path.cwd(), source="<edge bench>")


def _opcua_section(args: argparse.Namespace) -> dict[str, Any]:
    if not getattr(args, "opcua", False):
        return {}
    from edge.opcua.config import free_endpoint

    url = free_endpoint("opc.tcp://127.0.0.1:0/lineinspect")
    return {"opcua": {"mode": "server", "endpoint": url, "security": "none", "anonymous": True}}


def _open(cfg: Any, max_frames: int | None = None, reject_all: bool = False) -> Any:
    """The station's own assembly path (edge.runtime.plan), as `edge run` takes it.

    reject_all: thresholds 0 (image and pixel) instead of the bundle's, so every part is
    rejected and every pixel above 0 is labelled: the worst case of the reject path."""
    from edge.runtime import plan

    built = plan.build([cfg])
    if reject_all:
        for sp in built.stations:
            sp.post.set_thresholds(0.0, 0.0, sp.post.min_region_area)
    return plan.open_pipeline(built, max_frames=max_frames)


def _read_frames(args: argparse.Namespace, size: tuple[int, int]) -> np.ndarray:
    """N preprocessed frames (N,3,H,W) from the source, looping it if it is shorter."""
    from edge.preprocess import to_input
    from edge.sources import EndOfStream, create_source

    src = create_source(args.source, loop=True)
    src.open()
    out = np.empty((args.frames, 3, *size), np.uint8)
    try:
        n = 0
        deadline = time.monotonic() + 60
        while n < args.frames:
            try:
                f = src.read(timeout=5.0)
            except EndOfStream:
                raise SourceError(f"{args.source}: no readable frame") from None
            if f is None:
                if time.monotonic() > deadline:
                    raise SourceError(f"{args.source}: only {n} frames within 60 s")
                continue
            out[n] = to_input(f.image, size)
            n += 1
    finally:
        src.close()
    return out


def bench_backend(backend: Any, frames: np.ndarray) -> dict[str, Any]:
    """Bare backend, one preprocessed frame per call, back to back."""
    times = []
    cpu0 = time.process_time()
    t_start = time.perf_counter()
    for i in range(len(frames)):
        t = time.perf_counter()
        backend.infer(frames[i : i + 1])
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - t_start
    cpu = time.process_time() - cpu0
    ms = np.asarray(times) * 1000
    return {
        "images_per_s": round(len(frames) / wall, 3),
        "latency_ms": _pct(ms),
        "cpu_ms_per_image": round(cpu * 1000 / len(frames), 3),
        "wall_s": round(wall, 3),
    }


def bench_pipeline(
    cfg: Any, frames: int, listener: Any = None, *, viewers: int = 0, reject_all: bool = False
) -> dict[str, Any]:
    """The full pipeline on `frames` frames of cfg's source; e2e latencies if a listener;
    with `viewers`, the operator view on and that many viewers connected throughout."""
    pipe = _open(cfg, max_frames=frames, reject_all=reject_all)
    load = None
    if viewers:
        from edge.ui.viewload import ViewLoad

        load = ViewLoad(pipe.stations, viewers)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    try:
        summary = pipe.run()
    finally:
        view_stats = load.close() if load is not None else None
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    out: dict[str, Any] = {
        "images_per_s": summary["fps"],
        # whole process (all threads, incl. MQTT), run() only: the pipeline's cost per image
        "cpu_ms_per_image": round(cpu * 1000 / max(1, summary["frames"]), 3),
        "frames": summary["frames"],
        "drops": summary["drops"],
        "errors": summary["errors"],
        "rejects": summary["rejects"],
        "wall_s": round(wall, 3),
        "stages_ms": summary["latency_ms"],
        "stages_p99_ms": {k: v["p99"] for k, v in summary["latency_ms"].items()},
        # decision -> written into the OPC UA server's address space (--opcua)
        "opcua_written_ms": summary["latency_ms"].get("opcua_written"),
        "publisher": {
            k: summary["publisher"].get(k) for k in ("published", "acked", "spooled", "refused")
        },
    }
    if view_stats is not None:
        out["view"] = view_stats
    if listener is not None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got = [e for e in listener.events if e.kind == "result"]
            if len(got) >= summary["frames"]:
                break
            time.sleep(0.05)
        results = [e for e in listener.events if e.kind == "result"]
        rejects = [e for e in listener.events if e.kind == "reject"]
        # capture -> PUBACK, from the publisher's windows (every part's result; the rejects)
        out["e2e_ms"] = summary["latency_ms"]["result_acked"]
        out["e2e_reject_ms"] = summary["latency_ms"]["reject_acked"]
        for key, events in (("delivered_ms", results), ("delivered_reject_ms", rejects)):
            out[key] = _pct([(e.received - e.payload["capture_time"]) * 1000 for e in events])
        out["results_received"] = len(results)
        out["rejects_received"] = len(rejects)
    return out


def soak(cfg: Any, seconds: float, reject_all: bool = False) -> dict[str, Any]:
    """Looping replay for `seconds`, RSS sampled every second; memory must stay flat."""
    pipe = _open(cfg, reject_all=reject_all)
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append((round(time.monotonic() - t0, 1), round(rss_mb(), 2)))
            if time.monotonic() - t0 >= seconds:
                pipe.stop()

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    summary = pipe.run()
    done.set()
    th.join()
    rss = np.asarray([s[1] for s in samples])
    t = np.asarray([s[0] for s in samples])
    # Skip the first fifth (allocator and caches warming up), fit a line to the rest.
    k = len(rss) // 5
    slope = float(np.polyfit(t[k:], rss[k:], 1)[0]) * 60 if len(rss) - k >= 3 else None
    return {
        "seconds": round(time.monotonic() - t0, 1),
        "frames": summary["frames"],
        "fps": summary["fps"],
        "rss_mb_first": float(rss[k]) if rss.size else None,
        "rss_mb_last": float(rss[-1]) if rss.size else None,
        "rss_mb_max": float(rss.max()) if rss.size else None,
        "rss_slope_mb_per_min": round(slope, 3) if slope is not None else None,
        "samples": samples,
    }


def run(args: argparse.Namespace) -> int:
    from edge.backends import load_backend
    from edge.bundle import Bundle
    from edge.listen import Listener

    if args.frames < 10:
        raise ConfigError("--frames: at least 10")
    import cv2

    cv2.setNumThreads(args.opencv_threads)
    bundle = Bundle(args.bundle)
    bundle.thresholds()  # the pipeline refuses a bundle without: fail before measuring
    size = bundle.image_size
    loadavg = os.getloadavg()
    result: dict[str, Any] = {
        "bundle": {
            "path": str(bundle.root),
            "name": bundle.manifest.name,
            "model": bundle.manifest.model,
            "backbone": bundle.manifest.backbone,
            "input": list(size),
        },
        "source": args.source,
        "frames": args.frames,
        "settings": {
            "backend": args.backend,
            "precision": args.precision,
            "inference_threads": args.threads,
            "spin": bool(args.spin),
            "opencv_threads": args.opencv_threads,
            "queue_size": args.queue_size,
            "mode": "triggered",
            "viewers": args.viewers,
            "reject_all": bool(args.reject_all),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "loadavg_start": [round(v, 2) for v in loadavg],
        },
    }
    frames = _read_frames(args, size)

    with tempfile.TemporaryDirectory(prefix="lineinspect-bench-") as tmp:
        work = Path(tmp)
        broker = None
        if args.broker:
            host, _, port = args.broker.rpartition(":")
            host, port = host or "127.0.0.1", int(port)
        else:
            broker = Mosquitto(work).start()
            host, port = broker.host, broker.port
        try:
            cfg = _station_cfg(args, host, port, work)
            backend = load_backend(
                args.backend,
                bundle,
                args.precision,
                intra_op_threads=args.threads,
                spin=bool(args.spin),
            )
            result["backend_providers"] = getattr(backend, "providers", None)
            for _ in range(5):
                backend.infer(frames[:1])
            rounds = []
            for r in range(args.rounds):
                bare = bench_backend(backend, frames)
                # A subscriber, as on a line (the gate): a reject nobody subscribes to is not
                # delivered, stays spooled, and would turn up in the next phase.
                with Listener(host, port, cfg.topic_base, keep_events=False):
                    pipe = bench_pipeline(
                        cfg, args.frames, viewers=args.viewers, reject_all=args.reject_all
                    )
                ratio = pipe["images_per_s"] / bare["images_per_s"]
                rounds.append({"backend": bare, "pipeline": pipe, "ratio": round(ratio, 4)})
                print(
                    f"round {r + 1}: backend {bare['images_per_s']:.2f} img/s "
                    f"({bare['cpu_ms_per_image']:.1f} CPU ms/img), pipeline "
                    f"{pipe['images_per_s']:.2f} img/s ({pipe['cpu_ms_per_image']:.1f} CPU ms/img), "
                    f"ratio {ratio:.3f}, postprocess p99 {pipe['stages_p99_ms']['postprocess']} ms"
                    + (f", view {pipe['view']}" if "view" in pipe else ""),
                    flush=True,
                )
            result["rounds"] = rounds

            def med(kind: str, key: str) -> float:
                return float(np.median([r[kind][key] for r in rounds]))

            bare_ips, pipe_ips = med("backend", "images_per_s"), med("pipeline", "images_per_s")
            # The median of the per-round ratios: each compares two runs seconds apart.
            ratio = float(np.median([r["ratio"] for r in rounds]))
            bare_p50 = float(np.median([r["backend"]["latency_ms"]["p50"] for r in rounds]))
            post_p99 = float(
                np.median([r["pipeline"]["stages_p99_ms"]["postprocess"] for r in rounds])
            )
            result["backend"] = {
                "images_per_s": round(bare_ips, 3),
                "latency_p50_ms": bare_p50,
                "cpu_ms_per_image": med("backend", "cpu_ms_per_image"),
            }
            result["pipeline"] = {
                "opcua": bool(args.opcua),
                "images_per_s": round(pipe_ips, 3),
                "ratio": round(ratio, 4),
                "postprocess_p99_ms": post_p99,
                "cpu_ms_per_image": med("pipeline", "cpu_ms_per_image"),
            }
            accept = {
                "throughput_ratio_ge_0.95": ratio >= 0.95,
                "postprocess_p99_le_2ms": post_p99 <= 2.0,
            }
            if args.latency_load > 0:
                rate = round(args.latency_load * pipe_ips, 3)
                cfg_lat = _station_cfg(args, host, port, work, results=True, rate=rate)
                with Listener(host, port, cfg_lat.topic_base) as listener:
                    lat = bench_pipeline(cfg_lat, args.frames, listener, reject_all=args.reject_all)
                lat["source_rate"] = rate
                result["latency"] = lat
                limit = 1.5 * bare_p50 + 5.0
                e2e99 = lat["e2e_ms"]["p99"]
                rej99 = lat["e2e_reject_ms"]["p99"]
                accept["e2e_p99_le_1.5x_backend_p50_plus_5ms"] = (
                    e2e99 is not None and e2e99 <= limit
                )
                # The rejects' own tail (spool write included): None when no part was rejected.
                accept["reject_e2e_p99_le_limit"] = None if rej99 is None else rej99 <= limit
                result["latency"]["e2e_p99_limit_ms"] = round(limit, 3)
            backend.close()
            if args.soak > 0:
                cfg_soak = _station_cfg(args, host, port, work)
                result["soak"] = soak(cfg_soak, args.soak, args.reject_all)
        finally:
            if broker is not None:
                broker.kill()
    result["acceptance"] = accept
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    _print_summary(result)
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def _print_summary(r: dict[str, Any]) -> None:
    b, p = r["backend"], r["pipeline"]
    print(
        f"bare backend   {b['images_per_s']:.2f} img/s (p50 {b['latency_p50_ms']:.2f} ms, "
        f"{b['cpu_ms_per_image']:.2f} CPU ms/img)\n"
        f"pipeline       {p['images_per_s']:.2f} img/s ({p['cpu_ms_per_image']:.2f} CPU ms/img)  "
        f"ratio {p['ratio']:.3f} (median of rounds)  "
        f"postprocess p99 {p['postprocess_p99_ms']:.3f} ms"
    )
    opc = [x["pipeline"]["opcua_written_ms"] for x in r["rounds"]]
    if opc and opc[-1]:
        print(
            f"decision -> OPC UA write (last round): p50 {opc[-1]['p50']} ms, p99 {opc[-1]['p99']} ms"
        )
    if "latency" in r:
        lat = r["latency"]
        e = lat["e2e_ms"]
        print(
            f"latency @ {lat['source_rate']:.2f} img/s, capture -> broker ack: p50 {e['p50']} "
            f"ms, p99 {e['p99']} ms (limit {lat['e2e_p99_limit_ms']} ms; rejects p99 "
            f"{lat['e2e_reject_ms']['p99']} ms; delivered to a subscriber p99 "
            f"{lat['delivered_ms']['p99']} ms); stage p99 "
            + ", ".join(f"{k} {v}" for k, v in lat["stages_p99_ms"].items())
        )
    if "soak" in r:
        s = r["soak"]
        print(
            f"soak {s['seconds']} s, {s['frames']} frames: RSS {s['rss_mb_first']} -> "
            f"{s['rss_mb_last']} MB (max {s['rss_mb_max']}, slope {s['rss_slope_mb_per_min']} "
            "MB/min)"
        )
    print(f"peak RSS {r['peak_rss_mb']} MB; acceptance: {r['acceptance']}")
