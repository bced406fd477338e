"""The manifest keys for the traffic policy of calls to a service: split, routes, timeouts,
retries, load balancing, outlier detection and limits (the semantics: docs and MESH.md).

Per service:

    split: {v1: 90, v2: 10}
    routes: [{match: {headers: {x-canary: "1"}}, version: v2}]
    timeout: 2s
    retries: {attempts: 3, retry_on: [gateway-error]}
    load_balancer: {kind: consistent_hash, header: x-user}
    outlier_detection: {consecutive_errors: 5}
    limits: {max_connections: 100}

`DEFS` are the shared definitions (`$defs`) these keys refer to; a route refers to them too.
"""

from __future__ import annotations

from meshctl.agent.schema_parts import PERCENT, closed_object, described, exactly_one_of, ref

HEADER_NAME_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
METHOD_PATTERN = r"^[A-Za-z]+$"
RETRY_ON_PATTERN = r"^(connect-failure|refused|gateway-error|5xx|reset|[1-5][0-9][0-9])$"
SIMPLE_BALANCER_PATTERN = r"^(least_request|round_robin|random)$"

RETRY_CONDITIONS = ("connect-failure", "refused", "gateway-error", "5xx", "reset")
BALANCER_KINDS = ("least_request", "round_robin", "random", "consistent_hash")

# What a value failing each pattern should have looked like; `%r` is the bad value.
PATTERN_MESSAGES = {
    HEADER_NAME_PATTERN: "invalid header name %r",
    METHOD_PATTERN: "invalid method %r",
    RETRY_ON_PATTERN: "invalid retry condition %r: use one of "
    + ", ".join(RETRY_CONDITIONS)
    + ", or a status code such as 503",
    SIMPLE_BALANCER_PATTERN: "invalid load balancer %r: use one of least_request, round_robin, "
    "random, or {kind: consistent_hash, ...}",
}

