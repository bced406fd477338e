"""Live overrides: route changes and replica counts made at run time on top of the manifest.

Pure rules first: `with_split`, `with_rule`, `with_shadow`, `without`, `with_replicas` validate a change
against the manifest and return new `MeshOverrides`; `traffic_overrides` turns them into
the traffic keys `compile_sidecar` lays over each service's normalised traffic. An
override never edits the manifest's own rules: a header rule is inserted before them, and
`reset` goes back to exactly what the manifest says.

`OverrideStore` persists them in $MESHCTL_HOME/overrides.json (0600, replaced atomically),
keyed by mesh name, so that they survive an agent restart.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

from meshctl.agent.errors import AgentError
from meshctl.agent.model import Manifest, ServiceSpec
from meshctl.proxy.compare import json_pattern_error

STORE_NAME = "overrides.json"
MAX_REPLICAS = 64
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


class OverrideError(AgentError):
    code = "bad-request"


class UnknownService(OverrideError):
    code = "unknown-service"


class UnknownVersion(OverrideError):
    code = "unknown-version"


class BadSplit(OverrideError):
    code = "bad-split"


class BadScale(OverrideError):
    code = "bad-scale"


class BadShadow(OverrideError):
    code = "bad-shadow"


@dataclass(frozen=True)
class HeaderRule:
    """Requests whose header `name` equals `value` go to `version`."""

    name: str
    value: str
    version: str

    def to_route(self) -> dict[str, Any]:
        return {
            "match": {"path": None, "methods": None, "query": [],
                      "headers": [{"name": self.name, "kind": "exact", "value": self.value}]},
            "split": {self.version: 100},
            "timeout": None,
            "stream_idle_timeout": None,
            "retries": None,
            "fault": None,
            "mirror": None,
        }


@dataclass(frozen=True)
class Shadow:
    """`meshctl shadow`: `percent` of the service's requests copied to `version` and compared."""

    version: str
    percent: float = 100.0
    path: str = "/"
    unsafe: bool = False
    ignore_headers: tuple[str, ...] = ()
    ignore_json: tuple[str, ...] = ()

    def to_mirror(self) -> dict[str, Any]:
        """The sidecar's `shadow` traffic key: a comparing mirror laid over every route."""
        return {"version": self.version, "percent": self.percent,
                "compare": {"live": True, "path": self.path, "unsafe": self.unsafe, "ignore_headers": list(self.ignore_headers),
                            "ignore_json": list(self.ignore_json)}}

    def to_json(self) -> dict[str, Any]:
        return {**vars(self), "ignore_headers": list(self.ignore_headers), "ignore_json": list(self.ignore_json)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Shadow:
        return cls(str(raw["version"]), float(raw.get("percent", 100.0)), str(raw.get("path") or "/"),
                   raw.get("unsafe") is True, tuple(raw.get("ignore_headers") or ()), tuple(raw.get("ignore_json") or ()))


@dataclass(frozen=True)
class ServiceOverride:
    split: dict[str, int] | None = None
    rules: tuple[HeaderRule, ...] = ()
    shadow: Shadow | None = None

    @property
    def empty(self) -> bool:
        return self.split is None and not self.rules and self.shadow is None


@dataclass(frozen=True)
class MeshOverrides:
    services: dict[str, ServiceOverride] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)  # "service@version" -> count

    def service(self, name: str) -> ServiceOverride:
        return self.services.get(name, ServiceOverride())

    def to_json(self) -> dict[str, Any]:
        return {
            "services": {
                name: {"split": ov.split, "rules": [vars(rule) for rule in ov.rules],
                       "shadow": ov.shadow.to_json() if ov.shadow is not None else None}
                for name, ov in self.services.items()
            },
            "replicas": dict(self.replicas),
        }

    @classmethod
    def from_json(cls, raw: Any) -> MeshOverrides:
        if not isinstance(raw, dict):
            return cls()
        services = {}
        for name, entry in (raw.get("services") or {}).items():
            split = entry.get("split")
            rules = tuple(HeaderRule(r["name"], r["value"], r["version"]) for r in entry.get("rules") or ())
            shadow = Shadow.from_json(entry["shadow"]) if isinstance(entry.get("shadow"), dict) else None
            services[name] = ServiceOverride({k: int(v) for k, v in split.items()} if split else None, rules, shadow)
        replicas = {key: int(count) for key, count in (raw.get("replicas") or {}).items()}
        return cls(services, replicas)


# -- validation ---------------------------------------------------------------------------


def service_spec(manifest: Manifest, name: str) -> ServiceSpec:
    try:
        return manifest.service(name)
    except KeyError:
        known = ", ".join(s.name for s in manifest.services)
        raise UnknownService(f"no service {name!r} in mesh {manifest.mesh} (services: {known})") from None


def check_version(spec: ServiceSpec, version: str) -> None:
    names = [v.name for v in spec.versions]
    if version not in names:
        raise UnknownVersion(f"service {spec.name} has no version {version!r} (it has {', '.join(names)})")


