"""The control API: newline-delimited JSON on agent.sock (docs/protocols.md, part 2).

The only way in for the CLI. Each connection sends one request; the answer is one line,
or a stream of event lines for `logs --follow`. Errors carry a stable code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from agent.errors import AgentError
from agent.logs import LogLine
from agent.manifest import load_manifest
from agent.supervisor import Supervisor

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1024 * 1024


class BadRequest(AgentError):
    code = "bad-request"


class UnknownService(AgentError):
    code = "unknown-service"


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class ControlServer:
    def __init__(self, supervisor: Supervisor, home: str, on_down: Callable[[], Awaitable[None]]) -> None:
        self.sup = supervisor
        self.home = home
        self.on_down = on_down
        self.server: asyncio.AbstractServer | None = None
        self._ops: dict[str, Callable[[dict, asyncio.StreamWriter], Awaitable[Any]]] = {
            "ping": self._ping,
            "apply": self._apply,
            "status": self._status,
            "logs": self._logs,
            "down": self._down,
        }

    async def start(self, path: str) -> None:
        old_umask = os.umask(0o177)  # the socket is born 0600, never briefly wider
        try:
            self.server = await asyncio.start_unix_server(self._handle, path=path, limit=MAX_REQUEST_BYTES)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                raw = await reader.readline()
            except ValueError:
                raise BadRequest(f"request longer than {MAX_REQUEST_BYTES} bytes") from None
            if not raw:
                return
            try:
                request = json.loads(raw)
            except ValueError:
                raise BadRequest("request is not valid JSON") from None
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise BadRequest('request must be an object with a string "op"')
            handler = self._ops.get(request["op"])
            if handler is None:
                err = AgentError(f"unknown op {request['op']!r}; known: {', '.join(self._ops)}")
                err.code = "unknown-op"
                raise err
            result = await handler(request, writer)
            writer.write(_line({"ok": True, "result": result}))
        except AgentError as exc:
            writer.write(_line({"ok": False, "error": {"code": exc.code, "message": str(exc)}}))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except Exception as exc:
            log.error("control request failed", exc_info=True)
            writer.write(_line({"ok": False, "error": {"code": "internal", "message": f"internal error: {exc}"}}))
        try:
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        except ConnectionError:
            pass

    async def _ping(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        return {"mesh": self.sup.manifest.mesh if self.sup.manifest else None, "pid": os.getpid(), "home": self.home}

    async def _apply(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        path = request.get("manifest_path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise BadRequest('apply needs "manifest_path", an absolute path')
        manifest = load_manifest(path)
        return await self.sup.apply(manifest)

    async def _status(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        return self.sup.status()

    def _instances_for(self, service: Any) -> list[str]:
        if service is None:
            return list(self.sup.instances)
        if not isinstance(service, str):
            raise BadRequest('"service" must be a string')
        if service not in self.sup.service_names():
            raise UnknownService(f"no service {service!r} in mesh {self.sup.manifest.mesh if self.sup.manifest else '-'}")
        return [i for i, inst in self.sup.instances.items() if inst.spec.service == service]

    async def _logs(self, request: dict, writer: asyncio.StreamWriter) -> None:
        ids = self._instances_for(request.get("service"))
        tail = request.get("tail", 100)
        if not isinstance(tail, int) or tail < 0:
            raise BadRequest('"tail" must be a whole number >= 0')
        lines: list[LogLine] = []
        for iid in ids:
            lines.extend(self.sup.logbook.tail(iid, iid, tail))
        lines.sort(key=lambda entry: entry.ts)
        for entry in lines[-tail:] if tail else []:
            writer.write(_line({"event": entry.to_json()}))
        await writer.drain()
        if not request.get("follow"):
            return None
        wanted = set(ids) if request.get("service") is not None else None
        queue: asyncio.Queue[LogLine] = asyncio.Queue(maxsize=10000)

        def on_line(entry: LogLine) -> None:
            if (wanted is None or entry.instance in wanted) and not queue.full():
                queue.put_nowait(entry)

        unsubscribe = self.sup.logbook.follow(on_line)
        try:
            while True:
                entry = await queue.get()
                writer.write(_line({"event": entry.to_json()}))
                await writer.drain()
        finally:
            unsubscribe()

    async def _down(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        asyncio.get_running_loop().create_task(self.on_down())
        return {"stopping": [*(["ingress"] if self.sup.ingress else []), *self.sup.instances]}