DEFS: dict[str, dict] = {
    "retries": closed_object(
        {
            "attempts": {
                "type": "integer",
                "minimum": 1,
                "maximum": 10,
                "description": "Total tries, including the first [3].",
            },
            "per_try_timeout": ref("duration", "Time allowed for each try [no limit]."),
            "retry_on": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": ["string", "integer"],
                    "pattern": RETRY_ON_PATTERN,
                    "minimum": 100,
                    "maximum": 599,
                    "description": "connect-failure, refused, gateway-error (502, 503, "
                    "504), 5xx, reset, or a status code.",
                },
                "description": "When to retry [connect-failure, refused, gateway-error].",
            },
            "backoff": ref("duration", "Base delay before a retry, doubled per try, with full jitter [25ms]."),
            "max_backoff": ref("duration", "Upper bound of the delay between tries [250ms]."),
            "non_idempotent": {
                "type": "boolean",
                "description": "Also retry POST and PATCH [false: only GET, HEAD, OPTIONS, PUT, DELETE, TRACE].",
            },
            "budget": closed_object(
                {
                    "ratio": {
                        "type": "number",
                        "minimum": 0,
                        "maximum": 1,
                        "description": "Retries allowed as a fraction of requests [0.2].",
                    },
                    "min_per_second": {
                        "type": "number",
                        "minimum": 0,
                        "description": "Retries always allowed per second [10].",
                    },
                },
                "Caps retries so that they cannot multiply an outage.",
            ),
        },
        "Retry policy; without it (or with null) nothing is retried.",
        type=["object", "null"],
    ),
    "split": {
        "type": "object",
        "minProperties": 1,
        "propertyNames": {"$ref": "#/$defs/name"},
        "additionalProperties": {
            "type": "integer",
            "minimum": 0,
            "maximum": 100,
            "description": "Percent of requests for this version.",
        },
        "description": "Weighted split over versions, in percent, summing to 100, e.g. {v1: 90, v2: 10}.",
    },
    "string_match": exactly_one_of(
        {
            "exact": {"type": "string", "description": "The whole value equals this."},
            "prefix": {"type": "string", "description": "The value starts with this."},
            "regex": {"type": "string", "description": "The whole value matches this regular expression (Python syntax)."},
        },
        "Exactly one of exact, prefix, regex.",
    ),
    "route": closed_object(
        {
            "match": closed_object(
                {
                    "path": ref("string_match", "Match the request path (without the query)."),
                    "method": {
                        "type": ["string", "array"],
                        "pattern": METHOD_PATTERN,
                        "minItems": 1,
                        "items": {"type": "string", "pattern": METHOD_PATTERN, "description": "A method."},
                        "description": "A method such as GET, or a list of them.",
                    },
                    "headers": {
                        "type": "object",
                        "propertyNames": {"pattern": HEADER_NAME_PATTERN},
                        "additionalProperties": {
                            "type": ["string", "number", "boolean", "object"],
                            "minProperties": 1,
                            "maxProperties": 1,
                            "additionalProperties": False,
                            "properties": {
                                "exact": {"type": "string", "description": "Equals this."},
                                "prefix": {"type": "string", "description": "Starts with this."},
                                "regex": {"type": "string", "description": "The whole value matches this regular expression (Python syntax)."},
                            },
                            "description": "The exact value, or {exact|prefix|regex: ...}.",
                        },
                        "description": "Request headers that must be present with these values.",
                    },
                    "query": {
                        "type": "object",
                        "additionalProperties": {
                            "type": ["string", "number", "boolean"],
                            "description": "The exact value of the query parameter.",
                        },
                        "description": "Query parameters that must be present with these values.",
                    },
                },
                "What a request must look like to take this route; all given parts must match.",
            ),
            "split": ref("split", "Where matching requests go [the service's split]."),
            "version": ref("name", "Send matching requests to this version; short for split: {VERSION: 100}."),
            "timeout": ref("duration", "Overrides the service's timeout for matching requests; 0: no limit."),
            "stream_idle_timeout": ref("duration", "Overrides the service's stream_idle_timeout for matching requests; 0: never."),
            "retries": ref("retries", "Overrides the service's retries for matching requests."),
            "fault": closed_object(
                {
                    "delay": closed_object(
                        {
                            "fixed": ref("duration", "How long to delay."),
                            "percent": described(PERCENT, "Percent of requests delayed [100]."),
                        },
                        "Delay requests before forwarding them.",
                        required=("fixed",),
                    ),
                    "abort": closed_object(
                        {
                            "status": {
                                "type": "integer",
                                "minimum": 200,
                                "maximum": 599,
                                "description": "Status code to answer with.",
                            },
                            "percent": described(PERCENT, "Percent of requests aborted [100]."),
                        },
                        "Answer requests with an error instead of forwarding them.",
                        required=("status",),
                    ),
                },
                "Fault injection, for testing how callers cope.",
                minProperties=1,
            ),
            "mirror": closed_object(
                {
                    "version": ref("name", "The version that receives copies."),
                    "percent": described(PERCENT, "Percent of requests copied [100]."),
                    "compare": {
                        "type": ["boolean", "object"],
                        "description": "Keep the copy's answer and compare it with the primary's "
                                       "(`meshctl shadow report`): true, or unsafe/ignore_headers/ignore_json [false].",
                        "properties": {
                            "unsafe": {"type": "boolean", "description": "Also copy POST, PUT, PATCH, DELETE [false]."},
                            "ignore_headers": {"type": "array", "items": {"type": "string"},
                                               "description": "Headers that are noise."},
                            "ignore_json": {"type": "array", "items": {"type": "string"},
                                            "description": "JSON paths that are noise, e.g. $.ts, $.items[*].id."},
                        },
                        "additionalProperties": False,
                    },
                },
                "Send a copy of matching requests to a version; its responses are discarded unless `compare`.",
                required=("version",),
            ),
        },
        "A route: the first route whose match fits a request decides where it goes.",
    ),
    "load_balancer": {
        "type": ["string", "object"],
        "pattern": SIMPLE_BALANCER_PATTERN,
        "properties": {
            "kind": {
                "enum": list(BALANCER_KINDS),
                "description": "least_request (power of two choices), round_robin, random or consistent_hash.",
            },
            "header": {
                "type": "string",
                "pattern": HEADER_NAME_PATTERN,
                "description": "consistent_hash on this request header.",
            },
            "cookie": {"type": "string", "minLength": 1, "description": "consistent_hash on this cookie."},
            "source_ip": {"const": True, "description": "consistent_hash on the client's address."},
        },
        "required": ["kind"],
        "additionalProperties": False,
        "description": "How to pick an instance: least_request [default], round_robin, "
        "random, or {kind: consistent_hash, header|cookie|source_ip: ...}.",
    },
    "outlier_detection": {
        "type": ["object", "boolean"],
        "properties": {
            "consecutive_errors": {
                "type": "integer",
                "minimum": 1,
                "description": "5xx answers or connect failures in a row that eject an instance [5].",
            },
            "interval": ref("duration", "How often ejections are reconsidered [10s]."),
            "base_ejection_time": ref(
                "duration", "Ejection time, multiplied by the number of ejections so far [30s]."
            ),
            "max_ejection_percent": described(
                PERCENT, "At most this percent of instances ejected; one may always be [10]."
            ),
            "max_ejection_time": ref("duration", "Upper bound of one ejection [300s]."),
        },
        "additionalProperties": False,
        "description": "Eject instances that keep failing, then probe them back [on]. false turns it off.",
    },
    "limits": closed_object(
        {
            "max_connections": {
                "type": "integer",
                "minimum": 1,
                "description": "Connections to this service from each calling sidecar [1024].",
            },
            "max_pending": {
                "type": "integer",
                "minimum": 0,
                "description": "Requests waiting for a connection; more are answered 503 circuit-open [1024].",
            },
        },
        "Circuit breaking limits.",
    ),
}

SERVICE_PROPERTIES: dict[str, dict] = {
    "split": ref("split", "Weighted split of calls to this service [100 to the first version]."),
    "routes": {
        "type": "array",
        "items": {"$ref": "#/$defs/route"},
        "description": "Routing rules for calls to this service; first match wins, then the split.",
    },
    "timeout": ref(
        "duration", "Time allowed for a whole call, retries and the whole response included; then 504, or a cut "
        "response once it has begun [no limit]."),
    "stream_idle_timeout": ref(
        "duration", "End a call once no byte has moved either way for this long (504 stream-idle-timeout, "
        "or a cut stream); 0: never [5m]."),
    "connect_timeout": ref("duration", "Time allowed for the TCP connect to an instance [1s]."),
    "handshake_timeout": ref("duration", "Time allowed for the mTLS handshake after the connect [10s]."),
    "retries": ref("retries", "Retry policy for calls to this service [failed connects only, twice]."),
    "load_balancer": ref("load_balancer", "How calls pick an instance [least_request]."),
    "outlier_detection": ref("outlier_detection", "Ejection of failing instances [on]."),
    "limits": ref("limits", "Circuit breaking limits [1024 connections, 1024 pending]."),
}