def parse_weights(pairs: list[str]) -> dict[str, int]:
    """`["v1=90", "v2=10"]` -> `{"v1": 90, "v2": 10}`."""
    split: dict[str, int] = {}
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        if not sep or not version or not weight.strip().isdigit():
            raise BadSplit(f"{pair!r}: expected VERSION=WEIGHT with a whole number, e.g. v1=90")
        if version in split:
            raise BadSplit(f"version {version} given twice")
        split[version] = int(weight)
    return split


def validate_split(spec: ServiceSpec, split: dict[str, Any]) -> dict[str, int]:
    if not split:
        raise BadSplit("a split needs at least one VERSION=WEIGHT")
    for version, weight in split.items():
        check_version(spec, version)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise BadSplit(f"{version}={weight!r}: a weight is a whole number from 0 to 100")
    total = sum(split.values())
    if total != 100:
        shown = " ".join(f"{v}={w}" for v, w in split.items())
        raise BadSplit(f"weights must sum to 100; {shown} sums to {total}")
    return dict(split)


# -- changes ------------------------------------------------------------------------------


def _with_service(ov: MeshOverrides, name: str, service: ServiceOverride) -> MeshOverrides:
    services = {k: v for k, v in ov.services.items() if k != name}
    if not service.empty:
        services[name] = service
    return replace(ov, services=services)


def with_split(ov: MeshOverrides, manifest: Manifest, service: str, split: dict[str, Any]) -> MeshOverrides:
    spec = service_spec(manifest, service)
    clean = validate_split(spec, split)
    return _with_service(ov, service, replace(ov.service(service), split=clean))


def with_rule(
    ov: MeshOverrides, manifest: Manifest, service: str, header: str, value: str, version: str
) -> MeshOverrides:
    """Add (or replace, for the same header and value) a rule sending matches to `version`."""
    spec = service_spec(manifest, service)
    check_version(spec, version)
    if not HEADER_NAME.match(header):
        raise OverrideError(f"{header!r} is not a valid header name")
    rule = HeaderRule(header.lower(), value, version)
    others = tuple(r for r in ov.service(service).rules if (r.name, r.value) != (rule.name, rule.value))
    return _with_service(ov, service, replace(ov.service(service), rules=(rule, *others)))


def with_shadow(ov: MeshOverrides, manifest: Manifest, service: str, shadow: Shadow) -> MeshOverrides:
    """Start (or replace) the live shadow of `service`."""
    spec = service_spec(manifest, service)
    check_version(spec, shadow.version)
    if spec.protocol != "http":
        raise BadShadow(f"{service} speaks {spec.protocol}; shadow comparison works on HTTP/1 services")
    if not 0 < shadow.percent <= 100:
        raise BadShadow(f"--percent must be more than 0 and at most 100, not {shadow.percent:g}")
    if not shadow.path.startswith("/"):
        raise BadShadow(f"--path {shadow.path!r}: a path prefix starts with /")
    for name in shadow.ignore_headers:
        if not HEADER_NAME.match(name):
            raise BadShadow(f"--ignore-header {name!r} is not a valid header name")
    for path in shadow.ignore_json:
        problem = json_pattern_error(path)
        if problem is not None:
            raise BadShadow(f"--ignore-json {problem}")
    split = effective_traffic(spec, ov.service(service)).get("split") or {}
    if split.get(shadow.version, 0) >= 100:
        raise BadShadow(f"{service} sends all its traffic to {shadow.version} already; shadow another version")
    return _with_service(ov, service, replace(ov.service(service), shadow=shadow))


def without_shadow(ov: MeshOverrides, manifest: Manifest, service: str) -> MeshOverrides:
    service_spec(manifest, service)
    if ov.service(service).shadow is None:
        raise BadShadow(f"{service} has no live shadow (start one with `meshctl shadow {service} VERSION`)")
    return _with_service(ov, service, replace(ov.service(service), shadow=None))


def without(ov: MeshOverrides, manifest: Manifest, service: str) -> MeshOverrides:
    """Back to the manifest's routing for `service` (replica counts are kept)."""
    service_spec(manifest, service)
    return _with_service(ov, service, ServiceOverride())


def replica_key(service: str, version: str) -> str:
    return f"{service}@{version}"


def with_replicas(ov: MeshOverrides, manifest: Manifest, service: str, version: str, count: int) -> MeshOverrides:
    """Scale one version. 0 is allowed only for a version no traffic can reach."""
    spec = service_spec(manifest, service)
    check_version(spec, version)
    if not 0 <= count <= MAX_REPLICAS:
        raise BadScale(f"replicas must be from 0 to {MAX_REPLICAS}, not {count}")
    if count == 0 and version in versions_in_use(effective_traffic(spec, ov.service(service))):
        raise BadScale(
            f"{service}@{version} still receives traffic; move it out of the split "
            f"(`meshctl route split {service} ...`) before scaling it to 0"
        )
    replicas = dict(ov.replicas)
    if count == spec.version(version).replicas:
        replicas.pop(replica_key(service, version), None)
    else:
        replicas[replica_key(service, version)] = count
    return replace(ov, replicas=replicas)


