"""Traffic mirroring (shadowing): a fire-and-forget copy of a request to another version.

A route with `mirror: {version, percent}` copies that share of its requests to one
endpoint of the mirror version, as Istio does:

* the copy is sent once the whole request has been read and only when the replay
  buffer holds all of it (bodies up to 64 KiB); larger requests are not mirrored;
* its Host header gets `-shadow` appended to the host part (`cart:80` becomes
  `cart-shadow:80`, Istio's convention) and it carries `x-mesh-mirror: 1`, so the
  mirror version can tell shadow traffic from real traffic (and skip side effects);
* it uses its own pooled connection; the response is read and discarded; errors,
  hangs and slowness of the mirror never reach the client. A copy that gets no complete
  response within the route's timeout (MIRROR_TIMEOUT_S when it has none) is aborted;
* at most MAX_MIRRORS_IN_FLIGHT copies per service are outstanding; beyond that new
  copies are skipped rather than queued, so a dead mirror cannot pile up memory.

A copy made for a shadow comparison (proxy.shadow) is given `on_end`: it then keeps a
bounded copy of the answer (proxy.capture) and hands it over when the copy ends.

`shadow_head()` is the pure part; `Mirror` is the small driver.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from meshctl.proxy.capture import Capture
from meshctl.proxy.errors import ProtocolError
from meshctl.proxy.http1 import END, NEED_DATA, Head

if TYPE_CHECKING:
    from collections.abc import Callable

    from meshctl.proxy.pool import Pool, UpstreamConnection
    from meshctl.proxy.snapshot import Service

log = logging.getLogger("proxy.mirror")

MAX_MIRRORS_IN_FLIGHT = 64
MIRROR_TIMEOUT_S = 15.0  # a copy of a request on a route without timeout: nobody waits for it, so it must end
SHADOW_SUFFIX = b"-shadow"
MIRROR_HEADER = b"x-mesh-mirror: 1"


def shadow_head(out_head: bytes) -> bytes:
    """The forwarded request head with `-shadow` on the Host and `x-mesh-mirror: 1` added."""
    lines = out_head[:-4].split(b"\r\n")
    for index in range(1, len(lines)):
        line = lines[index]
        if line[:5].lower() == b"host:":
            value = line[5:].strip(b" \t")
            host, colon, port = value.rpartition(b":")
            if not colon or b"]" in port or not port.isdigit():
                host, colon, port = value, b"", b""
            lines[index] = b"host: " + host + SHADOW_SUFFIX + colon + port
            break
    lines.append(MIRROR_HEADER)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def send_mirror(pool: Pool, service: Service, version: str, request: list[bytes], timeout: float | None, connect_timeout: float, now: float) -> bool:
    """Start one mirrored copy of `request` (head first); False when it was skipped."""
    if service.mirrors_in_flight >= MAX_MIRRORS_IN_FLIGHT:
        return False
    endpoint = service.balancer.pick(version, None, frozenset(), now)
    if endpoint is None:
        return False
    head_is_head = request[0][:5] == b"HEAD "
    data = [shadow_head(request[0]), *request[1:]]
    Mirror(pool, service, endpoint.address, data, head_is_head).start(timeout or MIRROR_TIMEOUT_S, connect_timeout)
    return True


class Mirror:
    """Sends one copy and reads its response to the end, then returns the connection."""

    __slots__ = ("pool", "service", "address", "data", "no_body", "upstream", "timer", "done", "interim", "keep_alive",
                 "on_end", "role", "capture", "started")

    def __init__(
        self, pool: Pool, service: Service, address: tuple[str, int], data: list[bytes], no_body: bool,
        on_end: Callable[[str, Capture, str | None, float], None] | None = None, role: str = "",
    ) -> None:
        self.pool = pool
        self.service = service
        self.address = address
        self.data = data
        self.no_body = no_body
        self.upstream: UpstreamConnection | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.interim = False
        self.keep_alive = False
        self.on_end = on_end  # (role, capture, problem or None, seconds) when the copy ends
        self.role = role
        self.capture = Capture() if on_end is not None else None
        self.started = 0.0

    def __repr__(self) -> str:
        return "<Mirror %s to %s:%d>" % (self.service.name, self.address[0], self.address[1])

    def start(self, timeout: float, connect_timeout: float) -> None:
        self.service.mirrors_in_flight += 1
        loop = self.pool.loop
        self.started = loop.time()
        self.timer = loop.call_later(timeout, self._give_up, "no response within %gs" % timeout)
        conn = self.pool.take(self.address)
        if conn is not None:
            self._send(conn)
        else:
            loop.create_task(self._connect(connect_timeout), name="mirror-connect")

    async def _connect(self, timeout: float) -> None:
        try:
            conn = await self.pool.connect(self.address, timeout, self.service.tls, self.service.name)
        except (OSError, TimeoutError) as exc:
            self._finish("connect failed: %s" % (exc,))
            return
        if self.done:
            self.pool.add_idle(conn)
            return
        self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        conn.owner = self
        self.upstream = conn
        if self.no_body:
            conn.parser.expect_no_body()
        transport = conn.transport
        assert transport is not None  # the pool hands out connected connections only
        transport.writelines(self.data)
        conn.bytes_out += sum(map(len, self.data))
        self.data = []

    def _give_up(self, detail: str) -> None:
        self.timer = None
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.abort()
        self._finish(detail)

    def _finish(self, problem: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.service.mirrors_in_flight -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if problem is not None:
            log.debug("%r: %s", self, problem)
        if self.on_end is not None and self.capture is not None:  # set together in __init__
            self.on_end(self.role, self.capture, problem, self.pool.loop.time() - self.started)

    # -- the UpstreamConnection owner interface -----------------------------------------

    def upstream_data(self, data: bytes) -> None:
        conn = self.upstream
        if conn is None:
            return
        if self.capture is not None:
            self.capture.add(data)
        parser = conn.parser
        parser.feed(data)
        while True:
            try:
                event = parser.next_event()
            except ProtocolError as exc:
                self._give_up("invalid response: %s" % exc)
                return
            if event is NEED_DATA:
                return
            if type(event) is Head:
                self.interim = event.status < 200
                self.keep_alive = event.keep_alive
            elif event is END:
                if self.interim:
                    self.interim = False
                    parser.start_next_cycle()
                    if self.no_body:
                        parser.expect_no_body()
                    continue
                self.upstream = None
                if self.keep_alive and parser.buffered == 0:
                    self.pool.release(conn)
                else:
                    conn.close()
                self._finish(None)
                return

    def upstream_eof(self) -> None:
        conn = self.upstream
        if conn is not None:
            conn.parser.feed_eof()
            self.upstream_data(b"")
            if self.upstream is conn:
                self._give_up("closed before the end of the response")

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        if self.upstream is conn:
            self.upstream = None
            self._finish("connection lost: %s" % (exc or "eof"))

    def upstream_write_paused(self) -> None:
        """Nothing to pause: the whole copy was written at once."""

    def upstream_write_resumed(self) -> None:
        """See upstream_write_paused."""
