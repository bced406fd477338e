"""The live order feed of the ShopFast frontend: orders placed through it, as server-sent events.

`OrderFeed` keeps the last orders and wakes the streams waiting for new ones; `events()`
is one subscriber's stream in the text/event-stream format (`id:`, `event: order`,
`data:` one JSON object), beginning with the orders already kept, then each new one as
it is paid, and a comment line when nothing happened for a while so that the
subscriber, and anyone watching with `curl -N`, can see the stream is alive. It yields
an empty chunk about once a second, which shopkit's writer uses to notice a shutdown.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

KEPT_ORDERS = 20
HEARTBEAT_S = 15.0
POLL_S = 1.0  # how often a waiting stream lets its writer check for shutdown
RECONNECT_MS = 2000  # the EventSource's wait before it reconnects


class OrderFeed:
    """Orders in the order they were paid, each with a number that only grows."""

    def __init__(self, kept: int = KEPT_ORDERS) -> None:
        self._orders: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(maxlen=kept)
        self._last = 0
        self._changed = threading.Condition()

    def publish(self, order: dict[str, Any]) -> int:
        with self._changed:
            self._last += 1
            self._orders.append((self._last, order))
            self._changed.notify_all()
            return self._last

    def after(self, seen: int, wait_s: float) -> list[tuple[int, dict[str, Any]]]:
        """The orders numbered above `seen`, waiting up to `wait_s` for one when there are none."""
        with self._changed:
            self._changed.wait_for(lambda: self._last > seen, wait_s)
            return [(number, order) for number, order in self._orders if number > seen]

    def events(self, last_event_id: str | None = None, heartbeat_s: float = HEARTBEAT_S) -> Iterator[bytes]:
        """One subscriber's event stream; `last_event_id` resumes after a reconnect."""
        seen = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
        yield b"retry: %d\n: order feed, one event per paid order\n\n" % RECONNECT_MS
        quiet_since = time.monotonic()
        while True:
            orders = self.after(seen, POLL_S)
            for number, order in orders:
                yield sse_event(number, "order", order)
                seen = number
            now = time.monotonic()
            if orders:
                quiet_since = now
            elif now - quiet_since >= heartbeat_s:
                quiet_since = now
                yield b": still here\n\n"
            else:
                yield b""


def sse_event(number: int, kind: str, payload: Any) -> bytes:
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (number, kind.encode(), data.encode())
