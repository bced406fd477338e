"""The supervisor: runs every instance of the mesh and keeps the sidecars' config current.

Decide, then act: `plan_apply()` compares the running instances with a manifest and says
what to start, stop and replace; `Supervisor.apply()` carries that out. Each instance has
one runner task that owns its processes (start the sidecar, then the app, probe, restart
with backoff), so that no two tasks ever race on one process. Whenever an instance becomes
ready or stops being ready, one pusher task recompiles every sidecar's snapshot and pushes
the ones that changed.

Live changes keep callers whole (agent.live, which the supervisor owns as `self.live`): a
replaced or restarted instance is rolled: a replacement of the next generation starts beside
it, joins the endpoints once ready, then the old one leaves the endpoints, every sidecar ACKs
that, and only then does it stop.
Route and replica overrides (`agent.overrides`) are laid over the manifest when compiling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from meshctl.agent import meshstate
from meshctl.agent import overrides as ovr
from meshctl.agent import process
from meshctl.agent.compile import INGRESS_ID, Endpoint, compile_sidecar, identity_of
from meshctl.agent.errors import AgentError, ApplyError, MeshMismatch, MeshStopping
from meshctl.agent.identity import IdentityManager, load_user_tls
from meshctl.agent.instance import Ingress, Instance, owner_key
from meshctl.agent.lifecycle import State
from meshctl.agent.live import LiveChanges
from meshctl.agent.logs import LogBook
from meshctl.agent.model import Manifest
from meshctl.agent.plan import InstanceSpec, desired_instances, plan_apply
from meshctl.agent.sidecar import SidecarHandle

log = logging.getLogger(__name__)
# Settings of the sidecar that pass from the agent's environment to the sidecars it starts
# (MESHCTL_H2_CODEC=h2 forces the pure-Python HTTP/2 codec, meshctl/proxy/h2conn.py;
# MESHCTL_PROXY_BUILD=pure the .py files where the request path is compiled, meshctl/proxy/build.py).
SIDECAR_SETTINGS = frozenset({"MESHCTL_H2_CODEC", "MESHCTL_PROXY_BUILD"})


class Supervisor:
    def __init__(self, home: str, logbook: LogBook, sentinel: process.Sentinel | None) -> None:
        self.home = home
        self.logbook = logbook
        self.sentinel = sentinel
        self.manifest: Manifest | None = None
        self.instances: dict[str, Instance] = {}
        self.ingress: Ingress | None = None
        self.config_version = 0
        # Bumped by each `apply` of a manifest that differs from the running one (its file
        # aside): an `up` waiting for its manifest sees when another one overtook it.
        self.manifest_generation = 0
        self.stopping = False  # set by `down`: changes are refused from then on
        self._changed = asyncio.Condition()
        self._push_needed = asyncio.Event()
        self._pusher: asyncio.Task | None = None
        self.apply_lock = asyncio.Lock()
        self.store = ovr.OverrideStore(home)
        self.overrides = ovr.MeshOverrides()
        # Traffic keys pushed as they are, without validation: only for the debug op that
        # tests the NACK path. Never persisted.
        self.unchecked_traffic: dict[str, dict] = {}
        self.identities: IdentityManager | None = None  # the CA and every sidecar's leaf
        # Where sidecars' observability messages go (agent.observability sets it).
        self.on_sidecar_message: Callable[[dict], None] | None = None
        self.live = LiveChanges(self)  # converge, roll, scale, restart, override changes
        # The manifest as applied (text, source, environ): what a new agent adopting this
        # mesh after a crash runs (agent.meshstate), whatever the file says by then.
        self.manifest_record: dict | None = None
        self.without_agent: list[dict] = []  # the periods the mesh ran with no agent (agent.adopt)
        self._persist_soon = False

    def sidecar_message(self, message: dict) -> None:
        if self.on_sidecar_message is not None:
            self.on_sidecar_message(message)

    # -- shared helpers used by instances ---------------------------------------------

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in [k for k in env if k.startswith("MESHCTL_") and k not in SIDECAR_SETTINGS]:
            env.pop(key)
        # Commands like `python app.py` run with meshctl's own Python first on PATH.
        bindir = os.path.dirname(sys.executable)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", os.defpath)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def sentinel_unregister(self, pid: int) -> None:
        if self.sentinel is not None:
            self.sentinel.unregister(pid)

    def new_instance(self, spec: InstanceSpec, generation: int = 0) -> Instance:
        return Instance(self, spec, generation)

    def request_push(self) -> None:
        self._push_needed.set()

    def persist(self) -> None:
        """Rewrite mesh.state.json once this turn of the loop is over (many changes, one write)."""
        if not self._persist_soon:
            self._persist_soon = True
            asyncio.get_running_loop().call_soon(self._write_state)

    def _write_state(self) -> None:
        self._persist_soon = False
        if self.stopping or self.manifest is None or self.manifest_record is None:
            return
        try:
            meshstate.save(Path(self.home), meshstate.mesh_record(self))
        except OSError as exc:
            log.warning("cannot write %s: %s; a new agent could not adopt this mesh", meshstate.STATE_FILE, exc)

    def state_changed(self) -> None:
        self.persist()
        self._push_needed.set()
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_state_change(self) -> None:
        async with self._changed:
            await self._changed.wait()

    def unready_upstreams(self, upstreams: Iterable[str]) -> list[str]:
        waiting = []
        for upstream in upstreams:
            members = [i for i in self.instances.values() if i.spec.service == upstream]
            if not members or any(i.state is not State.READY for i in members):
                waiting.append(upstream)
        return waiting

    def next_version(self) -> int:
        self.config_version += 1
        self._write_state()  # before any sidecar sees it: a new agent never reuses a version
        return self.config_version

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(i.endpoint_id, i.spec.service, i.spec.version.name, i.inbound_port)
            for i in self.live.sidecar_owners()
            if i.state is State.READY and i.in_rotation
        ]

    def traffic_overrides(self) -> dict[str, dict]:
        assert self.manifest is not None
        layered = ovr.traffic_overrides(self.manifest, self.overrides)
        for service, keys in self.unchecked_traffic.items():
            layered[service] = {**layered.get(service, {}), **keys}
        return layered

    def snapshot_for(self, owner: Instance | Ingress) -> dict:
        assert self.manifest is not None
        try:
            return compile_sidecar(
                self.manifest, owner.identity(), owner.listeners(), self.endpoints(), self.traffic_overrides(),
                leaf=self._leaf(owner), ingress_tls=getattr(owner, "user_tls", None), local_uid=os.getuid(),
            )
        except KeyError:
            # An instance about to be replaced may call an upstream the new manifest
            # dropped: it keeps its last config until its replacement takes over.
            return owner.sidecar.last_snapshot or {}

    def _leaf(self, owner: Instance | Ingress) -> dict | None:
        assert self.manifest is not None
        if self.identities is None:
            return None
        who = owner.identity()
        return self.identities.leaf_for(
            owner_key(owner), identity_of(self.manifest, who.service), self.manifest.security.leaf_lifetime_s
        )

    async def start_sidecar(self, handle: SidecarHandle, owner: Instance | Ingress) -> None:
        try:
            await handle.start(self.next_version(), self.snapshot_for(owner))
        finally:
            self.persist()

    # -- config push ------------------------------------------------------------------

    def start_pusher(self) -> None:
        if self._pusher is None:
            self._pusher = asyncio.create_task(self._push_loop(), name="config-pusher")
        self._push_needed.set()

    async def _push_loop(self) -> None:
        while True:
            # Wake for a change, or when the next certificate falls due for renewal.
            due = self.identities.next_renewal() if self.identities is not None else None
            timeout = None if due is None else min(max(due - time.time(), 0.05), 60.0)
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the cancel at shutdown.
                async with asyncio.timeout(timeout):
                    await self._push_needed.wait()
            except TimeoutError:
                pass
            self._push_needed.clear()
            await self.push_all()
            if self.identities is not None:
                live = {owner_key(o) for o in self.live.sidecar_owners()}
                self.identities.prune(live | {INGRESS_ID})

    async def push_all(self) -> list[str]:
        """Recompile every sidecar's snapshot; push those that changed. Returns failures."""
        if self.manifest is None:
            return []
        owners: list[Instance | Ingress] = [i for i in self.live.sidecar_owners() if i.sidecar.running]
        if self.ingress is not None and self.ingress.sidecar.running:
            owners.append(self.ingress)
        pushes = []
        version = None
        for owner in owners:
            snapshot = self.snapshot_for(owner)
            if snapshot == owner.sidecar.last_snapshot:
                continue
            version = version or self.next_version()
            pushes.append((owner, owner.sidecar.push(version, snapshot)))
        failures = []
        for (owner, _), result in zip(pushes, await asyncio.gather(*(p for _, p in pushes), return_exceptions=True)):
            if isinstance(result, Exception):
                log.warning("config push to %s failed: %s", owner.sidecar.name, result)
                failures.append(f"{owner.sidecar.name}: {result}")
        if pushes:
            self.persist()  # the versions acknowledged and any leaf renewed on the way
        return failures

    # -- apply and down ---------------------------------------------------------------

    def preflight(self, manifest: Manifest) -> None:
        """Refuse a manifest whose commands or directories don't exist, before starting anything."""
        path = self.base_env()["PATH"]
        problems = []
        for service in manifest.services:
            for version in service.versions:
                where = f"services.{service.name}" + (
                    f".versions.{version.name}" if len(service.versions) > 1 or version.name != "v1" else ""
                )
                if not os.path.isdir(version.workdir):
                    problems.append(f"{where}: working directory {version.workdir} does not exist")
                    continue
                if not version.command:
                    problems.append(f"{where}.command: empty")
                elif process.resolve_command(version.command, version.workdir, path) is None:
                    problems.append(
                        f"{where}.command: {version.command[0]!r} not found "
                        f"(looked in {'the working directory' if '/' in version.command[0] else 'PATH'}); "
                        "install it or fix the command"
                    )
        if manifest.ingress is not None and manifest.ingress.tls_cert is not None:
            try:
                load_user_tls(manifest.ingress.tls_cert, manifest.ingress.tls_key)
            except (OSError, ssl.SSLError) as exc:
                problems.append(f"ingress.tls: {exc}; give a readable PEM certificate chain and unencrypted key")
        if problems:
            raise ApplyError("; ".join(problems))

    def require_manifest(self) -> Manifest:
        if self.manifest is None:
            raise AgentError("no mesh is running; run `meshctl up -f mesh.yaml`")
        return self.manifest

    def require_live(self) -> None:
        if self.stopping:
            raise MeshStopping("a `meshctl down` is stopping this mesh; no change is made any more")

    async def apply(self, manifest: Manifest, record: dict | None = None) -> dict:
        """`record`: the manifest's text, source and environ, kept for an agent that adopts the mesh."""
        async with self.apply_lock:
            self.require_live()
            if self.manifest is not None and self.manifest.mesh != manifest.mesh:
                raise MeshMismatch(
                    f"this agent runs mesh {self.manifest.mesh!r}, not {manifest.mesh!r}; "
                    "run `meshctl down` first or use another MESHCTL_HOME",
                )
            self.preflight(manifest)
            if self.identities is None:
                self.identities = IdentityManager(self.home, manifest.mesh)
            new_ingress = None
            old_ingress = self.ingress
            want = manifest.ingress
            ingress_changed = want is not None and (
                old_ingress is None
                or (old_ingress.host, old_ingress.port) != (want.host, want.port)
                or self.manifest is None
                or self.manifest.ingress is None
                or (self.manifest.ingress.tls_cert, self.manifest.ingress.tls_key) != (want.tls_cert, want.tls_key)
            )
            if ingress_changed and old_ingress is not None:
                await old_ingress.stop()
                self.ingress = old_ingress = None
            if want is not None and ingress_changed:
                new_ingress = Ingress(self, want.host, want.port)  # may raise: nothing started yet
                if want.tls_cert is not None:
                    new_ingress.user_tls = load_user_tls(want.tls_cert, want.tls_key)
            if self.manifest is None:
                self.overrides = self.store.load(manifest.mesh)  # survives an agent restart
            self.overrides, dropped = ovr.reconcile(manifest, self.overrides)
            if dropped:
                log.warning("overrides dropped by the new manifest: %s", "; ".join(dropped))
                self.store.save(manifest.mesh, self.overrides)
            running = {i: inst.spec for i, inst in self.instances.items()}
            desired = desired_instances(manifest, self.overrides.replicas)
            plan = plan_apply(running, desired)
            if self.manifest is None or not same_manifest(self.manifest, manifest):
                self.manifest_generation += 1
            self.manifest = manifest
            self.manifest_record = record or self.manifest_record
            if self.sentinel is not None:
                self.sentinel.set_grace(manifest.agent_grace_s)
            if want is None and old_ingress is not None:
                await old_ingress.stop()
                self.ingress = None
            self.live.launch_new(plan.start, desired)
            if new_ingress is not None:
                self.ingress = new_ingress
                new_ingress.launch()
            self.start_pusher()
            await self.live.retire([self.instances[i] for i in plan.stop])
            rollout_failed = await self.live.roll_all(plan.replace, desired)
            return {
                "mesh": manifest.mesh,
                "generation": self.manifest_generation,
                "started": list(plan.start),
                "replaced": list(plan.replace),
                "changed": list(plan.replace),
                "stopped": list(plan.stop),
                "unchanged": list(plan.keep),
                "instances": list(desired),
                "dropped_overrides": dropped,
                "rollout_failed": rollout_failed,
            }

    # -- stopping -----------------------------------------------------------------------

    async def _stop_instances(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        if not ids:
            return
        await asyncio.gather(*(self.instances[i].stop() for i in ids))
        for i in ids:
            self.instances.pop(i, None)

    async def down(self) -> list[str]:
        """Stop in reverse dependency order: the ingress, then dependants before upstreams."""
        stopped = []
        self.stopping = True  # before the lock: changes queued behind it are refused
        async with self.apply_lock:
            if self.ingress is not None:
                await self.ingress.stop()
                self.ingress = None
                stopped.append(INGRESS_ID)
            if self.manifest is not None:
                for service in reversed(self.manifest.services):
                    ids = [i for i, inst in self.instances.items() if inst.spec.service == service.name]
                    await self._stop_instances(ids)
                    stopped.extend(ids)
            await self._stop_instances(list(self.instances))
            await asyncio.gather(*(inst.stop() for inst in self.live.surges.values()))
            self.live.surges.clear()
            if self._pusher is not None:
                self._pusher.cancel()
                await asyncio.gather(self._pusher, return_exceptions=True)
                self._pusher = None
            meshstate.remove(Path(self.home))  # nothing left to adopt
        return stopped

    def status(self) -> dict:
        return {
            "mesh": self.manifest.mesh if self.manifest else None,
            "config_version": self.config_version,
            "manifest": {"generation": self.manifest_generation, "source": self.manifest.source if self.manifest else None},
            "stopping": self.stopping,
            "ingress": self.ingress.to_json() if self.ingress else None,
            "instances": [i.to_json() for i in self.instances.values()],
            "rolling": sorted(self.live.rolling),
            "without_agent": self.without_agent,
        }

    def service_names(self) -> list[str]:
        return [s.name for s in self.manifest.services] if self.manifest else []


def same_manifest(running: Manifest, new: Manifest) -> bool:
    """Whether `new` asks for what `running` does, wherever each was loaded from."""
    return dataclasses.replace(running, source="") == dataclasses.replace(new, source="")
