"""A gRPC "recommendations" service the shop could call, defined without protoc.

Messages are plain bytes (identity serializers): a request is an item id or a count in
ASCII, a response is a recommended item id. Methods of service `recommend.Recommend`:

* ForItem (unary): item id -> comma-separated recommendations: for a ShopFast SKU, three
  other SKUs of the shop (bought together, a fixed table); for any other id `id-a,id-b,id-c`;
* Stream (server streaming): count n -> n recommendations, one message each;
* Collect (client streaming): item ids -> how many were received;
* Slow (unary): waits until the deadline passes (to show DEADLINE_EXCEEDED);
* Fail (unary): answers UNAVAILABLE with a message (to show a server status).

Needs grpcio (a dependency of the demo). The ShopFast frontend calls ForItem through the
mesh (templates/shopfast.yaml declares this service `protocol: grpc`). Run by hand: PORT=50051 python demo-services/recommend.py
gRPC apps speak HTTP/2 only, so the mesh health probe must be TCP (connect) for them.
"""

import os
import signal
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "recommend.Recommend"
INSTANCE = "%s@%s#%s" % (
    os.environ.get("MESH_SERVICE", "recommend"),
    os.environ.get("MESH_VERSION", "v1"),
    os.environ.get("MESH_REPLICA", "0"),
)
SLOW_LIMIT_S = 30.0
# "Bought together": each ShopFast SKU (demo-services/catalog.py) -> three others.
SHOP_SKUS = ("mug-01", "tee-02", "hoodie-03", "socks-04", "sticker-05", "cap-06",
             "bottle-07", "notebook-08", "tote-09", "pins-10", "lamp-11", "plush-12")


def _identity(data: bytes) -> bytes:
    return data


def for_item(request: bytes, context: grpc.ServicerContext) -> bytes:
    item = request.decode("ascii", "replace") or "none"
    context.set_trailing_metadata((("x-served-by", INSTANCE),))
    return ",".join(recommendations_for(item)).encode()


def recommendations_for(item: str) -> list[str]:
    if item in SHOP_SKUS:
        index = SHOP_SKUS.index(item)
        return [SHOP_SKUS[(index + step) % len(SHOP_SKUS)] for step in (1, 4, 7)]
    return [item + "-a", item + "-b", item + "-c"]


def stream(request: bytes, context: grpc.ServicerContext):
    for index in range(int(request or b"0")):
        yield b"rec-%d" % index


def collect(request_iterator, context: grpc.ServicerContext) -> bytes:
    return b"%d" % sum(1 for _ in request_iterator)


def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    stopped = threading.Event()
    context.add_callback(stopped.set)  # runs when the RPC ends: deadline passed or cancelled
    stopped.wait(SLOW_LIMIT_S)
    return b"too late"


def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.UNAVAILABLE, "recommendations are warming up")


def handler() -> grpc.GenericRpcHandler:
    unary = grpc.unary_unary_rpc_method_handler
    kinds = {"request_deserializer": _identity, "response_serializer": _identity}
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ForItem": unary(for_item, **kinds),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, **kinds),
            "Collect": grpc.stream_unary_rpc_method_handler(collect, **kinds),
            "Slow": unary(slow, **kinds),
            "Fail": unary(fail, **kinds),
        },
    )


def build_server(port: int = 0) -> tuple[grpc.Server, int]:
    """A started server on 127.0.0.1:`port` (0: any free port) and the port it got."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler(),))
    bound = server.add_insecure_port("127.0.0.1:%d" % port)
    server.start()
    return server, bound


def main() -> None:
    server, port = build_server(int(os.environ.get("PORT", "50051")))
    print("%s serving gRPC on 127.0.0.1:%d" % (INSTANCE, port), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(3600):
        pass
    server.stop(grace=2.0).wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
