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
from meshctl.agent.schema_parts import closed_object, ref
from meshctl.agent.schema_security import MANIFEST_PROPERTIES, SERVICE_PROPERTIES
from meshctl.agent.schema_traffic import DEFS as TRAFFIC_DEFS
from meshctl.agent.schema_traffic import PATTERN_MESSAGES as TRAFFIC_PATTERN_MESSAGES
from meshctl.agent.schema_traffic import SERVICE_PROPERTIES as TRAFFIC_PROPERTIES
from meshctl.agent.yamllines import type_name

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
HOST_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?$"
URL_PATH_PATTERN = r"^/"

# What a value failing each pattern should have looked like; `%r` is the bad value.
_PATTERN_MESSAGES = {
    NAME_PATTERN: "invalid name %r: use lower-case letters, digits and '-', starting and ending with a letter or digit",
    ENV_NAME_PATTERN: "invalid variable name %r: use letters, digits and '_', not starting with a digit",
    HOST_PATTERN: "invalid host name %r",
    URL_PATH_PATTERN: "path %r must start with '/'",
    DURATION_PATTERN: "invalid duration %r: expected " + DURATION_HINT,
    OTLP_ENDPOINT_PATTERN: "invalid collector URL %r: expected http://HOST:PORT/PATH or https://...",
    **TRAFFIC_PATTERN_MESSAGES,
}


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
    "health": closed_object(
        {
            "http": {
                "type": "string",
                "pattern": URL_PATH_PATTERN,
                "description": "Path for an HTTP GET on the app; any 2xx or 3xx means "
                "ready. Without it, ready means the app's port accepts a TCP connection.",
            },
            "period": ref("duration", "Time between probes while starting [200ms]."),
            "timeout": ref("duration", "Time allowed for one probe [1s]."),
        },
        "Readiness probe. Traffic reaches an instance only once it is ready.",
    ),
    **TRAFFIC_DEFS,  # meshctl/agent/schema_traffic.py
    "restart": closed_object(
        {
            "policy": {
                "enum": ["on_failure", "always", "no"],
                "description": "Restart on a non-zero exit [on_failure], on any exit (always), or never (no).",
            },
            "backoff": ref("duration", "First delay before a restart; doubles, with jitter [500ms]."),
            "max_backoff": ref("duration", "Upper bound of the restart delay [30s]."),
            "max_quick_crashes": {
                "type": "integer",
                "minimum": 1,
                "description": "Quick crashes in a row before the instance is marked failed [5].",
            },
            "stable_after": ref("duration", "A run this long is not a quick crash; it resets the backoff [10s]."),
        },
        "What to do when the process exits.",
    ),
    "version": {
        "type": ["object", "null"],
        "properties": {
            "command": ref("command", "Command of this version [the service's command]."),
            "env": ref("env", "Environment variables, on top of the service's env."),
            "replicas": {"type": "integer", "minimum": 1, "description": "Instances of this version [the service's replicas]."},
            "health": ref("health", "Readiness probe; its keys override the service's."),
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

_SERVICE = closed_object(
    {
        "command": ref("command", "The program to run, for every version that does not set its own."),
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
            "items": ref("name", "A service in this mesh."),
            "description": "Services this one calls; each gets a local port in <NAME>_URL, and starts before this one.",
        },
        "health": ref("health", "Readiness probe [TCP connect to the app's port]."),
        "env": ref("env", "Environment variables for every version."),
        "replicas": {"type": "integer", "minimum": 1, "description": "Instances of each version [1]."},
        "workdir": {
            "type": "string",
            "minLength": 1,
            "description": "Working directory, relative to the mesh's workdir [the mesh's workdir].",
        },
        "restart": ref("restart", "Restart policy [on_failure with backoff]."),
        "stop_grace": ref("duration", "Time between SIGTERM and SIGKILL on stop [10s]."),
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
        **TRAFFIC_PROPERTIES,  # meshctl/agent/schema_traffic.py
    },
    "A service: one or more versions of a process, and the policy for calls to it.",
)

_INGRESS = closed_object(
    {
        "port": {
            "type": "integer",
            "minimum": 1,
            "maximum": 65535,
            "description": "Port the mesh listens on for outside traffic.",
        },
        "host": {"type": "string", "minLength": 1, "description": "Address to listen on [127.0.0.1]."},
        "tls": closed_object(
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
            "items": closed_object(
                {
                    "path": {
                        "type": "string",
                        "pattern": URL_PATH_PATTERN,
                        "description": "Path prefix; the longest matching prefix wins.",
                    },
                    "service": ref("name", "The service that gets these requests."),
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
    **closed_object(
        {
            "$schema": {"type": "string", "description": "URL or path of this schema, for editors."},
            "mesh": ref("name", "Name of the mesh; one agent runs per mesh."),
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
            "ingress": ref("ingress", "Outside traffic into the mesh [none]."),
            "agent_grace": ref(
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


def _settled(error: ValidationError) -> tuple[Any, Any, dict[str, Any]]:
    """The failing value, the keyword's value and the subschema: always set on a validator's errors."""
    schema = error.schema if isinstance(error.schema, dict) else {}
    return error.instance, error.validator_value, schema


def _translate(error: ValidationError) -> Iterator[SchemaProblem]:
    path = tuple(error.absolute_path)
    keyword = error.validator
    instance, value, schema = _settled(error)
    if "propertyNames" in error.absolute_schema_path:
        key_path = path + (instance,)
        yield SchemaProblem(key_path, key_path, _pattern_message(error))
    elif keyword == "required":
        for key in value:
            if key not in instance:
                yield SchemaProblem(path + (key,), path, "required")
    elif keyword == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        for key in instance:
            if key not in allowed:
                yield SchemaProblem(path + (key,), path + (key,), _unknown_key(key, allowed))
    elif keyword == "uniqueItems":
        seen: list = []
        for index, item in enumerate(instance):
            if item in seen:
                yield SchemaProblem(path + (index,), path + (index,), "duplicate %s" % _show(item))
            seen.append(item)
    else:
        yield SchemaProblem(path, path, _value_message(error))


def _value_message(error: ValidationError) -> str:
    keyword = error.validator
    instance, value, schema = _settled(error)
    if keyword == "type":
        if schema.get("pattern") == DURATION_PATTERN:
            return "expected %s, got %s" % (DURATION_HINT, type_name(instance))
        wanted = [value] if isinstance(value, str) else [name for name in value if name != "null"]
        phrases = [_TYPE_PHRASES[name] for name in wanted] if len(wanted) == 1 else [
            "a boolean" if name == "boolean" else _TYPE_PHRASES[name] for name in wanted
        ]
        return "expected %s, got %s" % (_join_or(phrases), type_name(instance))
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
    instance, value, _ = _settled(error)
    template = _PATTERN_MESSAGES.get(value)
    if error.validator == "pattern" and template is not None:
        return template % (instance,)
    if error.validator == "pattern":
        return "%s does not match %s" % (_show(instance), value)
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
