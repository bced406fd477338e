"""Manifest + live state -> one configuration snapshot per sidecar (docs/protocols.md).

Pure: the supervisor gathers what is live (which instances are ready, on which ports) into
`Endpoint` values and the listener fds of one sidecar into `SidecarListeners`; this module
only shapes data. A snapshot is compared with the last one pushed, so the agent pushes only
when something a sidecar sees has changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from meshctl.agent.model import DEFAULT_STREAM_IDLE_TIMEOUT_S, Manifest, ServiceSpec

INGRESS_ID = "ingress"
DEFAULT_HTTP = {
    "max_header_bytes": 64 * 1024,
    "max_body_bytes": None,
    "header_timeout": 10.0,
    "idle_timeout": 60.0,
}
DRAIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Endpoint:
    """A ready instance as its callers see it: the inbound listener of its sidecar."""

    id: str
    service: str
    version: str
    port: int


@dataclass(frozen=True)
class SidecarListeners:
    """The listening sockets the agent holds for one sidecar, by fd number."""

    inbound_fd: int | None = None
    app_port: int | None = None
    app_socket: str | None = None  # the app's Unix socket (`listen: unix`), instead of app_port
    outbound_fds: tuple[tuple[str, int], ...] = ()  # (upstream service, fd)
    forward_fd: int | None = None
    ingress_fd: int | None = None
    admin_fd: int | None = None


@dataclass(frozen=True)
class SidecarIdentity:
    instance: str
    service: str | None  # None for the ingress
    version: str | None
    upstreams: tuple[str, ...] = field(default=())


def default_traffic(service: ServiceSpec) -> dict[str, Any]:
    versions = [v.name for v in service.versions]
    return {
        "versions": versions,
        "split": {versions[0]: 100},
        "routes": [],
        "timeout": None,
        "stream_idle_timeout": DEFAULT_STREAM_IDLE_TIMEOUT_S,
        "connect_timeout": 1.0,
        "handshake_timeout": 10.0,
        "retries": None,
        "load_balancer": {"kind": "least_request"},
        "outlier_detection": None,
        "limits": {"max_connections": 1024, "max_pending": 1024},
    }


def service_config(
    service: ServiceSpec,
    endpoints: Iterable[Endpoint],
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    traffic = dict(service.traffic) if service.traffic else default_traffic(service)
    traffic.setdefault("versions", [v.name for v in service.versions])
    if overrides:
        traffic.update(overrides)
    traffic["endpoints"] = [
        {"id": ep.id, "version": ep.version, "address": ["127.0.0.1", ep.port]}
        for ep in sorted(endpoints, key=lambda ep: ep.id)
        if ep.service == service.name
    ]
    return traffic


def mtls_mode(manifest: Manifest, service: ServiceSpec) -> str:
    return service.mtls or manifest.security.mtls


def identity_of(manifest: Manifest, service: str | None) -> str:
    """The SPIFFE ID of a service's sidecars; the ingress has its own."""
    domain = manifest.security.trust_domain
    return f"spiffe://{domain}/ingress" if service is None else f"spiffe://{domain}/service/{service}"


def security_config(manifest: Manifest, who: SidecarIdentity, leaf: dict[str, Any] | None) -> dict[str, Any]:
    """The `tls`, `trust_domain` and `authz` parts of one sidecar's snapshot."""
    out: dict[str, Any] = {"trust_domain": manifest.security.trust_domain, "tls": None, "authz": None}
    own = manifest.service(who.service) if who.service is not None else None
    if leaf is not None:
        out["tls"] = {
            "mode": mtls_mode(manifest, own) if own is not None else "strict",
            "identity": leaf["identity"],
            "cert_pem": leaf["chain_pem"],
            "key_pem": leaf["key_pem"],
            "bundle_pem": leaf["bundle_pem"],
            "not_after": leaf["not_after"],
        }
    if own is not None and (own.authorization is not None or manifest.security.default_policy == "deny"):
        rules = own.authorization or {"allow": None, "deny": []}
        out["authz"] = {"default": manifest.security.default_policy, "allow": rules["allow"], "deny": rules["deny"]}
    return out


def compile_sidecar(
    manifest: Manifest,
    who: SidecarIdentity,
    listeners: SidecarListeners,
    endpoints: Iterable[Endpoint],
    overrides: dict[str, dict[str, Any]] | None = None,
    leaf: dict[str, Any] | None = None,
    ingress_tls: dict[str, str] | None = None,
    local_uid: int | None = None,
) -> dict[str, Any]:
    """One sidecar's snapshot. `local_uid`: only processes of this uid may connect to its
    listeners other than the ingress (meshctl/proxy/peers.py); None lets anyone in."""
    endpoints = list(endpoints)
    overrides = overrides or {}
    listener_list: list[dict[str, Any]] = []
    targets: list[str] = []
    if listeners.inbound_fd is not None:
        # The app's own protocol: what the inbound sidecar speaks to it (docs/protocols-l7.md).
        own_protocol = manifest.service(who.service).protocol if who.service is not None else "http"
        listener_list.append(
            {"name": "inbound", "kind": "inbound", "fd": listeners.inbound_fd,
             "app": listeners.app_socket or ["127.0.0.1", listeners.app_port], "protocol": own_protocol}
        )
    for upstream, fd in listeners.outbound_fds:
        listener_list.append({"name": f"outbound:{upstream}", "kind": "outbound", "fd": fd, "service": upstream,
                              "protocol": manifest.service(upstream).protocol})
        targets.append(upstream)
    if listeners.forward_fd is not None:
        listener_list.append({"name": "proxy", "kind": "forward", "fd": listeners.forward_fd})
        targets.extend(who.upstreams)
    if listeners.ingress_fd is not None and manifest.ingress is not None:
        routes = sorted(manifest.ingress.routes, key=lambda r: len(r.path), reverse=True)
        listener_list.append(
            {"name": "ingress", "kind": "ingress", "fd": listeners.ingress_fd,
             "routes": [{"path": r.path, "service": r.service} for r in routes]}
        )
        targets.extend(r.service for r in routes)
    services = {}
    for name in dict.fromkeys(targets):
        spec = manifest.service(name)
        services[name] = service_config(spec, endpoints, overrides.get(name))
        services[name]["protocol"] = spec.protocol
        tls_on = leaf is not None and mtls_mode(manifest, spec) != "off"
        services[name]["tls"] = {"identity": identity_of(manifest, name)} if tls_on else None
    egress: list[str] = []
    if who.service is not None:
        egress = list(manifest.service(who.service).egress)
    return {
        "instance": who.instance,
        "service": who.service,
        "version": who.version,
        "drain_timeout": DRAIN_TIMEOUT_S,
        "local_uid": local_uid,
        "listeners": listener_list,
        "services": services,
        "egress": egress,
        "http": dict(DEFAULT_HTTP),
        **security_config(manifest, who, leaf),
        "ingress_tls": ingress_tls,
        "admin": {"fd": listeners.admin_fd} if listeners.admin_fd is not None else None,
        "access_log": manifest.observability.access_log,
        "tracing": {"sampling": manifest.observability.sampling},
        "metrics": manifest.observability.metrics,
        "why": {"mode": manifest.observability.why, "ring": manifest.observability.why_records},
    }
