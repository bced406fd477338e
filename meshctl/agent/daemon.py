"""The agent's entry point: `python -m meshctl.agent --home DIR`.

One agent per state directory, enforced with an flock on `agent.lock` (the kernel releases
it when the agent dies, however it dies, so a stale lock can't block the next start). A
socket file left by a crashed agent is removed once the lock is ours.

The lock and the socket only mean something while they are the files at their paths. If
the state directory is deleted (`rm -rf`), moved or replaced, or `agent.lock` or
`agent.sock` is deleted, no `meshctl` can reach this agent any more and the next `meshctl
up` would start a second agent beside it. So every second the agent compares the
directory, the lock and the socket at their paths with the ones it holds
(`lost_state()`, pure); on a difference it logs why (to stderr: agent.log may be gone with
the directory), stops the whole mesh as `meshctl down` would, and exits with code 1. It
never recreates the directory, and it leaves alone whatever now stands at its old paths:
those may belong to the next agent.

A `meshctl up` right after the `rm -rf` can be faster than that check, and an agent of an
older meshctl has none. So a new agent, once it holds the lock, looks for other agents
started for the same directory (`agent_home()` reads their argv) that hold a lock file
other than ours (`is_orphan()`): a lock on a deleted or replaced `agent.lock`, or on one in
a directory moved away, is evidence that they lost their directory. An agent that holds no
lock, or opened ours, is a sibling starting side by side with us: it will find the lock
taken and exit, so it is left alone. Each orphan is asked to stop its mesh (SIGTERM),
SIGKILLed with everything it started if still there after ORPHAN_STOP_GRACE_S (its
sentinel would keep that mesh for `agent_grace`), and waited for with its processes
before we serve, so their ports are free again. A mesh that a crashed agent's sentinel
keeps serving here is adopted (agent.adopt), or stopped (`stop_kept_mesh`) if it cannot be.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import io
import json
import logging
import os
import signal
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from meshctl.agent import meshstate
from meshctl.agent.adopt import AdoptionFailed, Handover, supervise, take_over
from meshctl.agent.control import ControlServer
from meshctl.agent.sentinel import stop_kept_mesh

log = logging.getLogger("agent")

STATE_CHECK_INTERVAL_S = 1.0
# Both under the CLI's 10 s wait for a new agent to answer.
ORPHAN_STOP_GRACE_S = 5.0
ORPHAN_KILL_WAIT_S = 2.0
KEPT_MESH_STOP_TIMEOUT_S = 8.0  # the sentinel's SIGTERM-then-SIGKILL fits well inside
LOCK_NAME = "agent.lock"
SOCKET_NAME = "agent.sock"
EXIT_RECORD_NAME = "agent.exit"

FileId = tuple[int, int]  # (st_dev, st_ino): which file, not which name


def file_id(info: os.stat_result) -> FileId:
    return (info.st_dev, info.st_ino)


def file_id_at(path: Path) -> FileId | None:
    """The file at `path` now, or None if nothing is there (or it cannot be looked at)."""
    try:
        return file_id(os.stat(path))
    except OSError:
        return None


@dataclass(frozen=True)
class StateFiles:
    """The state directory, lock file and control socket, each as a FileId (None: absent)."""

    home: FileId | None
    lock: FileId | None
    socket: FileId | None

    @classmethod
    def at(cls, home: Path) -> StateFiles:
        return cls(file_id_at(home), file_id_at(home / LOCK_NAME), file_id_at(home / SOCKET_NAME))


def lost_state(home: Path, held: StateFiles, now: StateFiles) -> str | None:
    """Why this agent no longer owns its state directory, or None while it does."""
    if now.home is None:
        return f"the state directory {home} was deleted or moved"
    if now.home != held.home:
        return f"the state directory {home} was replaced by another directory"
    for name, was, is_now in ((LOCK_NAME, held.lock, now.lock), (SOCKET_NAME, held.socket, now.socket)):
        if is_now is None:
            return f"{home / name} was deleted"
        if is_now != was:
            return f"{home / name} was replaced by another file"
    return None


class StateDirError(Exception):
    pass


def check_state_dir(home: Path) -> None:
    """The state directory holds keys and the control socket: it must be ours and private."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = home.stat()
    if info.st_uid != os.getuid():
        raise StateDirError(f"{home} belongs to uid {info.st_uid}, not to you (uid {os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateDirError(
            f"{home} is writable by others (mode {stat.S_IMODE(info.st_mode):o}); run `chmod 700 {home}`"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(home, 0o700)


def take_lock(home: Path) -> int:
    fd = os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirError(f"another agent already runs in {home}") from None
    return fd


def agent_home(argv: Sequence[str]) -> str | None:
    """The --home of an agent's command line (`python -m meshctl.agent --home DIR`), None if not one."""
    if list(argv[1:4]) != ["-m", "meshctl.agent", "--home"] or len(argv) < 5:
        return None
    return argv[4]


def is_orphan(held_locks: Sequence[FileId], ours: FileId) -> bool:
    """Whether an agent holding these lock files lost its directory: it holds another one.

    A sibling that has not taken a lock yet holds none, or ours for a moment (it opened
    it and is about to find it taken): neither proves anything.
    """
    return any(lock != ours for lock in held_locks)


def held_lock_files(pid: int) -> list[FileId]:
    """The `agent.lock` files (deleted ones too) that process `pid` has open."""
    fd_dir = f"/proc/{pid}/fd"
    held = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}").removesuffix(" (deleted)")
            if os.path.basename(target) == LOCK_NAME:
                held.append(file_id(os.stat(f"{fd_dir}/{fd}")))  # follows to the open file itself
        except OSError:
            continue  # closed meanwhile
    return held


