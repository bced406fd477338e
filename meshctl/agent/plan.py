"""What should run: the manifest expanded into instances, and the plan to get there.

Pure: `desired_instances()` expands services x versions x replicas (with live replica
overrides) into `InstanceSpec`s; `plan_apply()` compares them with what runs and says what
to start, stop, replace and keep. The supervisor carries the plan out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from meshctl.agent import overrides as ovr
from meshctl.agent.model import Manifest, RestartPolicy, VersionSpec


def instance_id(service: str, version: str, replica: int) -> str:
    return f"{service}@{version}#{replica}"


def env_name(service: str) -> str:
    return re.sub(r"[^A-Z0-9_]", "_", service.upper())


@dataclass(frozen=True)
class InstanceSpec:
    """Everything that, when changed, means an instance must be replaced."""

    service: str
    version: VersionSpec
    replica: int
    upstreams: tuple[str, ...]
    http_proxy: bool
    egress: tuple[str, ...]
    restart: RestartPolicy
    stop_grace_s: float
    listen: str = "tcp"

    @property
    def id(self) -> str:
        return instance_id(self.service, self.version.name, self.replica)


def desired_instances(manifest: Manifest, replicas: dict[str, int] | None = None) -> dict[str, InstanceSpec]:
    """`replicas` ("service@version" -> count) overrides the manifest's counts."""
    out: dict[str, InstanceSpec] = {}
    for service in manifest.services:
        for version in service.versions:
            count = (replicas or {}).get(ovr.replica_key(service.name, version.name), version.replicas)
            # The count belongs to the version, not to an instance: scaling must not
            # make the instances it keeps look changed.
            per_instance = replace(version, replicas=1)
            for replica in range(count):
                spec = InstanceSpec(
                    service.name, per_instance, replica, service.upstreams, service.http_proxy,
                    service.egress, service.restart, service.stop_grace_s, service.listen,
                )
                out[spec.id] = spec
    return out


@dataclass(frozen=True)
class ApplyPlan:
    start: tuple[str, ...]
    stop: tuple[str, ...]
    replace: tuple[str, ...]
    keep: tuple[str, ...]


def plan_apply(running: dict[str, InstanceSpec], desired: dict[str, InstanceSpec]) -> ApplyPlan:
    start = tuple(i for i in desired if i not in running)
    stop = tuple(i for i in running if i not in desired)
    replace = tuple(i for i in desired if i in running and running[i] != desired[i])
    keep = tuple(i for i in desired if i in running and running[i] == desired[i])
    return ApplyPlan(start, stop, replace, keep)
