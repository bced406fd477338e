"""The agent's handle on one sidecar process: spawn, config channel, push and ACK, stop.

The agent owns the sidecar's listening sockets and passes them in by fd, so a restarted
sidecar serves the very same ports. The config channel is a socketpair: no file on disk,
no authentication needed, and EOF tells each side that the other is gone. The sentinel
holds a copy of the agent's end, so a sidecar sees EOF when the agent stopped it or the
sentinel is gone too, not when the agent alone crashed (agent.sentinel).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

from meshctl.agent import process
from meshctl.agent.logs import LogBook

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 10.0
# A channel line from the sidecar may be large (a `why` answer of 500 decision records is
# about 1 MB); asyncio's default 64 KiB limit would end the channel on such a line.
MAX_CHANNEL_LINE = 16 * 1024 * 1024


class SidecarError(Exception):
    """The sidecar did not start, NACKed a snapshot, or did not answer in time."""


class SidecarHandle:
    def __init__(
        self,
        name: str,
        instance: str | None,
        pass_fds: tuple[int, ...],
        logbook: LogBook,
        sentinel: process.Sentinel | None,
        env: dict[str, str],
        cwd: str,
    ) -> None:
        self.name = name  # the log name, e.g. "cart@v1#0.sidecar"
        self.instance = instance  # for log followers; None keeps sidecar lines out of `logs`
        self._pass_fds = pass_fds
        self._logbook = logbook
        self._sentinel = sentinel
        self._env = env
        self._cwd = cwd
        self.proc: asyncio.subprocess.Process | process.AdoptedProcess | None = None
        # An adopted sidecar knows its listening sockets by the fd numbers the dead agent
        # gave them, which its snapshots must keep naming: ours -> its.
        self._adopted_fds: dict[int, int] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._pump_task: asyncio.Task | None = None
        self._waiters: dict[int, asyncio.Future] = {}
        self.pushed_version = 0
        self.acked_version = 0
        self.last_snapshot: dict[str, Any] | None = None
        self.last_ack_at: float | None = None
        self.nack: str | None = None
        self._push_lock = asyncio.Lock()
        # Observability messages (stats, spans, access, tap-event) go here; see agent.observability.
        self.on_message: Callable[[dict], None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, version: int, snapshot: dict[str, Any]) -> None:
        """Spawn the sidecar and wait until it has ACKed its first snapshot."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = await process.spawn(
                [sys.executable, "-m", "meshctl.proxy", "--control-fd", str(theirs.fileno())],
                cwd=self._cwd,
                env=self._env,
                log_file=str(self._logbook.path(self.name)),
                pass_fds=(theirs.fileno(), *self._pass_fds),
                hold_fds=(ours.fileno(),),  # the sidecar sees no EOF if the agent dies
                sentinel=self._sentinel,
            )
        finally:
            theirs.close()
        if self._sentinel is not None:
            self._sentinel.hold(self.proc.pid, self._pass_fds)  # for the agent that adopts the mesh
        self.last_snapshot = None
        self.pushed_version = self.acked_version = 0
        await self._attach(ours)
        await self.push(version, snapshot)

    async def _attach(self, channel: socket.socket) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        self._pump_task = asyncio.create_task(
            self._logbook.pump(self.proc.stdout, self.name, self.instance), name=f"log:{self.name}"
        )
        reader, self._writer = await asyncio.open_unix_connection(sock=channel, limit=MAX_CHANNEL_LINE)
        self._reader_task = asyncio.create_task(self._read_channel(reader), name=f"channel:{self.name}")

    async def adopt(self, proc: process.AdoptedProcess, channel: socket.socket, version: int,
                    fds_in_sidecar: dict[int, int]) -> None:
        """Take over a running sidecar from a crashed agent: its config channel, its log, and
        the config version it last acknowledged (the next push continues from there)."""
        self.proc = proc
        self._adopted_fds = fds_in_sidecar
        self.last_snapshot = None
        self.pushed_version = self.acked_version = version
        await self._attach(channel)

    def fd_in_sidecar(self, fd: int) -> int:
        """The number the running sidecar knows our listening socket `fd` by."""
        if isinstance(self.proc, process.AdoptedProcess) and self.running:
            return self._adopted_fds.get(fd, fd)
        return fd

    async def push(self, version: int, snapshot: dict[str, Any], timeout: float = ACK_TIMEOUT_S) -> None:
        """Send a snapshot and wait for its ACK. Raises SidecarError on NACK, exit or timeout."""
        async with self._push_lock:
            if self._writer is None or not self.running:
                raise SidecarError(f"{self.name} is not running")
            if version <= self.pushed_version:
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[version] = waiter
            self.pushed_version = version
            self.last_snapshot = snapshot
            line = json.dumps({"type": "config", "version": version, "config": snapshot}, separators=(",", ":"))
            self._writer.write(line.encode() + b"\n")
            try:
                await self._writer.drain()
            except ConnectionError as exc:
                raise SidecarError(f"{self.name}: config channel closed") from exc
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            raise SidecarError(f"{self.name} did not acknowledge config v{version} within {timeout:g}s") from None
        finally:
            self._waiters.pop(version, None)

    def send(self, message: dict[str, Any]) -> None:
        """Write one channel message without waiting (read-out requests, taps)."""
        if self._writer is not None and self.running and self.acked_version:
            self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def _read_channel(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                line = await reader.readline()
            except (ConnectionError, ValueError):
                line = b""
            if not line:
                break
            try:
                msg = json.loads(line)
                kind = msg["type"]
                if kind not in ("ack", "nack"):
                    if self.on_message is not None:
                        self.on_message(msg)
                    continue
                version = int(msg["version"])
            except (ValueError, KeyError, TypeError):
                log.warning("%s sent a malformed channel message: %r", self.name, line[:200])
                continue
            waiter = self._waiters.get(version)
            if kind == "ack":
                self.acked_version = max(self.acked_version, version)
                self.last_ack_at = loop.time()
                self.nack = None
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif kind == "nack":
                self.nack = str(msg.get("error", "rejected"))
                if waiter is not None and not waiter.done():
                    waiter.set_exception(SidecarError(f"{self.name} rejected config v{version}: {self.nack}"))
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(SidecarError(f"{self.name} exited"))

    async def wait(self) -> int | None:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._sentinel is not None:
            self._sentinel.unregister(self.proc.pid)  # and so closes its copy of the channel
        await self._close_channel()
        return code

    async def stop(self, grace_s: float) -> None:
        if self.proc is None:
            return
        await process.stop_process(self.proc, grace_s, self._sentinel)
        await self._close_channel()

    async def _close_channel(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for task in (self._reader_task, self._pump_task):
            if task is not None:
                try:
                    await asyncio.wait_for(task, 2.0)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    task.cancel()
        self._reader_task = self._pump_task = None
