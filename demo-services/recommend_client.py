"""The frontend's gRPC client for `recommend.Recommend/ForItem` (demo-services/recommend.py).

Also a command for a gRPC client outside the mesh, through the ingress (which routes
`/recommend.Recommend/` to recommend in templates/shopfast.yaml):

    python demo-services/recommend_client.py --url http://127.0.0.1:8080 mug-01

The mesh gives the frontend RECOMMEND_URL (`http://127.0.0.1:<port>`, its sidecar's
outbound listener for `recommend`, which speaks h2c because the service is declared
`protocol: grpc`); gRPC wants `host:port` and an insecure channel, the sidecar encrypts.
Recommendations are a nice-to-have: without grpcio, without RECOMMEND_URL, or when the
call fails, `for_item` returns None and the page renders without them.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

try:
    import grpc
except ImportError:  # the demo lists grpcio, but the shop must not depend on it to render
    grpc = None

METHOD = "/recommend.Recommend/ForItem"
DEADLINE_S = 0.5

log = logging.getLogger("recommend-client")


@dataclass(frozen=True)
class Recommendations:
    skus: tuple[str, ...]
    served_by: str | None  # the recommend instance, from the x-served-by trailer


class RecommendClient:
    def __init__(self, url: str | None) -> None:
        self.target = None
        self._channel = None
        self._for_item = None
        if url and grpc is not None:
            parsed = urllib.parse.urlsplit(url)
            self.target = "%s:%d" % (parsed.hostname, parsed.port or 80)
            self._channel = grpc.insecure_channel(self.target)
            self._for_item = self._channel.unary_unary(
                METHOD, request_serializer=lambda data: data, response_deserializer=lambda data: data
            )
        elif url:
            log.warning("grpcio is not installed: no recommendations from %s", url)

    def for_item(self, sku: str, trace_headers: Mapping[str, str]) -> Recommendations | None:
        if self._for_item is None:
            return None
        try:
            response, call = self._for_item.with_call(
                sku.encode("ascii", "replace"), timeout=DEADLINE_S, metadata=tuple(trace_headers.items())
            )
        except grpc.RpcError as exc:
            log.info("recommend %s for %s: %s", self.target, sku, exc.code() if hasattr(exc, "code") else exc)
            return None
        served_by = dict(call.trailing_metadata() or ()).get("x-served-by")
        skus = tuple(part for part in response.decode("ascii", "replace").split(",") if part)
        return Recommendations(skus, served_by)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Ask recommend.Recommend/ForItem for recommendations.")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the ingress (or a sidecar's outbound listener)")
    parser.add_argument("sku", nargs="?", default="mug-01")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)  # why a call failed
    if grpc is None:
        print("grpcio is not installed: pip install grpcio", file=sys.stderr)
        return 2
    client = RecommendClient(args.url)
    try:
        answer = client.for_item(args.sku, {})
    finally:
        client.close()
    if answer is None:
        return 1
    print("%s (served by %s)" % (", ".join(answer.skus), answer.served_by or "?"))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
