"""What the dashboard shows, as plain data built from the control ops' own answers (pure).

The dashboard adds no numbers of its own: `build_state()` only arranges what `status`,
`stat`, `edges`, `route-show`, `proxy-status` and `certs` answer (the very functions the
CLI's commands call) into the shape the page draws. The one thing it keeps is `History`:
the `stat` rows of the last five minutes, one sample a second, for the small charts.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

HISTORY_SECONDS = 300
STAT_WINDOW_S = 10.0  # as `meshctl top`: smooth enough to read, recent enough to react


def key_of(service: str, version: str) -> str:
    return f"{service}@{version}"


class History:
    """Per service@version, [time, rps, success rate, p99 ms] once a second, five minutes deep."""

    def __init__(self, seconds: int = HISTORY_SECONDS) -> None:
        self.seconds = seconds
        self.series: dict[str, deque[list]] = {}

    def record(self, now: float, stat_rows: Iterable[dict]) -> None:
        for row in stat_rows:
            series = self.series.setdefault(key_of(row["service"], row["version"]), deque(maxlen=self.seconds))
            series.append([round(now, 3), row["rps"], row["success_rate"], row["p99_ms"]])

    def forget_except(self, keys: set[str]) -> None:
        """Drop the series of versions that are gone from the mesh."""
        for key in [k for k in self.series if k not in keys]:
            del self.series[key]

    def to_json(self) -> dict[str, list[list]]:
        return {key: list(points) for key, points in self.series.items()}


def promotion_view(promotion: Any) -> dict[str, Any]:
    """A running promotion (agent.promote.Promotion) with the ladder of weights it climbs."""
    step = promotion.limits.step
    ladder = [min(100, k * step) for k in range(math.ceil(100 / step) + 1)]
    running = promotion.task is not None and not promotion.task.done()
    return {
        **promotion.to_json(),
        "baseline": promotion.baseline,
        "step": step,
        "interval_s": promotion.limits.interval_s,
        "max_error_rate": promotion.limits.max_error_rate,
        "max_p99_ms": promotion.limits.max_p99_ms,
        "running": running,
        "steps": [{"weight": w, "reached": w <= promotion.weight} for w in ladder],
    }


def _service_view(spec: Any, route: dict, instances: list[dict], stats: dict[str, dict],
                  promotion: dict | None, mtls: str) -> dict[str, Any]:
    versions = []
    for version in spec.versions:
        mine = [i for i in instances if i["service"] == spec.name and i["version"] == version.name]
        versions.append({
            "name": version.name,
            "replicas": len(mine),
            "instances": [{key: inst[key] for key in ("id", "replica", "state", "pid", "restarts", "message",
                                                       "generation")} for inst in mine],
            "stats": stats.get(key_of(spec.name, version.name)),
        })
    return {
        "name": spec.name,
        "protocol": spec.protocol,
        "upstreams": list(spec.upstreams),
        "mtls": mtls,
        "versions": versions,
        "split": route["live"]["split"],
        "manifest_split": route["manifest"]["split"],
        "routes": route["live"]["routes"],
        "overridden": route["overridden"],
        "promotion": promotion,
        "authorization": spec.authorization,
    }


def build_state(manifest: Any, answers: dict[str, Any], promotions: dict[str, dict], mtls: dict[str, str],
                features: list[str]) -> dict[str, Any]:
    """The dashboard's whole picture; `answers` maps each control op's name to its answer."""
    status, routes = answers["status"], answers["route-show"]["services"]
    stats = {key_of(row["service"], row["version"]): row for row in answers["stat"]["services"]}
    ingress = None
    if manifest.ingress is not None:
        ingress = {**(status["ingress"] or {}), "routes": [{"path": r.path, "service": r.service}
                                                           for r in manifest.ingress.routes]}
    return {
        "mesh": manifest.mesh,
        "config_version": status["config_version"],
        "features": features,
        "ingress": ingress,
        "services": [_service_view(spec, routes[spec.name], status["instances"], stats, promotions.get(spec.name),
                                   mtls[spec.name]) for spec in manifest.services],
        "edges": answers["edges"],
        "sidecars": answers["proxy-status"]["sidecars"],
        "certs": answers["certs"],
        "default_policy": manifest.security.default_policy,
    }
