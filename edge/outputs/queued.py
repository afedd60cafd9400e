"""An output served from its own thread and bounded queue: a slow, failing or absent peer (a
PLC) never blocks the decision path nor another output.

    deliver()  (decision thread)  -> queue (bounded; full: the OLDEST verdict is dropped,
                                     counted and alarmed: never silently)
    own thread: asyncio loop      -> link.open() (retried with backoff while down, alarmed)
                                  -> link.write(verdict), in order; the same verdict is retried
                                     after a reconnect, so a peer outage loses nothing the queue
                                     still holds
A `Link` is the protocol-specific part (edge/opcua/server.py, edge/opcua/client.py). Alarms go
to `alarm(kind, text)` (text None clears it): the station's retained MQTT status.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, Callable, Optional, Protocol

from edge.errors import OutputError
from edge.metrics import LatencyWindows

log = logging.getLogger("edge.outputs")

AlarmSink = Callable[[str, Optional[str]], None]


class NotAcknowledged(OutputError):
    """The peer took the verdict but did not acknowledge it in time (client handshake)."""


class Link(Protocol):
    """The protocol-specific part of a queued output, run on the output's asyncio loop."""

    where: str  # endpoint, for messages

    async def open(self) -> str:
        """Connect (client) or start serving (server); returns what was found."""
        ...

    async def write(self, verdict: dict) -> None:
        """Deliver one verdict. NotAcknowledged: written, not acknowledged (counted, next);
        any other exception: the link is down (reopened, then the same verdict again)."""
        ...

    async def status(self, status: dict) -> None: ...

    async def close(self) -> None: ...


