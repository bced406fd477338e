"""The config channel: newline-delimited JSON from the agent, ACK or NACK back.

docs/protocols.md, part 1. Messages are applied one at a time, in order, by one named
task; a snapshot that does not compile is NACKed with the reason and the previous one
keeps serving. EOF on the channel means the agent is gone: the sidecar exits at once.

Observability messages (`stats?`, `tap`, `untap`; proxy.observe) are answered at once,
never queued behind a config apply. The first snapshot creates the `Observer`, installs
its per-exchange hook and serves the admin socket named by the snapshot's `admin.fd`.
"""

from __future__ import annotations

import asyncio
from typing import cast
import json
import logging

from meshctl.proxy.admin import serve_admin
from meshctl.proxy.observe import Observer
from meshctl.proxy.server import ServerState
from meshctl.proxy.snapshot import Snapshot, SnapshotError, compile_snapshot

log = logging.getLogger("proxy.control")

MAX_LINE_BYTES = 16 * 1024 * 1024


class ControlChannel(asyncio.Protocol):
    """Reads config messages from the socketpair and answers each one."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self.observer: Observer | None = None
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._worker = state.loop.create_task(self._apply_in_order(), name="control-apply")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream: the config channel is a socketpair

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip() and not self._observability(line):
                self._queue.put_nowait(line)
        if len(self._buffer) > MAX_LINE_BYTES:
            log.error("config channel line over %d bytes, exiting", MAX_LINE_BYTES)
            self.state.exit(1)

    def _observability(self, line: bytes) -> bool:
        """Answer a read-out request now; False for anything else (config goes in order)."""
        if self.observer is None or not line.startswith(b'{"type":"') or line.startswith(b'{"type":"config"'):
            return False
        try:
            message = json.loads(line)
        except ValueError:
            return False
        return isinstance(message, dict) and self.observer.handle(message)

    def eof_received(self) -> bool:
        log.info("config channel closed: the agent is gone, exiting")
        self.state.exit(0)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.exit(0)

    def send(self, message: dict) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def _observe(self, snapshot: Snapshot, raw: dict) -> None:
        state = self.state
        if self.observer is None:
            self.observer = Observer(state, snapshot, self.send)
            state.observer = self.observer
            state.on_exchange_done = self.observer.exchange_done
            admin = raw.get("admin")
            if isinstance(admin, dict) and isinstance(admin.get("fd"), int):
                state.servers.append(await serve_admin(state.loop, admin["fd"], lambda: self.observer, lambda: state.gate))
        self.observer.configure(snapshot, raw)

    async def _apply_in_order(self) -> None:
        while True:
            line = await self._queue.get()
            try:
                await self._handle(line)
            except Exception:
                log.exception("applying a config message failed")
                self.state.exit(1)

    async def _handle(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError as exc:
            self.send({"type": "nack", "version": None, "error": "invalid JSON: %s" % exc})
            return
        if not isinstance(message, dict) or message.get("type") != "config":
            self.send({"type": "nack", "version": None, "error": "unknown message %r" % (line[:100],)})
            return
        version = message.get("version")
        try:
            snapshot = compile_snapshot(message, self.state.snapshot)
            await self.state.apply(snapshot)
            await self._observe(snapshot, message["config"])
        except SnapshotError as exc:
            log.warning("config version %s rejected: %s", version, exc)
            self.send({"type": "nack", "version": version, "error": str(exc)})
            return
        except OSError as exc:
            log.error("config version %s: cannot open listeners: %s", version, exc)
            self.send({"type": "nack", "version": version, "error": "listeners: %s" % exc})
            return
        log.info("config version %s applied", version)
        self.send({"type": "ack", "version": version})
