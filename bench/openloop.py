"""An open-loop HTTP/1.1 load generator: a constant request rate, latency from the intended send time.

Debian's wrk has no `-R`, and a closed-loop tool hides queueing: when the server stalls,
the client stops sending and the stall shows up as one slow request instead of many
("coordinated omission"). Here request i is due at start + i/rate, whatever happened
before. It goes out on an idle keep-alive connection from a fixed pool; when none is
idle it waits in a queue, and that wait counts, because every latency is measured from
the request's due time to the last byte of its response (what wrk2 does).

    python bench/openloop.py --port 8080 --rate 1000 --seconds 10

prints one JSON object: sent, completed, failed and the latency percentiles in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import sys
import threading
import time
from collections.abc import Sequence

import httptools

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, math.ceil(round(p * len(ordered) / 100.0, 9)))  # round: 99.9% of 1000 is 999, not 999.0000001
    return ordered[rank - 1]


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, generator: OpenLoop) -> None:
        self.generator = generator
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.due = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.generator.fail("unparsable response")
            self.transport.close()

    def on_message_complete(self) -> None:
        self.generator.finished(self, self.due, self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.generator.lost(self)

    def send(self, request: bytes, due: float) -> None:
        self.due = due
        self.transport.write(request)


class OpenLoop:
    def __init__(self, loop: asyncio.AbstractEventLoop, request: bytes) -> None:
        self.loop = loop
        self.request = request
        self.idle: collections.deque[_Connection] = collections.deque()
        self.busy: set[_Connection] = set()
        self.backlog: collections.deque[float] = collections.deque()
        self.latencies: list[float] = []
        self.failed = 0
        self.failure_kinds: collections.Counter[str] = collections.Counter()  # what each failure was
        self.sent = 0

    def fail(self, kind: str) -> None:
        self.failed += 1
        self.failure_kinds[kind] += 1

    def dispatch(self, due: float) -> None:
        self.sent += 1
        if self.idle:
            conn = self.idle.popleft()
            self.busy.add(conn)
            conn.send(self.request, due)
        else:
            self.backlog.append(due)

    def finished(self, conn: _Connection, due: float, status: int) -> None:
        if status == 200:
            self.latencies.append(time.perf_counter() - due)
        else:
            self.fail("status %d" % status)
        if self.backlog:
            conn.send(self.request, self.backlog.popleft())
        else:
            self.busy.discard(conn)
            self.idle.append(conn)

    def lost(self, conn: _Connection) -> None:
        if conn in self.busy:
            self.fail("connection closed before the response")
            self.busy.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    @property
    def outstanding(self) -> int:
        return len(self.busy) + len(self.backlog)


def _pace(loop: asyncio.AbstractEventLoop, gen: OpenLoop, start: float, rate: float, total: int) -> None:
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        loop.call_soon_threadsafe(gen.dispatch, due)


async def run(port: int, path: str, rate: float, seconds: float, connections: int) -> dict:
    loop = asyncio.get_running_loop()
    request = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (path.encode(), port)
    gen = OpenLoop(loop, request)
    for _ in range(connections):
        _, conn = await loop.create_connection(lambda: _Connection(gen), "127.0.0.1", port)
        gen.idle.append(conn)
    total = int(rate * seconds)
    # Event loop timers tick in whole milliseconds, which would add up to 1 ms to every
    # latency: a thread sleeps with nanosleep precision and hands each due request over.
    start = time.perf_counter() + 0.01
    pacer = threading.Thread(target=_pace, args=(loop, gen, start, rate, total), name="pacer")
    pacer.start()
    await loop.run_in_executor(None, pacer.join)
    drain_deadline = time.perf_counter() + 10.0
    while gen.outstanding and time.perf_counter() < drain_deadline:
        await asyncio.sleep(0.01)
    unfinished = gen.outstanding
    for conn in list(gen.idle) + list(gen.busy):
        conn.transport.close()
    ordered = sorted(gen.latencies)
    result = {
        "rate": rate,
        "seconds": seconds,
        "connections": connections,
        "sent": gen.sent,
        "completed": len(ordered),
        "failed": gen.failed + unfinished,
        "failure kinds": dict(gen.failure_kinds, **({"unfinished at the end": unfinished} if unfinished else {})),
        "achieved_rps": len(ordered) / max(time.perf_counter() - start, 1e-9),
    }
    for p in PERCENTILES:
        result["p%g" % p] = percentile(ordered, p) if ordered else None
    result["max"] = ordered[-1] if ordered else None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="on 127.0.0.1")
    parser.add_argument("--path", default="/")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds at the same rate, not measured")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    # The pacer thread must get the GIL back quickly when its sleep ends.
    sys.setswitchinterval(0.0002)
    try:
        import uvloop
    except ImportError:
        new_loop = asyncio.new_event_loop
    else:
        new_loop = uvloop.new_event_loop
    if args.warmup > 0:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(run(args.port, args.path, args.rate, args.warmup, args.connections))
    with asyncio.Runner(loop_factory=new_loop) as runner:
        result = runner.run(run(args.port, args.path, args.rate, args.seconds, args.connections))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
