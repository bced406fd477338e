"""The manifest's JSON Schema, and structural validation against it in our own words.

`manifest_json_schema()` is published (`meshctl schema`) so that editors can complete
and check a `mesh.yaml`; the loader validates against the very same schema, so the
editor and `meshctl up` never disagree about what is allowed. Every object forbids
unknown keys: a typo is an error, not a silently ignored setting.

`structural_problems()` runs the validator and translates each jsonschema error into a
short message (`required`, `unknown key 'comand' (did you mean 'command'?)`,
`expected a string, got integer`) attached to the path it concerns. Cross-references
(upstreams, versions named in a split, dependency cycles) are not the schema's business:
`agent.manifest` checks them.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from meshctl.agent.durations import DURATION_HINT, DURATION_PATTERN
from meshctl.agent.schema_observability import MANIFEST_PROPERTIES as OBSERVABILITY_PROPERTIES
from meshctl.agent.schema_observability import OTLP_ENDPOINT_PATTERN
from meshctl.agent.schema_protocols import SERVICE_PROPERTIES as PROTOCOL_PROPERTIES
from meshctl.agent.schema_export import SERVICE_PROPERTIES as EXPORT_SERVICE_PROPERTIES
from meshctl.agent.schema_export import VERSION_PROPERTIES as EXPORT_VERSION_PROPERTIES
from meshctl.agent.schema_security import MANIFEST_PROPERTIES, SERVICE_PROPERTIES
from meshctl.agent.yamllines import type_name

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
HOST_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?$"
HEADER_NAME_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
METHOD_PATTERN = r"^[A-Za-z]+$"
URL_PATH_PATTERN = r"^/"
RETRY_ON_PATTERN = r"^(connect-failure|refused|gateway-error|5xx|reset|[1-5][0-9][0-9])$"
SIMPLE_BALANCER_PATTERN = r"^(least_request|round_robin|random)$"

RETRY_CONDITIONS = ("connect-failure", "refused", "gateway-error", "5xx", "reset")
BALANCER_KINDS = ("least_request", "round_robin", "random", "consistent_hash")

# What a value failing each pattern should have looked like; `%r` is the bad value.
_PATTERN_MESSAGES = {
    NAME_PATTERN: "invalid name %r: use lower-case letters, digits and '-', starting and ending with a letter or digit",
    ENV_NAME_PATTERN: "invalid variable name %r: use letters, digits and '_', not starting with a digit",
    HOST_PATTERN: "invalid host name %r",
    HEADER_NAME_PATTERN: "invalid header name %r",
    METHOD_PATTERN: "invalid method %r",
    URL_PATH_PATTERN: "path %r must start with '/'",
    RETRY_ON_PATTERN: "invalid retry condition %r: use one of "
    + ", ".join(RETRY_CONDITIONS)
    + ", or a status code such as 503",
    SIMPLE_BALANCER_PATTERN: "invalid load balancer %r: use one of least_request, round_robin, "
    "random, or {kind: consistent_hash, ...}",
    DURATION_PATTERN: "invalid duration %r: expected " + DURATION_HINT,
    OTLP_ENDPOINT_PATTERN: "invalid collector URL %r: expected http://HOST:PORT/PATH or https://...",
}


def _described(schema: dict, description: str) -> dict:
    return {**schema, "description": description}


def _ref(name: str, description: str) -> dict:
    return {"$ref": "#/$defs/" + name, "description": description}


def _object(properties: dict, description: str, required: tuple = (), **extra: Any) -> dict:
    schema = {
        "type": "object",
        "description": description,
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def _exactly_one_of(properties: dict, description: str) -> dict:
    return _object(properties, description, minProperties=1, maxProperties=1)


_PERCENT = {"type": "number", "minimum": 0, "maximum": 100}

_DEFS: dict[str, dict] = {
    "name": {
        "type": "string",
        "pattern": NAME_PATTERN,
        "maxLength": 63,
        "description": "Lower-case letters, digits and '-', like a DNS label.",
    },
    "duration": {
        "type": ["number", "string"],
        "minimum": 0,
        "pattern": DURATION_PATTERN,
        "description": "A duration: '250ms', '2s', '1.5s', '1m', '1h', or a number of seconds.",
    },
    "command": {
        "type": ["string", "array"],
        "minLength": 1,
        "minItems": 1,
        "items": {"type": "string", "description": "One argument."},
        "description": "The program to run: a string split like a shell would (no expansion), or a list of arguments.",
    },
    "env": {
        "type": "object",
        "propertyNames": {"pattern": ENV_NAME_PATTERN},
        "additionalProperties": {
            "type": ["string", "number", "boolean"],
            "description": "The value; numbers and booleans become strings.",
        },
        "description": "Environment variables for the process, on top of the agent's.",
    },
    "health": _object(
        {
            "http": {
                "type": "string",
                "pattern": URL_PATH_PATTERN,
                "description": "Path for an HTTP GET on the app; any 2xx or 3xx means "
                "ready. Without it, ready means the app's port accepts a TCP connection.",
            },
            "period": _ref("duration", "Time between probes while starting [200ms]."),
            "timeout": _ref("duration", "Time allowed for one probe [1s]."),
        },
        "Readiness probe. Traffic reaches an instance only once it is ready.",
    ),
    "retries": _object(
        {
            "attempts": {
                "type": "integer",
                "minimum": 1,
                "maximum": 10,
                "description": "Total tries, including the first [3].",
            },
            "per_try_timeout": _ref("duration", "Time allowed for each try [no limit]."),
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
            "backoff": _ref("duration", "Base delay before a retry, doubled per try, with full jitter [25ms]."),
            "max_backoff": _ref("duration", "Upper bound of the delay between tries [250ms]."),
            "non_idempotent": {
                "type": "boolean",
                "description": "Also retry POST and PATCH [false: only GET, HEAD, OPTIONS, PUT, DELETE, TRACE].",
            },
            "budget": _object(
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
    "string_match": _exactly_one_of(
        {
            "exact": {"type": "string", "description": "The whole value equals this."},
            "prefix": {"type": "string", "description": "The value starts with this."},
            "regex": {"type": "string", "description": "The whole value matches this regular expression (Python syntax)."},
        },
        "Exactly one of exact, prefix, regex.",
    ),
    "route": _object(
        {
            "match": _object(
                {
                    "path": _ref("string_match", "Match the request path (without the query)."),
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
            "split": _ref("split", "Where matching requests go [the service's split]."),
            "version": _ref("name", "Send matching requests to this version; short for split: {VERSION: 100}."),
            "timeout": _ref("duration", "Overrides the service's timeout for matching requests; 0: no limit."),
            "stream_idle_timeout": _ref("duration", "Overrides the service's stream_idle_timeout for matching requests; 0: never."),
            "retries": _ref("retries", "Overrides the service's retries for matching requests."),
            "fault": _object(
                {
                    "delay": _object(
                        {
                            "fixed": _ref("duration", "How long to delay."),
                            "percent": _described(_PERCENT, "Percent of requests delayed [100]."),
                        },
                        "Delay requests before forwarding them.",
                        required=("fixed",),
                    ),
                    "abort": _object(
                        {
                            "status": {
                                "type": "integer",
                                "minimum": 200,
                                "maximum": 599,
                                "description": "Status code to answer with.",
                            },
                            "percent": _described(_PERCENT, "Percent of requests aborted [100]."),
                        },
                        "Answer requests with an error instead of forwarding them.",
                        required=("status",),
                    ),
                },
                "Fault injection, for testing how callers cope.",
                minProperties=1,
            ),
            "mirror": _object(
                {
                    "version": _ref("name", "The version that receives copies."),
                    "percent": _described(_PERCENT, "Percent of requests copied [100]."),
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
            "interval": _ref("duration", "How often ejections are reconsidered [10s]."),
            "base_ejection_time": _ref(
                "duration", "Ejection time, multiplied by the number of ejections so far [30s]."
            ),
            "max_ejection_percent": _described(
                _PERCENT, "At most this percent of instances ejected; one may always be [10]."
            ),
            "max_ejection_time": _ref("duration", "Upper bound of one ejection [300s]."),
        },
        "additionalProperties": False,
        "description": "Eject instances that keep failing, then probe them back [on]. false turns it off.",
    },
    "limits": _object(
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
    "restart": _object(
        {
            "policy": {
                "enum": ["on_failure", "always", "no"],
                "description": "Restart on a non-zero exit [on_failure], on any exit (always), or never (no).",
            },
            "backoff": _ref("duration", "First delay before a restart; doubles, with jitter [500ms]."),
            "max_backoff": _ref("duration", "Upper bound of the restart delay [30s]."),
            "max_quick_crashes": {
                "type": "integer",
                "minimum": 1,
                "description": "Quick crashes in a row before the instance is marked failed [5].",
            },
            "stable_after": _ref("duration", "A run this long is not a quick crash; it resets the backoff [10s]."),
        },
        "What to do when the process exits.",
    ),
    "version": {
        "type": ["object", "null"],
        "properties": {
            "command": _ref("command", "Command of this version [the service's command]."),
            "env": _ref("env", "Environment variables, on top of the service's env."),
            "replicas": {"type": "integer", "minimum": 1, "description": "Instances of this version [the service's replicas]."},
            "health": _ref("health", "Readiness probe; its keys override the service's."),
            "workdir": {
                "type": "string",
                "minLength": 1,
                "description": "Working directory, relative to the service's [the service's].",
            },
        },
        "additionalProperties": False,
        "description": "One version of a service, e.g. v2 of a canary.",
    },
}

_SERVICE = _object(
    {
        "command": _ref("command", "The program to run, for every version that does not set its own."),
        "versions": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"$ref": "#/$defs/name"},
            "additionalProperties": {"$ref": "#/$defs/version"},
            "description": "Versions by name, in order; without it the service has one version, v1.",
        },
        "upstreams": {
            "type": "array",
            "uniqueItems": True,
            "items": _ref("name", "A service in this mesh."),
            "description": "Services this one calls; each gets a local port in <NAME>_URL, and starts before this one.",
        },
        "health": _ref("health", "Readiness probe [TCP connect to the app's port]."),
        "env": _ref("env", "Environment variables for every version."),
        "replicas": {"type": "integer", "minimum": 1, "description": "Instances of each version [1]."},
        "workdir": {
            "type": "string",
            "minLength": 1,
            "description": "Working directory, relative to the mesh's workdir [the mesh's workdir].",
        },
        "restart": _ref("restart", "Restart policy [on_failure with backoff]."),
        "stop_grace": _ref("duration", "Time between SIGTERM and SIGKILL on stop [10s]."),
        "listen": {
            "enum": ["tcp", "unix"],
            "description": "Where the app listens: tcp is 127.0.0.1:$PORT; unix is the Unix socket $MESH_SOCKET, "
                           "in the private state directory, which no other user can reach [tcp].",
        },
        "http_proxy": {
            "type": "boolean",
            "description": "Set HTTP_PROXY so the app can call http://<service>/ by name [false].",
        },
        "egress": {
            "type": "array",
            "uniqueItems": True,
            "items": {"type": "string", "pattern": HOST_PATTERN, "description": "A host name."},
            "description": "Hosts outside the mesh this service may reach through its proxy [none].",
        },
        "split": _ref("split", "Weighted split of calls to this service [100 to the first version]."),
        "routes": {
            "type": "array",
            "items": {"$ref": "#/$defs/route"},
            "description": "Routing rules for calls to this service; first match wins, then the split.",
        },
        "timeout": _ref(
            "duration", "Time allowed for a whole call, retries and the whole response included; then 504, or a cut "
            "response once it has begun [no limit]."),
        "stream_idle_timeout": _ref(
            "duration", "End a call once no byte has moved either way for this long (504 stream-idle-timeout, "
            "or a cut stream); 0: never [5m]."),
        "connect_timeout": _ref("duration", "Time allowed for the TCP connect to an instance [1s]."),
        "handshake_timeout": _ref("duration", "Time allowed for the mTLS handshake after the connect [10s]."),
        "retries": _ref("retries", "Retry policy for calls to this service [failed connects only, twice]."),
        "load_balancer": _ref("load_balancer", "How calls pick an instance [least_request]."),
        "outlier_detection": _ref("outlier_detection", "Ejection of failing instances [on]."),
        "limits": _ref("limits", "Circuit breaking limits [1024 connections, 1024 pending]."),
    },
    "A service: one or more versions of a process, and the policy for calls to it.",
)

_INGRESS = _object(
    {
        "port": {
            "type": "integer",
            "minimum": 1,
            "maximum": 65535,
            "description": "Port the mesh listens on for outside traffic.",
        },
        "host": {"type": "string", "minLength": 1, "description": "Address to listen on [127.0.0.1]."},
        "tls": _object(
            {
                "cert": {"type": "string", "minLength": 1, "description": "PEM certificate chain, relative to the manifest."},
                "key": {"type": "string", "minLength": 1, "description": "PEM private key (unencrypted), relative to the manifest."},
            },
            "Serve HTTPS to outside clients with your certificate [plain HTTP].",
            required=("cert", "key"),
        ),
        "routes": {
            "type": "array",
            "minItems": 1,
            "items": _object(
                {
                    "path": {
                        "type": "string",
                        "pattern": URL_PATH_PATTERN,
                        "description": "Path prefix; the longest matching prefix wins.",
                    },
                    "service": _ref("name", "The service that gets these requests."),
                },
                "An ingress route.",
                required=("path", "service"),
            ),
            "description": "Which service gets outside requests, by path prefix.",
        },
    },
    "The mesh's front door for traffic from outside.",
    required=("port", "routes"),
)

_MANIFEST = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "meshctl manifest",
    **_object(
        {
            "$schema": {"type": "string", "description": "URL or path of this schema, for editors."},
            "mesh": _ref("name", "Name of the mesh; one agent runs per mesh."),
            "workdir": {
                "type": "string",
                "minLength": 1,
                "description": "Directory commands run in, relative to this file [this file's directory].",
            },
            "services": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"$ref": "#/$defs/name"},
                "additionalProperties": {"$ref": "#/$defs/service"},
                "description": "The services of the mesh, by name.",
            },
            "ingress": _ref("ingress", "Outside traffic into the mesh [none]."),
            "agent_grace": _ref(
                "duration",
                "How long apps and sidecars keep serving after the agent dies without `meshctl down`;"
                " then they are stopped [5m].",
            ),
        },
        "A meshctl manifest (mesh.yaml): the processes of a mesh and the traffic policy between them.",
        required=("mesh", "services"),
    ),
    "$defs": {**_DEFS, "service": _SERVICE, "ingress": _INGRESS},
}


# Identity, mTLS and authorization keys live in their own module (meshctl/agent/schema_security.py).
_SERVICE["properties"].update(SERVICE_PROPERTIES)
_SERVICE["properties"].update(EXPORT_SERVICE_PROPERTIES)  # meshctl/agent/schema_export.py
_DEFS["version"]["properties"].update(EXPORT_VERSION_PROPERTIES)
_SERVICE["properties"].update(PROTOCOL_PROPERTIES)  # meshctl/agent/schema_protocols.py
_MANIFEST["properties"].update(MANIFEST_PROPERTIES)
_MANIFEST["properties"].update(OBSERVABILITY_PROPERTIES)  # meshctl/agent/schema_observability.py


def manifest_json_schema() -> dict:
    """The manifest's JSON Schema (draft 2020-12), a fresh copy the caller may modify."""
    return copy.deepcopy(_MANIFEST)


@lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    return Draft202012Validator(_MANIFEST)


@dataclass(frozen=True)
class SchemaProblem:
    """A structural problem at `path`, to be reported on the line of `anchor`."""

    path: tuple
    anchor: tuple
    message: str


def structural_problems(document: Any) -> list[SchemaProblem]:
    """Every way `document` (plain data from YAML) departs from the schema."""
    problems: list[SchemaProblem] = []
    for error in _validator().iter_errors(document):
        problems.extend(_translate(error))
    return problems


def _translate(error: ValidationError) -> Iterator[SchemaProblem]:
    path = tuple(error.absolute_path)
    keyword = error.validator
    if "propertyNames" in error.absolute_schema_path:
        key_path = path + (error.instance,)
        yield SchemaProblem(key_path, key_path, _pattern_message(error))
    elif keyword == "required":
        for key in error.validator_value:
            if key not in error.instance:
                yield SchemaProblem(path + (key,), path, "required")
    elif keyword == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        for key in error.instance:
            if key not in allowed:
                yield SchemaProblem(path + (key,), path + (key,), _unknown_key(key, allowed))
    elif keyword == "uniqueItems":
        seen: list = []
        for index, item in enumerate(error.instance):
            if item in seen:
                yield SchemaProblem(path + (index,), path + (index,), "duplicate %s" % _show(item))
            seen.append(item)
    else:
        yield SchemaProblem(path, path, _value_message(error))