def orphaned_agents(home: Path, our_lock: FileId) -> list[psutil.Process]:
    """Our other agents for `home` that hold a lock file other than ours: they lost it."""
    found = []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            wanted = agent_home(proc.info["cmdline"] or [])
            uids = proc.info["uids"]
            if wanted is None or proc.pid == os.getpid() or uids is None or uids.real != os.getuid():
                continue
            if (Path(proc.cwd()) / wanted).resolve() == home and is_orphan(held_lock_files(proc.pid), our_lock):
                found.append(proc)
        except (psutil.Error, OSError):
            continue  # gone meanwhile, or not ours to look at
    return found


def stop_orphaned_agents(home: Path, our_lock: FileId) -> None:
    """Stop the agents (and their processes) whose state directory `home` was deleted."""
    orphans = orphaned_agents(home, our_lock)
    if not orphans:
        return
    family = []
    for agent in orphans:
        log.warning(
            "agent %d still runs for %s holding a lock file that is no longer there (the "
            "directory was deleted or moved under it): asking it to stop its mesh", agent.pid, home,
        )
        try:
            family.extend(agent.children(recursive=True))
            agent.terminate()
        except psutil.NoSuchProcess:
            continue
    _, lingering = psutil.wait_procs(orphans, timeout=ORPHAN_STOP_GRACE_S)
    for agent in lingering:
        log.warning("agent %d did not stop within %.0f s; killing it and its mesh", agent.pid, ORPHAN_STOP_GRACE_S)
        # Its sentinel would keep the mesh for agent_grace, holding ports the new one needs.
        for proc in [agent, *family]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue
    _, lingering = psutil.wait_procs([*orphans, *family], timeout=ORPHAN_KILL_WAIT_S)
    if lingering:
        log.warning("processes of a previous agent still run: %s", ", ".join(str(p.pid) for p in lingering))


def dump_tasks() -> None:
    """`kill -USR1 <agent pid>` writes every task's stack to agent.log: for a stuck agent."""
    for task in asyncio.all_tasks():
        buffer = io.StringIO()
        task.print_stack(file=buffer)
        log.warning("task %s:\n%s", task.get_name(), buffer.getvalue())


@dataclass(frozen=True)
class AgentExit:
    """Why the agent stopped: "down", "signal SIGTERM", or the loss of its state directory."""

    reason: str
    lost_state: bool = False


