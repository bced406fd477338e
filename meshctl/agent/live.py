"""Live changes to a running mesh, without a failed request: converge, roll, scale, restart.

`LiveChanges` is owned by the supervisor (`sup.live`) and sees of it only the `MeshHost`
it is given; it owns the replacements in flight (`surges`, `rolling`). Every change follows
one path: a replacement of the next generation starts beside the instance it replaces,
joins the endpoints once ready; then the old one leaves the endpoints, every sidecar ACKs
that (`converge()`), and only then does it drain and stop. Route overrides are pushed the
same way and ACK-checked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from meshctl.agent import overrides as ovr
from meshctl.agent.compile import INGRESS_ID
from meshctl.agent.errors import RolloutError
from meshctl.agent.instance import Ingress, Instance
from meshctl.agent.lifecycle import State
from meshctl.agent.model import Manifest
from meshctl.agent.plan import InstanceSpec, desired_instances, plan_apply
from meshctl.agent.sidecar import SidecarHandle

log = logging.getLogger("agent.supervisor")

ROLLOUT_READY_TIMEOUT_S = 60.0
CONVERGE_TIMEOUT_S = 15.0
CONVERGE_POLL_S = 0.02

OverrideChange = Callable[[ovr.MeshOverrides, Manifest], ovr.MeshOverrides]


class MeshHost(Protocol):
    """What live changes use of the supervisor: the running mesh, its overrides, the push."""

    instances: dict[str, Instance]
    overrides: ovr.MeshOverrides

    @property
    def ingress(self) -> Ingress | None: ...
    @property
    def store(self) -> ovr.OverrideStore: ...
    @property
    def config_version(self) -> int: ...
    @property
    def apply_lock(self) -> asyncio.Lock: ...

    def require_live(self) -> None: ...
    def require_manifest(self) -> Manifest: ...
    def new_instance(self, spec: InstanceSpec, generation: int = 0) -> Instance: ...
    def request_push(self) -> None: ...
    async def push_all(self) -> list[str]: ...
    async def wait_state_change(self) -> None: ...


class LiveChanges:
    """Changes to the running mesh of `host`; see the module docstring."""

    def __init__(self, host: MeshHost) -> None:
        self.host = host
        self.surges: dict[str, Instance] = {}  # replacements starting beside an instance
        self.rolling: set[str] = set()  # ids of the instances being replaced

    def sidecar_owners(self) -> list[Instance]:
        return [*self.host.instances.values(), *self.surges.values()]

    def sidecars(self) -> list[tuple[str, SidecarHandle]]:
        """(the id shown to users, handle) of every sidecar: instances, replacements, ingress."""
        named = [(i.id, i.sidecar) for i in self.host.instances.values()]
        named += [(i.endpoint_id, i.sidecar) for i in self.surges.values()]
        ingress = self.host.ingress
        if ingress is not None:
            named.append((INGRESS_ID, ingress.sidecar))
        return named

    def routing_sidecars(self, service: str | None) -> list[tuple[str, SidecarHandle]]:
        return [
            (name, handle) for name, handle in self.sidecars()
            if handle.running and (service is None or service in (handle.last_snapshot or {}).get("services", {}))
        ]

    async def converge(self, service: str | None = None, timeout: float = CONVERGE_TIMEOUT_S) -> list[str]:
        """Push, then wait until every sidecar (that routes to `service`, if given) has ACKed
        its newest config. Returns the problems: NACKs, and sidecars still stale at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.host.push_all()
        while True:
            pending, problems = [], []
            for name, handle in self.routing_sidecars(service):
                if handle.acked_version >= handle.pushed_version:
                    continue
                if handle.nack is not None:
                    problems.append(f"{name} rejected config v{handle.pushed_version}: {handle.nack}")
                else:
                    pending.append(name)
            if not pending or loop.time() > deadline:
                return problems + [f"{name} has not acknowledged config v{h.pushed_version} (STALE)"
                                   for name, h in self.routing_sidecars(service) if name in pending]
            # Another push of a newer config is in flight; its ACK is what we wait for.
            await asyncio.sleep(CONVERGE_POLL_S)

    async def _wait_ready(self, inst: Instance, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while inst.state is not State.READY:
            if inst.state is State.FAILED:
                raise RolloutError(f"replacement of {inst.id} failed: {inst.message}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RolloutError(
                    f"replacement of {inst.id} not ready within {timeout:g}s ({inst.state.value}: {inst.message})"
                )
            try:
                await asyncio.wait_for(self.host.wait_state_change(), remaining)
            except asyncio.TimeoutError:
                pass

    async def roll(self, iid: str, spec: InstanceSpec) -> None:
        """Replace instance `iid` with one running `spec`, never leaving callers without it."""
        old = self.host.instances[iid]
        new = self.host.new_instance(spec, old.generation + 1)
        self.surges[iid] = new
        self.rolling.add(iid)
        try:
            new.launch()
            await self._wait_ready(new, ROLLOUT_READY_TIMEOUT_S)
            await self.converge()  # callers can reach the replacement before the old one leaves
        except BaseException:
            self.surges.pop(iid, None)
            await new.stop()
            raise
        finally:
            self.rolling.discard(iid)
        self.surges.pop(iid, None)
        self.host.instances[iid] = new  # same key: keeps its place in dependency order
        await self.retire([old])

    async def retire(self, instances: list[Instance]) -> None:
        """Take instances out of every caller's endpoints, wait for the ACKs, then stop them."""
        if not instances:
            return
        for inst in instances:
            inst.in_rotation = False
        problems = await self.converge()
        if problems:
            log.warning("stopping %s although not every sidecar confirmed: %s",
                        ", ".join(i.id for i in instances), "; ".join(problems))
        await asyncio.gather(*(inst.stop(drain_inbound=True) for inst in instances))
        for inst in instances:
            if self.host.instances.get(inst.id) is inst:
                self.host.instances.pop(inst.id)

    async def roll_all(self, ids: Iterable[str], desired: dict[str, InstanceSpec]) -> list[str]:
        failures = []
        for iid in ids:  # dependency order: upstreams are replaced before their callers
            try:
                await self.roll(iid, desired[iid])
            except RolloutError as exc:
                log.warning("%s", exc)
                failures.append(str(exc))
        return failures

    def launch_new(self, ids: Iterable[str], desired: dict[str, InstanceSpec]) -> None:
        instances = self.host.instances
        for iid in ids:
            instances[iid] = self.host.new_instance(desired[iid])
        # Keep dict order = dependency order, so status lists upstreams first.
        order = [i for i in desired if i in instances]
        self.host.instances = {i: instances[i] for i in [*order, *(i for i in instances if i not in desired)]}
        for iid in ids:
            self.host.instances[iid].launch()

    # -- overrides ----------------------------------------------------------------------

    async def change_overrides(self, service: str, change: OverrideChange, wait: bool = True) -> dict[str, Any]:
        """Make `change(live overrides, manifest)` the live overrides, persist them, push;
        with `wait`, until ACKed. One change at a time: each starts from the one before,
        and the last to return is the one in force."""
        host = self.host
        async with host.apply_lock:
            host.require_live()
            manifest = host.require_manifest()
            host.overrides = change(host.overrides, manifest)
            host.store.save(manifest.mesh, host.overrides)
            return await self.push_routes(service, wait)

    async def push_routes(self, service: str, wait: bool) -> dict[str, Any]:
        if not wait:
            self.host.request_push()
            return {"service": service, "version": None, "sidecars": [], "problems": []}
        problems = await self.converge(service)
        routing = self.routing_sidecars(service)
        version = max((h.pushed_version for _, h in routing), default=self.host.config_version)
        return {"service": service, "version": version, "sidecars": [n for n, _ in routing], "problems": problems}

    async def scale(self, service: str, version: str, count: int) -> dict[str, Any]:
        host = self.host
        async with host.apply_lock:
            host.require_live()
            manifest = host.require_manifest()
            new = ovr.with_replicas(host.overrides, manifest, service, version, count)
            host.overrides = new
            host.store.save(manifest.mesh, new)
            desired = desired_instances(manifest, new.replicas)
            plan = plan_apply({i: inst.spec for i, inst in host.instances.items()}, desired)
            self.launch_new(plan.start, desired)
            for iid in plan.start:
                await self._wait_ready(host.instances[iid], ROLLOUT_READY_TIMEOUT_S)
            await self.converge()
            await self.retire([host.instances[i] for i in plan.stop])
            return {"service": service, "version": version, "replicas": count,
                    "started": list(plan.start), "stopped": list(plan.stop)}

    async def restart(self, service: str, version: str | None) -> dict[str, Any]:
        host = self.host
        async with host.apply_lock:
            host.require_live()
            manifest = host.require_manifest()
            spec = ovr.service_spec(manifest, service)
            if version is not None:
                ovr.check_version(spec, version)
            ids = [iid for iid, inst in host.instances.items()
                   if inst.spec.service == service and version in (None, inst.spec.version.name)]
            for iid in ids:
                await self.roll(iid, host.instances[iid].spec)
            return {"restarted": ids}

    def proxy_status(self) -> list[dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        rows = []
        for name, handle in self.sidecars():
            if handle.nack is not None and handle.acked_version < handle.pushed_version:
                state = "NACK"
            elif handle.acked_version >= handle.pushed_version and handle.running:
                state = "SYNCED"
            else:
                state = "STALE"
            rows.append({
                "sidecar": name,
                "pid": handle.pid,
                "pushed": handle.pushed_version,
                "acked": handle.acked_version,
                "state": state,
                "nack": handle.nack,
                "since_ack_s": None if handle.last_ack_at is None else round(now - handle.last_ack_at, 3),
            })
        return rows

    def sidecar_named(self, name: str) -> SidecarHandle | None:
        return dict(self.sidecars()).get(name)
