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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshctl.proxy.build import BUILD  # noqa: E402
from meshctl.proxy.observe import Observer  # noqa: E402
from meshctl.proxy.pool import UpstreamConnection  # noqa: E402
from meshctl.proxy.server import ClientConnection, ServerState  # noqa: E402
from meshctl.proxy.snapshot import compile_snapshot  # noqa: E402

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


class FakeTransport:
    """Collects what is written; the rest of the transport API does nothing."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def measure(kind: str, requests: int, batches: int, why: str = "errors") -> float:
    """Minimum CPU seconds per request over `batches` of `requests` on a `kind` listener."""
    loop = asyncio.new_event_loop()
    try:
        listener = {"name": kind, "kind": kind, "fd": -1}
        listener.update({"app": list(APP)} if kind == "inbound" else {"routes": [{"path": "/", "service": "web"}]})
        config = {
            "instance": "web@v1#0" if kind == "inbound" else "ingress", "service": "web" if kind == "inbound" else "None",
            "version": "v1", "drain_timeout": 5.0, "listeners": [listener], "services": {"web": SERVICE}, "egress": [],
            "http": {"max_header_bytes": 65536, "max_body_bytes": None, "header_timeout": 10.0, "idle_timeout": 60.0},
            "tracing": {"sampling": 0.01}, "access_log": "off", "why": {"mode": why},
        }
        snapshot = compile_snapshot({"type": "config", "version": 1, "config": config}, None)
        state = ServerState(loop)
        state.snapshot = snapshot
        state.observer = Observer(state, snapshot, lambda message: None)
        state.on_exchange_done = state.observer.exchange_done
        state.observer.configure(snapshot, config)
        client = ClientConnection(state, snapshot.listeners[kind])
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
        best = float("inf")
        gc.collect()
        for _ in range(batches):
            client_transport.written.clear()
            upstream_transport.written.clear()
            started = time.process_time()
            batch(requests)
            best = min(best, (time.process_time() - started) / requests)
        return best
    finally:
        loop.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--why", choices=("errors", "all", "off"), default="errors",
                        help="decision records for `meshctl why` (observability.why) [errors, the default]")
    args = parser.parse_args()
    print("build: %s" % BUILD.description)
    if BUILD.warning is not None:
        print(BUILD.warning)
    for kind in ("ingress", "inbound"):
        print("%-8s %6.2f us Python CPU per request" % (kind, measure(kind, args.requests, args.batches, args.why) * 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
