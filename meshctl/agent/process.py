"""Spawning processes that never outlive the mesh, though they may outlive the agent.

Every app and sidecar gets its own process group (so that a stop reaches everything it
started) and a registration with the sentinel (agent.sentinel), which holds a copy of the
agent's end of its stdout pipe and config channel: if the agent dies, the processes keep
serving, and the sentinel stops every group once `agent_grace` passes without an agent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

LOG_LINE_LIMIT = 2**16  # asyncio's own default; logs.pump splits a longer line


class Sentinel:
    """The agent's side of the sentinel socket (see agent.sentinel): a sentinel it starts,
    or (`adopted()`) the one of a crashed agent, over the keeper.sock connection."""

    def __init__(self, home: Path) -> None:
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                [sys.executable, "-m", "meshctl.agent.sentinel", "--home", str(home)],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            theirs.close()
        self._pid = self._proc.pid

    @classmethod
    def adopted(cls, sock: socket.socket, pid: int) -> Sentinel:
        """The sentinel `pid` that kept the mesh and now follows this agent over `sock`."""
        sentinel = cls.__new__(cls)
        sentinel._sock, sentinel._proc, sentinel._pid = sock, None, pid
        return sentinel

    @property
    def pid(self) -> int:
        return self._pid

    def _send(self, line: str, fds: tuple[int, ...] = ()) -> None:
        try:
            socket.send_fds(self._sock, [line.encode()], list(fds))
        except OSError:
            log.warning("sentinel is gone; processes may outlive an agent crash", exc_info=True)

    def register(self, pgid: int, hold: tuple[int, ...] = (), log_file: str | None = None) -> None:
        """A new group; the sentinel keeps copies of `hold` (its stdout pipe first) while it lives."""
        self._send(f"+{pgid}" + (f" {log_file}" if log_file else ""), hold)

    def hold(self, pgid: int, fds: tuple[int, ...]) -> None:
        """Fds of group `pgid` for the sentinel to keep without reading: a sidecar's listening
        sockets, handed to the agent that adopts the mesh after a crash."""
        self._send(f"hold {pgid}", fds)

    def unregister(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    def set_grace(self, seconds: float) -> None:
        self._send(f"grace {seconds:g}")

    def close(self) -> None:
        """A clean shutdown: everything is stopped already, so the sentinel may just leave."""
        self._send("exit")
        self._sock.close()
        if self._proc is None:
            return  # not our child: it exits on its own, reaped by whoever adopted it
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()


async def spawn(
    argv: list[str],
    *,
    cwd: str,
    env: dict[str, str],
    log_file: str | None,
    pass_fds: tuple[int, ...] = (),
    hold_fds: tuple[int, ...] = (),
    sentinel: Sentinel | None,
) -> asyncio.subprocess.Process:
    """Start argv in a new session; stdout and stderr go to one pipe, read as `proc.stdout`.

    The sentinel holds a copy of that pipe's read end (and of `hold_fds`) so that the
    process does not see it break if the agent dies; `log_file` is where the sentinel
    appends the output it reads then.
    """
    read_end, write_end = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=pass_fds,
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    if sentinel is not None:
        sentinel.register(proc.pid, (read_end, *hold_fds), log_file)  # a session leader's pgid is its pid
    proc.stdout = await read_pipe(read_end)
    return proc


class AdoptedProcess:
    """A process a crashed agent started and this one adopted, shaped like the
    asyncio.subprocess.Process the rest of the agent handles.

    It is not our child, so its exit is seen through a pidfd (readable once it has
    exited) and its exit status cannot be known: `wait()` returns None ("exited"), and
    `returncode` only tells that it has ended. The reaping is done by init (or a
    subreaper), which inherited it from the dead agent.
    """

    def __init__(self, pid: int, pidfd: int, stdout: asyncio.StreamReader | None) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._loop = asyncio.get_running_loop()
        self._ended = self._loop.create_future()
        self._loop.add_reader(pidfd, self._exited)

    def _exited(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.returncode = 0  # it ended; the status itself went to its reaper
        if not self._ended.done():
            self._ended.set_result(None)

    async def wait(self) -> int | None:
        await asyncio.shield(self._ended)
        return None


async def read_pipe(fd: int) -> asyncio.StreamReader:
    """A StreamReader on the read end `fd` of a pipe (which it then owns)."""
    reader = asyncio.StreamReader(limit=LOG_LINE_LIMIT)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    return reader


def signal_group(pid: int, sig: int) -> bool:
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


async def stop_process(proc: asyncio.subprocess.Process | AdoptedProcess, grace_s: float, sentinel: Sentinel | None) -> int | None:
    """SIGTERM to the group, wait up to grace_s, then SIGKILL the group. Returns the exit code."""
    if proc.returncode is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except asyncio.TimeoutError:
            log.info("pid %d did not stop within %.1fs; sending SIGKILL", proc.pid, grace_s)
    # The leader may be gone while children it started linger in the group.
    signal_group(proc.pid, signal.SIGKILL)
    code = await proc.wait()
    if sentinel is not None:
        sentinel.unregister(proc.pid)
    return code


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
