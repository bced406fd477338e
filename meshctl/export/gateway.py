"""Gateway API objects: HTTPRoutes for calls between services, and the ingress.

Mesh routes follow GAMMA: an HTTPRoute whose parent is the Service `cart`; each meshctl
route becomes one rule, the service's split the last rule (PathPrefix /). Weights go to
per-version Services (`cart-v1`), as backendRefs must name Services. Linkerd reads
retries and timeouts from annotations on the HTTPRoute (`retry.linkerd.io/*`,
`timeout.linkerd.io/request`, `timeout.linkerd.io/idle`), which apply to the whole object: a route whose retries
differ from the service's gets an HTTPRoute of its own (`cart-r1`).

Two semantic differences are reported rather than hidden: Gateway API ranks rules by
specificity, not by order (meshctl: first match wins), and PathPrefix matches whole path
segments (meshctl: a string prefix).

The published CRD caps a rule at 8 matches and a route at 16 rules. A route with more
matches becomes several rules with the same backends; a service with more rules gets more
HTTPRoutes on the same parent (`cart-part2`), which Gateway API merges into one rule set.
"""

from __future__ import annotations

import re
from typing import Any

from meshctl.agent.model import Manifest, ServiceSpec
from meshctl.export import linkerd
from meshctl.export.context import (
    SERVICE_PORT,
    ExportInput,
    Notes,
    duration,
    ingress_name,
    metadata,
    route_parts,
    routing,
    rules_for,
    version_service_name,
)

API_VERSION = "gateway.networking.k8s.io/v1"
DEFAULT_MATCH = {"path": {"type": "PathPrefix", "value": "/"}}
GATEWAY_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")  # the CRD's pattern for timeouts


def mesh_routes(manifest: Manifest, given: ExportInput, notes: Notes) -> list[dict]:
    return [route for service in manifest.services for route in service_routes(service, given, notes)]


def service_routes(service: ServiceSpec, given: ExportInput, notes: Notes) -> list[dict]:
    """The HTTPRoutes for calls to `service` (the first one holds the split)."""
    split, routes = routing(service, given)
    traffic = service.traffic or {}
    service_retries = traffic.get("retries")
    main_rules: list[dict] = []
    separate: list[tuple[int, list[dict], dict]] = []
    for index, route in enumerate(routes):
        where = "%s.routes[%d]" % (service.name, index)
        action: dict = {"backendRefs": backend_refs(service.name, route["split"])}
        if route.get("timeout") is not None:
            action["timeouts"] = {"request": gateway_duration(route["timeout"])}  # 0s: none
        if route.get("stream_idle_timeout") is not None and route["stream_idle_timeout"] != traffic.get("stream_idle_timeout"):
            notes.add(where, "stream_idle_timeout", "Linkerd's idle timeout annotation applies to a whole HTTPRoute")
        rules = rules_for(http_matches(route["match"], where, notes), action)
        for feature in ("fault", "mirror"):
            if route.get(feature):
                notes.add(where, feature, "Linkerd has no %s" % ("fault injection" if feature == "fault" else "mirroring"))
        own_retries = route.get("retries")
        if own_retries is not None and own_retries != service_retries:
            separate.append((index, rules, linkerd.retry_annotations(own_retries, where, notes)))
        else:
            main_rules.extend(rules)
    if sum(1 for route in routes if route["match"] != _ANY) > 1:
        notes.add(service.name, "routes order", "Gateway API ranks matches by specificity, not by order")
    main_rules.append({"matches": [dict(DEFAULT_MATCH)], "backendRefs": backend_refs(service.name, split)})
    annotations = {
        **linkerd.retry_annotations(service_retries, service.name, notes),
        **linkerd.timeout_annotations(traffic),
    }
    out = [http_route(name, service.name, part, annotations, given) for name, part in route_parts(service.name, main_rules)]
    for index, rules, retry in separate:
        own = {**retry, **linkerd.timeout_annotations(traffic)}
        out.append(http_route("%s-r%d" % (service.name, index), service.name, rules, own, given))
    return out


def gateway_duration(seconds: float) -> str:
    """`duration` where the CRD's pattern (at most 5 digits a unit) takes it, else split by unit.

    100.5s is 1m40s500ms: 100500ms has six digits and the API server would refuse it.
    """
    plain = duration(seconds)
    if GATEWAY_DURATION.match(plain):
        return plain
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    whole, millis = divmod(millis, 1000)
    units = ((hours, "h"), (minutes, "m"), (whole, "s"), (millis, "ms"))
    return "".join("%d%s" % (amount, unit) for amount, unit in units if amount)


