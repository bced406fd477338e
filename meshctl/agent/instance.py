"""One instance (an app and its sidecar) and the ingress, each with the task that runs it.

An `Instance` owns its listening sockets (so ports survive restarts), its app process and
its sidecar, and one runner task: start the sidecar, then the app, probe until ready,
restart with backoff after a crash, restart the sidecar alone if only it died. The
supervisor decides which instances exist; an instance decides nothing about the others,
and sees of the supervisor only the `InstanceHost` it is given.
"""

from __future__ import annotations

import asyncio
import socket
import errno
import logging
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from meshctl.agent import process
from meshctl.agent.compile import (
    DRAIN_TIMEOUT_S,
    INGRESS_ID,
    SidecarIdentity,
    SidecarListeners,
    mtls_mode,
)
from meshctl.agent.errors import ApplyError
from meshctl.agent.lifecycle import State, decide_after_exit, describe_exit, transition
from meshctl.agent.logs import LogBook
from meshctl.agent.model import Manifest
from meshctl.agent.plan import InstanceSpec, env_name
from meshctl.agent.ports import bound_port, free_port, listening_socket, port_is_free, prepare_socket_path
from meshctl.agent.probe import ProbeFailed, probe
from meshctl.agent.sidecar import SidecarError, SidecarHandle

log = logging.getLogger("agent.supervisor")

SIDECAR_RESTART_DELAY_S = 0.2
SIDECAR_STABLE_S = 10.0  # a sidecar restart sooner than this after the last one is a crash loop
LOOPBACK_NO_PROXY = "127.0.0.1,localhost,::1"


class InstanceHost(Protocol):
    """What an instance and the ingress use of the supervisor that runs them."""

    @property
    def home(self) -> str: ...
    @property
    def logbook(self) -> LogBook: ...
    @property
    def sentinel(self) -> process.Sentinel | None: ...
    @property
    def manifest(self) -> Manifest | None: ...

    def base_env(self) -> dict[str, str]: ...
    def sidecar_message(self, message: dict) -> None: ...
    def sentinel_unregister(self, pid: int) -> None: ...
    def state_changed(self) -> None: ...
    def persist(self) -> None: ...
    def unready_upstreams(self, upstreams: Iterable[str]) -> list[str]: ...
    async def wait_state_change(self) -> None: ...
    async def start_sidecar(self, handle: SidecarHandle, owner: Instance | Ingress) -> None: ...


def owner_key(owner: Instance | Ingress) -> str:
    """Whose leaf: each generation of an instance has its own; the ingress has one."""
    return owner.endpoint_id if isinstance(owner, Instance) else INGRESS_ID


