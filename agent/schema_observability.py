"""The manifest keys for access logs, tracing and metrics (docs/observability.md).

Top level:

    observability:
      access_log: errors         # off | on | errors: JSON access lines for `meshctl logs --access` [off]
      tracing: {sampling: 0.1}   # share of traces started at the ingress that are kept [0.01]
      metrics: false             # sidecars record no request metrics at all [true]

Tracing is always on (headers propagated, caller's sampling decision honoured); `sampling`
only decides for traces that start at this mesh's ingress. `sampling: 0` records nothing
of its own. `metrics: false` turns per-request recording off in every sidecar (the
benchmark's metrics-off figures); `meshctl stat`/`top`/`metrics` then show no traffic.
"""

from __future__ import annotations

from typing import Any

ACCESS_LOG_MODES = ("off", "on", "errors")
DEFAULT_SAMPLING = 0.01

MANIFEST_PROPERTIES: dict[str, Any] = {
    "observability": {
        "type": "object",
        "additionalProperties": False,
        "description": "Access logs, trace sampling and metrics.",
        "properties": {
            "metrics": {"type": "boolean", "description": "Record request metrics in the sidecars [true]."},
            "access_log": {"enum": list(ACCESS_LOG_MODES), "description": "off, on (every request) or errors (5xx and mesh errors) [off]."},
            "tracing": {
                "type": "object",
                "description": "Trace sampling for traces that start at the ingress.",
                "additionalProperties": False,
                "properties": {
                    "sampling": {"type": "number", "minimum": 0, "maximum": 1, "description": "Share of new traces kept, 0..1 [0.01]."},
                },
            },
        },
    },
}


def observability_settings(document: dict[str, Any]) -> tuple[str, float]:
    """(access_log mode, sampling rate) of a validated manifest document."""
    raw = document.get("observability") or {}
    tracing = raw.get("tracing") or {}
    return raw.get("access_log", "off"), float(tracing.get("sampling", DEFAULT_SAMPLING))


def metrics_enabled(document: dict[str, Any]) -> bool:
    """Whether the sidecars record request metrics (`observability: {metrics: false}` turns it off)."""
    return (document.get("observability") or {}).get("metrics", True) is not False
