"""Spawning processes that cannot outlive the agent.

Every app and sidecar gets its own process group (so that a stop reaches everything it
started), PR_SET_PDEATHSIG (so that the kernel kills the leader if the agent dies) and a
registration with the sentinel (which kills the whole group if the agent dies).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_prctl = _libc.prctl  # resolved before any fork: the child must not load libraries


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: only async-signal-safe work here.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Sentinel:
    """The agent's side of the sentinel pipe (see agent.sentinel)."""

    def __init__(self) -> None:
        read_end, self._write_end = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "meshctl.agent.sentinel"],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        os.close(read_end)
        os.set_inheritable(self._write_end, False)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _send(self, line: str) -> None:
        try:
            os.write(self._write_end, line.encode() + b"\n")
        except OSError:
            log.warning("sentinel is gone; processes may outlive an agent crash", exc_info=True)

    def register(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def unregister(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    def close(self) -> None:
        """A clean shutdown: everything is stopped already, so the sentinel may just leave."""
        self._send("exit")
        os.close(self._write_end)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()


async def spawn(
    argv: list[str],
    *,
    cwd: str,
    env: dict[str, str],
    log_fd: int | None,
    pass_fds: tuple[int, ...] = (),
    sentinel: Sentinel | None,
) -> asyncio.subprocess.Process:
    """Start argv in a new session; stdout and stderr go to one pipe the caller reads."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if log_fd is None else log_fd,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
        pass_fds=pass_fds,
    )
    if sentinel is not None:
        sentinel.register(proc.pid)  # a session leader's pgid is its pid
    return proc


def signal_group(pid: int, sig: int) -> bool:
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


async def stop_process(proc: asyncio.subprocess.Process, grace_s: float, sentinel: Sentinel | None) -> int | None:
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
