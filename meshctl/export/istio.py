"""Istio: VirtualService and DestinationRule per service, PeerAuthentication, AuthorizationPolicy.

Routing stays first-match-wins here (VirtualService `http` is ordered), with subsets v1,
v2 selecting the `version` label. meshctl retries count every try and are off unless
set; Istio's `attempts` counts retries and defaults to 2, so a service without retries
gets `attempts: 0`. A `timeout` becomes the route's timeout (none set: none, as in Istio);
Envoy's stream idle timeout is 5 minutes like meshctl's default, but Istio sets it only
mesh-wide, so any other `stream_idle_timeout` is reported as not translated.
Authorization keeps meshctl's order: a DENY policy per service, an ALLOW policy per
service with allow rules (an empty one admits nobody), and, with `default_policy: deny`,
a namespace-wide `allow-nothing` ALLOW policy with no rules.
"""

from __future__ import annotations

from meshctl.agent.model import Manifest, ServiceSpec
from meshctl.export.context import (
    SERVICE_PORT,
    ExportInput,
    Notes,
    duration,
    effective_mtls,
    fqdn,
    ingress_name,
    labels,
    metadata,
    routing,
)

NETWORKING_API = "networking.istio.io/v1"
SECURITY_API = "security.istio.io/v1"
MTLS_MODES = {"strict": "STRICT", "permissive": "PERMISSIVE", "off": "DISABLE"}
RETRY_ON = {"connect-failure": "connect-failure", "refused": "refused-stream", "gateway-error": "gateway-error",
            "5xx": "5xx", "reset": "reset"}
SIMPLE_BALANCERS = {"least_request": "LEAST_REQUEST", "round_robin": "ROUND_ROBIN", "random": "RANDOM"}
DEFAULT_BACKOFF = (0.025, 0.25)
DEFAULT_BUDGET = {"ratio": 0.2, "min_per_second": 10.0}
ENVOY_STREAM_IDLE_TIMEOUT = 300.0


def traffic_objects(manifest: Manifest, given: ExportInput, notes: Notes) -> list[dict]:
    out: list[dict] = []
    for service in manifest.services:
        out.append(virtual_service(service, given, notes))
        out.append(destination_rule(manifest, service, given, notes))
    return out


def virtual_service(service: ServiceSpec, given: ExportInput, notes: Notes) -> dict:
    split, routes = routing(service, given)
    traffic = service.traffic or {}
    host = fqdn(service.name, given.namespace)
    http = []
    for index, route in enumerate(routes):
        where = "%s.routes[%d]" % (service.name, index)
        entry: dict = {"name": "route-%d" % index}
        matches = request_matches(route["match"])
        if matches:
            entry["match"] = matches
        entry["route"] = destinations(host, route["split"])
        timeout = route["timeout"] if route.get("timeout") is not None else traffic.get("timeout")
        if timeout is not None and (timeout or traffic.get("timeout")):
            entry["timeout"] = duration(timeout)  # 0s: none, lifting the service's
        if route.get("stream_idle_timeout") is not None:
            idle_timeout_note(route["stream_idle_timeout"], where, notes)
        entry["retries"] = retry_policy(route.get("retries") or traffic.get("retries"), where, notes)
        fault = route.get("fault")
        if fault:
            entry["fault"] = fault_injection(fault)
        mirror = route.get("mirror")
        if mirror:
            entry["mirror"] = {"host": host, "subset": mirror["version"], "port": {"number": SERVICE_PORT}}
            entry["mirrorPercentage"] = {"value": mirror["percent"]}
            if mirror.get("compare"):
                notes.add(where, "mirror.compare", "Istio discards the mirror's answers; compare them with meshctl shadow")
        http.append(entry)
    default: dict = {"name": "default", "route": destinations(host, split)}
    if traffic.get("timeout"):
        default["timeout"] = duration(traffic["timeout"])
    default["retries"] = retry_policy(traffic.get("retries"), service.name, notes)
    http.append(default)
    idle_timeout_note(traffic.get("stream_idle_timeout", ENVOY_STREAM_IDLE_TIMEOUT), service.name, notes)
    return {
        "apiVersion": NETWORKING_API,
        "kind": "VirtualService",
        "metadata": metadata(service.name, given, labels=labels(service.name)),
        "spec": {"hosts": [host], "http": http},
    }