class Instance:
    """One app process plus its sidecar, and the runner task that keeps them going."""

    def __init__(
        self, sup: InstanceHost, spec: InstanceSpec, generation: int = 0, held: dict[str, socket.socket] | None = None
    ) -> None:
        """`held`: listening sockets by `sockets()` name, kept from a crashed agent's instance."""
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
        self.app: asyncio.subprocess.Process | process.AdoptedProcess | None = None
        self.app_port = free_port()
        # `listen: unix`: the app's socket in the private state directory instead of a port.
        self.app_socket = str(Path(sup.home) / "sockets" / f"{self.endpoint_id}.sock") if spec.listen == "unix" else None
        held = held or {}
        self.inbound = held.get("inbound") or listening_socket()
        self.outbound = {u: held.get(f"outbound:{u}") or listening_socket() for u in spec.upstreams}
        self.forward = (held.get("forward") or listening_socket()) if spec.http_proxy else None
        self.admin = held.get("admin") or listening_socket()
        self.restarts = 0
        self.quick_crashes = 0
        self.started_at: float | None = None
        self.last_exit: str | None = None
        self.passed_gate = False
        self.last_sidecar_restart = -SIDECAR_STABLE_S
        self._stop = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.sidecar = SidecarHandle(
            f"{self.id}.sidecar", None, self._fds(), sup.logbook, sup.sentinel, sup.base_env(), sup.home
        )
        self.sidecar.on_message = sup.sidecar_message

    def sockets(self) -> dict[str, socket.socket]:
        """The sidecar's listening sockets by name, in the order they are passed to it."""
        named = {"inbound": self.inbound, "admin": self.admin}
        named.update({f"outbound:{u}": sock for u, sock in self.outbound.items()})
        if self.forward is not None:
            named["forward"] = self.forward
        return named

    def _fds(self) -> tuple[int, ...]:
        return tuple(sock.fileno() for sock in self.sockets().values())

    @property
    def inbound_port(self) -> int:
        return bound_port(self.inbound)

    def listeners(self) -> SidecarListeners:
        fd = self.sidecar.fd_in_sidecar
        return SidecarListeners(
            inbound_fd=fd(self.inbound.fileno()),
            app_port=self.app_port,
            app_socket=self.app_socket,
            outbound_fds=tuple((u, fd(s.fileno())) for u, s in self.outbound.items()),
            forward_fd=fd(self.forward.fileno()) if self.forward is not None else None,
            admin_fd=fd(self.admin.fileno()),
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
        if self.app_socket is not None:
            env["MESH_SOCKET"] = self.app_socket
        else:
            env["PORT"] = str(self.app_port)
        env.update(
            MESH_NAME=self.sup.manifest.mesh if self.sup.manifest else "",
            MESH_SERVICE=self.spec.service,
            MESH_VERSION=self.spec.version.name,
            MESH_REPLICA=str(self.spec.replica),
            MESH_INSTANCE=self.id,
        )
        for upstream, sock in self.outbound.items():
            env[f"{env_name(upstream)}_URL"] = f"http://127.0.0.1:{bound_port(sock)}"
        if self.forward is not None:
            proxy = f"http://127.0.0.1:{bound_port(self.forward)}"
            # The *_URL point at this sidecar's own loopback ports: reached directly, never
            # through the proxy (which would refuse 127.0.0.1 as neither a service nor egress).
            env.update(HTTP_PROXY=proxy, http_proxy=proxy, NO_PROXY=LOOPBACK_NO_PROXY, no_proxy=LOOPBACK_NO_PROXY)
        return env

    def argv(self, env: dict[str, str]) -> list[str]:
        return [process.expand_vars(arg, env) for arg in self.spec.version.command]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "service": self.spec.service,
            "version": self.spec.version.name,
            "replica": self.spec.replica,
            "state": "stopped" if self.state is State.STOPPING else self.state.value,
            "pid": self.app.pid if self.app is not None and self.app.returncode is None else None,
            "sidecar_pid": self.sidecar.pid,
            "port": self.app_port if self.app_socket is None else None,
            "socket": self.app_socket,
            "inbound_port": self.inbound_port,
            "outbound_ports": {u: bound_port(s) for u, s in self.outbound.items()},
            "admin_port": bound_port(self.admin),
            "restarts": self.restarts,
            "started_at": self.started_at,
            "last_exit": self.last_exit,
            "message": self.message,
            "config_version": self.sidecar.acked_version,
            "mtls": self._mtls_mode(),
            "generation": self.generation,
        }

    def _mtls_mode(self) -> str | None:
        """How callers reach this instance: strict, permissive or off (None if no longer in the manifest)."""
        manifest = self.sup.manifest
        if manifest is None:
            return None
        try:
            return mtls_mode(manifest, manifest.service(self.spec.service))
        except KeyError:
            return None

    # -- the runner -------------------------------------------------------------------

    def launch(self) -> None:
        self.set_state(State.STARTING, "waiting for upstreams" if self.spec.upstreams else None)
        self.task = asyncio.create_task(self._run(), name=f"instance:{self.id}")

    def resume(self, started_monotonic: float) -> None:
        """Supervise an app adopted from a crashed agent (`self.app`, running) as if we had
        started it at `started_monotonic`: restarted per its policy when it exits."""
        self.passed_gate = True
        self.task = asyncio.create_task(self._run(started_monotonic), name=f"instance:{self.id}")

    async def _run(self, resumed_from: float | None = None) -> None:
        try:
            await self._gate()
            if resumed_from is not None and await self._supervise(resumed_from) == "stop":
                return
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
        # The app binds $PORT itself, so the port is only reserved while the app holds it:
        # between a crash and the restart (or before the first start) any process, even a
        # client's ephemeral source port, can take it, and every restart would then fail
        # the same way. The sidecar's listeners are fixed for its life, so a running one is
        # restarted with the new app address (the agent holds its listening sockets, and
        # with the app down it has nothing in flight worth draining).
        if self.app_socket is not None:
            problem = prepare_socket_path(self.app_socket)
            if problem is not None:
                self.set_state(State.FAILED, problem)
                await self._stop.wait()
                return "stop"
        elif not port_is_free(self.app_port):
            old, self.app_port = self.app_port, free_port()
            log.warning("%s: port %d is taken by another process; the app gets port %d", self.id, old, self.app_port)
            if self.sidecar.running:
                await self.sidecar.stop(grace_s=1.0)
        try:
            if not self.sidecar.running:
                await self.sup.start_sidecar(self.sidecar, self)
        except SidecarError as exc:
            return await self._crashed(None, 0.0, f"sidecar: {exc}")
        env = self.app_env()
        started = time.monotonic()
        try:
            self.app = await process.spawn(
                self.argv(env), cwd=self.spec.version.workdir, env=env,
                log_file=str(self.sup.logbook.path(self.id)), sentinel=self.sup.sentinel,
            )
        except OSError as exc:
            self.set_state(State.FAILED, f"cannot start {self.spec.version.command[0]!r}: {exc.strerror or exc}")
            await self._stop.wait()
            return "stop"
        self.started_at = time.time()
        self.sup.persist()
        return await self._supervise(started)

    async def _supervise(self, started: float) -> str:
        """Wait for the running app (started at monotonic `started`) to be ready, then to
        exit or be stopped; restart its sidecar alone if only that dies."""
        assert self.app is not None and self.app.stdout is not None
        pump = asyncio.create_task(self.sup.logbook.pump(self.app.stdout, self.id, self.id), name=f"log:{self.id}")
        app_exit = asyncio.create_task(self.app.wait(), name=f"wait:{self.id}")
        stop = asyncio.create_task(self._stop.wait(), name=f"stop:{self.id}")
        try:
            ready = self.state is State.READY or await self._probe_until_ready(app_exit, stop)
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
                await probe(self.app_socket or self.app_port, health)
                return True
            except ProbeFailed as exc:
                last_error = str(exc)
                self.message = f"not ready: {last_error}"
            await asyncio.wait({app_exit, stop}, timeout=health.period_s)
        return False

    async def _restart_sidecar(self, code: int | None) -> None:
        """Only the sidecar died: the app keeps running and callers keep this endpoint.

        The agent holds the sidecar's listening sockets, so new connections wait in the
        kernel's backlog until the new sidecar accepts them; dropping the endpoint instead
        would turn a half-second restart into a burst of fast 503s for a single replica.
        """
        self.restarts += 1
        now = time.monotonic()
        crash_loop = now - self.last_sidecar_restart < SIDECAR_STABLE_S
        self.last_sidecar_restart = now
        self.message = f"sidecar {describe_exit(code)}; restarting it"
        log.warning("%s: sidecar %s; restarting it", self.id, describe_exit(code))
        if crash_loop:  # a sidecar that keeps dying is restarted with a pause, not in a spin
            try:
                async with asyncio.timeout(SIDECAR_RESTART_DELAY_S):
                    await self._stop.wait()
                return
            except TimeoutError:
                pass
        try:
            await self.sup.start_sidecar(self.sidecar, self)
        except SidecarError as exc:
            # Now it really cannot serve: out of the endpoints until a start succeeds.
            self.set_state(State.STARTING, f"sidecar: {exc}")
            return
        self.message = None
        if self.state is not State.READY:
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

    def __init__(self, sup: InstanceHost, host: str, port: int, held: dict[str, socket.socket] | None = None) -> None:
        """`held`: the listening sockets by `sockets()` name, kept from a crashed agent's ingress."""
        self.sup = sup
        held = held or {}
        try:
            self.sock = held.get("ingress") or listening_socket(host, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ApplyError(
                    f"ingress.port {port}: address {host}:{port} is already in use; "
                    "stop what uses it or choose another port in the manifest"
                ) from None
            raise ApplyError(f"ingress: cannot listen on {host}:{port}: {exc.strerror}") from None
        self.host = host
        self.port = bound_port(self.sock)
        self.admin = held.get("admin") or listening_socket()
        self.sidecar = SidecarHandle(
            "ingress.sidecar", None, (self.sock.fileno(), self.admin.fileno()), sup.logbook, sup.sentinel, sup.base_env(), sup.home
        )
        self.sidecar.on_message = sup.sidecar_message
        self.user_tls: dict[str, str] | None = None  # the user's certificate for outside clients
        self.ready = False
        self.task: asyncio.Task | None = None

    def sockets(self) -> dict[str, socket.socket]:
        return {"ingress": self.sock, "admin": self.admin}

    def listeners(self) -> SidecarListeners:
        fd = self.sidecar.fd_in_sidecar
        return SidecarListeners(ingress_fd=fd(self.sock.fileno()), admin_fd=fd(self.admin.fileno()))

    def identity(self) -> SidecarIdentity:
        return SidecarIdentity(INGRESS_ID, None, None)

    def launch(self, adopted: bool = False) -> None:
        """Run the sidecar; `adopted`: it already runs, taken over from a crashed agent."""
        self.task = asyncio.create_task(self._run(adopted), name="ingress")

    async def _run(self, adopted: bool) -> None:
        while True:
            try:
                if not adopted:
                    await self.sup.start_sidecar(self.sidecar, self)
                adopted = False
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
                "admin_port": bound_port(self.admin)}