def _value_message(error: ValidationError) -> str:
    keyword, value, schema = error.validator, error.validator_value, error.schema
    if keyword == "type":
        if schema.get("pattern") == DURATION_PATTERN:
            return "expected %s, got %s" % (DURATION_HINT, type_name(error.instance))
        wanted = [value] if isinstance(value, str) else [name for name in value if name != "null"]
        phrases = [_TYPE_PHRASES[name] for name in wanted] if len(wanted) == 1 else [
            "a boolean" if name == "boolean" else _TYPE_PHRASES[name] for name in wanted
        ]
        return "expected %s, got %s" % (_join_or(phrases), type_name(error.instance))
    if keyword == "enum":
        return "must be one of: " + ", ".join(str(option) for option in value)
    if keyword == "const":
        return "must be %s" % _show(value)
    if keyword == "minimum":
        return "must be >= %s" % value
    if keyword == "maximum":
        return "must be <= %s" % value
    if keyword in ("minLength", "minItems") and value == 1:
        return "must not be empty"
    if keyword == "maxLength":
        return "must be at most %d characters" % value
    if keyword in ("minProperties", "maxProperties"):
        if schema.get("minProperties") == 1 and schema.get("maxProperties") == 1:
            return "must have exactly one of: " + ", ".join(schema.get("properties", {}))
        if keyword == "minProperties" and value == 1:
            return "must not be empty"
    if keyword == "pattern":
        return _pattern_message(error)
    return error.message


def _pattern_message(error: ValidationError) -> str:
    template = _PATTERN_MESSAGES.get(error.validator_value)
    if error.validator == "pattern" and template is not None:
        return template % (error.instance,)
    if error.validator == "pattern":
        return "%s does not match %s" % (_show(error.instance), error.validator_value)
    return _value_message(error)


def _unknown_key(key: Any, allowed: list[str]) -> str:
    message = "unknown key %s" % _show(key)
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    if close:
        message += " (did you mean %r?)" % close[0]
    return message


_TYPE_PHRASES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "nothing",
}


def _join_or(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " or " + phrases[-1]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)