def idle_timeout_note(seconds: float | None, where: str, notes: Notes) -> None:
    if (seconds or 0.0) != ENVOY_STREAM_IDLE_TIMEOUT:
        notes.add(where, "stream_idle_timeout", "Istio's stream idle timeout (Envoy's, 5m) is set mesh-wide, by an EnvoyFilter")


def destinations(host: str, split: dict[str, int]) -> list[dict]:
    return [
        {"destination": {"host": host, "subset": version, "port": {"number": SERVICE_PORT}}, "weight": int(weight)}
        for version, weight in split.items()
    ]


def request_matches(match: dict) -> list[dict]:
    base: dict = {}
    if match.get("path") is not None:
        base["uri"] = {match["path"]["kind"]: match["path"]["value"]}
    if match.get("headers"):
        base["headers"] = {header["name"]: {header["kind"]: header["value"]} for header in match["headers"]}
    if match.get("query"):
        base["queryParams"] = {item["name"]: {"exact": item["value"]} for item in match["query"]}
    methods = match.get("methods")
    if not methods:
        return [base] if base else []
    return [dict(base, method={"exact": method}) for method in methods]


def retry_policy(retries: dict | None, where: str, notes: Notes) -> dict:
    if not retries:
        return {"attempts": 0}
    conditions = [str(item) if isinstance(item, int) else RETRY_ON[item] for item in retries["retry_on"]]
    policy: dict = {"attempts": retries["attempts"] - 1, "retryOn": ",".join(conditions)}
    if retries.get("per_try_timeout") is not None:
        policy["perTryTimeout"] = duration(retries["per_try_timeout"])
    if (retries["backoff"], retries["max_backoff"]) != DEFAULT_BACKOFF:
        notes.add(where, "retries.backoff", "Istio's retry backoff is set mesh-wide")
    if retries["budget"] != DEFAULT_BUDGET:
        notes.add(where, "retries.budget", "not exported to Istio")
    if not retries["non_idempotent"]:
        notes.add(where, "retries.idempotent-only", "Istio retries every method")
    return policy


def fault_injection(fault: dict) -> dict:
    out: dict = {}
    if fault.get("delay"):
        out["delay"] = {"fixedDelay": duration(fault["delay"]["fixed"]), "percentage": {"value": fault["delay"]["percent"]}}
    if fault.get("abort"):
        out["abort"] = {"httpStatus": fault["abort"]["status"], "percentage": {"value": fault["abort"]["percent"]}}
    return out


def destination_rule(manifest: Manifest, service: ServiceSpec, given: ExportInput, notes: Notes) -> dict:
    traffic = service.traffic or {}
    policy: dict = {"loadBalancer": load_balancer(traffic.get("load_balancer") or {"kind": "least_request"})}
    outlier = traffic.get("outlier_detection") or {}
    if outlier.get("enabled"):
        policy["outlierDetection"] = {
            "consecutive5xxErrors": outlier["consecutive_errors"],
            "interval": duration(outlier["interval"]),
            "baseEjectionTime": duration(outlier["base_ejection_time"]),
            "maxEjectionPercent": round(outlier["max_ejection_percent"]),
        }
        if outlier["max_ejection_time"] != 300.0:
            notes.add(service.name, "outlier_detection.max_ejection_time", "Istio has no upper bound per ejection")
    limits = traffic.get("limits") or {"max_connections": 1024, "max_pending": 1024}
    policy["connectionPool"] = {
        "tcp": {"maxConnections": limits["max_connections"], "connectTimeout": duration(traffic.get("connect_timeout", 1.0))},
        "http": {"http1MaxPendingRequests": limits["max_pending"]},
    }
    if effective_mtls(manifest, service) == "off":
        policy["tls"] = {"mode": "DISABLE"}
    return {
        "apiVersion": NETWORKING_API,
        "kind": "DestinationRule",
        "metadata": metadata(service.name, given, labels=labels(service.name)),
        "spec": {
            "host": fqdn(service.name, given.namespace),
            "trafficPolicy": policy,
            "subsets": [{"name": version.name, "labels": {"version": version.name}} for version in service.versions],
        },
    }


