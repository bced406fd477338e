"""`meshctl dashboard`: the mesh in a browser, served by the agent on 127.0.0.1.

The `dashboard` control op starts the web server (or reuses the running one) and answers
its URL, which carries the token (agent.dashboard_http has the access rules). The token is
new at every agent start and kept, 0600, in `$MESHCTL_HOME/dashboard.token` while the
server runs.

Nothing here computes a number: the page is fed by the control ops the CLI calls
(`ControlServer.call`), so `meshctl stat` and the dashboard can never disagree.

* `GET /` and `/static/*`: the page, plain files shipped in `dashboard_static/`.
* `GET /api/events`: server-sent events. A `history` event (five minutes of per-version
  signals) on connect, then a `state` event once a second built from `status`, `stat`,
  `edges`, `route-show`, `proxy-status` and `certs`. One tick builds it for every viewer.
* `GET /api/requests?service=&path=&status=`: server-sent `request` events, one per
  request the sidecars see (the tap of `meshctl tap`), opened while someone watches and
  closed when the page goes; at most TAP_MAX_RPS per sidecar.
* `GET /api/read/OP?field=value`: a read op answered as the control API does (`trace`, and
  `why` once the agent has it: the request panel asks for it when `features` lists it).
* `POST /api/do/OP` with a JSON body: a change, exactly the control op of that name
  (`route-split`, `route-set`, `route-reset`, `scale`, `restart`, `promote`).

It never slows the data plane: it reads what the agent gathers anyway (the stats poll, the
trace store); only a watched request list asks sidecars for something (a tap, rate-bounded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshctl.agent.compile import mtls_mode
from meshctl.agent.dashboard_http import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    BadHttp,
    Request,
    Verdict,
    check_access,
    clean_location,
    denied_response,
    error_response,
    event_frame,
    event_stream_head,
    json_response,
    login_cookie,
    new_token,
    parse_head,
    response,
)
from meshctl.agent.dashboard_views import STAT_WINDOW_S, History, build_state, key_of, promotion_view
from meshctl.agent.errors import AgentError

if TYPE_CHECKING:
    from meshctl.agent.seams import DashboardSource

log = logging.getLogger(__name__)

TOKEN_FILE = "dashboard.token"
TICK_S = 1.0
HEAD_TIMEOUT_S = 10.0
TAP_MAX_RPS = 20  # per sidecar: enough to read, never a load
STREAM_BACKLOG = 200  # events a slow viewer may lag behind before the newest are dropped
READ_OPS = ("trace", "traces", "why")
CHANGE_OPS = ("route-split", "route-set", "route-reset", "scale", "restart", "promote")
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


class DashboardError(AgentError):
    code = "dashboard"


def load_static() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once: name -> (bytes, content type)."""
    folder = resources.files("meshctl.agent").joinpath("dashboard_static")
    files = {}
    for entry in folder.iterdir():
        kind = STATIC_TYPES.get(os.path.splitext(entry.name)[1])
        if kind is not None and entry.is_file():
            files[entry.name] = (entry.read_bytes(), kind)
    return files


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file may have had other bits
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class Dashboard:
    def __init__(self, control: DashboardSource, home: str) -> None:
        self.control = control
        self.token_path = Path(home) / TOKEN_FILE
        self.token = new_token()
        self.port: int | None = None
        self.server: asyncio.AbstractServer | None = None
        self.history = History()
        self.viewers: set[asyncio.Queue[bytes]] = set()
        self.connections: set[asyncio.Task] = set()
        self.static: dict[str, tuple[bytes, str]] = {}
        self._ticker: asyncio.Task | None = None

    def __repr__(self) -> str:
        return "<Dashboard port=%s, %d viewers>" % (self.port, len(self.viewers))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/?token={self.token}"

    # -- the control op ----------------------------------------------------------------------

    async def open(self, request: dict, writer: Any) -> dict:
        """The `dashboard` op: serve on `port` (0: any free one) unless already serving."""
        port = request.get("port", 0)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise DashboardError('"port" must be a port number (0 picks a free one)')
        if self.server is not None:
            if port not in (0, self.port):
                raise DashboardError(f"the dashboard already serves on port {self.port}; "
                                     f"use that URL, or `meshctl down` and start again to change the port")
            return {"url": self.url, "port": self.port, "reused": True}
        self.static = load_static()
        try:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", port, limit=MAX_HEAD_BYTES)
        except OSError as exc:
            raise DashboardError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}; "
                                 "choose another --port, or 0 for a free one") from None
        self.port = self.server.sockets[0].getsockname()[1]
        write_private(self.token_path, self.token + "\n")
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="dashboard-tick")
        log.info("dashboard serving on 127.0.0.1:%d", self.port)
        return {"url": self.url, "port": self.port, "reused": False}

    async def close(self) -> None:
        if self.server is None:
            return
        if self._ticker is not None:
            self._ticker.cancel()
        self.server.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, *([self._ticker] if self._ticker else []), return_exceptions=True)
        await self.server.wait_closed()
        self.token_path.unlink(missing_ok=True)
        self.server = None

    # -- the picture -------------------------------------------------------------------------

    async def state(self, stat: dict | None = None) -> dict[str, Any]:
        """The whole picture; `stat`, when the caller has just asked for it, is not asked again."""
        manifest = self.control.sup.manifest
        if manifest is None:
            return {"mesh": None, "features": self.features()}
        window = {"window": STAT_WINDOW_S}
        answers = {op: await self.control.call(op, fields) for op, fields in (
            ("status", {}), ("edges", window), ("route-show", {}), ("proxy-status", {}),
        )}
        answers["stat"] = stat if stat is not None else await self.control.call("stat", window)
        try:
            answers["certs"] = await self.control.call("certs", {})
        except AgentError:
            answers["certs"] = None  # no identities yet: the mesh is still starting
        promotions = {name: promotion_view(p) for name, p in self.control.promotions.items()}
        mtls = {spec.name: mtls_mode(manifest, spec) for spec in manifest.services}
        return build_state(manifest, answers, promotions, mtls, self.features())

    def features(self) -> list[str]:
        return [op for op in READ_OPS if self.control.has_op(op)]

    async def _tick(self) -> None:
        while True:
            try:
                await self._sample()
            except Exception:
                log.error("dashboard: building the picture failed", exc_info=True)
            await asyncio.sleep(TICK_S)  # the page's refresh period

    async def _sample(self) -> None:
        manifest = self.control.sup.manifest
        if manifest is None:
            return
        stat = await self.control.call("stat", {"window": STAT_WINDOW_S})
        self.history.record(time.time(), stat["services"])
        self.history.forget_except({key_of(s.name, v.name) for s in manifest.services for v in s.versions})
        if not self.viewers:
            return
        frame = event_frame("state", await self.state(stat))
        for queue in list(self.viewers):
            if queue.full():
                continue  # a viewer that does not keep up skips a frame rather than piling them up
            queue.put_nowait(frame)

    # -- HTTP --------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            await self._answer(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        except asyncio.LimitOverrunError:
            writer.write(error_response(431, "too-large", f"request head over {MAX_HEAD_BYTES} bytes"))
        except BadHttp as exc:
            writer.write(error_response(400, "bad-http", str(exc)))
        except Exception:
            log.error("dashboard request failed", exc_info=True)
            writer.write(error_response(500, "internal", "internal error; see agent.log"))
        finally:
            self.connections.discard(task)
            try:
                await writer.drain()
                writer.close()
            except (ConnectionError, RuntimeError):
                pass

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        request = parse_head(head)
        access = check_access(request, self.token, self.port or 0)
        if access.verdict is Verdict.LOGIN:
            writer.write(response(303, extra=(("Location", clean_location(request)),
                                              ("Set-Cookie", login_cookie(self.token, self.port or 0)))))
            return
        if access.verdict is not Verdict.ADMIT:
            writer.write(denied_response(access))
            return
        path = request.path
        if request.method == "POST" and path.startswith("/api/do/"):
            body = await self._body(reader, request)
            writer.write(await self._do(path[len("/api/do/"):], body))
        elif request.method != "GET":
            writer.write(error_response(405, "method-not-allowed", "GET the page; changes are POST /api/do/OP"))
        elif path in ("/", "/index.html"):
            writer.write(self._file("index.html"))
        elif path.startswith("/static/"):
            writer.write(self._file(path[len("/static/"):]))
        elif path == "/api/state":
            writer.write(json_response(200, {"ok": True, "result": await self.state()}))
        elif path == "/api/events":
            await self._events(reader, writer)
        elif path == "/api/requests":
            await self._requests(reader, writer, request)
        elif path.startswith("/api/read/"):
            writer.write(await self._read(path[len("/api/read/"):], request.query))
        else:
            writer.write(error_response(404, "not-found", f"no page {path}"))

    def _file(self, name: str) -> bytes:
        found = self.static.get(name)  # only the shipped files by name: no path to traverse
        if found is None:
            return error_response(404, "not-found", f"no file {name}")
        return response(200, found[0], found[1])

    async def _body(self, reader: asyncio.StreamReader, request: Request) -> Any:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise BadHttp("a change is a JSON body (Content-Type: application/json)")
        length = request.content_length
        if length > MAX_BODY_BYTES:
            raise BadHttp(f"body over {MAX_BODY_BYTES} bytes")
        raw = await asyncio.wait_for(reader.readexactly(length), HEAD_TIMEOUT_S)
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise BadHttp("the body is not valid JSON") from None

    async def _call(self, op: str, fields: dict) -> bytes:
        try:
            return json_response(200, {"ok": True, "result": await self.control.call(op, fields)})
        except AgentError as exc:
            return error_response(400, exc.code, str(exc))

    async def _do(self, op: str, body: Any) -> bytes:
        if op not in CHANGE_OPS:
            return error_response(404, "unknown-op", f"no change {op!r} here; known: {', '.join(CHANGE_OPS)}")
        if not isinstance(body, dict):
            return error_response(400, "bad-request", "the body must be a JSON object")
        return await self._call(op, {**body, "op": op})

    async def _read(self, op: str, query: dict[str, str]) -> bytes:
        if op not in READ_OPS or not self.control.has_op(op):
            return error_response(404, "unknown-op", f"no read {op!r} here")
        return await self._call(op, dict(query))

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      queue: asyncio.Queue[bytes], first: bytes) -> None:
        """Send `first`, then each queued frame, until the viewer goes (its side reaches EOF)."""
        writer.write(event_stream_head() + first)
        await writer.drain()
        gone = asyncio.ensure_future(reader.read(1))  # a viewer sends nothing more; EOF means it left
        try:
            while True:
                frame = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({frame, gone}, return_when=asyncio.FIRST_COMPLETED)
                if frame not in done:
                    frame.cancel()
                    return
                writer.write(frame.result())
                await writer.drain()
        finally:
            gone.cancel()

    async def _events(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=2)
        first = event_frame("history", self.history.to_json())
        first += event_frame("state", await self.state())  # at once, not a tick later
        self.viewers.add(queue)
        try:
            await self._stream(reader, writer, queue, first)
        finally:
            self.viewers.discard(queue)

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: Request) -> None:
        wanted = {"service": request.query.get("service") or None, "path_prefix": request.query.get("path") or None,
                  "status": request.query.get("status") or None, "max_rps": TAP_MAX_RPS}
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=STREAM_BACKLOG)

        def push(event: dict) -> None:
            if not queue.full():
                queue.put_nowait(event_frame("request", event))

        observability = self.control.observability
        tap_id = observability.open_tap(wanted, push)
        try:
            await self._stream(reader, writer, queue, event_frame("tapping", wanted))
        finally:
            observability.close_tap(tap_id)
