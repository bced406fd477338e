"""Linkerd: retry, timeout and failure-accrual annotations, and policy.linkerd.io authorization.

Retries (`retry.linkerd.io/http`, `/limit`, `/timeout`) and timeouts
(`timeout.linkerd.io/request`, and `timeout.linkerd.io/idle` for `stream_idle_timeout`,
which Linkerd does not have by default) annotate HTTPRoutes; failure accrual (Linkerd's outlier
detection) annotates the Service. Authorization: each service gets a Server on its
port. Without allow rules its `accessPolicy` says what the mesh's default_policy and
mTLS mode admit; with them it is `deny`, and each allow rule becomes a
MeshTLSAuthentication (the callers' identities) plus an AuthorizationPolicy, targeting
the Server, or, for a rule with paths, methods or headers, a policy.linkerd.io HTTPRoute
on the Server that carries those conditions (one path and method per match, at most 8
matches a rule and 16 rules a route as the CRD allows: a rule with more gets more routes,
`payments-allow-0-part2`, each with its own AuthorizationPolicy). Linkerd authorization is
allow-only, so deny rules are reported as not translated.
"""

from __future__ import annotations

from typing import Any

from meshctl.agent.model import Manifest, ServiceSpec
from meshctl.export.context import (
    PORT_NAME,
    ExportInput,
    Notes,
    duration,
    effective_mtls,
    ingress_name,
    labels,
    metadata,
    route_parts,
    rules_for,
)

POLICY_GROUP = "policy.linkerd.io"
SERVER_API = POLICY_GROUP + "/v1beta3"
AUTHZ_API = POLICY_GROUP + "/v1alpha1"
ROUTE_API = POLICY_GROUP + "/v1beta3"
RETRY_CODES = {"5xx": "5xx", "gateway-error": "gateway-error"}
DEFAULT_BACKOFF = (0.025, 0.25)
DEFAULT_BUDGET = {"ratio": 0.2, "min_per_second": 10.0}


def retry_annotations(retries: dict | None, where: str, notes: Notes) -> dict[str, str]:
    if not retries:
        return {}
    codes = []
    for condition in retries["retry_on"]:
        if isinstance(condition, int):
            codes.append(str(condition))
        elif condition in RETRY_CODES:
            codes.append(RETRY_CODES[condition])
        else:
            notes.add(where, "retries.retry_on.%s" % condition, "Linkerd retries on response codes only")
    annotations = {"retry.linkerd.io/limit": str(retries["attempts"] - 1)}
    if codes:
        annotations["retry.linkerd.io/http"] = ",".join(codes)
    if retries.get("per_try_timeout") is not None:
        annotations["retry.linkerd.io/timeout"] = duration(retries["per_try_timeout"])
    if (retries["backoff"], retries["max_backoff"]) != DEFAULT_BACKOFF:
        notes.add(where, "retries.backoff", "Linkerd's retry backoff is not configurable")
    if retries["budget"] != DEFAULT_BUDGET:
        notes.add(where, "retries.budget", "Linkerd's annotations have no retry budget")
    if retries["non_idempotent"]:
        notes.add(where, "retries.non_idempotent", "Linkerd decides which methods it retries")
    return annotations


def timeout_annotations(traffic: dict) -> dict[str, str]:
    """A service's `timeout` and `stream_idle_timeout` (None or 0: none, Linkerd's default)."""
    annotations = {}
    if traffic.get("timeout"):
        annotations["timeout.linkerd.io/request"] = duration(traffic["timeout"])
    if traffic.get("stream_idle_timeout"):
        annotations["timeout.linkerd.io/idle"] = duration(traffic["stream_idle_timeout"])
    return annotations


def service_annotations(service: ServiceSpec, notes: Notes) -> dict[str, str]:
    """Failure accrual on the Service, and notes on the balancing settings Linkerd lacks."""
    traffic = service.traffic or {}
    outlier = traffic.get("outlier_detection") or {}
    balancer = traffic.get("load_balancer") or {"kind": "least_request"}
    if balancer["kind"] != "least_request":
        what = "load_balancer.%s" % balancer["kind"]
        if balancer.get("cookie"):
            what += ".cookie"
        notes.add(service.name, what, "Linkerd always balances by peak-EWMA")
    if traffic.get("limits") and traffic["limits"] != {"max_connections": 1024, "max_pending": 1024}:
        notes.add(service.name, "limits", "Linkerd has no connection or pending-request limits")
    if traffic.get("connect_timeout", 1.0) != 1.0:
        notes.add(service.name, "connect_timeout", "Linkerd's connect timeout is set by the proxy")
    if not outlier.get("enabled"):
        return {}
    if outlier["interval"] != 10.0 or outlier["max_ejection_percent"] != 10.0:
        notes.add(service.name, "outlier_detection.interval, max_ejection_percent", "Linkerd's failure accrual has neither")
    return {
        "balancer.linkerd.io/failure-accrual": "consecutive",
        "balancer.linkerd.io/failure-accrual-consecutive-max-failures": str(outlier["consecutive_errors"]),
        "balancer.linkerd.io/failure-accrual-consecutive-min-penalty": duration(outlier["base_ejection_time"]),
        "balancer.linkerd.io/failure-accrual-consecutive-max-penalty": duration(outlier["max_ejection_time"]),
    }


