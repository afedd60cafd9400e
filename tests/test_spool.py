from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from edge.errors import BrokerError
from edge.spool import Spool, SpoolError, SpoolFullError

REPO = Path(__file__).resolve().parents[1]


def _eid() -> str:
    return str(uuid.uuid4())


def test_put_pending_ack_in_order(tmp_path):
    with Spool(tmp_path / "s.sqlite", max_events=10) as spool:
        ids = [_eid() for _ in range(5)]
        for i, eid in enumerate(ids):
            spool.put("t/reject", f"p{i}".encode(), eid)
        assert len(spool) == 5
        assert spool.fill_ratio == pytest.approx(0.5)
        rows = spool.pending(10)
        assert [r.event_id for r in rows] == ids
        assert [r.payload for r in rows] == [f"p{i}".encode() for i in range(5)]
        assert all(r.topic == "t/reject" and r.qos == 1 for r in rows)
        assert rows == sorted(rows, key=lambda r: r.seq)

        assert spool.ack(ids[1]) is True
        assert spool.ack(ids[1]) is False  # already gone
        assert spool.ack("not-there") is False
        assert [r.event_id for r in spool.pending(10)] == [ids[0], *ids[2:]]
        assert spool.pending(2) == spool.pending(10)[:2]
        # paging by seq
        first = spool.pending(1)[0]
        assert [r.event_id for r in spool.pending(10, after_seq=first.seq)] == ids[2:]

        spool.put("t/reject", b"again", ids[0])  # idempotent on event_id
        assert len(spool) == 4
        assert spool.ack_many(ids) == 4
        assert len(spool) == 0 and spool.pending(10) == []


def test_reopen_replays_what_was_not_acked(tmp_path):
    path = tmp_path / "s.sqlite"
    ids = [_eid() for _ in range(4)]
    spool = Spool(path)
    for eid in ids:
        spool.put("t", eid.encode(), eid)
    spool.ack(ids[0])
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        spool.put("t", b"x", _eid())

    with Spool(path) as again:
        assert len(again) == 3
        assert [r.event_id for r in again.pending(10)] == ids[1:]
        # seq keeps growing after a reopen: order stays oldest-first
        new = _eid()
        again.put("t", b"new", new)
        assert again.pending(10)[-1].event_id == new


def test_survives_sigkill(tmp_path):
    path = tmp_path / "s.sqlite"
    code = (
        "import os, signal, sys\n"
        "from edge.spool import Spool\n"
        "s = Spool(sys.argv[1])\n"
        "for i in range(20):\n"
        "    s.put('t', b'%d' % i, 'id-%02d' % i)\n"
        "s.ack('id-00')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == -signal.SIGKILL
    with Spool(path) as spool:
        assert [r.event_id for r in spool.pending(100)] == [f"id-{i:02d}" for i in range(1, 20)]


def test_full_raises_and_never_drops(tmp_path):
    path = tmp_path / "s.sqlite"
    with Spool(path, max_events=3) as spool:
        ids = [_eid() for _ in range(3)]
        for eid in ids:
            spool.put("t", b"x", eid)
        assert spool.fill_ratio == 1.0
        with pytest.raises(SpoolFullError, match=r"s\.sqlite is full \(3 of 3") as exc:
            spool.put("t", b"x", "one-too-many")
        assert isinstance(exc.value, BrokerError)
        assert "one-too-many" in str(exc.value)
        assert [r.event_id for r in spool.pending(10)] == ids  # nothing evicted
        spool.ack(ids[0])
        spool.put("t", b"x", "fits-now")
        assert len(spool) == 3


def test_concurrent_puts_from_threads(tmp_path):
    n_threads, per_thread = 6, 40
    with Spool(tmp_path / "s.sqlite") as spool:
        errors = []

        def worker(k):
            try:
                for i in range(per_thread):
                    spool.put("t", b"x", f"{k}-{i:03d}")
            except Exception as exc:  # reported by the assert below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        rows = spool.pending(10_000)
        assert len(rows) == len(spool) == n_threads * per_thread
        assert len({r.seq for r in rows}) == len(rows)
        for k in range(n_threads):  # each thread's events keep their order
            mine = [r.event_id for r in rows if r.event_id.startswith(f"{k}-")]
            assert mine == [f"{k}-{i:03d}" for i in range(per_thread)]


def test_disk_full_names_the_file(tmp_path):
    path = tmp_path / "s.sqlite"
    with Spool(path) as spool:
        spool.put("t", b"x", _eid())
        # Simulate a full disk: SQLite may not grow the file beyond its current pages.
        pages = spool._conn.execute("PRAGMA page_count").fetchone()[0]
        spool._conn.execute(f"PRAGMA max_page_count={pages}")
        with pytest.raises(SpoolError, match=rf"spool {path}: cannot store event .*full"):
            for _ in range(100):
                spool.put("t", os.urandom(4096), _eid())
        assert len(spool) >= 1
        assert len(spool) == len(spool.pending(1000))  # the in-memory count stayed right


def test_unopenable_file_names_the_file(tmp_path):
    path = tmp_path / "adir"
    path.mkdir()
    with pytest.raises(SpoolError, match=f"spool {path}: cannot open"):
        Spool(path)

    # Not a database at all: moved aside (a station must not exit over it), reported.
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with Spool(junk) as s:
        assert "not a database" in s.recovered and len(s) == 0


def test_is_sqlite_wal_with_full_sync(tmp_path):
    path = tmp_path / "s.sqlite"
    with Spool(path) as spool:
        assert spool._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert spool._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    conn = sqlite3.connect(path)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(events)")]
    conn.close()
    assert cols == ["seq", "event_id", "topic", "payload", "qos", "created"]


def test_corrupt_file_at_start_is_moved_aside_and_a_fresh_spool_opens(tmp_path):
    p = tmp_path / "spool.sqlite"
    with Spool(p) as s:
        s.put("t", b"x", "e1")
    raw = bytearray(p.read_bytes())
    raw[100:4096] = b"\xff" * (4096 - 100)  # the header's tail and the schema page
    p.write_bytes(bytes(raw))
    s = Spool(p)
    try:
        assert s.recovered and "corrupt" in s.recovered and "moved to" in s.recovered
        assert list(tmp_path.glob("spool.sqlite.corrupt-*"))
        s.put("t", b"y", "e2")  # the fresh spool works
        assert [r.event_id for r in s.pending()][-1] == "e2"
    finally:
        s.close()


def test_deleted_spool_is_detected_and_recreated_with_what_it_held(tmp_path):
    p = tmp_path / "spool.sqlite"
    with Spool(p) as s:
        s.put("t", b"x", "e1")
        assert s.check_file() is False
        p.unlink()
        assert s.check_file() is True and s.recreated == 1 and p.exists()
        s.put("t", b"y", "e2")
    with Spool(p) as again:  # what was written after the deletion is on disk, in the new file
        assert [r.event_id for r in again.pending()] == ["e1", "e2"]


def test_bd_seq_is_durable_and_increments(tmp_path):
    p = tmp_path / "spool.sqlite"
    with Spool(p) as s:
        assert s.next_bd_seq() == 0 and s.next_bd_seq() == 1
    with Spool(p) as s:
        assert s.next_bd_seq() == 2
