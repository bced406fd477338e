"""Outside TLS peers for tests: a client and an HTTPS server with any certificate we like.

They use Python's ssl module directly, never the sidecar's code, so a test that passes
proves the sidecar interoperates with an independent TLS stack.
"""

from __future__ import annotations

import datetime as dt
import http.server
import os
import socket
import ssl
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshctl.agent.ca import CertificateAuthority, spiffe_id

TRUST_DOMAIN = "t.local"


def make_ca(directory: Path, mesh: str = "t") -> CertificateAuthority:
    return CertificateAuthority(directory, mesh)


def tls_block(ca: CertificateAuthority, service: str, mode: str = "strict", lifetime: float = 3600) -> dict:
    """The `tls` part of a sidecar snapshot, as the agent would send it."""
    leaf = ca.issue(spiffe_id(TRUST_DOMAIN, service), lifetime)
    return {
        "mode": mode, "identity": leaf.identity, "cert_pem": leaf.chain_pem, "key_pem": leaf.key_pem,
        "bundle_pem": ca.bundle_pem, "not_after": leaf.not_after,
    }


def expired_leaf(ca: CertificateAuthority, identity: str) -> tuple[str, str]:
    """A leaf our CA signed that expired an hour ago: (cert_pem, key_pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "expired")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=2))
        .not_valid_after(now - dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def user_certificate(common_name: str, dns_names: tuple[str, ...] = (), ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[str, str]:
    """A self-signed certificate, as a user would bring for the ingress: (cert_pem, key_pem).

    Marked as its own CA, so that clients (curl, grpcio, Python's ssl) accept it as their trust anchor.
    """
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    names = [x509.DNSName(dns) for dns in dns_names] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


class PemFiles:
    """Cert and key written to a private temp dir, because ssl loads chains from paths."""

    def __init__(self, cert_pem: str, key_pem: str, bundle_pem: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="tlspeer-")
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")
        self.bundle = os.path.join(self.dir, "bundle.pem")
        for path, data in ((self.cert, cert_pem), (self.key, key_pem), (self.bundle, bundle_pem)):
            Path(path).write_text(data)
            os.chmod(path, 0o600)


def client_context(bundle_pem: str, cert_pem: str | None = None, key_pem: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=bundle_pem)
    if cert_pem is not None:
        files = PemFiles(cert_pem, key_pem or "", bundle_pem)
        ctx.load_cert_chain(files.cert, files.key)
    return ctx


def _get_status(sock: socket.socket, path: str) -> int | None:
    """Send one GET on a connected (plain or TLS) socket; its status, or None if no HTTP came back."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    if not data.startswith(b"HTTP/1."):
        return None
    return int(data.split(b" ", 2)[1])


def tls_get(port: int, ctx: ssl.SSLContext, path: str = "/", timeout: float = 5.0) -> int | None:
    """Status of one GET over TLS, or None when the peer refused us (at or after the handshake)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname="svc.mesh") as tls:
                return _get_status(tls, path)
    except (ssl.SSLError, ConnectionError, OSError):
        return None


def plain_get(port: int, path: str = "/", timeout: float = 5.0) -> int | None:
    """Status of one plaintext GET, or None when the peer refused it."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            return _get_status(sock, path)
    except (ConnectionError, OSError):
        return None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = b"tls upstream\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class HttpsUpstream:
    """An HTTPS server on 127.0.0.1:0 presenting the given certificate (or plain HTTP)."""

    def __init__(self, cert_pem: str | None, key_pem: str | None, bundle_pem: str | None = None) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        if cert_pem is not None:
            files = PemFiles(cert_pem, key_pem or "", bundle_pem or cert_pem)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(files.cert, files.key)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> list:
        return ["127.0.0.1", self.port]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
