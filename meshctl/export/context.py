"""What an export starts from, how things are named, and how untranslatable parts are noted.

`ExportInput` carries the choices of the command line and the live routing of a running
agent (or nothing: the manifest alone). `Notes` gathers, by name, every manifest setting
the target cannot express, so the CLI can list them instead of dropping them silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from meshctl.agent.model import Manifest, ServiceSpec

APP_PORT = 8080  # every container listens here; PORT=8080 in its environment
SERVICE_PORT = 80  # every Service exposes this port, named "http"
PORT_NAME = "http"
PLACEHOLDER_IMAGE = "registry.invalid/meshctl/%s:%s"  # service, version; never pulls
MESHES = ("linkerd", "istio")
CLUSTER_DOMAIN = "cluster.local"
# maxItems of HTTPRouteRule.matches and HTTPRoute.spec.rules in the published CRDs, the same in
# gateway.networking.k8s.io/v1 and policy.linkerd.io/v1beta3: past them the API server refuses the object.
ROUTE_MAX_MATCHES = 8
ROUTE_MAX_RULES = 16


class ExportError(Exception):
    """The export cannot go on; `code` is stable, as for the agent's errors."""

    code = "export-failed"


class MissingImages(ExportError):
    code = "missing-image"

    def __init__(self, missing: list[str]) -> None:
        super().__init__("no image for " + ", ".join(missing))
        self.missing = missing


@dataclass(frozen=True)
class LiveRouting:
    """A running agent's routing, from its `route-show` and `diff` answers."""

    config_version: int
    traffic: dict[str, dict[str, Any]]  # service -> {"split": {...}, "routes": [...]}
    replicas: dict[str, int]  # "service@version" -> live replica count, overridden ones only


@dataclass(frozen=True)
class ExportInput:
    namespace: str = "default"
    mesh: str = "linkerd"  # linkerd | istio
    gateway_class: str = ""  # [istio for istio, else "default"]
    allow_placeholders: bool = False
    live: LiveRouting | None = None

    @property
    def gateway_class_name(self) -> str:
        return self.gateway_class or ("istio" if self.mesh == "istio" else "default")


@dataclass
class Notes:
    """Settings not translated, each as (where, what, why), in the order found."""

    items: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, where: str, what: str, why: str) -> None:
        entry = (where, what, why)
        if entry not in self.items:
            self.items.append(entry)

    def lines(self) -> list[str]:
        return ["%s: %s (%s)" % item for item in self.items]

    def names(self) -> list[str]:
        return ["%s.%s" % (where, what) for where, what, _ in self.items]


def live_routing(route_show: dict, differences: list[dict]) -> LiveRouting:
    """The agent's answers to `route-show` and `diff` as a LiveRouting."""
    traffic = {
        name: {"split": dict(entry["live"]["split"] or {}), "routes": list(entry["live"]["routes"] or [])}
        for name, entry in route_show["services"].items()
    }
    replicas = {}
    for difference in differences:
        what = str(difference.get("what", ""))
        if what.startswith("replicas "):
            replicas["%s@%s" % (difference["service"], what.split(" ", 1)[1])] = int(difference["live"])
    return LiveRouting(int(route_show.get("config_version") or 0), traffic, replicas)


def check_images(manifest: Manifest, given: ExportInput) -> None:
    missing = [
        "%s@%s" % (service.name, version.name)
        for service in manifest.services
        for version in service.versions
        if not version.image
    ]
    if missing and not given.allow_placeholders:
        raise MissingImages(missing)


def image_of(service: ServiceSpec, version_name: str) -> str:
    return service.version(version_name).image or PLACEHOLDER_IMAGE % (service.name, version_name)


def routing(service: ServiceSpec, given: ExportInput) -> tuple[dict[str, int], list[dict]]:
    """The split and routes in force: the live ones when an agent answered, else the manifest's."""
    traffic = service.traffic or {}
    if given.live is not None and service.name in given.live.traffic:
        live = given.live.traffic[service.name]
        return dict(live["split"]), list(live["routes"])
    return dict(traffic.get("split") or {service.versions[0].name: 100}), list(traffic.get("routes") or [])


def replicas_of(service: ServiceSpec, version_name: str, given: ExportInput) -> int:
    key = "%s@%s" % (service.name, version_name)
    if given.live is not None and key in given.live.replicas:
        return given.live.replicas[key]
    return service.version(version_name).replicas


def version_service_name(service: str, version: str) -> str:
    """The per-version Service that weighted backendRefs point at: cart-v1."""
    return "%s-%s" % (service, version)


def deployment_name(service: str, version: str) -> str:
    return "%s-%s" % (service, version)


def fqdn(service: str, namespace: str) -> str:
    return "%s.%s.svc.%s" % (service, namespace, CLUSTER_DOMAIN)


def upstream_url(service: str, namespace: str) -> str:
    """What <UPSTREAM>_URL becomes: the Service's cluster DNS name, port 80."""
    return "http://%s:%d" % (fqdn(service, namespace), SERVICE_PORT)


def env_name(service: str) -> str:
    return service.upper().replace("-", "_") + "_URL"


def ingress_name(manifest: Manifest) -> str:
    return "%s-ingress" % manifest.mesh


def duration(seconds: float) -> str:
    """Seconds as a Gateway API / Istio / Linkerd duration: 15s, 250ms."""
    millis = round(seconds * 1000)
    if millis % 1000 == 0:
        return "%ds" % (millis // 1000)
    return "%dms" % millis


def rules_for(matches: list[dict], action: dict) -> list[dict]:
    """One HTTPRoute rule per run of at most ROUTE_MAX_MATCHES matches, each with `action`.

    Matches are ORed, so rules that share an action admit what one rule with all the matches would.
    """
    return [
        {"matches": matches[start:start + ROUTE_MAX_MATCHES], **action}
        for start in range(0, len(matches), ROUTE_MAX_MATCHES)
    ]


def route_parts(name: str, rules: list[dict]) -> list[tuple[str, list[dict]]]:
    """(name, rules) per HTTPRoute of at most ROUTE_MAX_RULES rules: `name`, then `name`-part2, ...

    Routes on one parent merge into one rule set, so splitting them changes no routing decision.
    """
    parts = [rules[start:start + ROUTE_MAX_RULES] for start in range(0, len(rules), ROUTE_MAX_RULES)]
    return [(name if number == 1 else "%s-part%d" % (name, number), part) for number, part in enumerate(parts, 1)]


def whole_seconds(seconds: float) -> int:
    """Kubernetes probe fields are whole seconds, at least 1."""
    return max(1, math.ceil(seconds))


def labels(service: str, version: str | None = None) -> dict[str, str]:
    out = {"app": service}
    if version is not None:
        out["version"] = version
    return out


def metadata(name: str, given: ExportInput, **extra: Any) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": given.namespace}
    meta.update({key: value for key, value in extra.items() if value})
    return meta


def effective_mtls(manifest: Manifest, service: ServiceSpec) -> str:
    return service.mtls or manifest.security.mtls
