"""Messages to the agent that travel in batches: access lines, shadow results.

One message per item halved the throughput when access logs were on, so items wait
`interval` seconds after the first of a batch, or go at once when `limit` are waiting.
`flush()` also runs at exit, so a drain loses none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Batch:
    """Items for one kind of message, sent as `{"type": kind, field: [items]}`."""

    __slots__ = ("loop", "send", "kind", "field", "limit", "interval", "items", "flusher")

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Callable[[dict], None], kind: str, field: str,
                 limit: int, interval: float) -> None:
        self.loop = loop
        self.send = send
        self.kind = kind
        self.field = field
        self.limit = limit
        self.interval = interval
        self.items: list[Any] = []
        self.flusher: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return "<Batch %s: %d waiting>" % (self.kind, len(self.items))

    def add(self, item: Any) -> None:
        items = self.items
        items.append(item)
        if len(items) >= self.limit:
            self.flush()
        elif self.flusher is None:
            self.flusher = self.loop.call_later(self.interval, self.flush)

    def flush(self) -> None:
        if self.flusher is not None:
            self.flusher.cancel()
            self.flusher = None
        if self.items:
            items, self.items = self.items, []
            self.send({"type": self.kind, self.field: items})
