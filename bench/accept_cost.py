"""What the local-uid check costs per accepted connection (meshctl/proxy/peers.py).

Two figures: the check alone (`PeerGate.admits` on a live loopback connection, in this
process), and new-connection requests through a real sidecar's outbound listener with the
check on and off (each request on its own connection, `connection: close`, to an upstream
that answers at once). Pooled keep-alive connections pay the check once, so real traffic
pays it rarely. Run: `nice python bench/accept_cost.py [--seconds 2] [--rounds 5]`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshctl.proxy.peers import PeerGate  # noqa: E402
from tests.proxy_harness import Sidecar, Upstream, raw_exchange, service  # noqa: E402


def check_alone(count: int) -> float:
    """Microseconds per admits() call."""
    gate = PeerGate(os.getuid(), time.time, lambda listener, uid: None)
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as client:
        conn, _ = server.accept()
        with conn:
            started = time.perf_counter()
            for _ in range(count):
                assert gate.admits(conn, "outbound")
            elapsed = time.perf_counter() - started
    gate.close()
    return elapsed / count * 1e6


def connections_per_second(local_uid: int | None, seconds: float) -> float:
    upstream = Upstream("up")
    block = service([("v1", upstream.address)])
    sidecar = Sidecar([{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": block}, local_uid=local_uid).start()
    request = b"GET / HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n"
    try:
        for _ in range(50):  # warm-up
            raw_exchange(sidecar.ports["out"], request)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            assert raw_exchange(sidecar.ports["out"], request)[0][0] == 200
            done += 1
        return done / (time.perf_counter() - started)
    finally:
        sidecar.stop()
        upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with open("/proc/net/tcp") as fh:
        sockets = sum(1 for _ in fh) - 1
    print("sockets on this host (IPv4 TCP): %d" % sockets)
    print("check alone: %.1f us per connection" % check_alone(20000))
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.rounds):  # interleaved, so a noisy neighbour hits both alike
        for label, uid in (("off", None), ("on", os.getuid())):
            rates[label].append(connections_per_second(uid, args.seconds))
    for label, values in rates.items():
        rate = statistics.median(values)
        print("new connection + request, check %-3s: median %5.0f /s (%.0f us each) over %s" % (
            label, rate, 1e6 / rate, " ".join("%.0f" % v for v in values)))


if __name__ == "__main__":
    main()
