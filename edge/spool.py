"""On-disk spool of events that must reach the broker: a reject waits here until it is acknowledged.

One SQLite file (WAL journal, ``synchronous=FULL``): once `put` returns, the event survives a
process kill or a power cut, and a reopened spool hands back, in order, everything not acked.
The spool never drops an event: when it is full, `put` raises `SpoolFullError` and the caller
must count it and raise an alarm.

One connection, guarded by a lock, serves every thread.

Failures are never silent: a file that is corrupt at start is moved aside (what can still be
read is carried over into the fresh spool) and reported in `recovered`; a spool file deleted
or replaced while open (its inode gone, st_nlink 0) is detected before the next write and
recreated, reported in `recreated`; every other failure raises SpoolError for the caller to
count and alarm. A meta table keeps the station's birth/death sequence (`next_bd_seq`).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple, Sequence

from edge.errors import BrokerError, InvalidValue, LineInspectError

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
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"

log = logging.getLogger(__name__)


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
            raise InvalidValue(f"spool max_events must be >= 1, got {max_events}")
        self.path = Path(path)
        self.max_events = max_events
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._ino: tuple[int, int] | None = None
        self.recovered: str | None = None  # set when a corrupt file was moved aside at start
        self.recreated = 0  # times the file vanished while open and was recreated
        try:
            self._conn = self._connect()
        except sqlite3.DatabaseError as exc:
            self._recover(exc)

    def _connect(self) -> sqlite3.Connection:
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
            conn.execute(_META)
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            self._count = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            st = os.stat(self.path)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if _is_corrupt(exc):
                raise
            raise SpoolError(f"spool {self.path}: cannot open: {exc}") from exc
        except (sqlite3.Error, OSError) as exc:
            conn.close()
            raise SpoolError(f"spool {self.path}: cannot open: {exc}") from exc
        self._ino = (st.st_dev, st.st_ino)
        return conn

    def _recover(self, exc: BaseException) -> None:
        """The file is corrupt: move it (and its WAL) aside, open a fresh one, carry over the
        events that can still be read. Never silent: `recovered` says what happened."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    shutil.move(str(src), str(aside) + suffix)
        except OSError as move_exc:
            raise SpoolError(
                f"spool {self.path}: corrupt ({exc}) and cannot be moved aside: {move_exc}"
            ) from exc
        rows = _salvage(aside)
        self._conn = self._connect()
        for row in rows:
            self._conn.execute(
                "INSERT OR IGNORE INTO events (event_id, topic, payload, qos, created) "
                "VALUES (?, ?, ?, ?, ?)",
                row,
            )
        self._count = self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        self.recovered = (
            f"spool {self.path} was corrupt ({exc}); moved to {aside.name}, {len(rows)} "
            "event(s) recovered into a fresh spool"
        )
        log.error("%s", self.recovered)

    def check_file(self) -> bool:
        """Recreate the spool when its file was deleted or replaced while open (writes would go
        to an unlinked inode and be lost at the next start). True when it was recreated; the
        events held only by the lost file are gone, so the caller must alarm."""
        with self._lock:
            if self._conn is None or self._ino is None:
                return False
            try:
                st = os.stat(self.path)
                same = (st.st_dev, st.st_ino) == self._ino and st.st_nlink > 0
            except FileNotFoundError:
                same = False
            except OSError as exc:
                raise SpoolError(f"spool {self.path}: cannot stat: {exc}") from exc
            if same:
                return False
            # Carry over what the open (unlinked) file still holds, then start a new file.
            try:
                rows = self._conn.execute(
                    "SELECT event_id, topic, payload, qos, created FROM events ORDER BY seq"
                ).fetchall()
                bd = self._conn.execute("SELECT key, value FROM meta").fetchall()
            except sqlite3.Error:
                rows, bd = [], []
            self._conn.close()
            self._conn = None
            self._conn = self._connect()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany(
                    "INSERT OR IGNORE INTO events (event_id, topic, payload, qos, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
                self._conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", bd)
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise SpoolError(f"spool {self.path}: cannot recreate: {exc}") from exc
            self._count = self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            self.recreated += 1
            log.error(
                "spool %s was deleted or replaced while open; recreated with the %d event(s) "
                "still held",
                self.path,
                len(rows),
            )
            return True

    def next_bd_seq(self) -> int:
        """Increment and return the station's birth/death sequence (durable, starts at 0)."""
        with self._lock:
            conn = self._open_conn()
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = 'bd_seq'").fetchone()
                value = 0 if row is None else int(row[0]) + 1
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('bd_seq', ?)", (value,))
            except sqlite3.Error as exc:
                raise SpoolError(f"spool {self.path}: cannot update bd_seq: {exc}") from exc
            return value

    def free_bytes(self) -> int:
        """Free space on the spool's file system (for the reserve other writers keep)."""
        try:
            return shutil.disk_usage(self.path.parent).free
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: cannot stat the file system: {exc}") from exc

    # -- writing -----------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, event_id: str, qos: int = 1) -> None:
        """Store one event durably (committed and synced when this returns).

        Idempotent on event_id: putting an id already pending stores nothing new.
        Raises SpoolFullError when full, SpoolError on any I/O problem; never drops silently.
        """
        if self.put_many([(topic, payload, event_id, qos)]):
            raise self.full_error(event_id)

    def put_many(self, events: Sequence[tuple[str, bytes, str, int]]) -> list[str]:
        """Store (topic, payload, event_id, qos) events in one transaction: one sync for all
        of them (the publisher's group commit), committed and synced when this returns.

        Returns the event ids NOT stored because the spool is full (the first ones fill it);
        the caller must raise `full_error` for each. Raises SpoolError on any I/O problem:
        then none of them was stored.
        """
        for event in events:
            if not isinstance(event[1], (bytes, bytearray, memoryview)):
                raise TypeError(f"spool payload must be bytes, got {type(event[1]).__name__}")
        with self._lock:
            conn = self._open_conn()
            room = max(0, self.max_events - self._count)
            take = events[:room]
            if take:
                added = 0
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    for topic, payload, event_id, qos in take:
                        added += conn.execute(
                            "INSERT OR IGNORE INTO events (event_id, topic, payload, qos, created) "
                            "VALUES (?, ?, ?, ?, ?)",
                            (str(event_id), topic, bytes(payload), int(qos), time.time()),
                        ).rowcount
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    _rollback(conn)
                    ids = ", ".join(str(e[2]) for e in take[:3])
                    more = f" and {len(take) - 3} more" if len(take) > 3 else ""
                    raise SpoolError(
                        f"spool {self.path}: cannot store event {ids}{more}: {exc}"
                    ) from exc
                self._count += added
            return [str(e[2]) for e in events[room:]]

    def full_error(self, event_id: str) -> SpoolFullError:
        """The error for an event put_many could not store because the spool is full."""
        return SpoolFullError(
            f"spool {self.path} is full ({self._count} of {self.max_events} events "
            f"waiting for the broker); event {event_id} was not stored"
        )

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


def _rollback(conn: sqlite3.Connection) -> None:
    """End a failed transaction; a failed rollback (disk gone) leaves SQLite to roll back the
    journal at the next open, and the caller raises the original error."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("spool rollback failed: %s", exc)


def _is_corrupt(exc: BaseException) -> bool:
    """A damaged file (moved aside at start), not a locked, unwritable or missing one."""
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "integrity check" in text


def _salvage(path: Path) -> list[tuple]:
    """Rows still readable from a corrupt spool file, row by row (a bad page costs its rows)."""
    rows: list[tuple] = []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return rows
    try:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq").fetchall()]
    except sqlite3.Error:
        seqs = []
    for seq in seqs:
        try:
            r = conn.execute(
                "SELECT event_id, topic, payload, qos, created FROM events WHERE seq = ?", (seq,)
            ).fetchone()
        except sqlite3.Error:
            continue
        if r is not None:
            rows.append(r)
    conn.close()
    return rows
