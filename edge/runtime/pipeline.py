"""Stations and engines run as one unit: `run()` until stopped, then drain, flush and close.

    capture + preprocess --inbox--> infer (shared) --q_out--> postprocess + publish (+ evidence)
       (one per station)            (one per model)            (one per station)

Queues are small and bounded. `triggered` mode (one frame per part) never drops: a full inbox
blocks capture (back-pressure up to the source). `continuous` mode drops the OLDEST frame
waiting for the engine, and counts it; latency then stays bounded. After inference nothing is
dropped. Every frame carries its stage timestamps (capture, preprocessed, inference start/end,
post start, decided, published); they feed the latency windows and each event's `stages_ms`.

Shutdown: `stop()` (a signal handler, another thread, end of a file, max_frames) stops capture
only. On a triggered line the frames a live camera had already buffered are still taken. Every
captured frame then goes through inference and publishing, evidence is written, publishers are
flushed (the spool waits for the broker's acknowledgements) and closed. A backend failure is
fatal after FATAL_INFER_FAILURES failed inferences in a row: capture stops, every frame already
captured still gets a verdict (inferred ones their own, the rest `unverified`), and `run()`
re-raises it.

Built from configs by edge.runtime.plan (the one assembly path of `run`, `check` and `bench`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from edge.errors import LineInspectError
from edge.liveness import sd_notify
from edge.metrics import LatencyWindows
from edge.runtime.engine import Engine, warmup
from edge.runtime.inbox import POLL_S, Control
from edge.runtime.station import Station

if TYPE_CHECKING:
    from edge.ports import Backend, Publisher

log = logging.getLogger("edge.pipeline")


class Pipeline:
    """Stations and engines run as one unit: `run()` until stopped, then drain and flush.

    The keyword constructor builds the common case, one station on its own backend (see
    `Station` for the arguments; `backend`, `max_batch`, `flush_timeout_s` and `warm` are the
    engine's and the run's). `from_config` / `from_configs` build from station YAML files;
    several stations on the same bundle share one loaded model.
    """

    def __init__(
        self,
        *,
        backend: Backend,
        max_batch: int = 0,
        flush_timeout_s: float = 10.0,
        warm: bool = False,
        **station_kwargs: Any,
    ):
        engine = Engine(backend, max_batch)
        station = Station(**station_kwargs)
        engine.attach(station)
        self._setup([station], [engine], flush_timeout_s, warm)

    @classmethod
    def from_stations(
        cls,
        stations: list[Station],
        engines: list[Engine],
        *,
        flush_timeout_s: float = 10.0,
        warm: bool = False,
    ) -> Pipeline:
        self = cls.__new__(cls)
        self._setup(stations, engines, flush_timeout_s, warm)
        return self

    def _setup(
        self, stations: list[Station], engines: list[Engine], flush_timeout_s: float, warm: bool
    ) -> None:
        if not stations:
            raise ValueError("a pipeline needs at least one station")
        self.stations = stations
        self.engines = engines
        self.flush_timeout_s = flush_timeout_s
        self.warm = warm
        self._ctl = Control()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ single-station view
    @property
    def station(self) -> Station:
        return self.stations[0]

    @property
    def errors(self) -> dict[str, int]:
        return self.station.errors

    @property
    def latency(self) -> LatencyWindows:
        return self.station.latency

    @property
    def max_frames(self) -> int | None:
        return self.station.max_frames

    @max_frames.setter
    def max_frames(self, n: int | None) -> None:
        for st in self.stations:
            st.max_frames = n

    def metrics(self) -> dict[str, Any]:
        return self.station.metrics()

    def snapshots(self) -> list[dict[str, Any]]:
        """Every station's current metrics (for the Prometheus endpoint)."""
        return [st.snapshot() for st in self.stations]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        cfg: Any,
        *,
        max_frames: int | None = None,
        publisher: Publisher | None = None,
        backend_opts: dict[str, Any] | None = None,
    ) -> Pipeline:
        """One station from a StationConfig (see from_configs)."""
        return cls.from_configs(
            [cfg],
            max_frames=max_frames,
            publishers=None if publisher is None else [publisher],
            backend_opts=backend_opts,
        )

    @classmethod
    def from_configs(
        cls,
        cfgs: list[Any],
        *,
        max_frames: int | None = None,
        publishers: list[Publisher] | None = None,
        backend_opts: dict[str, Any] | None = None,
    ) -> Pipeline:
        """Every station the configs name: edge.runtime.plan.build, then open (fails fast and
        cleans up on any problem)."""
        from edge.runtime import plan

        p = plan.build(cfgs, backend_opts=backend_opts)
        return plan.open_pipeline(p, max_frames=max_frames, publishers=publishers)

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Stop capturing; frames already captured are still processed. Signal-handler safe."""
        self._ctl.stop.set()

    @property
    def stopping(self) -> bool:
        return self._ctl.stop.is_set()

    def request_reload(self) -> None:
        """Re-read thresholds.yaml at the next frame of every station (SIGHUP). Signal-safe."""
        for st in self.stations:
            if st.watcher is not None:
                st.watcher.request()

    def run(self) -> dict[str, Any]:
        """Run until stop(), end of every file source, max_frames, or a fatal error.

        Returns the summary dict; re-raises a fatal error (e.g. BackendError) after draining.
        """
        ctl = self._ctl
        try:
            if not self.warm:
                for eng in self.engines:
                    warmup(eng.backend)
                self.warm = True
            t0 = time.monotonic()
            threads: list[threading.Thread] = []
            for eng in self.engines:
                eng.thread = threading.Thread(
                    target=self._guard(eng.loop, ctl), name=eng.name, daemon=True
                )
            for st in self.stations:
                st.counters.start(t0)
                if st.evidence is not None:
                    st.evidence.start()
                suffix = f"-{st.name}" if len(self.stations) > 1 else ""
                # A failed source still lets captured frames drain; a crash elsewhere aborts.
                st.threads = {
                    "capture": threading.Thread(
                        target=self._guard(st.capture_loop, ctl, drain=True),
                        name=f"capture{suffix}",
                        daemon=True,
                    ),
                    "post": threading.Thread(
                        target=self._guard(st.post_loop, ctl), name=f"post{suffix}", daemon=True
                    ),
                }
                threads += st.threads.values()
            threads += [eng.thread for eng in self.engines]
            self._threads = threads
            # daemon: a wedged driver must not keep the process alive after exit
            for t in threads:
                t.start()
            # systemd (Type=notify): ready once every thread runs; the watchdog is fed only
            # while every station decides or idles with nothing waiting (edge/liveness.py).
            sd_notify("READY=1")
            next_dog = 0.0
            # Join with a timeout so signal handlers run promptly in the main thread.
            for t in threads:
                while t.is_alive():
                    t.join(POLL_S)
                    now = time.monotonic()
                    if now >= next_dog and all(st.liveness.healthy() for st in self.stations):
                        sd_notify("WATCHDOG=1")
                        next_dog = now + 1.0
        finally:
            ctl.stop.set()
            self._shutdown()
        if ctl.fatal is not None:
            raise ctl.fatal
        return self.summary()

    def close(self) -> None:
        """Release what an opened, never run, pipeline holds (`edge check`)."""
        self._shutdown()

    def _shutdown(self) -> None:
        for st in self.stations:
            if st.evidence is not None:
                st.evidence.close(self.flush_timeout_s)
        deadline = time.monotonic() + self.flush_timeout_s
        for st in self.stations:
            try:
                if not st.publisher.flush(max(0.0, deadline - time.monotonic())):
                    log.warning(
                        "%s: publisher not flushed within %.0fs; spooled events wait for the "
                        "next start",
                        st.label,
                        self.flush_timeout_s,
                    )
            except Exception as exc:
                log.error("%s: publisher flush failed: %s", st.label, exc)
        closers: list[tuple[str, Callable[[], Any]]] = []
        for st in self.stations:
            closers += [(f"{st.label} publisher", st.publisher.close)]
            closers += [(f"{st.label} source", st.source.close)]
        closers += [(f"{eng.name} backend", eng.backend.close) for eng in self.engines]
        for name, close in closers:
            try:
                close()
            except Exception as exc:
                log.error("closing %s failed: %s", name, exc)

    def _guard(
        self, fn: Callable[[Control], None], ctl: Control, drain: bool = False
    ) -> Callable[[], None]:
        def run() -> None:
            try:
                fn(ctl)
            except BaseException as exc:  # a failing stage must stop the run, loudly
                if isinstance(exc, LineInspectError):
                    log.error("%s: %s", threading.current_thread().name, exc)
                else:
                    log.exception("%s thread crashed", threading.current_thread().name)
                ctl.fail(exc, drain)

        return run

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict[str, Any]:
        """One station: its summary. Several: totals plus "stations": {line/name: summary}."""
        if len(self.stations) == 1:
            return self.station.summary()
        per = {st.label: st.summary() for st in self.stations}
        total = {
            k: sum(s[k] for s in per.values())
            for k in ("frames", "captured", "rejects", "passes", "unverified", "drops", "errors")
        }
        total["fps"] = round(sum(s["fps"] for s in per.values()), 3)
        total["engines"] = [
            {
                "name": eng.name,
                "backend": eng.backend.name,
                "stations": [st.label for st in eng.stations],
                "max_batch": eng.max_batch,
                "batches": eng.batches,
                "batch_mean": round(eng.batched_frames / eng.batches, 3) if eng.batches else 0,
            }
            for eng in self.engines
        ]
        total["stations"] = per
        return total