_ANY: dict[str, Any] = {"path": None, "methods": None, "headers": [], "query": []}


def http_route(name: str, parent_service: str, rules: list[dict], annotations: dict, given: ExportInput) -> dict:
    return {
        "apiVersion": API_VERSION,
        "kind": "HTTPRoute",
        "metadata": metadata(name, given, labels={"app": parent_service}, annotations=annotations),
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent_service, "port": SERVICE_PORT}],
            "rules": rules,
        },
    }


def backend_refs(service: str, split: dict[str, int]) -> list[dict]:
    return [
        {"name": version_service_name(service, version), "port": SERVICE_PORT, "weight": int(weight)}
        for version, weight in split.items()
    ]


def http_matches(match: dict, where: str, notes: Notes) -> list[dict]:
    """One HTTPRouteMatch per method (matches are ORed), each with the same conditions."""
    base: dict = {}
    path = match.get("path")
    if path is not None:
        base["path"] = path_match(path, where, notes)
    headers = [header_match(header) for header in match.get("headers") or []]
    if headers:
        base["headers"] = headers
    query = [{"type": "Exact", "name": item["name"], "value": item["value"]} for item in match.get("query") or []]
    if query:
        base["queryParams"] = query
    methods = match.get("methods") or [None]
    matches = [dict(base, method=method) if method else dict(base) for method in methods]
    return [found if found else dict(DEFAULT_MATCH) for found in matches]


def path_match(path: dict, where: str, notes: Notes) -> dict:
    if path["kind"] == "exact":
        return {"type": "Exact", "value": path["value"]}
    if path["kind"] == "regex":
        return {"type": "RegularExpression", "value": path["value"]}
    if not path["value"].endswith("/"):
        notes.add(where, "match.path.prefix", "PathPrefix %s matches whole segments only" % path["value"])
    return {"type": "PathPrefix", "value": path["value"]}


def header_match(header: dict) -> dict:
    if header["kind"] == "exact":
        return {"type": "Exact", "name": header["name"], "value": header["value"]}
    if header["kind"] == "regex":
        return {"type": "RegularExpression", "name": header["name"], "value": header["value"]}
    return {"type": "RegularExpression", "name": header["name"], "value": "^" + re.escape(header["value"]) + ".*"}


# -------------------------------------------------------------------------- the ingress


def ingress_objects(manifest: Manifest, given: ExportInput, notes: Notes) -> list[dict]:
    ingress = manifest.ingress
    assert ingress is not None
    name = ingress_name(manifest)
    listener: dict = {"name": "http", "protocol": "HTTP", "port": ingress.port}
    if ingress.tls_cert:
        listener = {
            "name": "https", "protocol": "HTTPS", "port": ingress.port,
            "tls": {"mode": "Terminate", "certificateRefs": [{"kind": "Secret", "name": name + "-tls"}]},
        }
        notes.add("ingress", "tls", "create Secret %s-tls from %s and its key (kubectl create secret tls)"
                  % (name, ingress.tls_cert))
    if ingress.host not in ("127.0.0.1", "localhost"):
        notes.add("ingress", "host", "the Gateway's addresses are the implementation's")
    gateway = {
        "apiVersion": API_VERSION,
        "kind": "Gateway",
        "metadata": metadata(name, given),
        "spec": {"gatewayClassName": given.gateway_class_name, "listeners": [listener]},
    }
    rules = []
    for route in ingress.routes:
        if not route.path.endswith("/"):
            notes.add("ingress", "routes[%s]" % route.path, "PathPrefix matches whole segments only")
        rules.append({
            "matches": [{"path": {"type": "PathPrefix", "value": route.path}}],
            "backendRefs": [{"name": route.service, "port": SERVICE_PORT}],
        })
        if given.mesh == "istio" and len(manifest.service(route.service).versions) > 1:
            notes.add("ingress", "routes[%s]" % route.path,
                      "the Istio gateway sends to Service %s without its VirtualService split" % route.service)
    route_objects = [
        {
            "apiVersion": API_VERSION,
            "kind": "HTTPRoute",
            "metadata": metadata(route_name, given),
            "spec": {"parentRefs": [{"name": name}], "rules": part},
        }
        for route_name, part in route_parts(name, rules)
    ]
    return [gateway, *route_objects]
