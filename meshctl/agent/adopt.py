"""A new agent re-adopts the mesh a crashed agent's sentinel keeps serving.

`take_over()` (before the agent serves, holding agent.lock, so no second agent can
adopt the same mesh) reads the crashed agent's record (agent.meshstate), finds the
sentinel keeping the mesh and asks it, over keeper.sock, for a copy of every fd it holds:
each group's stdout pipe and config channel and each sidecar's listening sockets. From
then on that sentinel follows the new agent, its grace timer stopped.

`adopt()` then rebuilds the supervisor around the running processes: each app and
sidecar whose pid is still the process the record names (pid and create time, checked
through a pidfd opened first, so a reused pid is never adopted) is taken over as it is,
with the same ports, its log read from the same pipe, its config channel reconnected;
supervision resumes (an adopted app that exits is restarted per its restart policy,
noticed through its pidfd, its exit status unknown: it is not our child). A process that
died meanwhile is started again with the ports it had. The config version continues
from the record, route overrides and the CA come from their files, each sidecar's leaf
from the record, and the first push (a new version) reaches every sidecar. Any process
group the sentinel held that is not adopted (a replacement half way through a rollout,
or one started after the record was last written) is stopped once callers no longer
route to it, never orphaned.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from meshctl.agent import meshstate, process
from meshctl.agent.identity import IdentityManager
from meshctl.agent.instance import Ingress, Instance
from meshctl.agent.lifecycle import State
from meshctl.agent.manifest import parse_manifest
from meshctl.agent.plan import desired_instances
from meshctl.agent.logs import LogBook
from meshctl.agent.sentinel import (
    KEEPER_SOCKET,
    MAX_FDS,
    MAX_MESSAGE,
    STOP_GRACE_S,
    group_alive,
    kept_sentinels,
)
from meshctl.agent.supervisor import Supervisor

log = logging.getLogger(__name__)

POLL_S = 0.05
# Within the CLI's 10 s wait for a new agent to answer: a sidecar that does not ACK by
# then shows STALE in `proxy-status` and gets the next push.
ADOPT_CONVERGE_TIMEOUT_S = 5.0
CREATE_TIME_TOLERANCE_S = 0.005  # create times are in clock ticks (10 ms): the same process or another


@dataclass
class HeldGroup:
    """The fds the sentinel handed over for one process group: `drained` (stdout pipe
    first, then a sidecar's config channel) and `held` (a sidecar's listening sockets)."""

    pgid: int
    drained: list[int]
    held: list[int]

    def close(self) -> None:
        for fd in [*self.drained, *self.held]:
            with suppress(OSError):
                os.close(fd)
        self.drained, self.held = [], []


@dataclass
class Handover:
    record: dict[str, Any]
    sentinel_pid: int
    conn: socket.socket
    without_agent_s: float
    groups: dict[int, HeldGroup] = field(default_factory=dict)


class AdoptionFailed(Exception):
    pass


def take_over(home: Path, timeout_s: float) -> Handover | None:
    """Take the mesh over from the sentinel keeping it; None if there is none to adopt
    (no crashed agent's record, or none of its sentinel), raises AdoptionFailed if there
    is one but it cannot be adopted (the caller stops it then)."""
    record = meshstate.load(home)
    sentinels = list(kept_sentinels(home))
    if not sentinels:
        if record is not None:
            meshstate.remove(home)  # its mesh is gone: stopped by the grace, or by hand
        return None
    if record is None or len(sentinels) != 1 or record.get("sentinel_pid") != sentinels[0].pid:
        raise AdoptionFailed("no record of the mesh the sentinel keeps")
    conn = connect_keeper(home, sentinels[0], time.monotonic() + timeout_s)
    try:
        conn.settimeout(timeout_s)
        conn.sendall(b"adopt")
        handover = Handover(record, sentinels[0].pid, conn, 0.0)
        while True:
            message, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, MAX_FDS)
            head, *rest = message.decode(errors="replace").split()
            if head == "group" and len(rest) == 2:
                pgid, drained = int(rest[0]), int(rest[1])
                handover.groups[pgid] = HeldGroup(pgid, fds[:drained], fds[drained:])
            elif head == "adopted" and len(rest) == 1:
                handover.without_agent_s = float(rest[0])
                conn.settimeout(None)
                return handover
            else:
                raise AdoptionFailed(f"the sentinel said {message[:80]!r}")
    except (OSError, ValueError) as exc:
        conn.close()
        raise AdoptionFailed(f"the handover from the sentinel failed: {exc}") from None


def connect_keeper(home: Path, sentinel: psutil.Process, give_up_at: float) -> socket.socket:
    """Connect to keeper.sock; a sentinel that has just seen its agent die is waited for."""
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.connect(str(home / KEEPER_SOCKET))
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
        if time.monotonic() > give_up_at or not sentinel.is_running():
            raise AdoptionFailed("the sentinel keeping the mesh did not answer on keeper.sock")
        time.sleep(POLL_S)  # polling interval of a deadline loop


def open_same_process(identity: dict[str, Any] | None) -> int | None:
    """A pidfd on the process `identity` names, None if it is gone or its pid is another's now."""
    if not identity:
        return None
    try:
        pidfd = os.pidfd_open(int(identity["pid"]))
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        return None
    try:
        proc = psutil.Process(int(identity["pid"]))
        # The pidfd is opened first: if the create time matches now, the pidfd is that process.
        if abs(proc.create_time() - float(identity["created"])) < CREATE_TIME_TOLERANCE_S and \
                proc.status() != psutil.STATUS_ZOMBIE:
            return pidfd
    except (psutil.Error, KeyError, ValueError, TypeError):
        pass
    os.close(pidfd)
    return None


class Adopter:
    """Rebuilds one supervisor from a handover; see the module docstring."""

    def __init__(self, sup: Supervisor, handover: Handover) -> None:
        self.sup = sup
        self.handover = handover
        self.adopted: set[int] = set()  # pgids now ours

    async def process(self, identity: dict[str, Any] | None) -> process.AdoptedProcess | None:
        """The running process of `identity`, with its stdout, if the sentinel holds its group."""
        group = self.handover.groups.get(int(identity["pid"])) if identity else None
        if group is None or not group.drained:
            return None
        pidfd = open_same_process(identity)
        if pidfd is None:
            return None
        self.adopted.add(group.pgid)
        stdout = await process.read_pipe(group.drained.pop(0))
        return process.AdoptedProcess(group.pgid, pidfd, stdout)

    def sockets(self, sidecar: dict[str, Any] | None) -> tuple[dict[str, socket.socket], dict[int, int]]:
        """The listening sockets a sidecar's group held, by name; and ours -> the sidecar's fd."""
        group = self.handover.groups.get(int(sidecar["pid"])) if sidecar else None
        if group is None or sidecar is None or len(group.held) != len(sidecar["sockets"]):
            return {}, {}
        held = {name: socket.socket(fileno=fd) for name, fd in zip(sidecar["sockets"], group.held)}
        group.held = []
        for sock in held.values():
            sock.set_inheritable(False)
        return held, {sock.fileno(): theirs for sock, theirs in zip(held.values(), sidecar["fds"])}

    async def sidecar(self, owner: Instance | Ingress, record: dict[str, Any] | None, fds: dict[int, int]) -> bool:
        proc = await self.process(record)
        if proc is None or record is None:
            return False
        group = self.handover.groups[proc.pid]
        channel = socket.socket(fileno=group.drained.pop(0))
        await owner.sidecar.adopt(proc, channel, int(record["acked"]), fds)
        return True

    async def instance(self, record: dict[str, Any], spec: Any) -> Instance:
        held, fds = self.sockets(record.get("sidecar"))
        inst = Instance(self.sup, spec, int(record.get("generation", 0)), held=held)
        inst.app_port = int(record["app_port"])
        inst.restarts = int(record.get("restarts", 0))
        inst.quick_crashes = int(record.get("quick_crashes", 0))
        inst.started_at = record.get("started_at")
        inst.last_exit = record.get("last_exit")
        sidecar_adopted = await self.sidecar(inst, record.get("sidecar"), fds)
        app = await self.process(record.get("app"))
        if app is None:
            log.warning("%s: its app is no longer running; starting it again", inst.id)
            inst.launch()
            return inst
        inst.app = app
        inst.set_state(State.STARTING, "adopted")
        if record.get("state") == State.READY.value and sidecar_adopted:
            inst.set_state(State.READY)
        if not sidecar_adopted:
            log.warning("%s: its sidecar is no longer running; starting it again", inst.id)
            await self.sup.start_sidecar(inst.sidecar, inst)
        ran_for = time.time() - (inst.started_at or time.time())
        inst.resume(time.monotonic() - ran_for)
        return inst

    async def ingress(self, record: dict[str, Any]) -> Ingress:
        held, fds = self.sockets(record.get("sidecar"))
        ingress = Ingress(self.sup, record["host"], int(record["port"]), held=held)
        adopted = await self.sidecar(ingress, record.get("sidecar"), fds)
        ingress.ready = adopted
        ingress.launch(adopted=adopted)
        return ingress

    async def leftovers(self) -> None:
        """Stop every group the sentinel held that was not adopted, then close what is left.

        A group is signalled only while one of its processes still writes to the stdout
        pipe the sentinel held for it: once a group is gone, its number may be another's.
        """
        stray = [pgid for pgid, group in self.handover.groups.items()
                 if pgid not in self.adopted and group.drained and group_writes_to(pgid, group.drained[0])]
        for pgid in stray:
            process.signal_group(pgid, signal.SIGTERM)
        give_up_at = time.monotonic() + STOP_GRACE_S
        while any(group_alive(pgid) for pgid in stray) and time.monotonic() < give_up_at:
            await asyncio.sleep(POLL_S)  # polling interval of a deadline loop
        for pgid in stray:
            process.signal_group(pgid, signal.SIGKILL)
            log.warning("stopped process group %d: held by the sentinel but not adopted", pgid)
        for pgid, group in self.handover.groups.items():
            if pgid not in self.adopted:
                self.sup.sentinel_unregister(pgid)  # it closes its copies; a later crash will not signal it
            group.close()


def group_writes_to(pgid: int, pipe_fd: int) -> bool:
    """Whether a process of group `pgid` has the other end of pipe `pipe_fd` as its stdout."""
    pipe = os.fstat(pipe_fd).st_ino
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and os.stat(f"/proc/{proc.pid}/fd/1").st_ino == pipe:
                return True
        except OSError:
            continue  # gone meanwhile, or not ours to look at
    return False


async def adopt(sup: Supervisor, handover: Handover) -> None:
    """Make `sup` run the mesh of `handover`. If that fails, whatever it took is stopped as
    `down` would and every other group the sentinel held too, then the error is raised."""
    adopter = Adopter(sup, handover)
    try:
        await take_processes(sup, adopter)
    except BaseException:
        with suppress(Exception):
            await sup.down()
        adopter.adopted.clear()  # those are stopped: everything else still running is a stray now
        await adopter.leftovers()
        raise
    await adopter.leftovers()
    sup.manifest_record = handover.record["manifest"]
    sup.persist()
    log.info(
        "adopted mesh %s after %.1f s without an agent: %d of %d process groups still running taken over",
        sup.manifest.mesh if sup.manifest else "-", handover.without_agent_s, len(adopter.adopted), len(handover.groups),
    )


async def take_processes(sup: Supervisor, adopter: Adopter) -> None:
    handover = adopter.handover
    record = handover.record
    source = record["manifest"]
    try:
        manifest = parse_manifest(source["text"], source["source"], environ=source.get("environ") or {})
    except Exception as exc:  # ManifestError, or a record of another meshctl
        raise AdoptionFailed(f"the manifest it ran does not load any more: {exc}") from None
    sup.manifest = manifest  # manifest_record stays None until the end: no half-adopted record is written
    sup.config_version = int(record["config_version"])
    sup.manifest_generation = int(record.get("manifest_generation", 1))
    sup.without_agent = [*record.get("without_agent", []),
                         {"seconds": round(handover.without_agent_s, 3), "adopted_at": time.time(), "agent": os.getpid()}]
    sup.identities = IdentityManager(sup.home, manifest.mesh)
    sup.identities.restore_leaves(record.get("leaves") or {})
    sup.overrides = sup.store.load(manifest.mesh)
    if sup.sentinel is not None:
        sup.sentinel.set_grace(manifest.agent_grace_s)
    desired = desired_instances(manifest, sup.overrides.replicas)
    by_id = {r["id"]: r for r in record.get("instances", [])}
    for iid, spec in desired.items():
        if iid in by_id:
            sup.instances[iid] = await adopter.instance(by_id[iid], spec)
    missing = [iid for iid in desired if iid not in sup.instances]
    sup.instances = {iid: sup.instances[iid] for iid in desired if iid in sup.instances}
    if missing:
        sup.live.launch_new(missing, desired)
    if record.get("ingress") and manifest.ingress is not None:
        sup.ingress = await adopter.ingress(record["ingress"])
    sup.start_pusher()
    problems = await sup.live.converge(timeout=ADOPT_CONVERGE_TIMEOUT_S)
    if problems:
        log.warning("after adopting the mesh: %s", "; ".join(problems))


async def supervise(home: Path, handover: Handover | None) -> Supervisor:
    """The agent's supervisor: running the adopted mesh, or none yet (with a new sentinel).

    If adopting fails half way, everything the sentinel held is stopped as `down` would:
    the mesh is started afresh by the next `up`, and nothing is left running unsupervised.
    """
    logbook = LogBook(home / "logs")
    if handover is not None:
        sentinel = process.Sentinel.adopted(handover.conn, handover.sentinel_pid)
        sup = Supervisor(str(home), logbook, sentinel)
        try:
            await adopt(sup, handover)
            return sup
        except Exception as exc:
            log.error("adopting the mesh failed (%s); stopped it", exc, exc_info=not isinstance(exc, AdoptionFailed))
            sentinel.close()
            meshstate.remove(home)
    return Supervisor(str(home), logbook, process.Sentinel(home))
