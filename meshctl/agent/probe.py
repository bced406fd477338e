"""Readiness probes: an HTTP GET on the app, or a connect when no health path is given.

The app is on 127.0.0.1:port, or on a Unix socket (`listen: unix`) given by its path."""

from __future__ import annotations

import asyncio

from meshctl.agent.model import Health


class ProbeFailed(Exception):
    pass


async def probe(port: int | str, health: Health) -> None:
    """Raise ProbeFailed with a short reason unless the app on 127.0.0.1:port (or the socket path) is ready."""
    try:
        await asyncio.wait_for(_probe(port, health), health.timeout_s)
    except asyncio.TimeoutError:
        raise ProbeFailed(f"no answer within {health.timeout_s:g}s") from None
    except OSError as exc:
        raise ProbeFailed(exc.strerror or str(exc)) from None


async def _probe(port: int | str, health: Health) -> None:
    if isinstance(port, str):
        reader, writer = await asyncio.open_unix_connection(port)
        host = b"localhost"
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        host = b"127.0.0.1:%d" % port
    try:
        if health.http is None:
            return
        writer.write(
            b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: meshctl-probe\r\n"
            b"Connection: close\r\n\r\n" % (health.http.encode(), host)
        )
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise ProbeFailed(f"GET {health.http}: not an HTTP response")
        status = int(parts[1])
        if not 200 <= status < 400:
            raise ProbeFailed(f"GET {health.http} answered {status}")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