def write_exit_record(home: Path, reason: str) -> None:
    """Leave `agent.exit` saying why this agent stopped: an `up` that was waiting on it
    tells "a `down` overtook me" from a crash (`meshctl.client.exit_reason`)."""
    path = home / EXIT_RECORD_NAME
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as record:
        json.dump({"pid": os.getpid(), "reason": reason}, record)
    os.replace(temporary, path)


async def serve(home: Path, lock_fd: int, handover: Handover | None) -> AgentExit:
    """Run the agent until `down`, a signal, or the loss of its state directory."""
    loop = asyncio.get_running_loop()
    sup = await supervise(home, handover)
    sentinel = sup.sentinel
    assert sentinel is not None
    finished = asyncio.Event()
    stopping = False
    reason = ""

    async def shutdown(why: str = "down") -> None:
        nonlocal stopping, reason
        if stopping:
            return
        stopping, reason = True, why
        log.info("stopping the mesh (%s)", why)
        try:
            await sup.down()
        finally:
            finished.set()

    control = ControlServer(sup, str(home), shutdown)
    if sup.manifest is not None:  # adopted: its metrics port is ours to serve now
        await control.observability.serve_metrics(sup.manifest.observability.metrics_port)  # warns itself
    sock_path = home / SOCKET_NAME
    sock_path.unlink(missing_ok=True)  # ours now: the lock proves no live agent holds it
    await control.start(str(sock_path))
    held = StateFiles(file_id_at(home), file_id(os.fstat(lock_fd)), file_id_at(sock_path))
    lost: str | None = None

    async def watch_state_dir() -> None:
        nonlocal lost
        while not stopping:
            await asyncio.sleep(STATE_CHECK_INTERVAL_S)
            lost = lost_state(home, held, StateFiles.at(home))
            if lost is not None:
                log.error("%s; no meshctl can reach this agent any more: stopping the mesh", lost)
                try:
                    await shutdown(lost)
                except Exception:
                    log.error("stopping the mesh failed", exc_info=True)
                return

    watcher = loop.create_task(watch_state_dir(), name="state-dir-watch")
    def on_signal(name: str) -> None:
        loop.create_task(shutdown(f"signal {name}"))

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig.name)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    log.info("agent %d serving %s", os.getpid(), sock_path)
    try:
        await finished.wait()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await control.close()
        if file_id_at(sock_path) == held.socket:  # else it is gone, or the next agent's
            sock_path.unlink(missing_ok=True)
        sentinel.close()
        log.info("agent stopped")
    return AgentExit(lost, lost_state=True) if lost is not None else AgentExit(reason)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshctl.agent", description="meshctl's supervising agent")
    parser.add_argument("--home", required=True, help="the state directory")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    home = Path(args.home).resolve()
    try:
        check_state_dir(home)
        lock_fd = take_lock(home)
    except StateDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stop_orphaned_agents(home, file_id(os.fstat(lock_fd)))
    try:
        handover = take_over(home, KEPT_MESH_STOP_TIMEOUT_S)
    except AdoptionFailed as exc:
        handover = None
        if stop_kept_mesh(home, KEPT_MESH_STOP_TIMEOUT_S):
            log.warning("stopped the mesh that a crashed agent's sentinel kept serving (%s); starting afresh", exc)
        meshstate.remove(home)
    pid_path = home / "agent.pid"
    pid_path.write_text(f"{os.getpid()}\n")
    os.chmod(pid_path, 0o600)
    if sys.version_info < (3, 12):
        # Child watching without a thread per child (3.11's default starts one per
        # process), as 3.12 does by itself.
        loop = asyncio.new_event_loop()
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(loop)
        asyncio.set_child_watcher(watcher)
        try:
            ended = loop.run_until_complete(serve(home, lock_fd, handover))
        finally:
            loop.close()
    else:
        ended = asyncio.run(serve(home, lock_fd, handover))
    if file_id_at(home / LOCK_NAME) == file_id(os.fstat(lock_fd)):  # else not ours to touch
        write_exit_record(home, ended.reason)
        pid_path.unlink(missing_ok=True)
    os.close(lock_fd)
    if ended.lost_state:
        print(f"error: {ended.reason}; the mesh was stopped", file=sys.stderr)
        return 1
    return 0
