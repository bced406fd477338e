"""The manifest keys for access logs, tracing and metrics (docs/observability.md).

Top level:

    observability:
      access_log: errors         # off | on | errors: JSON access lines for `meshctl logs --access` [off]
      tracing:
        sampling: 0.1            # share of traces started at the ingress that are kept [0.01]
        otlp:                    # also export every recorded span to a collector [none]
          endpoint: http://127.0.0.1:4318/v1/traces   # OTLP/HTTP JSON, http:// or https://
          headers: {authorization: "Bearer ${OTLP_TOKEN}"}  # sent with every export; never logged
          timeout: 2s            # per export request [2s]
      metrics: {port: 9464}      # where the agent serves all sidecars' metrics merged [9464]
      # metrics: false           # sidecars record no request metrics at all [true]
      why: all                   # decision records for `meshctl why`: errors | all | off [errors]
      why_records: 5000          # records each sidecar keeps, oldest dropped [2000]

Tracing is always on (headers propagated, caller's sampling decision honoured); `sampling`
only decides for traces that start at this mesh's ingress. `sampling: 0` records nothing
of its own. `metrics: false` turns per-request recording off in every sidecar (the
benchmark's metrics-off figures); `meshctl stat`/`top`/`metrics` then show no traffic.
The merged metrics port is fixed (9464 unless set) so that a Prometheus target survives
agent restarts; with the default, a taken port falls back to a free one with a warning, an
explicit port that is taken fails `meshctl up` (`metrics-port-taken`) before any change.
`tracing.otlp` makes the agent post every span it receives, batched, to an OpenTelemetry
collector (meshctl/agent/otlp_export.py); spans are dropped, and counted, when it cannot keep up.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from meshctl.agent.durations import DURATION_PATTERN, parse_duration
from meshctl.agent.model import OtlpExport

ACCESS_LOG_MODES = ("off", "on", "errors")
WHY_MODES = ("errors", "all", "off")
DEFAULT_WHY_RECORDS = 2000
DEFAULT_SAMPLING = 0.01
DEFAULT_OTLP_TIMEOUT_S = 2.0
OTLP_ENDPOINT_PATTERN = r"^https?://[^/?#\s]+(/\S*)?$"
# The same pattern as agent.schema's HEADER_NAME_PATTERN, so that it gets the same message.
_HEADER_NAME_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
_OTLP_PATH = ("observability", "tracing", "otlp")

_OTLP: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["endpoint"],
    "description": "Export every recorded span to an OpenTelemetry collector (OTLP/HTTP JSON) [none].",
    "properties": {
        "endpoint": {
            "type": "string",
            "pattern": OTLP_ENDPOINT_PATTERN,
            "description": "The collector's traces URL, http:// or https://, e.g. http://127.0.0.1:4318/v1/traces.",
        },
        "headers": {
            "type": "object",
            "propertyNames": {"pattern": _HEADER_NAME_PATTERN},
            "additionalProperties": {"type": "string", "description": "The header's value."},
            "description": "Headers sent with every export, e.g. an API key; never logged or shown [none].",
        },
        "timeout": {
            "type": ["number", "string"],
            "minimum": 0,
            "pattern": DURATION_PATTERN,
            "description": "Time allowed for one export request [2s].",
        },
    },
}

MANIFEST_PROPERTIES: dict[str, Any] = {
    "observability": {
        "type": "object",
        "additionalProperties": False,
        "description": "Access logs, trace sampling and metrics.",
        "properties": {
            "metrics": {
                "description": "true/false: record request metrics in the sidecars [true]; or "
                "{enabled, port}: also where the agent serves them merged [9464; 0: any free port].",
                "oneOf": [
                    {"type": "boolean"},
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "enabled": {"type": "boolean", "description": "Record request metrics [true]."},
                            "port": {"type": "integer", "minimum": 0, "maximum": 65535,
                                     "description": "Port of the merged /metrics on 127.0.0.1 [9464]."},
                        },
                    },
                ],
            },
            "access_log": {"enum": list(ACCESS_LOG_MODES), "description": "off, on (every request) or errors (5xx and mesh errors) [off]."},
            "why": {
                "enum": list(WHY_MODES),
                "description": "Which requests get a decision record for `meshctl why`: errors (5xx, mesh errors, resets, "
                               "non-OK gRPC statuses and requests with x-mesh-debug: 1), all, or off [errors].",
            },
            "why_records": {
                "type": "integer", "minimum": 1, "maximum": 1000000,
                "description": "Decision records each sidecar keeps in memory, oldest dropped [2000].",
            },
            "tracing": {
                "type": "object",
                "description": "Trace sampling for traces that start at the ingress.",
                "additionalProperties": False,
                "properties": {
                    "sampling": {"type": "number", "minimum": 0, "maximum": 1, "description": "Share of new traces kept, 0..1 [0.01]."},
                    "otlp": _OTLP,
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


def why_settings(document: dict[str, Any]) -> tuple[str, int]:
    """(which requests get a decision record, how many each sidecar keeps) of a validated document."""
    raw = document.get("observability") or {}
    return raw.get("why", "errors"), int(raw.get("why_records", DEFAULT_WHY_RECORDS))


def metrics_enabled(document: dict[str, Any]) -> bool:
    """Whether the sidecars record request metrics (`observability: {metrics: false}` turns it off)."""
    raw = (document.get("observability") or {}).get("metrics", True)
    return raw.get("enabled", True) is not False if isinstance(raw, dict) else raw is not False


def metrics_port(document: dict[str, Any]) -> int | None:
    """The merged metrics' port the manifest asks for, or None for the default."""
    raw = (document.get("observability") or {}).get("metrics")
    return raw.get("port") if isinstance(raw, dict) else None


def otlp_export(document: dict[str, Any]) -> OtlpExport | None:
    """Where a validated manifest document exports spans to, or None."""
    raw = ((document.get("observability") or {}).get("tracing") or {}).get("otlp")
    if raw is None:
        return None
    timeout = parse_duration(raw["timeout"]) if "timeout" in raw else DEFAULT_OTLP_TIMEOUT_S
    return OtlpExport(endpoint=raw["endpoint"], headers=tuple(sorted((raw.get("headers") or {}).items())), timeout_s=timeout)


def otlp_problems(document: dict[str, Any]) -> Iterator[tuple[tuple, str]]:
    """What the schema cannot say: a zero timeout, a line break in a header value (never echoed)."""
    observability = document.get("observability")
    tracing = observability.get("tracing") if isinstance(observability, dict) else None
    raw = tracing.get("otlp") if isinstance(tracing, dict) else None
    if not isinstance(raw, dict):
        return
    timeout = raw.get("timeout")
    try:
        if timeout is not None and parse_duration(timeout) == 0:
            yield _OTLP_PATH + ("timeout",), "must be more than 0"
    except ValueError:
        pass  # reported by the schema
    headers = raw.get("headers")
    for name, value in headers.items() if isinstance(headers, dict) else ():
        if isinstance(value, str) and ("\r" in value or "\n" in value):
            yield _OTLP_PATH + ("headers", name), "a header value cannot contain a line break"
