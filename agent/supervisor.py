"""The supervisor: runs every instance of the mesh and keeps the sidecars' config current.

Decide, then act: `plan_apply()` compares the running instances with a manifest and says
what to start, stop and replace; `Supervisor.apply()` carries that out. Each instance has
one runner task that owns its processes (start the sidecar, then the app, probe, restart
with backoff), so that no two tasks ever race on one process. Whenever an instance becomes
ready or stops being ready, one pusher task recompiles every sidecar's snapshot and pushes
the ones that changed.

Live changes keep callers whole: a replaced or restarted instance is rolled (`roll()`): a
replacement of the next generation starts beside it, joins the endpoints once ready, then
the old one leaves the endpoints, every sidecar ACKs that, and only then does it stop.
Route and replica overrides (`agent.overrides`) are laid over the manifest when compiling.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from agent import process
from agent.compile import (
    DRAIN_TIMEOUT_S,
    INGRESS_ID,
    Endpoint,
    SidecarIdentity,
    SidecarListeners,
    compile_sidecar,
    identity_of,
)
from agent import overrides as ovr
from agent.errors import AgentError
from agent.identity import IdentityManager
from agent.lifecycle import State, decide_after_exit, describe_exit, transition
from agent.logs import LogBook
from agent.model import Manifest, ServiceSpec, VersionSpec
from agent.probe import ProbeFailed, probe
from agent.sidecar import SidecarError, SidecarHandle

log = logging.getLogger(__name__)

SIDECAR_RESTART_DELAY_S = 0.2


class ApplyError(AgentError):
    """The manifest is valid but cannot run here: a missing binary, a port in use."""

    code = "apply-failed"


class MeshMismatch(AgentError):
    code = "mesh-mismatch"


class RolloutError(AgentError):
    """A replacement never became ready; the instance it was to replace keeps serving."""

    code = "rollout-failed"


class NotConverged(AgentError):
    """A sidecar NACKed a new config or did not ACK it in time."""

    code = "not-converged"


ROLLOUT_READY_TIMEOUT_S = 60.0
CONVERGE_TIMEOUT_S = 15.0
CONVERGE_POLL_S = 0.02


def owner_key(owner: Instance | Ingress) -> str:
    """Whose leaf: each generation of an instance has its own; the ingress has one."""
    return getattr(owner, "endpoint_id", INGRESS_ID)


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
    restart: object
    stop_grace_s: float

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
                    service.egress, service.restart, service.stop_grace_s,
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


def expand_vars(arg: str, env: dict[str, str]) -> str:
    """$NAME and ${NAME} from the instance's environment, as process-compose does."""
    return re.sub(
        r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))",
        lambda m: env.get(m.group(1) or m.group(2), m.group(0)),
        arg,
    )


def resolve_command(argv: tuple[str, ...], cwd: str, path: str) -> str | None:
    """Where argv[0] is, or None: a missing binary is named before anything starts."""
    exe = argv[0]
    if "/" in exe:
        full = exe if os.path.isabs(exe) else os.path.join(cwd, exe)
        return full if os.access(full, os.X_OK) else None
    return shutil.which(exe, path=path)


