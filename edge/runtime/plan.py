"""The one assembly path: station configs -> a `Plan` -> an opened `Pipeline`.

    build(cfgs)            config -> bundle (hashes) -> thresholds (refused if missing or
                           unusable) -> post-processor, per station; which stations share a
                           loaded model. Opens nothing: no backend, socket, camera or folder.
    open_pipeline(plan)    backends (one per distinct bundle/backend/precision/threads, warmed
                           up) -> publishers (started) -> evidence folders -> sources (opened
                           last: a live camera starts buffering at once) -> stations attached to
                           their engines. Fails fast and closes what it opened on any problem.

`edge run` opens the plan and runs it; `edge check` walks the same steps with `report` printing
each (and a throwaway publisher, so a running station on the same broker is not disturbed);
`edge bench` builds its plan from an in-memory config.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Tuple

import cv2

import edge
from edge.backends import load_backend
from edge.bundle import Bundle
from edge.drift import from_config as drift_from_config
from edge.drift import reference_line
from edge.errors import ConfigError
from edge.postprocess import PostProcessor, effective_min_area
from edge.postprocess import from_bundle as postprocessor_from_bundle
from edge.reload import ThresholdsWatcher, validate_thresholds
from edge.runtime.engine import Engine, warmup
from edge.runtime.pipeline import Pipeline
from edge.runtime.station import Station, StationSettings
from edge.sources import open_source

if TYPE_CHECKING:
    from edge.config import StationConfig
    from edge.ports import Publisher

log = logging.getLogger("edge.pipeline")

Report = Callable[[str, str], None]  # (step, what was found): `edge check` prints it
PublisherFactory = Callable[[Any, Dict[str, Any]], Any]  # (StationConfig, status) -> started
EngineKey = Tuple[str, str, str, int, bool]


def _quiet(_what: str, _detail: str) -> None:
    pass


@dataclass
class StationPlan:
    cfg: StationConfig
    bundle: Bundle
    thresholds: Any  # edge.bundle.Thresholds
    post: PostProcessor
    engine: EngineKey
    model: dict[str, str]  # {"name", "sha256"} written into every event

    @property
    def label(self) -> str:
        return f"{self.cfg.station.line}/{self.cfg.station.name}"


@dataclass
class EnginePlan:
    name: str
    backend: str
    bundle: Bundle
    precision: str
    opts: dict[str, Any]
    max_batch: int


@dataclass
class Plan:
    stations: list[StationPlan]
    engines: dict[EngineKey, EnginePlan] = field(default_factory=dict)
    opencv_threads: int = 1


def warn_thresholds_precision(thresholds: Any, bundle: Bundle, precision: str) -> bool:
    """Warn when thresholds were fitted on another graph of the bundle (e.g. fp32 vs int8):
    quantisation shifts the score distribution, so the false-reject rate may differ."""
    fitted = thresholds.model_sha256
    if fitted and fitted != bundle.model_sha256(precision):
        log.warning(
            "%s: fitted on the %s graph, running %s; recalibrate for %s to keep the target rates",
            bundle.thresholds_path,
            thresholds.precision,
            precision,
            precision,
        )
        return True
    return False


# ------------------------------------------------------------------------------------ build
def build(
    cfgs: list[StationConfig],
    *,
    backend_opts: dict[str, Any] | None = None,
    report: Report = _quiet,
    verify: bool = False,
) -> Plan:
    """Read and validate everything the stations need before anything is opened.

    verify: check the sha256 of every bundle file now (`edge check`); otherwise each file is
    verified when it is loaded."""
    _check_distinct(cfgs)
    threads = {c.runtime.opencv_threads for c in cfgs}
    if len(threads) > 1:
        log.warning("runtime.opencv_threads differs between stations; using the largest")
    plan = Plan([], opencv_threads=max(threads))
    for cfg in cfgs:
        rt = cfg.runtime
        report(
            "config",
            f"{cfg.path} (station {cfg.station.line}/{cfg.station.name}, {cfg.mode}, queues "
            f"{cfg.queue_size}, inference threads {rt.inference_threads or 'auto'}, "
            f"spin {'on' if rt.spin else 'off'}, opencv threads {rt.opencv_threads})",
        )
        bundle = Bundle(cfg.bundle)
        m = bundle.manifest
        if verify:
            bundle.verify_all()
        report(
            "bundle",
            f"{bundle.root}: {m.name} v{m.version} ({m.model}/{m.backbone}), "
            f"input {m.input.height}x{m.input.width}, {len(m.files)} files"
            f"{', hashes verified' if verify else ''}",
        )
        th = bundle.thresholds()  # BundleError telling to run calibration if missing
        validate_thresholds(th, bundle.thresholds_path)
        mismatch = warn_thresholds_precision(th, bundle, cfg.precision)
        override = cfg.postprocess.min_region_area is not None
        report(
            "thresholds",
            f"image {th.image_threshold:.6g}, pixel {th.pixel_threshold:.6g}, "
            f"min area {effective_min_area(th, cfg.postprocess)}"
            f"{' (station override)' if override else ''} ({th.method}"
            f"{', fitted on ' + th.precision if mismatch else ''}); "
            f"hot reload {'on file change and SIGHUP' if cfg.thresholds.watch else 'on SIGHUP'}",
        )
        post = postprocessor_from_bundle(th, bundle.image_size, cfg.preprocess, cfg.postprocess)
        key = (
            str(bundle.root.resolve()),
            cfg.backend,
            cfg.precision,
            rt.inference_threads,
            rt.spin,
        )
        if key not in plan.engines:
            opts = {"intra_op_threads": rt.inference_threads, "spin": rt.spin}
            opts.update(backend_opts or {})
            name = f"infer-{len(plan.engines)}"
            plan.engines[key] = EnginePlan(
                name, cfg.backend, bundle, cfg.precision, opts, rt.max_batch
            )
        model = {"name": m.name, "sha256": bundle.model_sha256(cfg.precision)}
        plan.stations.append(StationPlan(cfg, bundle, th, post, key, model))
    return plan


# ------------------------------------------------------------------------------------- open
def open_pipeline(
    plan: Plan,
    *,
    max_frames: int | None = None,
    publishers: list[Publisher] | None = None,
    publisher_factory: PublisherFactory | None = None,
    retry_open: bool | None = None,
    report: Report = _quiet,
) -> Pipeline:
    """Open every backend, publisher, evidence writer and source of `plan` into a Pipeline.

    publishers: one ready publisher per station (tests), else `publisher_factory(cfg, status)`
    (default: the station's own edge.mqtt.Publisher, started). retry_open: False fails at once
    when a live camera is absent (`edge check`); None keeps the config's `source.retry_open`.
    """
    # Decode/resize/post run on their own threads, one core each: an OpenCV pool per call
    # would only take cores from inference.
    cv2.setNumThreads(plan.opencv_threads)
    factory = publisher_factory or station_publisher
    with contextlib.ExitStack() as undo:
        engines: dict[EngineKey, Engine] = {}
        for key, ep in plan.engines.items():
            backend = load_backend(ep.backend, ep.bundle, ep.precision, **ep.opts)
            undo.callback(backend.close)
            warmup(backend)
            providers = getattr(backend, "providers", None)
            report(
                "backend",
                f"{backend.name} {ep.precision}, input {backend.input_shape}"
                + (f", providers {', '.join(providers)}" if providers else ""),
            )
            engines[key] = Engine(backend, ep.max_batch, name=ep.name)
        outputs = []
        for i, sp in enumerate(plan.stations):
            cfg = sp.cfg
            pub = publishers[i] if publishers is not None else None
            if pub is None:
                status = {
                    "station": cfg.station.name,
                    "line": cfg.station.line,
                    "model": sp.model["name"],
                    "model_sha256": sp.model["sha256"],
                    "precision": cfg.precision,
                    "backend": engines[sp.engine].backend.name,
                    "config_sha256": cfg.sha256,
                    "version": edge.__version__,
                }
                pub = factory(cfg, status)
                undo.callback(pub.close)  # releases the spool if start() failed half-way
                report("broker", f"{cfg.mqtt.host}:{cfg.mqtt.port} reachable")
                for out in getattr(pub, "outputs", [])[1:]:  # edge.outputs.Outputs
                    h = out.health()
                    report(out.name, getattr(out, "found", "") or f"{h['state']}: {h['alarm']}")
            writer = _evidence(sp, report)
            outputs.append((pub, writer))
        stations = []
        for sp, (pub, writer) in zip(plan.stations, outputs):
            cfg = sp.cfg
            source = open_source(
                cfg.source, triggered=cfg.mode == "triggered", retry_open=retry_open
            )
            undo.callback(source.close)
            if cfg.on_error == "pass":
                log.warning(
                    "%s: on_error: pass: parts without a valid verdict (undecodable frame, "
                    "failed inference, NaN output) are let through, only counted",
                    sp.label,
                )
            st = _station(sp, source, pub, writer, max_frames)
            engines[sp.engine].attach(st)
            stations.append(st)
        undo.pop_all()
    return Pipeline.from_stations(stations, list(engines.values()), warm=True)


def station_publisher(cfg: Any, status: dict[str, Any]) -> Publisher:
    """The station's own publisher, started: BrokerError (one line) if the broker is
    unreachable, unless the config says to inspect and spool until it comes; with further
    outputs configured (opcua), an edge.outputs.Outputs over it and them."""
    from edge import outputs
    from edge.mqtt import Publisher

    pub = Publisher(cfg.mqtt, cfg.topic_base, status)
    try:
        pub.start(required=cfg.mqtt.require_broker_at_start)
        return outputs.wrap(pub, cfg)  # + OPC UA etc. when configured (edge/outputs/)
    except BaseException:
        pub.close()
        raise


def _evidence(sp: StationPlan, report: Report) -> Any:
    from edge import evidence as evidence_mod

    cfg = sp.cfg
    writer = evidence_mod.from_config(
        cfg,
        info={
            "station": cfg.station.name,
            "line": cfg.station.line,
            "bundle": str(sp.bundle.root),
            "model_sha256": sp.model["sha256"],
            "model_input": list(sp.bundle.image_size),
            "crop": cfg.preprocess.crop,
            "note": "raw frames (BGR PNG) of accepted parts; apply `crop` before "
            "edge.preprocess.to_input, as the station does",
        },
    )
    if writer is not None:
        mb = 1024 * 1024
        for what, qd in (("evidence", writer.evidence), ("recalib", writer.recal)):
            if qd is not None:
                report(
                    what,
                    f"{qd.path}: writable, {len(qd)} kept, {qd.bytes / mb:.1f} of "
                    f"{qd.quota / mb:g} MB",
                )
    return writer


def _station(sp: StationPlan, source: Any, pub: Any, writer: Any, max_frames: int | None):
    cfg = sp.cfg
    drift = drift_from_config(cfg.drift, sp.thresholds, pub, sp.label)
    watcher = ThresholdsWatcher(
        sp.bundle,
        _threshold_applier(sp.post, cfg, sp.bundle, drift),
        sp.thresholds,
        watch=cfg.thresholds.watch,
        check_interval_s=cfg.thresholds.check_interval_s,
        label=sp.label,
    )
    settings = StationSettings(
        size=sp.bundle.image_size,
        station=cfg.station.name,
        line=cfg.station.line,
        model=sp.model,
        crop=cfg.preprocess.crop,
        mode=cfg.mode,
        queue_size=cfg.queue_size,
        read_timeout_s=cfg.source.timeout_s,
        metrics_interval_s=cfg.metrics.interval_s,
        publish_results=cfg.mqtt.publish_results,
        max_frames=max_frames,
        window=cfg.metrics.window,
        on_error=cfg.on_error,
        heartbeat_s=cfg.heartbeat_s,
        stall_s=cfg.stall_s,
    )
    st = Station(
        source=source,
        postprocessor=sp.post,
        publisher=pub,
        evidence=writer,
        watcher=watcher,
        settings=settings,
    )
    if drift is not None:
        st.drift = drift
        st.observers.append(drift.on_part)
    return st


def _threshold_applier(
    post: PostProcessor, cfg: Any, bundle: Bundle, drift: Any = None
) -> Callable[[Any], None]:
    def apply(th: Any) -> None:
        warn_thresholds_precision(th, bundle, cfg.precision)
        post.set_thresholds(
            th.image_threshold, th.pixel_threshold, effective_min_area(th, cfg.postprocess)
        )
        if drift is not None:  # new calibration, new reference: the watch starts over
            line = reference_line(th.stats, cfg.drift.quantile)
            if line is not None:
                drift.rebase(line)

    return apply


def _check_distinct(cfgs: list[Any]) -> None:
    """Stations in one process must not share ids, MQTT client ids, spools or folders."""
    seen: dict[str, dict[Any, str]] = {}
    for cfg in cfgs:
        checks = {
            "station (line/name)": (cfg.station.line, cfg.station.name),
            "mqtt.client_id": cfg.mqtt.client_id,
            "mqtt.spool": os.path.realpath(cfg.mqtt.spool),
            "evidence.dir": cfg.evidence.dir and os.path.realpath(cfg.evidence.dir),
            "recalibration.dir": cfg.recalibration.dir and os.path.realpath(cfg.recalibration.dir),
        }
        for what, value in checks.items():
            if value is None:
                continue
            other = seen.setdefault(what, {}).get(value)
            if other is not None:
                raise ConfigError(
                    f"{cfg.path}: {what} {value!r} is also used by {other}; stations in one "
                    "process need their own"
                )
            seen[what][value] = cfg.path
