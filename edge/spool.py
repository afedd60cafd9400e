"""On-disk spool of events that must reach the broker: a reject waits here until it is acknowledged.

One SQLite file (WAL journal, ``synchronous=FULL``): once `put` returns, the event survives a
process kill or a power cut, and a reopened spool hands back, in order, everything not acked.
The spool never drops an event: when it is full, `put` raises `SpoolFullError` and the caller
must count it and raise an alarm.

One connection, guarded by a lock, serves every thread.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple

from edge.errors import BrokerError, LineInspectError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT    NOT NULL UNIQUE,
    topic    TEXT    NOT NULL,
    payload  BLOB    NOT NULL,
    qos      INTEGER NOT NULL,
    created  REAL    NOT NULL
)
"""


class SpoolError(LineInspectError):
    """The spool file cannot be opened, read or written (disk full, permissions, corruption)."""


class SpoolFullError(BrokerError):
    """The spool holds max_events events: the broker has not acknowledged them for too long."""


class Row(NamedTuple):
    seq: int
    event_id: str
    topic: str
    payload: bytes
    qos: int
    created: float  # epoch seconds when put


class Spool:
    """Durable FIFO of pending events, keyed by event_id."""

    def __init__(self, path: str | Path, max_events: int = 100000) -> None:
        if max_events < 1:
            raise ValueError(f"spool max_events must be >= 1, got {max_events}")
        self.path = Path(path)
        self.max_events = max_events
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=10.0
            )
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"spool {self.path}: cannot open: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SpoolError(f"spool {self.path}: cannot switch to WAL journal (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(_SCHEMA)
            self._count = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        except sqlite3.Error as exc:
            conn.close()
            raise SpoolError(f"spool {self.path}: cannot open: {exc}") from exc
        self._conn = conn

    # -- writing -----------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, event_id: str, qos: int = 1) -> None:
        """Store one event durably (committed and synced when this returns).

        Idempotent on event_id: putting an id already pending stores nothing new.
        Raises SpoolFullError when full, SpoolError on any I/O problem; never drops silently.
        """
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"spool payload must be bytes, got {type(payload).__name__}")
        with self._lock:
            conn = self._open_conn()
            if self._count >= self.max_events:
                raise SpoolFullError(
                    f"spool {self.path} is full ({self._count} of {self.max_events} events "
                    f"waiting for the broker); event {event_id} was not stored"
                )
            try:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO events (event_id, topic, payload, qos, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (str(event_id), topic, bytes(payload), int(qos), time.time()),
                )
            except sqlite3.Error as exc:
                raise SpoolError(
                    f"spool {self.path}: cannot store event {event_id}: {exc}"
                ) from exc
            self._count += cur.rowcount

    def ack(self, event_id: str) -> bool:
        """Forget one event (the broker has it). Returns False when it was not pending."""
        return self.ack_many([event_id]) == 1

    def ack_many(self, event_ids: list[str]) -> int:
        """Forget several events in one transaction. Returns how many were pending.

        Acks are not synced to disk on their own (synchronous=NORMAL for this transaction; the
        next put's sync carries them): a power cut may bring an acked event back, to be sent
        twice, never lose one. This keeps acks from stalling the caller's put behind an fsync.
        """
        if not event_ids:
            return 0
        with self._lock:
            conn = self._open_conn()
            try:
                conn.execute("PRAGMA synchronous=NORMAL")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    removed = 0
                    for eid in event_ids:
                        removed += conn.execute(
                            "DELETE FROM events WHERE event_id = ?", (str(eid),)
                        ).rowcount
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise SpoolError(f"spool {self.path}: cannot remove acked events: {exc}") from exc
            self._count -= removed
            return removed

    # -- reading -----------------------------------------------------------------------------

    def pending(self, limit: int = 1000, after_seq: int = 0) -> list[Row]:
        """Up to `limit` pending events with seq > after_seq, oldest first."""
        with self._lock:
            conn = self._open_conn()
            try:
                rows = conn.execute(
                    "SELECT seq, event_id, topic, payload, qos, created FROM events "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (int(after_seq), int(limit)),
                ).fetchall()
            except sqlite3.Error as exc:
                raise SpoolError(f"spool {self.path}: cannot read: {exc}") from exc
        return [Row(r[0], r[1], r[2], bytes(r[3]), r[4], r[5]) for r in rows]

    def __len__(self) -> int:
        return self._count

    @property
    def fill_ratio(self) -> float:
        return self._count / self.max_events

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except sqlite3.Error as exc:
                    raise SpoolError(f"spool {self.path}: cannot close: {exc}") from exc
                finally:
                    self._conn = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SpoolError(f"spool {self.path} is closed")
        return self._conn