def load_user_tls(cert_path: str, key_path: str | None) -> dict[str, str]:
    """The user's ingress certificate, checked by loading it the way the sidecar will."""
    with open(cert_path) as fh:
        cert_pem = fh.read()
    with open(key_path or "") as fh:
        key_pem = fh.read()
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_path, key_path)
    return {"cert_pem": cert_pem, "key_pem": key_pem}


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)  # passed explicitly with pass_fds, never leaked to apps
    return sock


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Instance:
    """One app process plus its sidecar, and the runner task that keeps them going."""

    def __init__(self, sup: Supervisor, spec: InstanceSpec, generation: int = 0) -> None:
        self.sup = sup
        self.spec = spec
        self.id = spec.id
        # A replacement runs beside the instance it replaces, so callers tell them apart
        # by the generation in the endpoint id.
        self.generation = generation
        self.endpoint_id = self.id if generation == 0 else f"{self.id}~{generation}"
        self.in_rotation = True  # False while it drains before a stop
        self.state = State.STOPPED
        self.message: str | None = None
        self.app: asyncio.subprocess.Process | None = None
        self.app_port = free_port()
        self.inbound = listening_socket()
        self.outbound = {u: listening_socket() for u in spec.upstreams}
        self.forward = listening_socket() if spec.http_proxy else None
        self.admin = listening_socket()
        self.restarts = 0
        self.quick_crashes = 0
        self.started_at: float | None = None
        self.last_exit: str | None = None
        self.passed_gate = False
        self._stop = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.sidecar = SidecarHandle(
            f"{self.id}.sidecar", None, self._fds(), sup.logbook, sup.sentinel, sup.base_env(), sup.home
        )
        self.sidecar.on_message = sup.sidecar_message

    def _fds(self) -> tuple[int, ...]:
        fds = [self.inbound.fileno(), self.admin.fileno(), *(s.fileno() for s in self.outbound.values())]
        if self.forward is not None:
            fds.append(self.forward.fileno())
        return tuple(fds)

    @property
    def inbound_port(self) -> int:
        return self.inbound.getsockname()[1]

    def listeners(self) -> SidecarListeners:
        return SidecarListeners(
            inbound_fd=self.inbound.fileno(),
            app_port=self.app_port,
            outbound_fds=tuple((u, s.fileno()) for u, s in self.outbound.items()),
            forward_fd=self.forward.fileno() if self.forward is not None else None,
            admin_fd=self.admin.fileno(),
        )

    def identity(self) -> SidecarIdentity:
        return SidecarIdentity(self.id, self.spec.service, self.spec.version.name, self.spec.upstreams)

    def set_state(self, new: State, message: str | None = None) -> None:
        old = self.state
        self.state = transition(self.state, new)
        self.message = message
        if old is not new:
            log.info("%s: %s -> %s%s", self.id, old.value, new.value, f" ({message})" if message else "")
            self.sup.state_changed()

    def app_env(self) -> dict[str, str]:
        env = self.sup.base_env()
        env.update(self.spec.version.env)
        env.update(
            PORT=str(self.app_port),
            MESH_NAME=self.sup.manifest.mesh if self.sup.manifest else "",
            MESH_SERVICE=self.spec.service,
            MESH_VERSION=self.spec.version.name,
            MESH_REPLICA=str(self.spec.replica),
            MESH_INSTANCE=self.id,
        )
        for upstream, sock in self.outbound.items():
            env[f"{env_name(upstream)}_URL"] = f"http://127.0.0.1:{sock.getsockname()[1]}"
        if self.forward is not None:
            proxy = f"http://127.0.0.1:{self.forward.getsockname()[1]}"
            env.update(HTTP_PROXY=proxy, http_proxy=proxy, NO_PROXY="", no_proxy="")
        return env

    def argv(self, env: dict[str, str]) -> list[str]:
        return [expand_vars(arg, env) for arg in self.spec.version.command]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "service": self.spec.service,
            "version": self.spec.version.name,
            "replica": self.spec.replica,
            "state": "stopped" if self.state is State.STOPPING else self.state.value,
            "pid": self.app.pid if self.app is not None and self.app.returncode is None else None,
            "sidecar_pid": self.sidecar.pid,
            "port": self.app_port,
            "inbound_port": self.inbound_port,
            "outbound_ports": {u: s.getsockname()[1] for u, s in self.outbound.items()},
            "admin_port": self.admin.getsockname()[1],
            "restarts": self.restarts,
            "started_at": self.started_at,
            "last_exit": self.last_exit,
            "message": self.message,
            "config_version": self.sidecar.acked_version,
            "generation": self.generation,
        }

    # -- the runner -------------------------------------------------------------------

    def launch(self) -> None:
        self.set_state(State.STARTING, "waiting for upstreams" if self.spec.upstreams else None)
        self.task = asyncio.create_task(self._run(), name=f"instance:{self.id}")

    async def _run(self) -> None:
        try:
            await self._gate()
            while not self._stop.is_set():
                outcome = await self._run_once()
                if outcome == "stop":
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not take the agent down with it
            log.error("%s: runner failed", self.id, exc_info=True)
            self.set_state(State.FAILED, f"internal error: {exc}")

    async def _gate(self) -> None:
        """Dependency order: start once every instance of every upstream is ready."""
        if self.passed_gate:
            return
        while not self._stop.is_set():
            waiting = self.sup.unready_upstreams(self.spec.upstreams)
            if not waiting:
                break
            self.message = "waiting for " + ", ".join(waiting)
            await self.sup.wait_state_change()
        self.passed_gate = True

    async def _run_once(self) -> str:
        self.set_state(State.STARTING)
        if not self.sidecar.running:
            try:
                await self.sup.start_sidecar(self.sidecar, self)
            except SidecarError as exc:
                return await self._crashed(None, 0.0, f"sidecar: {exc}")
        env = self.app_env()
        started = time.monotonic()
        try:
            self.app = await process.spawn(
                self.argv(env), cwd=self.spec.version.workdir, env=env, log_fd=None, sentinel=self.sup.sentinel
            )
        except OSError as exc:
            self.set_state(State.FAILED, f"cannot start {self.spec.version.command[0]!r}: {exc.strerror or exc}")
            await self._stop.wait()
            return "stop"
        self.started_at = time.time()
        assert self.app.stdout is not None
        pump = asyncio.create_task(self.sup.logbook.pump(self.app.stdout, self.id, self.id), name=f"log:{self.id}")
        app_exit = asyncio.create_task(self.app.wait(), name=f"wait:{self.id}")
        stop = asyncio.create_task(self._stop.wait(), name=f"stop:{self.id}")
        try:
            ready = await self._probe_until_ready(app_exit, stop)
            if ready:
                self.set_state(State.READY)
            while True:
                sidecar_exit = asyncio.create_task(self.sidecar.wait(), name=f"sidecar-wait:{self.id}")
                done, _ = await asyncio.wait({app_exit, stop, sidecar_exit}, return_when=asyncio.FIRST_COMPLETED)
                if sidecar_exit in done and not stop.done() and not app_exit.done():
                    await self._restart_sidecar(sidecar_exit.result())
                    continue
                sidecar_exit.cancel()
                break
        finally:
            stop.cancel()
        if self._stop.is_set():
            app_exit.cancel()
            await asyncio.gather(app_exit, return_exceptions=True)
            return "stop"
        code = app_exit.result()
        await asyncio.wait({pump}, timeout=1.0)
        # Whatever the app left behind in its group goes with it before the next start.
        process.signal_group(self.app.pid, signal.SIGKILL)
        self.sup.sentinel_unregister(self.app.pid)
        return await self._crashed(code, time.monotonic() - started, describe_exit(code))

    async def _probe_until_ready(self, app_exit: asyncio.Task, stop: asyncio.Task) -> bool:
        health = self.spec.version.health
        last_error = "not probed yet"
        while not app_exit.done() and not stop.done():
            try:
                await probe(self.app_port, health)
                return True
            except ProbeFailed as exc:
                last_error = str(exc)
                self.message = f"not ready: {last_error}"
            await asyncio.wait({app_exit, stop}, timeout=health.period_s)
        return False

    async def _restart_sidecar(self, code: int) -> None:
        self.restarts += 1
        log.warning("%s: sidecar %s; restarting it", self.id, describe_exit(code))
        self.set_state(State.STARTING, f"sidecar {describe_exit(code)}; restarting it")
        await asyncio.wait({asyncio.ensure_future(self._stop.wait())}, timeout=SIDECAR_RESTART_DELAY_S)
        if self._stop.is_set():
            return
        try:
            await self.sup.start_sidecar(self.sidecar, self)
        except SidecarError as exc:
            self.message = f"sidecar: {exc}"
            return
        self.set_state(State.READY)

    async def _crashed(self, code: int | None, ran_for: float, reason: str) -> str:
        self.last_exit = reason
        decision = decide_after_exit(self.spec.restart, code, ran_for, self.quick_crashes)
        self.quick_crashes = decision.quick_crashes
        self.set_state(decision.state, decision.reason)
        if decision.state is State.FAILED:
            await self._stop.wait()
            return "stop"
        try:
            await asyncio.wait_for(self._stop.wait(), decision.delay_s)
            return "stop"
        except asyncio.TimeoutError:
            self.restarts += 1
            return "again"

    async def stop(self, drain_inbound: bool = False) -> None:
        """Stop the app, then its sidecar (so in-flight calls drain), then close the ports.

        `drain_inbound` is for an instance no caller routes to any more: its sidecar goes
        first, finishing the requests it still has in flight to the app, then the app.
        """
        self._stop.set()
        if self.state is not State.STOPPED:
            self.set_state(State.STOPPING)
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
        if drain_inbound:
            await self.sidecar.stop(DRAIN_TIMEOUT_S + 1.0)
        if self.app is not None:
            await process.stop_process(self.app, self.spec.stop_grace_s, self.sup.sentinel)
        await self.sidecar.stop(DRAIN_TIMEOUT_S + 1.0)
        for sock in (self.inbound, self.admin, *self.outbound.values(), *([self.forward] if self.forward else [])):
            sock.close()
        self.set_state(State.STOPPED)


