"""Outlier detection: eject endpoints that keep failing, then probe them back in.

Modelled on Envoy's consecutive-errors detector (Istio's ``outlierDetection``), with
Linkerd's probe step. Defaults, as in Istio: ``consecutive_errors: 5``,
``interval: 10``, ``base_ejection_time: 30``, ``max_ejection_percent: 10``, plus
``max_ejection_time: 300``. ``enabled: false`` turns the detector off.

* The engine reports each finished try with ``record(endpoint, ok, now, total)``; what
  counts as a failure (5xx, connect failure) is the engine's call.
* After ``consecutive_errors`` failures in a row the endpoint is ejected: the balancer
  skips it until ``now + base_ejection_time * ejections`` (capped at
  ``max_ejection_time``), where ``ejections`` counts this endpoint's recent ejections.
* When the ejection expires the endpoint is back in rotation on probation: its next
  result decides. A success clears the failure count; a failure ejects it again at once,
  for longer.
* The ejection count decays by one for every ``interval`` seconds the endpoint spends
  out of ejection, so an endpoint that recovered starts again from the base time.
* At most ``max_ejection_percent`` of the service's endpoints are ejected at once, but
  one may always be ejected when there are at least two (a lone endpoint never is: the
  balancer would send to it anyway, in panic mode).

State is kept by endpoint id, so it survives a new config snapshot: call
``apply(endpoints)`` with the new Endpoint objects to carry ejections over and forget
endpoints that are gone.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from meshctl.proxy.balance import Endpoint

DEFAULTS = {
    "consecutive_errors": 5,
    "interval": 10.0,
    "base_ejection_time": 30.0,
    "max_ejection_percent": 10.0,
    "max_ejection_time": 300.0,
}


class OutlierConfigError(ValueError):
    """An outlier_detection block that cannot be used; the message starts with the key path."""

    code = "config-invalid"


class _EndpointHealth:
    __slots__ = ("failures", "ejections", "ejected_until", "decayed_at", "on_probation")

    def __init__(self) -> None:
        self.failures = 0  # consecutive
        self.ejections = 0  # recent ejections, decaying
        self.ejected_until = 0.0
        self.decayed_at = 0.0  # when the last decay step was counted
        self.on_probation = False  # ejection expired, next result not seen yet


class OutlierDetector:
    """Consecutive-failure ejection for the endpoints of one upstream service."""

    __slots__ = (
        "enabled",
        "consecutive_errors",
        "interval",
        "base_ejection_time",
        "max_ejection_percent",
        "max_ejection_time",
        "_health",
    )

    def __init__(self, cfg: dict[str, Any] | None = None) -> None:
        cfg = {} if cfg is None else cfg
        if not isinstance(cfg, dict):
            raise OutlierConfigError("outlier_detection: expected a mapping, got %r" % (cfg,))
        unknown = sorted(set(cfg) - set(DEFAULTS) - {"enabled"})
        if unknown:
            raise OutlierConfigError(
                "outlier_detection.%s: unknown key (known: enabled, %s)" % (unknown[0], ", ".join(DEFAULTS))
            )
        values = {}
        for key, default in DEFAULTS.items():
            value = cfg.get(key, default)
            if value is None:
                value = default
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise OutlierConfigError("outlier_detection.%s: expected a number >= 0, got %r" % (key, value))
            values[key] = value
        if not isinstance(values["consecutive_errors"], int) or values["consecutive_errors"] < 1:
            raise OutlierConfigError(
                "outlier_detection.consecutive_errors: expected an integer >= 1, got %r" % (values["consecutive_errors"],)
            )
        if values["max_ejection_percent"] > 100:
            raise OutlierConfigError(
                "outlier_detection.max_ejection_percent: expected 0 to 100, got %r" % (values["max_ejection_percent"],)
            )
        enabled = cfg.get("enabled", True)
        if not isinstance(enabled, bool):
            raise OutlierConfigError("outlier_detection.enabled: expected true or false, got %r" % (enabled,))
        self.enabled = enabled
        self.consecutive_errors: int = values["consecutive_errors"]
        self.interval = float(values["interval"])
        self.base_ejection_time = float(values["base_ejection_time"])
        self.max_ejection_percent = float(values["max_ejection_percent"])
        self.max_ejection_time = float(values["max_ejection_time"])
        self._health: dict[str, _EndpointHealth] = {}

    def record(self, endpoint: Endpoint, ok: bool, now: float, total_endpoints: int) -> bool:
        """Count one finished try; True when this result ejected the endpoint."""
        health = self._health.get(endpoint.id)
        if ok:
            if health is not None and (health.failures or health.on_probation):
                if now >= health.ejected_until:
                    health.on_probation = False
                    health.failures = 0
            return False
        if not self.enabled:
            return False
        if health is None:
            health = self._health[endpoint.id] = _EndpointHealth()
        if now < health.ejected_until:
            return False  # a try that started before the ejection; already counted
        health.failures += 1
        if health.failures < self.consecutive_errors and not health.on_probation:
            return False
        if not self._may_eject(now, total_endpoints):
            return False
        self._decay(health, now)
        health.ejections += 1
        duration = self.base_ejection_time * health.ejections
        if duration > self.max_ejection_time:
            duration = self.max_ejection_time
        health.ejected_until = endpoint.ejected_until = now + duration
        health.decayed_at = health.ejected_until
        health.failures = 0
        health.on_probation = True
        return True

    def _may_eject(self, now: float, total_endpoints: int) -> bool:
        if total_endpoints < 2:
            return False
        allowed = max(1, math.floor(total_endpoints * self.max_ejection_percent / 100.0))
        ejected = sum(1 for health in self._health.values() if health.ejected_until > now)
        return ejected < allowed

    def _decay(self, health: _EndpointHealth, now: float) -> None:
        if health.ejections and self.interval > 0:
            steps = int((now - health.decayed_at) // self.interval)
            if steps > 0:
                health.ejections = max(0, health.ejections - steps)
                health.decayed_at += steps * self.interval

    def ejection_count(self, endpoint_id: str, now: float) -> int:
        """How many recent ejections count towards this endpoint's next ejection time."""
        health = self._health.get(endpoint_id)
        if health is None:
            return 0
        self._decay(health, now)
        return health.ejections

    def ejected_ids(self, now: float) -> list[str]:
        """Ids of endpoints ejected at ``now``, sorted (for status and metrics)."""
        return sorted(endpoint_id for endpoint_id, health in self._health.items() if health.ejected_until > now)

    def apply(self, endpoints: Iterable[Endpoint]) -> None:
        """Carry ejections over to a new snapshot's endpoints; forget the ones that left."""
        current = {endpoint.id: endpoint for endpoint in endpoints}
        for endpoint_id in list(self._health):
            if endpoint_id not in current:
                del self._health[endpoint_id]
        for endpoint_id, health in self._health.items():
            current[endpoint_id].ejected_until = health.ejected_until

    def __repr__(self) -> str:
        return "OutlierDetector(%s, consecutive_errors=%d, tracking %d endpoints)" % (
            "on" if self.enabled else "off",
            self.consecutive_errors,
            len(self._health),
        )
