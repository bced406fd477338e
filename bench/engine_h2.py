"""Python CPU per HTTP/2 stream of the sidecar's H2Proxy alone: no sockets, no TLS, no loop running.

    python bench/engine_h2.py [--streams 20000] [--batches 7] [--why errors|all|off] [--grpc]

An app's outbound HTTP/2 connection to a service, as proxy.dispatch.outbound_h2 builds it
(routing, balancing, limits, metrics and the `meshctl why` keep test included), gets a fake
transport on both sides. The client's and the upstream app's frames are made beforehand
(hpack and hyperframe, which come with h2), so the figure is the proxy's work alone: per
stream one `data_received` of a request's HEADERS downstream and one of the answer
upstream (HEADERS and DATA, or for `--grpc` HEADERS, a length-prefixed message and
grpc-status trailers). Streams follow one another on one connection each side.

The figure is process CPU time per stream, the minimum over the batches, as bench/engine.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hpack import Encoder  # noqa: E402
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame, WindowUpdateFrame  # noqa: E402

from engine import APP, SERVICE, FakeTransport, add_why_option, min_cpu_per_item, sidecar_config, sidecar_state  # noqa: E402
from meshctl.proxy import h2proxy  # noqa: E402
from meshctl.proxy.dispatch import outbound_h2  # noqa: E402

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BODY = b"hello, world\n"
GRPC_MESSAGE = b"\x00" + len(BODY).to_bytes(4, "big") + BODY


def _frames(count: int, grpc: bool) -> tuple[list[bytes], list[bytes]]:
    """`count` requests from the client (stream ids 1, 3, ...) and the app's answers (the proxy's ids, the same)."""
    ask, answer = Encoder(), Encoder()
    request = [(":method", "POST" if grpc else "GET"), (":scheme", "http"), (":authority", "web"), (":path", "/shop.Cart/Get" if grpc else "/"),
               ("user-agent", "bench")] + ([("content-type", "application/grpc"), ("te", "trailers")] if grpc else [])
    head = [(":status", "200"), ("content-type", "application/grpc" if grpc else "text/plain")] + ([] if grpc else [("content-length", "13")])
    requests, answers = [], []
    for index in range(count):
        stream = 2 * index + 1
        start = b""
        if index == 0:  # the connection prefaces, a large connection window, and the ACK of the proxy's settings
            start = PREFACE + SettingsFrame(0).serialize() + WindowUpdateFrame(0, window_increment=2**30).serialize()
            start += SettingsFrame(0, flags=["ACK"]).serialize()
        requests.append(start + HeadersFrame(stream, ask.encode(request), flags=["END_HEADERS", "END_STREAM"]).serialize())
        reply = b""
        if index == 0:
            reply = SettingsFrame(0).serialize() + SettingsFrame(0, flags=["ACK"]).serialize()
        reply += HeadersFrame(stream, answer.encode(head), flags=["END_HEADERS"]).serialize()
        if grpc:
            reply += DataFrame(stream, GRPC_MESSAGE).serialize()
            reply += HeadersFrame(stream, answer.encode([("grpc-status", "0")]), flags=["END_HEADERS", "END_STREAM"]).serialize()
        else:
            reply += DataFrame(stream, BODY, flags=["END_STREAM"]).serialize()
        answers.append(reply)
    return requests, answers


def measure(streams: int, batches: int, why: str = "errors", grpc: bool = False) -> float:
    """Minimum CPU seconds per stream over `batches` of `streams`."""
    loop = asyncio.new_event_loop()
    try:
        listener = {"name": "out", "kind": "outbound", "fd": -1, "service": "web", "protocol": "grpc"}
        state = sidecar_state(loop, sidecar_config(listener, "shop@v1#0", "shop", {"web": {**SERVICE, "protocol": "grpc"}}, why))
        proxy = outbound_h2(state, state.snapshot.listeners["out"])  # type: ignore[union-attr]
        downstream = FakeTransport()
        proxy.connection_made(downstream)  # type: ignore[arg-type]
        upstream = h2proxy._Side(proxy, client_side=True, label="upstream (bench)")
        upstream.connection_made(FakeTransport())  # type: ignore[arg-type]
        proxy.upstreams[(APP[0], APP[1], id(None))] = upstream  # as if connected: no connect task runs
        warmup = 100
        requests, answers = _frames(warmup + streams * batches, grpc)
        position = 0

        def batch(count: int) -> None:
            nonlocal position
            for index in range(position, position + count):
                proxy.data_received(requests[index])
                upstream.data_received(answers[index])
            position += count

        batch(warmup)
        if proxy.streams != warmup or proxy.records or BODY not in downstream.written[-1]:
            raise SystemExit("the proxy did not end every stream: %d streams, %d open" % (proxy.streams, len(proxy.records)))
        best = min_cpu_per_item(batch, streams, batches, downstream.written.clear)
        if proxy.streams != warmup + streams * batches or proxy.records:
            raise SystemExit("the proxy did not end every stream")
        return best
    finally:
        loop.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=7)
    add_why_option(parser)
    parser.add_argument("--grpc", action="store_true", help="gRPC unary calls instead of GET with a 13-byte body")
    args = parser.parse_args()
    print("%-8s %6.2f us Python CPU per stream" % ("grpc" if args.grpc else "http2", measure(args.streams, args.batches, args.why, args.grpc) * 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
