"""Station config: one YAML file per station, loaded into this typed tree.

Relative paths in the file are resolved against the file's own directory, so a station folder
can be moved or deployed as a whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge import typedconfig
from edge.errors import ConfigError, InvalidValue
from edge.opcua.config import OpcUaConfig

# Names that end up in MQTT topics, client ids and file names: no wildcard (#, +), no level
# separator (/), no whitespace or control characters, nothing a shell or a broker ACL reads twice.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CREDENTIAL_KEYS = ("mqtt_username", "mqtt_password", "ui_token", "opcua_username", "opcua_password")


# Keys that hold paths, declared once on their fields (metadata "path"): config loading
# resolves every one of them against the file's folder, and deploy/stage.py decides from the
# kind what a release does with it (path_keys() lists them).
#   source      the source URI: a relative file path or file:// URI resolves, other URIs stay
#   bundle      the bundle folder (deploy ships the bundle given to it)
#   input       a file the station reads (deploy ships it with the release)
#   state_file  a file the station writes (deploy keeps it in the device's data folder)
#   state_dir   a folder the station writes (the same)
#   secret      the credentials file (deploy writes it, private, outside the release)
SOURCE, BUNDLE, INPUT = ({"path": "source"}, {"path": "bundle"}, {"path": "input"})
STATE_FILE, STATE_DIR, SECRET = ({"path": "state_file"}, {"path": "state_dir"}, {"path": "secret"})


def default_client_id(*names: str) -> str:
    """The MQTT client id of a station without one: lineinspect-<line>-<station>, stable across
    restarts (the broker keeps its session)."""
    return "-".join(("lineinspect", *names))


def check_name(key: str, value: str) -> None:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise InvalidValue(
            f"{key}: {value!r} is not a valid name (letters, digits, '_', '.', '-'; first a "
            "letter or digit; at most 64; no '#', '+', '/', spaces or control characters)"
        )


@dataclass
class StationId:
    line: str = "line1"
    name: str = "station1"

    def validate(self) -> None:
        check_name("line", self.line)
        check_name("name", self.name)


@dataclass
class SourceConfig:
    uri: str = field(
        metadata=SOURCE
    )  # file://video.mp4, file://dir/, bare path, v4l2:///dev/video0, csi://0, rtsp://, gst://
    loop: bool = False
    rate: float = 0.0  # frames/s for file replay; 0 = as fast as the pipeline takes them
    timeout_s: float = 1.0  # read() returns None after this long without a frame
    width: int = 0  # requested capture size for live sources; 0 = source default
    height: int = 0
    # Live sources (v4l2, csi, rtsp, gst): reconnect with exponential backoff between these.
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    # Live sources: keep retrying when the camera is not there at start-up (false: fail at once).
    retry_open: bool = True
    buffer: int = 4  # live sources: frames buffered by the grabber thread (oldest dropped)

    def validate(self) -> None:
        if self.rate < 0:
            raise InvalidValue(f"rate: must be >= 0, got {self.rate}")
        if self.timeout_s <= 0:
            raise InvalidValue(f"timeout_s: must be > 0, got {self.timeout_s}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise InvalidValue(
                "reconnect_min_s/reconnect_max_s: need 0 < min <= max, got "
                f"{self.reconnect_min_s}, {self.reconnect_max_s}"
            )
        if self.buffer < 1:
            raise InvalidValue(f"buffer: must be >= 1, got {self.buffer}")


@dataclass
class PreprocessConfig:
    crop: list[int] | None = None  # [x, y, w, h] in frame pixels, applied before resize

    def validate(self) -> None:
        if self.crop is not None and (len(self.crop) != 4 or min(self.crop[2:]) <= 0):
            raise InvalidValue(f"crop: expected [x, y, w, h] with w,h > 0, got {self.crop}")


@dataclass
class PostprocessConfig:
    roi_mask: str | None = field(default=None, metadata=INPUT)  # non-zero pixels are inspected
    min_region_area: int | None = None  # overrides thresholds.yaml when set


@dataclass
class TlsConfig:
    ca_certs: str | None = field(default=None, metadata=INPUT)
    certfile: str | None = field(default=None, metadata=INPUT)
    keyfile: str | None = field(default=None, metadata=INPUT)
    insecure: bool = False  # skip hostname check (test rigs only)


@dataclass
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = "lineinspect"
    client_id: str = ""  # default: lineinspect-<line>-<station>, stable across restarts
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive: int = 30
    connect_timeout_s: float = 15.0  # at start-up: fail with a clear error after this long
    # false: a broker that is down, refusing or misconfigured at start-up is logged and retried
    # in the background while the station inspects and spools its rejects, instead of exiting
    # (and being restarted in a loop by systemd). Interactive runs keep the loud default.
    require_broker_at_start: bool = True
    username: str | None = None
    password: str | None = None  # or env LINEINSPECT_MQTT_PASSWORD; never logged
    tls: TlsConfig | None = None
    publish_results: bool = False  # also publish every part on <base>/result
    # 1: results are acknowledged by the broker too (and their capture -> ack latency measured)
    result_qos: Literal[0, 1] = 0
    spool: str = field(
        default="spool.sqlite", metadata=STATE_FILE
    )  # reject events wait here until the broker acknowledges them
    spool_max_events: int = 100000
    reconnect_max_s: float = 10.0
    # Rejects published but not yet acknowledged (paho's in-flight window). When the broker
    # stops acknowledging, the window fills, new rejects wait in the spool and an alarm is raised.
    max_inflight: int = 100
    # Free disk space kept for the spool: evidence and recalibration samples are not written
    # when the spool's file system has less than this left.
    spool_reserve_mb: float = 64.0

    def validate(self) -> None:
        check_name("prefix", self.prefix)
        if self.max_inflight < 1:
            raise InvalidValue(f"max_inflight: must be >= 1, got {self.max_inflight}")
        if self.spool_reserve_mb < 0:
            raise InvalidValue(f"spool_reserve_mb: must be >= 0, got {self.spool_reserve_mb}")


def _check_rate(key: str, rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise InvalidValue(f"{key}: must be within [0, 1], got {rate}")


def _check_quota(key: str, quota_mb: float) -> None:
    if quota_mb <= 0:
        raise InvalidValue(f"{key}: must be > 0, got {quota_mb}")


@dataclass
class EvidenceConfig:
    dir: str | None = field(default=None, metadata=STATE_DIR)  # None = keep no evidence
    quota_mb: float = 500.0  # oldest evidence deleted first above this
    sample_pass_rate: float = 0.0  # fraction of passed parts also kept (0..1)
    jpeg_quality: int = 90
    # Frames waiting for the writer (evidence and recalibration samples; each holds one full
    # frame in memory). When full, a pass sample makes room for a reject, else it is dropped.
    queue_size: int = 8

    def validate(self) -> None:
        if self.queue_size < 1:
            raise InvalidValue(f"queue_size: must be >= 1, got {self.queue_size}")
        _check_quota("quota_mb", self.quota_mb)
        _check_rate("sample_pass_rate", self.sample_pass_rate)
        if not 1 <= self.jpeg_quality <= 100:
            raise InvalidValue(f"jpeg_quality: must be 1..100, got {self.jpeg_quality}")


@dataclass
class RecalibrationConfig:
    """A sample of ACCEPTED parts' raw frames (PNG), for refitting thresholds on the line."""

    dir: str | None = field(default=None, metadata=STATE_DIR)  # None = keep none
    sample_rate: float = 0.0  # fraction of accepted parts kept (0..1)
    quota_mb: float = 1000.0  # oldest frames deleted first above this

    def validate(self) -> None:
        _check_quota("quota_mb", self.quota_mb)
        _check_rate("sample_rate", self.sample_rate)


