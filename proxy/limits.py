"""Circuit-breaking limits: bounded counters for connections and pending requests.

Istio's ``connectionPool`` in miniature. Per upstream service, from this sidecar:
``max_connections`` open upstream connections and ``max_pending`` requests waiting for
one (defaults 1024 each). When ``try_acquire()`` says no, the engine answers 503 with
``x-mesh-error: circuit-open`` instead of queueing without bound.
"""

from __future__ import annotations

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


class CircuitLimits:
    """The two limits of one upstream service: ``connections`` and ``pending``."""

    __slots__ = ("connections", "pending")

    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.connections = Limit("max_connections", max_connections)
        self.pending = Limit("max_pending", max_pending)

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
