"""What TLS 1.3 session resumption would save on a handshake between two sidecars.

    python bench/tls_resume.py [--handshakes 300]

Both ends in one process (a blocking server thread and a blocking client), with the
sidecars' own contexts (proxy.tls: TLS 1.3, client certificates required, ECDSA P-256 leaves
from meshctl's CA): rounds of full handshakes alternate with rounds resumed from a session
ticket. CPU is the process's user+sys per handshake, both ends and the TCP connect included.
docs/connections.md records the result and why the sidecar does not resume sessions.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meshctl.agent.ca import CertificateAuthority, spiffe_id  # noqa: E402
from meshctl.proxy.tls import TLSConfig  # noqa: E402


def _tls(ca: CertificateAuthority, service: str) -> TLSConfig:
    leaf = ca.issue(spiffe_id("bench.local", service), 3600)
    return TLSConfig({"identity": leaf.identity, "cert_pem": leaf.chain_pem, "key_pem": leaf.key_pem, "bundle_pem": ca.bundle_pem}, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=300, help="per round [300]")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as home:
        ca = CertificateAuthority(Path(home) / "ca", "bench")
        server, client = _tls(ca, "web").server_context, _tls(ca, "ingress").client_context
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            try:
                with server.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
                    tls.sendall(b"y")
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()

    def handshake(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool]:
        with client.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="web.mesh", session=session) as tls:
            tls.sendall(b"x")
            tls.recv(1)  # TLS 1.3 tickets arrive after the handshake
            return tls.session, tls.session_reused

    session, _ = handshake(None)
    for label, resume in (("full", False), ("resumed", True), ("full", False), ("resumed", True)):
        cpu, wall, reused = time.process_time(), time.perf_counter(), 0
        for _ in range(args.handshakes):
            fresh, was_reused = handshake(session if resume else None)
            reused += was_reused
            if resume and fresh is not None:
                session = fresh
        print("%-8s %6.0f us CPU per handshake (both ends), %6.0f us wall, %d of %d resumed" % (
            label, (time.process_time() - cpu) / args.handshakes * 1e6, (time.perf_counter() - wall) / args.handshakes * 1e6,
            reused, args.handshakes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