def replicas_for(manifest: Manifest, ov: MeshOverrides) -> dict[str, int]:
    """The replica count of every service@version, overrides applied."""
    return {
        replica_key(s.name, v.name): ov.replicas.get(replica_key(s.name, v.name), v.replicas)
        for s in manifest.services
        for v in s.versions
    }


# -- effect -------------------------------------------------------------------------------


def base_traffic(spec: ServiceSpec) -> dict[str, Any]:
    if spec.traffic:
        return dict(spec.traffic)
    return {"split": {spec.versions[0].name: 100}, "routes": []}


def effective_traffic(spec: ServiceSpec, service: ServiceOverride) -> dict[str, Any]:
    traffic = base_traffic(spec)
    traffic.update(service_keys(spec, service))
    return traffic


def service_keys(spec: ServiceSpec, service: ServiceOverride) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    if service.split is not None:
        keys["split"] = dict(service.split)
    if service.rules:
        keys["routes"] = [rule.to_route() for rule in service.rules] + list(base_traffic(spec).get("routes") or [])
    if service.shadow is not None:
        keys["shadow"] = service.shadow.to_mirror()
    return keys


def traffic_overrides(manifest: Manifest, ov: MeshOverrides) -> dict[str, dict[str, Any]]:
    """What `compile_sidecar(overrides=...)` lays over each service's traffic."""
    out = {}
    for name, service in ov.services.items():
        try:
            spec = manifest.service(name)
        except KeyError:
            continue
        # `live` tells the sidecar which rules and split are overrides (for `meshctl why`).
        out[name] = {**service_keys(spec, service), "live": {"rules": len(service.rules), "split": service.split is not None}}
    return out


def versions_in_use(traffic: dict[str, Any]) -> set[str]:
    used = {v for v, w in (traffic.get("split") or {}).items() if w > 0}
    for route in traffic.get("routes") or ():
        used.update(v for v, w in (route.get("split") or {}).items() if w > 0)
        if route.get("mirror"):
            used.add(route["mirror"]["version"])
    if traffic.get("shadow"):
        used.add(traffic["shadow"]["version"])
    return used


def reconcile(manifest: Manifest, ov: MeshOverrides) -> tuple[MeshOverrides, list[str]]:
    """Drop the overrides a (new) manifest no longer allows; say which and why."""
    kept = MeshOverrides()
    dropped = []
    for name, service in ov.services.items():
        try:
            if service.split is not None:
                kept = with_split(kept, manifest, name, service.split)
            for rule in reversed(service.rules):
                kept = with_rule(kept, manifest, name, rule.name, rule.value, rule.version)
            if service.shadow is not None:
                kept = with_shadow(kept, manifest, name, service.shadow)
        except OverrideError as exc:
            dropped.append(f"route override of {name}: {exc}")
            kept = _with_service(kept, name, ServiceOverride())
    for key, count in ov.replicas.items():
        scaled, _, version = key.partition("@")
        try:
            kept = with_replicas(kept, manifest, scaled, version, count)
        except OverrideError as exc:
            dropped.append(f"scale of {key}: {exc}")
    return kept, dropped


def diff(manifest: Manifest, ov: MeshOverrides) -> list[dict[str, Any]]:
    """Each live difference from the manifest, as {service, what, manifest, live}."""
    out = []
    for name, service in ov.services.items():
        base = base_traffic(service_spec(manifest, name))
        if service.split is not None:
            out.append({"service": name, "what": "split", "manifest": base.get("split"), "live": service.split})
        for rule in service.rules:
            out.append({"service": name, "what": "rule", "manifest": None,
                        "live": {"header": rule.name, "value": rule.value, "version": rule.version}})
        if service.shadow is not None:
            out.append({"service": name, "what": "shadow", "manifest": None, "live": service.shadow.to_json()})
    for key, count in ov.replicas.items():
        scaled, _, version = key.partition("@")
        out.append({"service": scaled, "what": f"replicas {version}",
                    "manifest": manifest.service(scaled).version(version).replicas, "live": count})
    return out


# -- persistence --------------------------------------------------------------------------


class OverrideStore:
    """overrides.json: {"meshes": {mesh: MeshOverrides.to_json()}}."""

    def __init__(self, home: str) -> None:
        self.path = os.path.join(home, STORE_NAME)

    def _read_all(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return {"meshes": {}}
        except ValueError as exc:
            raise OverrideError(f"{self.path} is not valid JSON ({exc}); remove it to drop every override") from None
        return raw if isinstance(raw, dict) and isinstance(raw.get("meshes"), dict) else {"meshes": {}}

    def load(self, mesh: str) -> MeshOverrides:
        return MeshOverrides.from_json(self._read_all()["meshes"].get(mesh))

    def save(self, mesh: str, ov: MeshOverrides) -> None:
        data = self._read_all()
        data["meshes"][mesh] = ov.to_json()
        fd, tmp = tempfile.mkstemp(prefix=".overrides.", dir=os.path.dirname(self.path))
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # readers see the old file or the new one, never half
        except BaseException:
            os.unlink(tmp)
            raise
