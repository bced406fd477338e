"""The manifest loader: `mesh.yaml` text in, a validated `agent.model.Manifest` out.

Three passes, each reporting every problem it finds with its file and line:

1. YAML (`agent.yamllines`): composed node by node, not `safe_load`, so that every
   dotted path keeps the line it came from, duplicate keys are caught, and only YAML 1.2
   booleans count (`policy: no` stays the string "no").
2. Structure: the JSON Schema of `agent.schema`, the same one editors use.
3. Meaning: cross-references and rules a schema cannot express (upstreams that exist,
   dependency cycles, splits summing to 100, regexes that compile, a command for every
   version). Only parts that passed pass 2 are checked, so one typo is one message.

If nothing is wrong the manifest is normalised into the model: defaults filled in,
durations in seconds, services in dependency order, and each service's traffic policy
as plain data in the shape the sidecar receives (meshctl/proxy/policy.md).

The normalised traffic policy of a service (`ServiceSpec.traffic`)::

    {"split": {"v1": 90, "v2": 10},          # ints summing to 100; [100 to the first version]
     "versions": ["v1", "v2"],                # manifest order
     "routes": [route, ...],                  # first match wins; see below
     "timeout": None | float,                 # seconds; None or 0.0: no limit on the whole request
     "stream_idle_timeout": 300.0,            # None or 0.0: a silent stream is never cut
     "connect_timeout": 1.0,                  # seconds: the TCP connect
     "handshake_timeout": 10.0,               # seconds: the mTLS handshake after the connect
     "retries": None | retries,               # see below
     "load_balancer": {"kind": "least_request"}   # or round_robin, random, or
         # {"kind": "consistent_hash", "header": "x-user" | "cookie": "s" | "source_ip": True}
     "outlier_detection": {"enabled": True, "consecutive_errors": 5, "interval": 10.0,
                           "base_ejection_time": 30.0, "max_ejection_percent": 10.0,
                           "max_ejection_time": 300.0},   # `false` in the manifest: enabled False
     "limits": {"max_connections": 1024, "max_pending": 1024}}

    retries = {"attempts": 3, "per_try_timeout": None | float,
               "retry_on": ["connect-failure", "refused", "gateway-error", 503, ...],
               "backoff": 0.025, "max_backoff": 0.25, "non_idempotent": False,
               "budget": {"ratio": 0.2, "min_per_second": 10.0}}

    route = {"match": {"path": None | {"kind": "exact" | "prefix" | "regex", "value": str},
                       "methods": None | ["GET", "HEAD"],          # upper-case
                       "headers": [{"name": "x-canary",            # lower-case
                                    "kind": "exact" | "prefix" | "regex", "value": str}],
                       "query": [{"name": "beta", "value": "1"}]},  # exact values
             "split": {"v2": 100},          # `version: v2` becomes this; [the service's split]
             "timeout": None | float,       # None: the service's timeout; 0.0: no limit
             "stream_idle_timeout": None | float,   # None: the service's; 0.0: never cut
             "retries": None | retries,     # None: the service's retries
             "fault": None | {"delay": None | {"fixed": 0.1, "percent": 10.0},
                              "abort": None | {"status": 503, "percent": 5.0}},
             "mirror": None | {"version": "v2", "percent": 10.0}}

A route without `match` matches every request. Every part of `match` that is given must
match; all headers and query parameters listed must be present with matching values.
Regexes must match the whole value (as in meshctl/proxy/routing.py).
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from pathlib import Path
from typing import Any, Iterator, Mapping, TypeVar

from meshctl.agent.durations import DurationError, parse_duration
from meshctl.agent.errors import ManifestError, Problem
from meshctl.agent.interpolate import substitute
from meshctl.agent.model import (
    DEFAULT_AGENT_GRACE_S,
    DEFAULT_STOP_GRACE_S,
    DEFAULT_STREAM_IDLE_TIMEOUT_S,
    Health,
    Ingress,
    IngressRoute,
    Manifest,
    Observability,
    RestartPolicy,
    Security,
    ServiceSpec,
    VersionSpec,
)
from meshctl.agent.overrides import HEADER_NAME
from meshctl.agent.schema import manifest_json_schema, structural_problems
from meshctl.agent.schema_export import version_image
from meshctl.agent.schema_observability import (
    metrics_enabled,
    metrics_port,
    observability_settings,
    otlp_export,
    otlp_problems,
    why_settings,
)
from meshctl.agent.schema_protocols import protocol_of, protocol_problems
from meshctl.agent.schema_security import normal_authorization, source_problems
from meshctl.agent.yamllines import YamlReader
from meshctl.proxy.compare import json_pattern_error

__all__ = ["ManifestError", "Problem", "load_manifest", "parse_manifest", "read_manifest_text"]

DEFAULT_VERSION = "v1"
_HEALTH_TIMES = (("health", "period"), ("health", "timeout"))
_ROUTE_TIMEOUTS = (("retries", "per_try_timeout"),)  # `timeout` and `stream_idle_timeout` may be 0: no limit
_SERVICE_TIMEOUTS = _ROUTE_TIMEOUTS + _HEALTH_TIMES + (("connect_timeout",), ("handshake_timeout",))
_KNOWN_KEYS = {name: frozenset(manifest_json_schema()["$defs"][name]["properties"]) for name in ("service", "version")}


def load_manifest(path: str | Path, environ: Mapping[str, str] | None = None) -> Manifest:
    """Read and validate the manifest at `path`; raise ManifestError listing every problem.

    `${VAR}` references are filled from `environ` (by default this process's environment).
    """
    source = os.fspath(path)
    return parse_manifest(read_manifest_text(source), source, environ=environ)


def read_manifest_text(source: str) -> str:
    try:
        return Path(source).read_bytes().decode("utf-8")
    except OSError as error:
        raise ManifestError([Problem(source, None, "", "cannot read: %s" % (error.strerror or error))]) from None
    except UnicodeDecodeError as error:
        raise ManifestError([Problem(source, None, "", "not UTF-8 text: %s" % error.reason)]) from None


def parse_manifest(
    text: str, source: str, base_dir: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Manifest:
    """Validate manifest `text`; `source` names the file in messages, as the user typed it.

    Relative workdirs are resolved against `base_dir`, by default the directory of `source`.
    """
    absolute_source = os.path.abspath(source)
    if base_dir is None:
        base_dir = os.path.dirname(absolute_source)
    reader = YamlReader(source)
    document = reader.read(text)
    problems = list(reader.problems)
    if isinstance(document, dict):
        for path, message in substitute(document, os.environ if environ is None else environ):
            problems.append(reader.problem(path, message))
            reader.bad_paths.append(path)
        schema_problems = [
            found
            for found in structural_problems(document)
            if not any(found.path[: len(bad)] == bad for bad in reader.bad_paths)
        ]
        for found in schema_problems:
            problems.append(reader.problem(found.path, found.message, found.anchor))
        checker = _Checker(document, [found.path for found in schema_problems] + reader.bad_paths)
        for path, message, anchor in checker.run():
            problems.append(reader.problem(path, message, anchor))
    if problems:
        unique = {(p.line or 0, p.path, p.message): p for p in problems}
        raise ManifestError([unique[key] for key in sorted(unique)])
    return _build(document, os.path.abspath(base_dir), absolute_source)


# ---------------------------------------------------------------- pass 3: meaning


class _Checker:
    """The rules a schema cannot express, on the parts that passed the schema."""

    def __init__(self, document: dict, dirty_paths: list[tuple]) -> None:
        self.document = document
        self.dirty = dirty_paths
        services = document.get("services")
        self.services: dict = services if isinstance(services, dict) else {}

    def clean(self, path: tuple) -> bool:
        return not any(dirty[: len(path)] == path or path[: len(dirty)] == dirty for dirty in self.dirty)

    def run(self) -> Iterator[tuple[tuple, str, tuple | None]]:
        for name, service in self.services.items():
            if isinstance(service, dict):
                yield from self._service(("services", name), name, service)
        yield from self._cycles()
        ingress = self.document.get("ingress")
        if isinstance(ingress, dict) and isinstance(self.document.get("services"), dict):
            yield from self._ingress(ingress)
        for problem_path, message in otlp_problems(self.document):
            if self.clean(problem_path):
                yield problem_path, message, None

    def _service(self, path: tuple, name: str, service: dict) -> Iterator:
        for index, upstream in enumerate(_list(service.get("upstreams"))):
            if not self.clean(path + ("upstreams", index)):
                continue
            if upstream == name:
                yield path + ("upstreams", index), "a service cannot be its own upstream", None
            elif upstream not in self.services:
                yield path + ("upstreams", index), _unknown("service", upstream, self.services), None
        yield from self._commands(path, service)
        if self.clean(path + ("authorization",)):
            for problem_path, message in source_problems(path, service.get("authorization"), self.services):
                yield problem_path, message, None
        if self.clean(path + ("protocol",)):
            for problem_path, message in protocol_problems(path, service):
                yield problem_path, message, None
        yield from self._positive_durations(path, service, _SERVICE_TIMEOUTS)
        for version_name, version in _dict(service.get("versions")).items():
            yield from self._positive_durations(path + ("versions", version_name), version or {}, _HEALTH_TIMES)
        if not self.clean(path + ("versions",)):
            return  # the names of the versions are unknown, so nothing can be checked against them
        versions = list(service.get("versions") or {DEFAULT_VERSION: None})
        if "split" in service and self.clean(path + ("split",)):
            yield from _split(path + ("split",), service["split"], versions)
        for index, route in enumerate(_list(service.get("routes"))):
            if isinstance(route, dict):
                yield from self._route(path + ("routes", index), route, versions)
                yield from self._positive_durations(path + ("routes", index), route, _ROUTE_TIMEOUTS)
        balancer = service.get("load_balancer")
        if isinstance(balancer, dict) and self.clean(path + ("load_balancer",)):
            yield from _balancer(path + ("load_balancer",), balancer)

    def _positive_durations(self, path: tuple, mapping: dict, key_paths: tuple) -> Iterator:
        """A zero timeout or probe period is allowed by the duration format but means nothing."""
        for key_path in key_paths:
            value: Any = mapping
            for key in key_path:
                value = value.get(key) if isinstance(value, dict) else None
            if value is None or not self.clean(path + key_path):
                continue
            try:
                seconds = parse_duration(value)
            except DurationError:
                continue  # reported by the YAML reader (not a finite number)
            if seconds == 0:
                yield path + key_path, "must be more than 0", None

    def _route(self, path: tuple, route: dict, versions: list[str]) -> Iterator:
        match = _dict(route.get("match"))
        regexes: list[tuple[tuple[str, ...], Any]] = [(("match", "path", "regex"), _dict(match.get("path")).get("regex"))]
        for header, value in _dict(match.get("headers")).items():
            regexes.append((("match", "headers", header, "regex"), _dict(value).get("regex")))
        for key_path, pattern in regexes:
            if pattern is not None and self.clean(path + key_path):
                yield from _regex(path + key_path, pattern)
        if "split" in route and "version" in route:
            yield path, "give either split or version, not both", None
        if "split" in route and self.clean(path + ("split",)):
            yield from _split(path + ("split",), route["split"], versions)
        if "version" in route and self.clean(path + ("version",)) and route["version"] not in versions:
            yield path + ("version",), _unknown("version", route["version"], versions), None
        mirror = _dict(route.get("mirror"))
        if self.clean(path + ("mirror",)) and mirror and mirror["version"] not in versions:
            yield path + ("mirror", "version"), _unknown("version", mirror["version"], versions), None
        compare = _dict(mirror.get("compare")) if mirror else {}
        if self.clean(path + ("mirror", "compare")):
            for index, pattern in enumerate(compare.get("ignore_json") or ()):
                problem = json_pattern_error(pattern)
                if problem is not None:
                    yield path + ("mirror", "compare", "ignore_json", index), problem, None
            for index, name in enumerate(compare.get("ignore_headers") or ()):
                if not HEADER_NAME.match(name):
                    yield path + ("mirror", "compare", "ignore_headers", index), f"{name!r} is not a valid header name", None

    def _commands(self, path: tuple, service: dict) -> Iterator:
        if self.clean(path + ("command",)) and "command" in service:
            yield from _command(path + ("command",), service["command"])
        # A typo such as `comand:` is reported once, as a typo, not also as a missing command.
        has_command = "command" in service or _has_unknown_keys(service, "service")
        versions = service.get("versions")
        if not isinstance(versions, dict):
            if not has_command and "versions" not in service:
                yield path + ("command",), "required", path
            return
        for version_name, version in versions.items():
            version_path = path + ("versions", version_name)
            if version is not None and not isinstance(version, dict):
                continue
            if version and "command" in version:
                if self.clean(version_path + ("command",)):
                    yield from _command(version_path + ("command",), version["command"])
            elif not has_command and not _has_unknown_keys(version or {}, "version"):
                yield version_path + ("command",), "required", version_path

    def _cycles(self) -> Iterator:
        graph = {
            name: [up for up in _list(service.get("upstreams")) if up in self.services and up != name]
            for name, service in self.services.items()
            if isinstance(service, dict) and self.clean(("services", name, "upstreams"))
        }
        reported: set[frozenset] = set()
        for cycle in _find_cycles(graph):
            if frozenset(cycle) not in reported:
                reported.add(frozenset(cycle))
                yield ("services",), "dependency cycle: " + " -> ".join(cycle + [cycle[0]]), None

    def _ingress(self, ingress: dict) -> Iterator:
        seen_paths: set[str] = set()
        for index, route in enumerate(_list(ingress.get("routes"))):
            path = ("ingress", "routes", index)
            service, route_path = _dict(route).get("service"), _dict(route).get("path")
            if service is not None and self.clean(path + ("service",)) and service not in self.services:
                yield path + ("service",), _unknown("service", service, self.services), None
            if route_path is not None and self.clean(path + ("path",)):
                if route_path in seen_paths:
                    yield path + ("path",), "duplicate path %r" % route_path, None
                seen_paths.add(route_path)


def _has_unknown_keys(mapping: dict, definition: str) -> bool:
    return not _KNOWN_KEYS[definition].issuperset(mapping)


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _command(path: tuple, command: Any) -> Iterator:
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as error:
            yield path, "cannot split command: %s" % str(error).lower(), None
            return
        if not argv:
            yield path, "must not be empty", None


def _split(path: tuple, split: dict, versions: list[str]) -> Iterator:
    for version in split:
        if version not in versions:
            yield path + (version,), _unknown("version", version, versions), None
    total = sum(split.values())
    if total != 100:
        yield path, "weights sum to %d, must be 100" % total, None


def _regex(path: tuple, pattern: str) -> Iterator:
    try:
        re.compile(pattern)
    except re.error as error:
        yield path, "invalid regex: %s" % error, None


def _balancer(path: tuple, balancer: dict) -> Iterator:
    keys = [key for key in ("header", "cookie", "source_ip") if key in balancer]
    if balancer["kind"] == "consistent_hash" and len(keys) != 1:
        yield path, "consistent_hash needs exactly one of: header, cookie, source_ip", None
    elif balancer["kind"] != "consistent_hash":
        for key in keys:
            yield path + (key,), "only for kind consistent_hash", None


def _unknown(what: str, name: Any, known: Any) -> str:
    message = "unknown %s %r" % (what, name)
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    if close:
        message += " (did you mean %r?)" % close[0]
    return message


def _find_cycles(graph: dict[str, list[str]]) -> Iterator[list[str]]:
    """Yield cycles found by depth-first search, each starting at its first node in order."""
    done: set[str] = set()
    for start in graph:
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(graph[start]))]
        on_stack = [start]
        while stack:
            node, edges = stack[-1]
            following = next(edges, None)
            if following is None:
                stack.pop()
                on_stack.pop()
                done.add(node)
            elif following in on_stack:
                yield on_stack[on_stack.index(following) :]
            elif following not in done and following in graph:
                stack.append((following, iter(graph[following])))
                on_stack.append(following)


# ---------------------------------------------------------------- normalising into the model


def _build(document: dict, base_dir: str, source: str) -> Manifest:
    workdir = _resolve(base_dir, document.get("workdir"))
    services = [_service(name, raw, workdir) for name, raw in document["services"].items()]
    ingress = None
    if "ingress" in document:
        raw = document["ingress"]
        routes = tuple(IngressRoute(route["path"], route["service"]) for route in raw["routes"])
        tls = raw.get("tls") or {}
        ingress = Ingress(
            port=int(raw["port"]), host=raw.get("host", "127.0.0.1"), routes=routes,
            tls_cert=_resolve(base_dir, tls["cert"]) if tls else None,
            tls_key=_resolve(base_dir, tls["key"]) if tls else None,
        )
    certificates = document.get("certificates") or {}
    security = Security(
        mtls=document.get("mtls", "strict"),
        trust_domain=document.get("trust_domain") or f"{document['mesh']}.local",
        leaf_lifetime_s=_seconds(certificates, "leaf_lifetime", Security.leaf_lifetime_s),
        default_policy=document.get("default_policy", "allow"),
    )
    access_log, sampling = observability_settings(document)
    why, why_records = why_settings(document)
    return Manifest(
        mesh=document["mesh"], services=_dependency_order(services), ingress=ingress, source=source, security=security,
        observability=Observability(
            access_log=access_log, sampling=sampling, metrics=metrics_enabled(document), metrics_port=metrics_port(document), otlp=otlp_export(document),
            why=why, why_records=why_records,
        ),
        agent_grace_s=_seconds(document, "agent_grace", DEFAULT_AGENT_GRACE_S),
    )


def _resolve(base: str, directory: str | None) -> str:
    if directory is None:
        return base
    return os.path.normpath(os.path.join(base, os.path.expanduser(directory)))


def _service(name: str, raw: dict, mesh_workdir: str) -> ServiceSpec:
    workdir = _resolve(mesh_workdir, raw.get("workdir"))
    raw_versions = raw.get("versions") or {DEFAULT_VERSION: None}
    versions = tuple(_version(version, spec or {}, raw, workdir) for version, spec in raw_versions.items())
    restart = raw.get("restart", {})
    defaults = RestartPolicy()
    return ServiceSpec(
        name=name,
        versions=versions,
        upstreams=tuple(raw.get("upstreams", ())),
        restart=RestartPolicy(
            policy=restart.get("policy", defaults.policy),
            backoff_s=_seconds(restart, "backoff", defaults.backoff_s),
            max_backoff_s=_seconds(restart, "max_backoff", defaults.max_backoff_s),
            max_quick_crashes=int(restart.get("max_quick_crashes", defaults.max_quick_crashes)),
            stable_after_s=_seconds(restart, "stable_after", defaults.stable_after_s),
        ),
        stop_grace_s=_seconds(raw, "stop_grace", DEFAULT_STOP_GRACE_S),
        traffic=_traffic(raw, [version.name for version in versions]),
        http_proxy=bool(raw.get("http_proxy", False)),
        egress=tuple(host.lower() for host in raw.get("egress", ())),
        mtls=raw.get("mtls"),
        authorization=normal_authorization(raw.get("authorization")),
        protocol=protocol_of(raw),
        listen=raw.get("listen", "tcp"),
    )


def _version(name: str, raw: dict, service: dict, service_workdir: str) -> VersionSpec:
    command: Any = raw.get("command", service.get("command"))  # a string or a list, as validated
    env = {**service.get("env", {}), **raw.get("env", {})}
    health = {**service.get("health", {}), **raw.get("health", {})}
    defaults = Health()
    return VersionSpec(
        name=name,
        command=tuple(shlex.split(command) if isinstance(command, str) else command),
        env=tuple(sorted((key, _text(value)) for key, value in env.items())),
        replicas=int(raw.get("replicas", service.get("replicas", 1))),
        health=Health(
            http=health.get("http"),
            period_s=_seconds(health, "period", defaults.period_s),
            timeout_s=_seconds(health, "timeout", defaults.timeout_s),
        ),
        image=version_image(raw, service),
        workdir=_resolve(service_workdir, raw.get("workdir")),
    )


def _traffic(raw: dict, versions: list[str]) -> dict:
    split = {version: int(weight) for version, weight in raw.get("split", {versions[0]: 100}).items()}
    outlier = raw.get("outlier_detection", True)
    limits = raw.get("limits", {})
    return {
        "split": split,
        "versions": versions,
        "routes": [_normal_route(route, split) for route in raw.get("routes", ())],
        "timeout": _seconds(raw, "timeout", None),
        "stream_idle_timeout": _seconds(raw, "stream_idle_timeout", DEFAULT_STREAM_IDLE_TIMEOUT_S),
        "connect_timeout": _seconds(raw, "connect_timeout", 1.0),
        "handshake_timeout": _seconds(raw, "handshake_timeout", 10.0),
        "retries": _retries(raw.get("retries")),
        "load_balancer": _load_balancer(raw.get("load_balancer", "least_request")),
        "outlier_detection": _outlier(outlier if isinstance(outlier, dict) else {}, enabled=outlier is not False),
        "limits": {
            "max_connections": int(limits.get("max_connections", 1024)),
            "max_pending": int(limits.get("max_pending", 1024)),
        },
    }


def _normal_route(raw: dict, service_split: dict) -> dict:
    match = raw.get("match") or {}
    path = match.get("path")
    methods = match.get("method")
    if isinstance(methods, str):
        methods = [methods]
    if "version" in raw:
        split = {raw["version"]: 100}
    else:
        split = {version: int(weight) for version, weight in raw.get("split", service_split).items()}
    fault = raw.get("fault")
    mirror = raw.get("mirror")
    return {
        "match": {
            "path": None if path is None else _string_match(path),
            "methods": None if methods is None else [method.upper() for method in methods],
            "headers": [_header_match(name, value) for name, value in (match.get("headers") or {}).items()],
            "query": [{"name": name, "value": _text(value)} for name, value in (match.get("query") or {}).items()],
        },
        "split": split,
        "timeout": _seconds(raw, "timeout", None),
        "stream_idle_timeout": _seconds(raw, "stream_idle_timeout", None),
        "retries": _retries(raw.get("retries")),
        "fault": None if fault is None else _fault(fault),
        "mirror": None if mirror is None else {"version": mirror["version"], "percent": _percent(mirror),
                                               **_compare(mirror.get("compare"))},
    }


def _compare(raw: bool | dict | None) -> dict:
    """A mirror's `compare`, only when on: the sidecar's shape (proxy.shadow.compare_spec)."""
    if not raw:
        return {}
    raw = raw if isinstance(raw, dict) else {}
    return {"compare": {"unsafe": raw.get("unsafe") is True, "ignore_headers": [h.lower() for h in raw.get("ignore_headers") or ()],
                        "ignore_json": list(raw.get("ignore_json") or ())}}


def _string_match(raw: dict) -> dict:
    ((kind, value),) = raw.items()
    return {"kind": kind, "value": value}


def _header_match(name: str, value: Any) -> dict:
    if isinstance(value, dict):
        return {"name": name.lower(), **_string_match(value)}
    return {"name": name.lower(), "kind": "exact", "value": _text(value)}


def _fault(raw: dict) -> dict:
    delay, abort = raw.get("delay"), raw.get("abort")
    return {
        "delay": None if delay is None else {"fixed": parse_duration(delay["fixed"]), "percent": _percent(delay)},
        "abort": None if abort is None else {"status": int(abort["status"]), "percent": _percent(abort)},
    }


def _percent(raw: dict) -> float:
    return float(raw.get("percent", 100))


def _retries(raw: dict | None) -> dict | None:
    if raw is None:
        return None
    budget = raw.get("budget", {})
    retry_on = raw.get("retry_on", ["connect-failure", "refused", "gateway-error"])
    return {
        "attempts": int(raw.get("attempts", 3)),
        "per_try_timeout": _seconds(raw, "per_try_timeout", None),
        "retry_on": [item if isinstance(item, str) and not item.isdigit() else int(item) for item in retry_on],
        "backoff": _seconds(raw, "backoff", 0.025),
        "max_backoff": _seconds(raw, "max_backoff", 0.25),
        "non_idempotent": bool(raw.get("non_idempotent", False)),
        "budget": {
            "ratio": float(budget.get("ratio", 0.2)),
            "min_per_second": float(budget.get("min_per_second", 10)),
        },
    }


def _load_balancer(raw: str | dict) -> dict:
    if isinstance(raw, str):
        return {"kind": raw}
    balancer = dict(raw)
    if "header" in balancer:
        balancer["header"] = balancer["header"].lower()
    return balancer


def _outlier(raw: dict, enabled: bool) -> dict:
    return {
        "enabled": enabled,
        "consecutive_errors": int(raw.get("consecutive_errors", 5)),
        "interval": _seconds(raw, "interval", 10.0),
        "base_ejection_time": _seconds(raw, "base_ejection_time", 30.0),
        "max_ejection_percent": float(raw.get("max_ejection_percent", 10)),
        "max_ejection_time": _seconds(raw, "max_ejection_time", 300.0),
    }


Default = TypeVar("Default", bound=float | None)


def _seconds(raw: dict, key: str, default: Default) -> float | Default:
    """`raw[key]` in seconds, or `default` (a number, or None for a limit left unset)."""
    return parse_duration(raw[key]) if key in raw else default


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _dependency_order(services: list[ServiceSpec]) -> tuple[ServiceSpec, ...]:
    """Upstreams before the services that call them; otherwise manifest order (stable Kahn)."""
    remaining = list(services)
    placed: set[str] = set()
    ordered: list[ServiceSpec] = []
    while remaining:
        ready = next(service for service in remaining if placed.issuperset(service.upstreams))
        remaining.remove(ready)
        placed.add(ready.name)
        ordered.append(ready)
    return tuple(ordered)