@dataclass
class ThresholdsConfig:
    """Hot reload of the bundle's thresholds.yaml (also on SIGHUP)."""

    watch: bool = True  # check the file's mtime between frames
    check_interval_s: float = 1.0

    def validate(self) -> None:
        if self.check_interval_s <= 0:
            raise InvalidValue(f"check_interval_s: must be > 0, got {self.check_interval_s}")


@dataclass
class MetricsConfig:
    interval_s: float = 10.0
    window: int = 2048  # frames in each rolling latency/score window (bounded memory)

    def validate(self) -> None:
        if self.interval_s <= 0 or self.window < 1:
            raise InvalidValue(
                f"need interval_s > 0 and window >= 1, got {self.interval_s}, {self.window}"
            )


@dataclass
class DriftConfig:
    """Drift watch on accepted parts' scores (edge/drift.py): Bernoulli CUSUM on exceedances of
    the calibration's good-score quantile; a retained `drift` alarm on status while it holds."""

    enabled: bool = True  # off by itself when thresholds.yaml has no stats.good (logged)
    quantile: Literal["p50", "p90", "p99"] = "p90"  # reference line: P(good part above) known
    shift: float = 3.0  # detect the exceedance rate rising to shift x (1 - quantile)
    threshold: float = 10.0  # CUSUM decision threshold h (ARL0 ~ 290k parts at p90, shift 3)

    def validate(self) -> None:
        p0 = {"p50": 0.5, "p90": 0.1, "p99": 0.01}[self.quantile]
        if not 1.0 < self.shift < 1.0 / p0:
            raise ValueError(
                f"shift: must be in (1, {1.0 / p0:g}) for {self.quantile}, got {self.shift}"
            )
        if self.threshold <= 0:
            raise ValueError(f"threshold: must be > 0, got {self.threshold}")


