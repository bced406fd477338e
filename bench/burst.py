"""A burst of new client connections: every request on its own connection (`connection: close`).

    python bench/burst.py --port PORT [--requests 4000] [--concurrency 500] [--processes 2] [--path /]

What a crowd of browsers or a fleet of short-lived clients does to a proxy, and what
`wrk`/`h2load` (keep-alive) do not show: each of `--concurrency` clients opens a connection,
sends one GET with `connection: close`, reads the response to its end and starts over, until
`--requests` have been sent. The clients are split over `--processes` processes (asyncio,
uvloop when installed, raw sockets), so the generator is not the bottleneck on a small
machine. Prints one JSON object: requests, failures by reason (a refused or timed out
connect, a reset, a status other than 200 with its x-mesh-error) and the wall time from the
first connect to the last response.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from collections import Counter
from typing import Any

REQUEST_TIMEOUT_S = 60.0  # a response slower than this counts as a failure


class OneRequest(asyncio.Protocol):
    """Sends the request on connect, collects the whole response, resolves `done` at EOF."""

    def __init__(self, request: bytes, done: asyncio.Future) -> None:
        self.request = request
        self.done = done
        self.chunks: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result((b"".join(self.chunks), exc))


def classify(response: bytes, exc: Exception | None) -> str | None:
    """None for a 200, else the reason a request failed."""
    head, _, _ = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return "reset before a response (%s)" % (type(exc).__name__ if exc else "eof")
    if parts[1] == b"200":
        return None
    mesh_error = b""
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-mesh-error":
            mesh_error = value.strip()
    return "status %s %s" % (parts[1].decode("ascii", "replace"), mesh_error.decode("ascii", "replace") or "(not from the mesh)")


async def _client(loop: asyncio.AbstractEventLoop, host: str, port: int, request: bytes, quota: list[int], failures: Counter) -> None:
    while quota[0] > 0:
        quota[0] -= 1
        done = loop.create_future()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await loop.create_connection(lambda: OneRequest(request, done), host, port)
                response, exc = await done
        except TimeoutError:
            failures["no response within %gs" % REQUEST_TIMEOUT_S] += 1
            continue
        except OSError as exc:
            failures["connect failed (%s)" % type(exc).__name__] += 1
            continue
        reason = classify(response, exc)
        if reason is not None:
            failures[reason] += 1


async def _one_process(host: str, port: int, path: str, requests: int, concurrency: int, start_at: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    request = b"GET %s HTTP/1.1\r\nhost: %s:%d\r\nconnection: close\r\n\r\n" % (path.encode(), host.encode(), port)
    quota = [requests]
    failures: Counter = Counter()
    delay = start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)  # pacing: all processes start their burst at the same instant
    started = time.monotonic()
    await asyncio.gather(*(_client(loop, host, port, request, quota, failures) for _ in range(concurrency)))
    return {"started": started, "ended": time.monotonic(), "failures": dict(failures)}


def _worker(args: tuple, results: Any) -> None:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    results.put(runner(_one_process(*args)))


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def run_burst(host: str, port: int, requests: int, concurrency: int, processes: int = 2, path: str = "/") -> dict[str, Any]:
    """Send the burst; returns requests, concurrency, failed, failures {reason: count} and wall_s."""
    processes = max(1, min(processes, concurrency))
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    start_at = time.monotonic() + 0.5  # time for the processes to start
    workers = [
        context.Process(target=_worker, args=((host, port, path, share, clients, start_at), results), daemon=True)
        for share, clients in zip(_shares(requests, processes), _shares(concurrency, processes))
    ]
    for worker in workers:
        worker.start()
    try:
        outcomes = [results.get(timeout=REQUEST_TIMEOUT_S * 4 + requests / 50) for _ in workers]
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
                worker.join()
    failures: Counter = Counter()
    for outcome in outcomes:
        failures.update(outcome["failures"])
    return {
        "requests": requests,
        "concurrency": concurrency,
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "wall_s": round(max(o["ended"] for o in outcomes) - min(o["started"] for o in outcomes), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.processes < 1:
        parser.error("--requests, --concurrency and --processes must be at least 1")
    result = run_burst(args.host, args.port, args.requests, args.concurrency, args.processes, args.path)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