class Ingress:
    """The ingress: a sidecar with no app, listening where the manifest says."""

    def __init__(self, sup: Supervisor, host: str, port: int) -> None:
        self.sup = sup
        try:
            self.sock = listening_socket(host, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ApplyError(
                    f"ingress.port {port}: address {host}:{port} is already in use; "
                    "stop what uses it or choose another port in the manifest"
                ) from None
            raise ApplyError(f"ingress: cannot listen on {host}:{port}: {exc.strerror}") from None
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.admin = listening_socket()
        self.sidecar = SidecarHandle(
            "ingress.sidecar", None, (self.sock.fileno(), self.admin.fileno()), sup.logbook, sup.sentinel, sup.base_env(), sup.home
        )
        self.sidecar.on_message = sup.sidecar_message
        self.user_tls: dict[str, str] | None = None  # the user's certificate for outside clients
        self.ready = False
        self.task: asyncio.Task | None = None

    def listeners(self) -> SidecarListeners:
        return SidecarListeners(ingress_fd=self.sock.fileno(), admin_fd=self.admin.fileno())

    def identity(self) -> SidecarIdentity:
        return SidecarIdentity(INGRESS_ID, None, None)

    def launch(self) -> None:
        self.task = asyncio.create_task(self._run(), name="ingress")

    async def _run(self) -> None:
        while True:
            try:
                await self.sup.start_sidecar(self.sidecar, self)
            except SidecarError as exc:
                log.error("ingress: %s", exc)
            else:
                self.ready = True
                self.sup.state_changed()
                code = await self.sidecar.wait()
                log.warning("ingress sidecar %s; restarting it", describe_exit(code))
            self.ready = False
            self.sup.state_changed()
            await asyncio.sleep(SIDECAR_RESTART_DELAY_S)  # a restart delay, not synchronisation

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.sidecar.stop(DRAIN_TIMEOUT_S + 1.0)
        self.sock.close()
        self.admin.close()
        self.ready = False

    def to_json(self) -> dict:
        return {"host": self.host, "port": self.port, "ready": self.ready, "sidecar_pid": self.sidecar.pid,
                "admin_port": self.admin.getsockname()[1]}


class Supervisor:
    def __init__(self, home: str, logbook: LogBook, sentinel: process.Sentinel | None) -> None:
        self.home = home
        self.logbook = logbook
        self.sentinel = sentinel
        self.manifest: Manifest | None = None
        self.instances: dict[str, Instance] = {}
        self.ingress: Ingress | None = None
        self.config_version = 0
        self._changed = asyncio.Condition()
        self._push_needed = asyncio.Event()
        self._pusher: asyncio.Task | None = None
        self._apply_lock = asyncio.Lock()
        self.store = ovr.OverrideStore(home)
        self.overrides = ovr.MeshOverrides()
        # Traffic keys pushed as they are, without validation: only for the debug op that
        # tests the NACK path. Never persisted.
        self.unchecked_traffic: dict[str, dict] = {}
        self.surges: dict[str, Instance] = {}  # replacements starting beside an instance
        self.identities: IdentityManager | None = None  # the CA and every sidecar's leaf
        self.rolling: set[str] = set()
        # Where sidecars' observability messages go (agent.observability sets it).
        self.on_sidecar_message: Callable[[dict], None] | None = None

    def sidecar_message(self, message: dict) -> None:
        if self.on_sidecar_message is not None:
            self.on_sidecar_message(message)

    # -- shared helpers used by instances ---------------------------------------------

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in [k for k in env if k.startswith("MESHCTL_")]:
            env.pop(key)
        # Commands like `python app.py` run with meshctl's own Python first on PATH.
        bindir = os.path.dirname(sys.executable)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", os.defpath)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def sentinel_unregister(self, pid: int) -> None:
        if self.sentinel is not None:
            self.sentinel.unregister(pid)

    def state_changed(self) -> None:
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
        return self.config_version

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(i.endpoint_id, i.spec.service, i.spec.version.name, i.inbound_port)
            for i in [*self.instances.values(), *self.surges.values()]
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
                leaf=self._leaf(owner), ingress_tls=getattr(owner, "user_tls", None),
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
        await handle.start(self.next_version(), self.snapshot_for(owner))

    # -- config push ------------------------------------------------------------------

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
                live = {owner_key(o) for o in [*self.instances.values(), *self.surges.values()]}
                self.identities.prune(live | {INGRESS_ID})

    async def push_all(self) -> list[str]:
        """Recompile every sidecar's snapshot; push those that changed. Returns failures."""
        if self.manifest is None:
            return []
        owners: list[Instance | Ingress] = [i for i in self.sidecar_owners() if i.sidecar.running]
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
                elif resolve_command(version.command, version.workdir, path) is None:
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

    async def apply(self, manifest: Manifest) -> dict:
        async with self._apply_lock:
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
            if ingress_changed:
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
            self.manifest = manifest
            if want is None and old_ingress is not None:
                await old_ingress.stop()
                self.ingress = None
            self._launch_new(plan.start, desired)
            if new_ingress is not None:
                self.ingress = new_ingress
                new_ingress.launch()
            if self._pusher is None:
                self._pusher = asyncio.create_task(self._push_loop(), name="config-pusher")
            self._push_needed.set()
            await self._retire([self.instances[i] for i in plan.stop])
            rollout_failed = await self._roll_all(plan.replace, desired)
            return {
                "mesh": manifest.mesh,
                "started": list(plan.start),
                "replaced": list(plan.replace),
                "changed": list(plan.replace),
                "stopped": list(plan.stop),
                "unchanged": list(plan.keep),
                "instances": list(desired),
                "dropped_overrides": dropped,
                "rollout_failed": rollout_failed,
            }

    # -- live changes: rolling, draining, converging ------------------------------------

    def sidecar_owners(self) -> list[Instance]:
        return [*self.instances.values(), *self.surges.values()]

    def sidecars(self) -> list[tuple[str, SidecarHandle]]:
        """(the id shown to users, handle) of every sidecar: instances, replacements, ingress."""
        named = [(i.id, i.sidecar) for i in self.instances.values()]
        named += [(i.endpoint_id, i.sidecar) for i in self.surges.values()]
        if self.ingress is not None:
            named.append((INGRESS_ID, self.ingress.sidecar))
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
        await self.push_all()
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
                await asyncio.wait_for(self.wait_state_change(), remaining)
            except asyncio.TimeoutError:
                pass

    async def roll(self, iid: str, spec: InstanceSpec) -> None:
        """Replace instance `iid` with one running `spec`, never leaving callers without it."""
        old = self.instances[iid]
        new = Instance(self, spec, old.generation + 1)
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
        self.instances[iid] = new  # same key: keeps its place in dependency order
        await self._retire([old])

    async def _retire(self, instances: list[Instance]) -> None:
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
            if self.instances.get(inst.id) is inst:
                self.instances.pop(inst.id)

    async def _roll_all(self, ids: Iterable[str], desired: dict[str, InstanceSpec]) -> list[str]:
        failures = []
        for iid in ids:  # dependency order: upstreams are replaced before their callers
            try:
                await self.roll(iid, desired[iid])
            except RolloutError as exc:
                log.warning("%s", exc)
                failures.append(str(exc))
        return failures

    def _launch_new(self, ids: Iterable[str], desired: dict[str, InstanceSpec]) -> None:
        for iid in ids:
            self.instances[iid] = Instance(self, desired[iid])
        # Keep dict order = dependency order, so status lists upstreams first.
        order = [i for i in desired if i in self.instances]
        self.instances = {i: self.instances[i] for i in [*order, *(i for i in self.instances if i not in desired)]}
        for iid in ids:
            self.instances[iid].launch()

    # -- overrides ----------------------------------------------------------------------

    def require_manifest(self) -> Manifest:
        if self.manifest is None:
            raise AgentError("no mesh is running; run `meshctl up -f mesh.yaml`")
        return self.manifest

    async def set_overrides(self, new: ovr.MeshOverrides, service: str, wait: bool = True) -> dict:
        """Make `new` the live overrides, persist them, push; with `wait`, until ACKed."""
        manifest = self.require_manifest()
        self.overrides = new
        self.store.save(manifest.mesh, new)
        return await self.push_routes(service, wait)

    async def push_routes(self, service: str, wait: bool) -> dict:
        if not wait:
            self._push_needed.set()
            return {"service": service, "version": None, "sidecars": [], "problems": []}
        problems = await self.converge(service)
        routing = self.routing_sidecars(service)
        version = max((h.pushed_version for _, h in routing), default=self.config_version)
        return {"service": service, "version": version, "sidecars": [n for n, _ in routing], "problems": problems}

    async def scale(self, service: str, version: str, count: int) -> dict:
        async with self._apply_lock:
            manifest = self.require_manifest()
            new = ovr.with_replicas(self.overrides, manifest, service, version, count)
            self.overrides = new
            self.store.save(manifest.mesh, new)
            desired = desired_instances(manifest, new.replicas)
            plan = plan_apply({i: inst.spec for i, inst in self.instances.items()}, desired)
            self._launch_new(plan.start, desired)
            for iid in plan.start:
                await self._wait_ready(self.instances[iid], ROLLOUT_READY_TIMEOUT_S)
            await self.converge()
            await self._retire([self.instances[i] for i in plan.stop])
            return {"service": service, "version": version, "replicas": count,
                    "started": list(plan.start), "stopped": list(plan.stop)}

    async def restart(self, service: str, version: str | None) -> dict:
        async with self._apply_lock:
            manifest = self.require_manifest()
            spec = ovr.service_spec(manifest, service)
            if version is not None:
                ovr.check_version(spec, version)
            ids = [iid for iid, inst in self.instances.items()
                   if inst.spec.service == service and version in (None, inst.spec.version.name)]
            for iid in ids:
                await self.roll(iid, self.instances[iid].spec)
            return {"restarted": ids}

    def proxy_status(self) -> list[dict]:
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
        async with self._apply_lock:
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
            await asyncio.gather(*(inst.stop() for inst in self.surges.values()))
            self.surges.clear()
            if self._pusher is not None:
                self._pusher.cancel()
                await asyncio.gather(self._pusher, return_exceptions=True)
                self._pusher = None
        return stopped

    def status(self) -> dict:
        return {
            "mesh": self.manifest.mesh if self.manifest else None,
            "config_version": self.config_version,
            "ingress": self.ingress.to_json() if self.ingress else None,
            "instances": [i.to_json() for i in self.instances.values()],
            "rolling": sorted(self.rolling),
        }

    def service_names(self) -> list[str]:
        return [s.name for s in self.manifest.services] if self.manifest else []

    def services_of(self, spec: ServiceSpec) -> list[Instance]:
        return [i for i in self.instances.values() if i.spec.service == spec.name]