@dataclass
class UiConfig:
    """The operator view (edge/ui): read-only web page served by the station process.

    Off unless `port` is set here or `edge run --ui-port N` is given. Bound to 127.0.0.1 unless
    `host` says otherwise; any other address needs `ui_token` in credentials_file (HTTP Basic,
    any user name, the token as password; or `Authorization: Bearer <token>`)."""

    port: int | None = None
    host: str = "127.0.0.1"
    fps: float = 3.0  # live frames per camera per second, at most (JPEG, encoded off the line)
    max_width: int = 640  # live frames are scaled down to this width
    jpeg_quality: int = 70
    gallery: int = 24  # last rejects kept for the gallery (in memory)
    max_connections: int = 16  # open HTTP connections (each viewer holds one event stream)
    timeout_s: float = 10.0  # socket timeout: a stalled viewer is dropped

    def validate(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0..65535, got {self.port}")
        if not 0 < self.fps <= 30:
            raise ValueError(f"fps: must be in (0, 30], got {self.fps}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: must be 1..100, got {self.jpeg_quality}")
        for key in ("max_width", "gallery", "max_connections"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")


@dataclass
class RuntimeConfig:
    """Threads and batching. Measured defaults for a 2-core device: see docs/edge.md."""

    inference_threads: int = 0  # ONNX Runtime intra-op threads; 0 = one per core
    spin: bool = False  # let ONNX Runtime's threads busy-wait between operators
    opencv_threads: int = 1  # decode/resize/post threads each use one core; no OpenCV pool
    max_batch: int = 0  # dynamic-batch graphs: most frames per inference; 0 = stations sharing it

    def validate(self) -> None:
        for key in ("inference_threads", "opencv_threads", "max_batch"):
            if getattr(self, key) < 0:
                raise InvalidValue(f"{key}: must be >= 0, got {getattr(self, key)}")


@dataclass
class StationConfig:
    bundle: str = field(metadata=BUNDLE)
    source: SourceConfig
    station: StationId = field(default_factory=StationId)
    backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    mode: Literal["triggered", "continuous"] = "triggered"
    # A part without a valid verdict (undecodable frame, failed inference, NaN output): reject
    # it as `unverified` (default), or let it pass, counted (must be explicit; warned at start).
    on_error: Literal["reject", "pass"] = "reject"
    queue_size: int = 4
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    evidence: EvidenceConfig = field(default_factory=EvidenceConfig)
    recalibration: RecalibrationConfig = field(default_factory=RecalibrationConfig)
    thresholds: ThresholdsConfig = field(default_factory=ThresholdsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    ui: UiConfig = field(default_factory=UiConfig)
    opcua: OpcUaConfig | None = None  # verdicts over OPC UA beside MQTT (edge/opcua/)
    # A YAML mapping with optional mqtt_username / mqtt_password / ui_token, readable by its
    # owner only; its values override mqtt.username / mqtt.password (ui_token: the operator
    # view's token; opcua_username / opcua_password: the OPC UA login, given nowhere else).
    # Never logged nor published.
    credentials_file: str | None = field(default=None, metadata=SECRET)
    # Liveness: a heartbeat on <base>/status every heartbeat_s; a `stalled` alarm when the
    # source delivers frames but none is decided for stall_s.
    heartbeat_s: float = 5.0
    stall_s: float = 10.0
    # Set by load(): where the file was, and a hash of its text (published in status).
    path: str = ""
    sha256: str = ""
    ui_token: str | None = None  # set by load() from credentials_file; never in the YAML

    def validate(self) -> None:
        if self.queue_size < 1:
            raise InvalidValue(f"queue_size: must be >= 1, got {self.queue_size}")
        if self.heartbeat_s <= 0 or self.stall_s <= 0:
            raise InvalidValue(
                f"heartbeat_s/stall_s: must be > 0, got {self.heartbeat_s}, {self.stall_s}"
            )

    @property
    def topic_base(self) -> str:
        return f"{self.mqtt.prefix}/{self.station.line}/{self.station.name}"


def _resolve(base: Path, p: str | None) -> str | None:
    if p is None or "://" in p:
        return p
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


def resolve_source_uri(base: Path, uri: str) -> str:
    """A relative file path or file:// URI made absolute against `base`; other URIs unchanged."""
    if uri.startswith("file://") and not uri.startswith("file:///"):
        return "file://" + _resolve(base, uri[len("file://") :])
    return _resolve(base, uri)


def load(path: str | Path) -> StationConfig:
    """Load and validate a station YAML. Raises ConfigError naming the file and key."""
    path = Path(path)
    data = typedconfig.read_yaml(path)
    return from_mapping(
        data,
        base=path.resolve().parent,
        source=str(path),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        path=str(path.resolve()),
    )


def from_mapping(
    data: dict, *, base: Path, source: str, sha256: str | None = None, path: str | None = None
) -> StationConfig:
    """A station config from an in-memory mapping (what `load` does once the YAML is read).

    Relative paths resolve against `base`; sha256 defaults to the hash of the mapping."""
    for reserved in ("path", "sha256", "ui_token"):
        if reserved in data:
            raise ConfigError(f"{source}: unknown key {reserved}")
    for secret in ("username", "password"):
        if secret in (data.get("opcua") or {}):
            raise ConfigError(
                f"{source}: opcua.{secret}: give it as opcua_{secret} in credentials_file"
            )
    cfg = typedconfig.from_dict(StationConfig, data, source=source)
    base = Path(base).resolve()
    cfg.path = path or source
    if sha256 is None:
        canonical = json.dumps(data, sort_keys=True, default=str).encode()
        sha256 = hashlib.sha256(canonical).hexdigest()
    cfg.sha256 = sha256
    for key, kind in path_keys().items():
        value = get_key(cfg, key)
        if value is not None:
            resolved = (
                resolve_source_uri(base, value) if kind == "source" else _resolve(base, value)
            )
            set_key(cfg, key, resolved)
    if not cfg.mqtt.client_id:
        cfg.mqtt.client_id = default_client_id(cfg.station.line, cfg.station.name)
    if cfg.credentials_file is not None:
        creds = load_credentials(cfg.credentials_file)
        if "mqtt_username" in creds:
            cfg.mqtt.username = creds["mqtt_username"]
        if "mqtt_password" in creds:
            cfg.mqtt.password = creds["mqtt_password"]
        cfg.ui_token = creds.get("ui_token")
    if cfg.opcua is not None:
        _opcua_login(cfg, creds if cfg.credentials_file is not None else {}, source)
    return cfg


def _opcua_login(cfg: StationConfig, creds: dict[str, str], source: str) -> None:
    """OPC UA user and password from the credentials file; anonymous only when configured."""
    cfg.opcua.username = creds.get("opcua_username")
    cfg.opcua.password = creds.get("opcua_password")
    if (cfg.opcua.username is None) != (cfg.opcua.password is None):
        raise ConfigError(f"{source}: credentials_file: give opcua_username and opcua_password")
    if cfg.opcua.username is None and not cfg.opcua.anonymous:
        raise ConfigError(
            f"{source}: opcua: no login: put opcua_username/opcua_password in credentials_file, "
            "or say opcua.anonymous: true"
        )


def path_keys(cls: type | None = None) -> dict[str, str]:
    """Every path-bearing key of the station config, dotted ("mqtt.tls.keyfile"), and its kind."""
    out: dict[str, str] = {}
    hints = typedconfig.type_hints(cls or StationConfig)
    for f in dataclasses.fields(cls or StationConfig):
        if "path" in f.metadata:
            out[f.name] = f.metadata["path"]
        for sub in _dataclasses_in(hints[f.name]):
            out.update({f"{f.name}.{k}": v for k, v in path_keys(sub).items()})
    return out


def _dataclasses_in(tp: Any) -> list[type]:
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]


def default_of(dotted: str) -> Any:
    """The default of a dotted key (None when the field has none)."""
    cls: Any = StationConfig
    *parents, last = dotted.split(".")
    for part in parents:
        (sub,) = _dataclasses_in(typedconfig.type_hints(cls)[part])
        cls = sub
    f = {f.name: f for f in dataclasses.fields(cls)}[last]
    return None if f.default is dataclasses.MISSING else f.default


def get_key(obj: Any, dotted: str) -> Any:
    """The value at a dotted key of a config tree (dataclasses, or mappings as in YAML); None
    when a section on the way is absent."""
    for part in dotted.split("."):
        if obj is None:
            return None
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part)
    return obj


def set_key(obj: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    if isinstance(obj, dict):
        obj[last] = value
    else:
        setattr(obj, last, value)


def load_credentials(path: str | Path) -> dict[str, str]:
    """The credentials file: a YAML mapping of CREDENTIAL_KEYS to strings, owner-only.

    Refused (ConfigError naming the file, never its content) when group or others may read or
    write it, when it is not a mapping, or has another key or a non-string value."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{path}: credentials_file: {exc.strerror or exc}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: credentials_file is accessible by group/others (mode "
            f"{stat.S_IMODE(st.st_mode):o}); chmod 600 it"
        )
    data = typedconfig.read_yaml(path)
    out: dict[str, str] = {}
    for key, value in data.items():
        if key not in CREDENTIAL_KEYS:
            raise ConfigError(
                f"{path}: credentials_file: unknown key {key} "
                f"(expected {', '.join(CREDENTIAL_KEYS)})"
            )
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: credentials_file: {key}: expected a non-empty string")
        out[key] = value
    return out