def load_balancer(balancer: dict) -> dict:
    if balancer["kind"] in SIMPLE_BALANCERS:
        return {"simple": SIMPLE_BALANCERS[balancer["kind"]]}
    if balancer.get("header"):
        return {"consistentHash": {"httpHeaderName": balancer["header"]}}
    if balancer.get("cookie"):
        return {"consistentHash": {"httpCookie": {"name": balancer["cookie"], "ttl": "0s"}}}
    return {"consistentHash": {"useSourceIp": True}}


# ------------------------------------------------------------------------------ security


def security_objects(manifest: Manifest, given: ExportInput, notes: Notes) -> list[dict]:
    out = [peer_authentication("default", manifest.security.mtls, None, given)]
    for service in manifest.services:
        if service.mtls is not None:
            out.append(peer_authentication(service.name, service.mtls, service.name, given))
    if manifest.security.default_policy == "deny":
        out.append({
            "apiVersion": SECURITY_API,
            "kind": "AuthorizationPolicy",
            "metadata": metadata("allow-nothing", given),
            "spec": {},
        })
    for service in manifest.services:
        authorization = service.authorization or {}
        if authorization.get("deny"):
            out.append(authorization_policy(manifest, service.name, "DENY", authorization["deny"], given, notes))
        if authorization.get("allow") is not None:
            out.append(authorization_policy(manifest, service.name, "ALLOW", authorization["allow"], given, notes))
    return out


def peer_authentication(name: str, mode: str, service: str | None, given: ExportInput) -> dict:
    spec: dict = {"mtls": {"mode": MTLS_MODES[mode]}}
    if service is not None:
        spec = {"selector": {"matchLabels": labels(service)}, **spec}
    return {"apiVersion": SECURITY_API, "kind": "PeerAuthentication", "metadata": metadata(name, given), "spec": spec}


def authorization_policy(manifest: Manifest, service: str, action: str, rules: list[dict],
                         given: ExportInput, notes: Notes) -> dict:
    spec: dict = {"selector": {"matchLabels": labels(service)}, "action": action}
    translated = [
        istio_rule(manifest, rule, given, "%s.authorization.%s[%d]" % (service, action.lower(), index), notes)
        for index, rule in enumerate(rules)
    ]
    if translated:
        spec["rules"] = translated
    return {
        "apiVersion": SECURITY_API,
        "kind": "AuthorizationPolicy",
        "metadata": metadata("%s-%s" % (service, action.lower()), given, labels=labels(service)),
        "spec": spec,
    }


def istio_rule(manifest: Manifest, rule: dict, given: ExportInput, where: str, notes: Notes) -> dict:
    out: dict = {}
    if rule.get("from"):
        principals = [principal(manifest, source, given, where, notes) for source in rule["from"]]
        out["from"] = [{"source": {"principals": principals}}]
    operation = {key: list(rule[key]) for key in ("paths", "methods") if rule.get(key)}
    if operation:
        out["to"] = [{"operation": operation}]
    if rule.get("headers"):
        out["when"] = [{"key": "request.headers[%s]" % name, "values": [value]} for name, value in rule["headers"].items()]
    return out


def principal(manifest: Manifest, source: str, given: ExportInput, where: str, notes: Notes) -> str:
    """A meshctl caller as an Istio principal: cluster.local/ns/NS/sa/NAME."""
    if source == "*":
        return "*"
    account = "cluster.local/ns/%s/sa/" % given.namespace
    if source == "ingress":
        return account + "%s-%s" % (ingress_name(manifest), given.gateway_class_name)
    prefix = "spiffe://%s/service/" % manifest.security.trust_domain
    if source.startswith(prefix):
        return account + source[len(prefix):]
    if source.startswith("spiffe://"):
        return source[len("spiffe://"):]
    if "*" in source[:-1]:
        notes.add(where, "from[%s]" % source, "Istio principals take '*' only at the end here; kept as is")
    return account + source
