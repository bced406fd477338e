"""Circuit-breaking limits: bounded counters for connections and pending requests.

Istio's ``connectionPool`` in miniature. Per upstream service, from this sidecar:
``max_connections`` upstream connections in use and ``max_pending`` requests waiting for
one (defaults 1024 each). Sans-IO: the engine asks ``admit(waiter)`` per request and
gets ADMITTED (a connection slot is its own), QUEUED (it waits, first in first out) or
REJECTED (both full: the engine answers 503 ``x-mesh-error: circuit-open``). Every
admitted or queued waiter calls ``leave(waiter)`` exactly once; when that frees a slot,
``leave`` returns the queued waiter that now owns it, for the engine to wake.

HTTP/2 streams and opaque TCP relays take a connection slot too, with ``hold(holder)``:
it never queues (as Envoy's max_requests for HTTP/2 and its TCP proxy's max_connections
refuse at once), so a stream over the limit is answered 503 / gRPC UNAVAILABLE and a relay
is closed. Queued waiters are HTTP/1.1 exchanges; whoever's ``leave`` frees a slot wakes
the returned waiter with ``waiter.admitted()``.

One `CircuitLimits` lives per service name for the life of the process: a new config
snapshot calls ``reconfigure()``, so the counts and the queue carry over. A lowered
maximum admits nobody new until enough requests have left.
"""

from __future__ import annotations

from collections import deque
from typing import Any

DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_PENDING = 1024


class LimitsConfigError(ValueError):
    """A limits block that cannot be used; the message starts with the key path."""

    code = "config-invalid"


class Limit:
    """A counter with a ceiling. Every successful ``try_acquire()`` needs one ``release()``."""

    __slots__ = ("name", "maximum", "in_use")

    def __init__(self, name: str, maximum: int) -> None:
        self.name = name
        self.maximum = maximum
        self.in_use = 0

    def try_acquire(self) -> bool:
        if self.in_use >= self.maximum:
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        if self.in_use <= 0:
            raise RuntimeError("%s: release() without a matching try_acquire()" % self.name)
        self.in_use -= 1

    def __repr__(self) -> str:
        return "Limit(%s: %d/%d)" % (self.name, self.in_use, self.maximum)


ADMITTED = "admitted"
QUEUED = "queued"
REJECTED = "rejected"


class CircuitLimits:
    """The two limits of one upstream service: ``connections`` and ``pending`` (a FIFO queue)."""

    __slots__ = ("connections", "pending", "_queue", "_holders")

    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.connections = Limit("max_connections", max_connections)
        self.pending = Limit("max_pending", max_pending)
        self._queue: deque[Any] = deque()
        self._holders: set[int] = set()  # id() of the waiters that own a connection slot

    def reconfigure(self, other: CircuitLimits) -> CircuitLimits:
        """Take the maxima of `other` (a freshly compiled block), keep counts and queue."""
        self.connections.maximum = other.connections.maximum
        self.pending.maximum = other.pending.maximum
        return self

    def hold(self, holder: Any) -> bool:
        """Take a connection slot now or not at all (never queued, never ahead of the queue)."""
        if not self._queue and self.connections.try_acquire():
            self._holders.add(id(holder))
            return True
        return False

    def admit(self, waiter: Any) -> str:
        """ADMITTED, QUEUED or REJECTED; queued waiters are woken in order by `leave()`."""
        if self.hold(waiter):
            return ADMITTED
        if self.pending.try_acquire():
            self._queue.append(waiter)
            return QUEUED
        return REJECTED

    def leave(self, waiter: Any) -> Any | None:
        """`waiter` is done (or gave up); returns the queued waiter that got its slot, if any."""
        key = id(waiter)
        if key in self._holders:
            self._holders.discard(key)
            self.connections.release()
        else:
            try:
                self._queue.remove(waiter)
            except ValueError:
                return None
            self.pending.release()
        return self._grant_next()

    def _grant_next(self) -> Any | None:
        if self._queue and self.connections.in_use < self.connections.maximum:
            waiter = self._queue.popleft()
            self.pending.release()
            self.connections.in_use += 1
            self._holders.add(id(waiter))
            return waiter
        return None

    @property
    def queued(self) -> int:
        return len(self._queue)

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None) -> CircuitLimits:
        cfg = cfg or {}
        if not isinstance(cfg, dict):
            raise LimitsConfigError("limits: expected a mapping, got %r" % (cfg,))
        values = {}
        for key, default in (("max_connections", DEFAULT_MAX_CONNECTIONS), ("max_pending", DEFAULT_MAX_PENDING)):
            value = cfg.get(key)
            if value is None:
                value = default
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LimitsConfigError("limits.%s: expected an integer >= 1, got %r" % (key, value))
            values[key] = value
        return cls(values["max_connections"], values["max_pending"])

    def __repr__(self) -> str:
        return "CircuitLimits(connections %d/%d, pending %d/%d)" % (
            self.connections.in_use,
            self.connections.maximum,
            self.pending.in_use,
            self.pending.maximum,
        )