def identity(name: str, namespace: str) -> str:
    """Linkerd's identity for a ServiceAccount."""
    return "%s.%s.serviceaccount.identity.linkerd.cluster.local" % (name, namespace)


def security_objects(manifest: Manifest, given: ExportInput, notes: Notes) -> list[dict]:
    out: list[dict] = []
    for service in manifest.services:
        out.extend(service_security(manifest, service, given, notes))
    return out


def service_security(manifest: Manifest, service: ServiceSpec, given: ExportInput, notes: Notes) -> list[dict]:
    mtls = effective_mtls(manifest, service)
    if mtls == "off":
        notes.add(service.name, "mtls.off", "Linkerd always uses mTLS between meshed pods")
    authorization = service.authorization or {}
    allow = authorization.get("allow")
    for index, _rule in enumerate(authorization.get("deny") or []):
        notes.add(service.name, "authorization.deny[%d]" % index, "Linkerd authorization is allow-only")
    if allow is None and manifest.security.default_policy == "allow":
        access = "all-authenticated" if mtls == "strict" else "all-unauthenticated"
    else:
        access = "deny"
    out = [server(service.name, access, given)]
    for index, rule in enumerate(allow or []):
        out.extend(allow_rule(manifest, service.name, index, rule, given, notes))
    return out


def server(service: str, access_policy: str, given: ExportInput) -> dict:
    return {
        "apiVersion": SERVER_API,
        "kind": "Server",
        "metadata": metadata(service, given, labels=labels(service)),
        "spec": {
            "podSelector": {"matchLabels": labels(service)},
            "port": PORT_NAME,
            "proxyProtocol": "HTTP/1",
            "accessPolicy": access_policy,
        },
    }


def allow_rule(manifest: Manifest, service: str, index: int, rule: dict, given: ExportInput, notes: Notes) -> list[dict]:
    name = "%s-allow-%d" % (service, index)
    where = "%s.authorization.allow[%d]" % (service, index)
    identities = [found for found in (caller(manifest, source, given, where, notes) for source in rule.get("from") or ["*"]) if found]
    if not identities:
        return []  # every caller was untranslatable (noted): admitting anyone instead would widen access
    out: list[dict] = [{
        "apiVersion": AUTHZ_API,
        "kind": "MeshTLSAuthentication",
        "metadata": metadata(name, given),
        "spec": {"identities": identities},
    }]
    if not (rule.get("paths") or rule.get("methods") or rule.get("headers")):
        return out + [authorization_policy(name, name, {"group": POLICY_GROUP, "kind": "Server", "name": service}, given)]
    for route in authz_routes(name, service, rule, given):
        route_name = route["metadata"]["name"]
        out.append(route)
        out.append(authorization_policy(route_name, name, {"group": POLICY_GROUP, "kind": "HTTPRoute", "name": route_name}, given))
    return out


def authorization_policy(name: str, authentication: str, target: dict, given: ExportInput) -> dict:
    return {
        "apiVersion": AUTHZ_API,
        "kind": "AuthorizationPolicy",
        "metadata": metadata(name, given),
        "spec": {
            "targetRef": target,
            "requiredAuthenticationRefs": [{"group": POLICY_GROUP, "kind": "MeshTLSAuthentication", "name": authentication}],
        },
    }


def caller(manifest: Manifest, source: str, given: ExportInput, where: str, notes: Notes) -> str | None:
    if source == "*":
        return "*"
    if source == "ingress":
        return identity(ingress_name(manifest), given.namespace)
    prefix = "spiffe://%s/service/" % manifest.security.trust_domain
    if source.startswith(prefix):
        source = source[len(prefix):]
    if "*" in source or "/" in source:
        notes.add(where, "from[%s]" % source, "Linkerd identities match a '*' prefix of a domain only")
        return None
    return identity(source, given.namespace)


def authz_routes(name: str, service: str, rule: dict, given: ExportInput) -> list[dict]:
    """policy.linkerd.io HTTPRoutes on the Server with the rule's conditions (one unless the CRD's caps need more)."""
    paths: list[dict[str, Any] | None] = [
        {"type": "PathPrefix", "value": path[:-1]} if path.endswith("*") else {"type": "Exact", "value": path}
        for path in rule.get("paths") or [None]
        if path is not None
    ] or [None]
    headers = [{"type": "Exact", "name": key, "value": value} for key, value in (rule.get("headers") or {}).items()]
    matches = []
    for path in paths:
        for method in rule.get("methods") or [None]:
            match: dict = {}
            if path is not None:
                match["path"] = path
            if method is not None:
                match["method"] = method.upper()
            if headers:
                match["headers"] = headers
            matches.append(match)
    return [
        {
            "apiVersion": ROUTE_API,
            "kind": "HTTPRoute",
            "metadata": metadata(route_name, given),
            "spec": {"parentRefs": [{"group": POLICY_GROUP, "kind": "Server", "name": service}], "rules": part},
        }
        for route_name, part in route_parts(name, rules_for(matches, {}))
    ]