class QueuedOutput:
    """edge.ports.Output over a Link. latency: decision -> written (and acknowledged)."""

    def __init__(
        self,
        name: str,
        link: Link,
        *,
        queue_size: int,
        alarm: AlarmSink,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 10.0,
    ):
        self.name = name
        self.link = link
        self.queue_size = queue_size
        self._alarm = alarm
        self.reconnect = (reconnect_min_s, reconnect_max_s)
        self.latency = LatencyWindows((f"{name}_written",))
        self._q: collections.deque[tuple[dict, float]] = collections.deque()
        self._status: dict | None = None
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("delivered", "unacknowledged", "lost", "rejects_lost", "link_errors", "reconnects"), 0
        )
        self._state = "starting"
        self._last_error: str | None = None
        self._alarms: dict[str, str] = {}
        self._busy = False
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._opened = threading.Event()
        self._thread: threading.Thread | None = None
        self.found = ""  # what link.open() reported (edge check)

    # -- decision thread ------------------------------------------------------------------------
    def deliver(self, verdict: dict, t_capture: float | None = None) -> None:
        dropped = None
        with self._lock:
            if self._closing:
                raise OutputError(f"{self.name}: closed; verdict for part {verdict.get('part_id')}")
            if len(self._q) >= self.queue_size:
                dropped = self._q.popleft()[0]
                self._counts["lost"] += 1
                self._counts["rejects_lost"] += dropped.get("decision") == "reject"
            self._q.append((verdict, time.monotonic()))
        if dropped is not None:
            self._lost(dropped, "queue full")
        self._kick()

    def publish_status(self, status: dict, /) -> None:
        with self._lock:
            self._status = status  # only the latest matters
        self._kick()

    def _kick(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:
                pass  # the loop has ended (close): the queue is counted there

    # -- life cycle --------------------------------------------------------------------------------
    def start(self, required: bool = True, timeout_s: float = 10.0) -> None:
        """Start the thread; with `required`, raise OutputError unless the link opens within
        timeout_s (the output is closed then)."""
        self._thread = threading.Thread(target=self._run, name=f"output-{self.name}", daemon=True)
        self._thread.start()
        if not required:
            return
        if not self._opened.wait(timeout_s) or self._state != "up":
            err = self._last_error or f"not reached within {timeout_s:g}s"
            self.close(0.0)
            raise OutputError(f"{self.name}: {self.link.where}: {err}")

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if not self._q and not self._busy:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def close(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._closing = True
        self._kick()
        if self._thread is not None:
            self._thread.join(timeout_s + 5.0)
        with self._lock:
            left = list(self._q)
            self._q.clear()
            self._counts["lost"] += len(left)
            self._counts["rejects_lost"] += sum(v.get("decision") == "reject" for v, _ in left)
        if left:
            log.error(
                "%s: %d verdict(s) not delivered to %s at close (first part %s)",
                self.name,
                len(left),
                self.link.where,
                left[0][0].get("part_id"),
            )

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {
                "output": self.name,
                "state": self._state,
                "endpoint": self.link.where,
                "alarm": "; ".join(self._alarms.values()) or None,
                "queued": len(self._q),
                **self._counts,
                "last_error": self._last_error,
            }

    # -- the output's thread -----------------------------------------------------------------------
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        except Exception as exc:  # a bug in a link: loud, and the output is marked down
            log.exception("%s: output thread failed", self.name)
            self._set_down(f"output thread failed: {exc}")
        finally:
            self._opened.set()
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake = asyncio.Event()
        self._loop = loop
        backoff = self.reconnect[0]
        up = False
        try:
            while not self._closing:
                if not up:
                    up = await self._open()
                    self._opened.set()
                    if not up:
                        await self._sleep(backoff)
                        backoff = min(2 * backoff, self.reconnect[1])
                        continue
                    backoff = self.reconnect[0]
                up = await self._serve()
                if not up:
                    await self._close_link()
        finally:
            await self._close_link()

    async def _open(self) -> bool:
        try:
            self.found = await self.link.open()
        except Exception as exc:
            await self._close_link()
            self._set_down(_describe(exc))
            return False
        with self._lock:
            was = self._state
            self._state = "up"
            if was == "down":
                self._counts["reconnects"] += 1
        log.info("%s: %s: %s", self.name, self.link.where, self.found)
        self._set_alarm("down", None)
        return True

    async def _serve(self) -> bool:
        """Deliver queued verdicts and status until closing; False when the link went down."""
        while not self._closing or self._q:
            with self._lock:
                status, self._status = self._status, None
                head = self._q[0] if self._q else None
                self._busy = head is not None
            if status is not None and not await self._try(self.link.status(status)):
                return False
            if head is None:
                if self._closing:
                    break
                self._wake.clear()
                if not self._q and self._status is None:
                    await self._wake.wait()
                continue
            verdict, t_deliver = head
            try:
                await self.link.write(verdict)
            except NotAcknowledged as exc:
                self._pop(head)
                self._counts["unacknowledged"] += 1
                self._set_alarm("unacknowledged", f"{self.name}: {self.link.where}: {exc}")
                continue
            except Exception as exc:
                self._link_error(exc)
                return False
            self._pop(head)
            self._counts["delivered"] += 1
            self.latency.add(f"{self.name}_written", time.monotonic() - t_deliver)
            self._set_alarm("unacknowledged", None)
            if self._alarms.get("lost") and not self._q:
                self._set_alarm("lost", None)  # caught up; the count stays in health()
        return True

    async def _try(self, coro: Any) -> bool:
        try:
            await coro
            return True
        except Exception as exc:
            self._link_error(exc)
            return False

    def _pop(self, head: tuple) -> None:
        with self._lock:
            if self._q and self._q[0] is head:  # still ours: deliver() may have dropped it
                self._q.popleft()
            self._busy = False

    def _link_error(self, exc: BaseException) -> None:
        with self._lock:
            self._counts["link_errors"] += 1
        self._set_down(_describe(exc))

    async def _close_link(self) -> None:
        try:
            await asyncio.wait_for(self.link.close(), 5.0)
        except Exception as exc:
            log.warning("%s: closing %s: %s", self.name, self.link.where, _describe(exc))

    async def _sleep(self, seconds: float) -> None:
        """Back off, but wake at once for close()."""
        self._wake.clear()
        if self._closing:
            return
        try:
            await asyncio.wait_for(self._closed(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _closed(self) -> None:
        while not self._closing:
            self._wake.clear()
            await self._wake.wait()

    # -- state and alarms --------------------------------------------------------------------------
    def _set_down(self, error: str) -> None:
        with self._lock:
            self._state = "down"
            self._last_error = error
        # A stable text (the counts are in health()): the retained status changes once.
        self._set_alarm("down", f"{self.name}: {self.link.where} unreachable ({error})")

    def _lost(self, verdict: dict, why: str) -> None:
        with self._lock:
            n = self._counts["lost"]
        self._set_alarm(
            "lost",
            f"{self.name}: verdicts NOT delivered to {self.link.where} ({why}, queue_size "
            f"{self.queue_size}; counted in outputs.{self.name}.lost)",
        )
        if n <= 5 or n % 100 == 0:
            log.error("%s: verdict for part %s dropped: %s", self.name, verdict.get("part_id"), why)

    def _set_alarm(self, kind: str, text: str | None) -> None:
        """Hold or clear one of this output's alarms, and tell the station's status."""
        with self._lock:
            if self._alarms.get(kind) == text:
                return
            if text is None:
                self._alarms.pop(kind, None)
            else:
                self._alarms[kind] = text
        try:
            self._alarm(f"{self.name}_{kind}", text)
        except Exception as exc:  # the MQTT side failing must not stop this output
            log.error("%s: cannot raise alarm %s: %s", self.name, kind, exc)


def _describe(exc: BaseException) -> str:
    """One line: the exception's text, or its type when it has none (timeouts)."""
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
