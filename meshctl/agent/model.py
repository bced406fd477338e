"""The manifest as the agent sees it: validated, defaults filled in, durations in seconds.

`agent.manifest.load_manifest()` turns YAML into these objects; everything downstream
(the supervisor, the config compiler, the CLI) reads only these, never raw YAML.
All objects are frozen so that a running mesh and a newly loaded manifest can be
compared with `==` to find what changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_STOP_GRACE_S = 10.0
DEFAULT_STREAM_IDLE_TIMEOUT_S = 300.0  # as Envoy; no whole-request timeout unless asked, as Istio and Linkerd
DEFAULT_AGENT_GRACE_S = 300.0


@dataclass(frozen=True)
class Health:
    """Readiness probe. `http` is a path for an HTTP GET on the app; None means TCP connect."""

    http: str | None = None
    period_s: float = 0.2  # between probes while an instance is starting
    timeout_s: float = 1.0  # per probe


@dataclass(frozen=True)
class RestartPolicy:
    """Capped, jittered exponential backoff, as supervisord / process-compose users expect.

    A run shorter than `stable_after_s` counts as a quick crash; `max_quick_crashes` of them
    in a row put the instance in state `failed`. A longer run resets the count and the delay.
    """

    policy: str = "on_failure"  # on_failure | always | no
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_quick_crashes: int = 5
    stable_after_s: float = 10.0


@dataclass(frozen=True)
class VersionSpec:
    name: str  # "v1"
    command: tuple[str, ...]  # argv, already split
    env: tuple[tuple[str, str], ...] = ()  # service env overlaid by version env, sorted
    replicas: int = 1
    health: Health = field(default_factory=Health)
    workdir: str = "."  # absolute after loading
    image: str | None = None  # container image, for `meshctl export` (meshctl/agent/schema_export.py)


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    versions: tuple[VersionSpec, ...]  # in manifest order; a service without `versions` has v1
    upstreams: tuple[str, ...] = ()
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    stop_grace_s: float = DEFAULT_STOP_GRACE_S
    # Traffic policy for calls *to* this service (split, routes, retries, timeouts,
    # load_balancer, outlier_detection, limits), normalised to plain data: see
    # meshctl/proxy/config.py for the shape. Kept as data so that the sidecar gets it unchanged.
    traffic: Any = None
    # Forward-proxy mode for this service's own outbound calls.
    http_proxy: bool = False
    egress: tuple[str, ...] = ()  # hosts outside the mesh this service may reach
    mtls: str | None = None  # None: the mesh's mode
    # {"allow": [rule, ...] or None, "deny": [rule, ...]}, rules as meshctl/proxy/authz.py reads them
    authorization: Any = None
    protocol: str = "http"  # http | grpc | tcp (meshctl/agent/schema_protocols.py)
    listen: str = "tcp"  # tcp: the app on 127.0.0.1:$PORT; unix: on the socket $MESH_SOCKET

    def version(self, name: str) -> VersionSpec:
        for version in self.versions:
            if version.name == name:
                return version
        raise KeyError(name)


@dataclass(frozen=True)
class IngressRoute:
    path: str  # prefix
    service: str


@dataclass(frozen=True)
class Ingress:
    port: int
    host: str = "127.0.0.1"
    routes: tuple[IngressRoute, ...] = ()
    tls_cert: str | None = None  # absolute paths of the user's certificate (chain) and key
    tls_key: str | None = None


@dataclass(frozen=True)
class Security:
    """Mesh-wide identity and policy settings (docs in meshctl/agent/schema_security.py)."""

    mtls: str = "strict"  # strict | permissive | off; a service may override it
    trust_domain: str = ""  # filled in by the loader: "<mesh>.local" unless given
    leaf_lifetime_s: float = 24 * 3600.0
    default_policy: str = "allow"  # what a service without allow rules admits


@dataclass(frozen=True)
class OtlpExport:
    """The collector the agent posts every span to (OTLP/HTTP JSON)."""

    endpoint: str  # http(s)://host:port/v1/traces
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may carry API keys: never printed
    timeout_s: float = 2.0  # per export request


@dataclass(frozen=True)
class Observability:
    """Access logs, trace sampling and export (docs in meshctl/agent/schema_observability.py)."""

    access_log: str = "off"  # off | on | errors
    sampling: float = 0.01
    metrics: bool = True  # False: sidecars record no request metrics
    # Where the agent serves the merged metrics: None means 9464, or a free port when taken.
    metrics_port: int | None = None
    otlp: OtlpExport | None = None  # None: spans stay in the agent
    why: str = "errors"  # errors | all | off: which requests get a decision record (`meshctl why`)
    why_records: int = 2000  # decision records kept per sidecar


@dataclass(frozen=True)
class Manifest:
    mesh: str
    services: tuple[ServiceSpec, ...]  # in dependency order: upstreams before dependants
    ingress: Ingress | None = None
    source: str = ""  # absolute path of the file it came from
    security: Security = field(default_factory=Security)
    observability: Observability = field(default_factory=Observability)
    # How long the data plane serves on after the agent died without `down` (agent.sentinel).
    agent_grace_s: float = DEFAULT_AGENT_GRACE_S

    def service(self, name: str) -> ServiceSpec:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(name)
