"""Python CPU per request of the sidecar's engine alone: no sockets, no uvloop, no TLS.

    python bench/engine.py [--requests 20000] [--batches 7] [--why errors|all|off]

A `ClientConnection` and a pooled `UpstreamConnection` of the working tree's proxy get
fake transports; each request is one `data_received` of a request head on the client
side and one of an nginx-like response on the upstream side, so everything between the
two (parsing, routing, balancing, trace headers, metrics, the pool) runs as in a
sidecar. Two listeners are measured: the ingress (starts the trace, routes to a
service) and a service's inbound (continues an unsampled trace to its app).

The figure is process CPU time per request, the minimum over the batches: it moves
little when other work shares the machine, unlike wrk's, so it is the one to compare
before and after a hot-path change. It leaves out the kernel, uvloop and OpenSSL, which
`make bench` includes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshctl.proxy.build import BUILD  # noqa: E402
from meshctl.proxy.observe import Observer  # noqa: E402
from meshctl.proxy.pool import UpstreamConnection  # noqa: E402
from meshctl.proxy.server import ClientConnection, ServerState  # noqa: E402
from meshctl.proxy.snapshot import compile_snapshot  # noqa: E402
from tests.drivers import FakeTransport  # noqa: E402

APP = ("127.0.0.1", 9)
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
INBOUND_REQUEST = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nx-forwarded-for: 127.0.0.1\r\n"
    b"forwarded: for=127.0.0.1\r\nx-request-id: 6f1c2a9e0b3d000000000001\r\n"
    b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00\r\n"
    b"b3: 0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 13:00:00 GMT\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 13\r\nLast-Modified: Thu, 26 Nov 2026 13:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "abc-d"\r\nAccept-Ranges: bytes\r\n\r\nhello, world\n'
)
SERVICE = {
    "endpoints": [{"id": "web@v1#0", "version": "v1", "address": list(APP)}],
    "versions": ["v1"], "split": {"v1": 100}, "routes": [], "timeout": None, "stream_idle_timeout": 300.0, "connect_timeout": 1.0,
    "retries": None, "load_balancer": {"kind": "round_robin"}, "outlier_detection": None,
    "limits": {"max_connections": 1024, "max_pending": 1024},
}


def sidecar_config(listener: dict, instance: str, service: str, services: dict, why: str) -> dict:
    """A sidecar's config with one listener: tracing sampled at 0.01, access log off, `why` records."""
    return {
        "instance": instance, "service": service, "version": "v1", "drain_timeout": 5.0, "listeners": [listener],
        "services": services, "egress": [],
        "http": {"max_header_bytes": 65536, "max_body_bytes": None, "header_timeout": 10.0, "idle_timeout": 60.0},
        "tracing": {"sampling": 0.01}, "access_log": "off", "why": {"mode": why},
    }


def sidecar_state(loop: asyncio.AbstractEventLoop, config: dict) -> ServerState:
    """The state of a sidecar that applied `config`, its Observer hooked in, messages to the agent dropped."""
    snapshot = compile_snapshot({"type": "config", "version": 1, "config": config}, None)
    state = ServerState(loop)
    state.snapshot = snapshot
    state.observer = Observer(state, snapshot, lambda message: None)
    state.on_exchange_done = state.observer.exchange_done
    state.observer.configure(snapshot, config)
    return state


def min_cpu_per_item(batch: Callable[[int], None], count: int, batches: int, between: Callable[[], None]) -> float:
    """The minimum over `batches` runs of `batch(count)` of process CPU seconds per item (`between` runs before each)."""
    best = float("inf")
    gc.collect()
    for _ in range(batches):
        between()
        started = time.process_time()
        batch(count)
        best = min(best, (time.process_time() - started) / count)
    return best


def add_why_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--why", choices=("errors", "all", "off"), default="errors",
                        help="decision records for `meshctl why` (observability.why) [errors, the default]")


def measure(kind: str, requests: int, batches: int, why: str = "errors") -> float:
    """Minimum CPU seconds per request over `batches` of `requests` on a `kind` listener."""
    loop = asyncio.new_event_loop()
    try:
        listener = {"name": kind, "kind": kind, "fd": -1}
        listener.update({"app": list(APP)} if kind == "inbound" else {"routes": [{"path": "/", "service": "web"}]})
        inbound = kind == "inbound"
        config = sidecar_config(listener, "web@v1#0" if inbound else "ingress", "web" if inbound else "None", {"web": SERVICE}, why)
        state = sidecar_state(loop, config)
        client = ClientConnection(state, state.snapshot.listeners[kind])  # type: ignore[union-attr]
        client_transport = FakeTransport()
        client.connection_made(client_transport)  # type: ignore[arg-type]
        upstream = UpstreamConnection(state.pool, APP, "web")
        upstream_transport = FakeTransport()
        upstream.connection_made(upstream_transport)  # type: ignore[arg-type]
        state.pool.add_idle(upstream)
        request = INBOUND_REQUEST if kind == "inbound" else REQUEST

        def batch(count: int) -> None:
            for _ in range(count):
                client.data_received(request)
                upstream.data_received(RESPONSE)

        batch(100)
        if len(upstream_transport.written) != 100 or not client_transport.written[-1].endswith(b"hello, world\n"):
            raise SystemExit("the engine did not answer every request: %r" % client_transport.written[-3:])

        def clear() -> None:
            client_transport.written.clear()
            upstream_transport.written.clear()

        return min_cpu_per_item(batch, requests, batches, clear)
    finally:
        loop.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=7)
    add_why_option(parser)
    args = parser.parse_args()
    print("build: %s" % BUILD.description)
    if BUILD.warning is not None:
        print(BUILD.warning)
    for kind in ("ingress", "inbound"):
        print("%-8s %6.2f us Python CPU per request" % (kind, measure(kind, args.requests, args.batches, args.why) * 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
