"""The sidecar's admin listener: GET /metrics, /stats and /ready on 127.0.0.1.

The agent binds the socket (kind `admin` in the listener list) and passes it in like the
others. One request per connection (`connection: close`), answered from the observer's
registry; anything else is 404 or 405. Prometheus does not scrape sidecars directly: the
agent serves all of them merged (docs/observability.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable

from meshctl.proxy.observe import Observer
from meshctl.proxy.peers import PeerGate

log = logging.getLogger("proxy.admin")

MAX_HEAD_BYTES = 8192
HEAD_TIMEOUT = 5.0
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def response(status: int, reason: str, body: bytes, content_type: str) -> bytes:
    head = "HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
        status, reason, content_type, len(body))
    return head.encode("ascii") + body


def answer(request_line: bytes, observer: Observer | None) -> bytes:
    """The whole response to one request line (pure, given the observer)."""
    parts = request_line.split()
    if len(parts) != 3:
        return response(400, "Bad Request", b"bad request\n", "text/plain")
    method, target = parts[0], parts[1].partition(b"?")[0]
    if target not in (b"/metrics", b"/stats", b"/ready"):
        return response(404, "Not Found", b"try /metrics, /stats or /ready\n", "text/plain")
    if method not in (b"GET", b"HEAD"):
        return response(405, "Method Not Allowed", b"GET only\n", "text/plain")
    if observer is None:
        return response(503, "Service Unavailable", b"no config applied yet\n", "text/plain")
    if target == b"/ready":
        return response(200, "OK", b"ready\n", "text/plain")
    if target == b"/metrics":
        return response(200, "OK", observer.metrics.exposition().encode(), PROMETHEUS_TEXT)
    return response(200, "OK", json.dumps(observer.metrics.snapshot()).encode(), "application/json")


async def serve_admin(
    loop: asyncio.AbstractEventLoop, fd: int, observer: Callable[[], Observer | None], gate: Callable[[], PeerGate | None] = lambda: None,
) -> asyncio.AbstractServer:
    """Serve the inherited admin socket `fd`; `observer()` gives the current registry.

    With a `gate()`, only processes of the mesh's uid are answered (proxy.peers)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        checker = gate()
        if checker is not None and not checker.admits(writer.get_extra_info("socket"), "admin"):
            writer.transport.abort()
            return
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            writer.write(answer(head.partition(b"\r\n")[0], observer()))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("admin request failed")
        finally:
            writer.close()

    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return await asyncio.start_server(handle, sock=sock, limit=MAX_HEAD_BYTES)
