"""The runtime's seams (edge/ports.py): every implementation offers what its Protocol names,
with parameters the runtime can pass; and the station's counters under concurrent use."""

from __future__ import annotations

import inspect
import threading

import pytest

from edge import ports, sources
from edge.evidence import EvidenceWriter
from edge.mqtt import Publisher
from edge.runtime.counters import Counters


def members(proto: type) -> list[str]:
    skip = {"__init__", "__subclasshook__", "__class_getitem__", "__init_subclass__"}
    names = [n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")]
    return [n for n in names if n not in skip]


def conforms(impl: type, proto: type) -> None:
    """impl has every method of proto, and accepts proto's parameters by name."""
    for name in members(proto):
        assert hasattr(impl, name), f"{impl.__name__} lacks {name}"
        want = inspect.signature(getattr(proto, name)).parameters
        got = inspect.signature(getattr(impl, name)).parameters
        for p in want.values():
            if p.name == "self" or p.kind == p.POSITIONAL_ONLY:
                continue
            assert p.name in got or any(q.kind == q.VAR_KEYWORD for q in got.values()), (
                f"{impl.__name__}.{name} takes no {p.name}"
            )
            if p.default is not p.empty:
                assert got[p.name].default is not p.empty, f"{impl.__name__}.{name}({p.name}=)"


@pytest.mark.parametrize(
    "impl, proto",
    [
        (Publisher, ports.Publisher),
        (EvidenceWriter, ports.EvidenceSink),
    ]
    + [
        (getattr(sources, name), ports.Source)
        for name in (
            "ImageFolderSource",
            "VideoFileSource",
            "V4L2Source",
            "CsiSource",
            "GstSource",
            "RtspSource",
        )
    ],
    ids=lambda x: getattr(x, "__name__", str(x)),
)
def test_implementations_conform(impl, proto):
    conforms(impl, proto)


def test_the_test_fake_publisher_conforms():
    from tests.test_pipeline import FakePublisher

    conforms(FakePublisher, ports.Publisher)


def test_counters_are_consistent_under_concurrent_writers_and_readers():
    c = Counters(window=64)
    stop = threading.Event()
    seen: list[dict] = []

    def write() -> None:
        for i in range(2000):
            c.add("captured")
            c.decided(i % 3 == 0, 0.1, 0.0, 1.0)
            c.error("metrics")

    def read() -> None:
        while not stop.is_set():
            s = c.snapshot()
            seen.append(s)
            assert s["rejects"] <= s["frames"]

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write) for _ in range(3)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    s = c.snapshot()
    assert s["captured"] == s["frames"] == 6000 and s["errors"]["metrics"] == 6000
    assert s["rejects"] == 3 * 667 and seen
