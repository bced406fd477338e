"""mTLS for the sidecar: contexts built from PEM data, peer identities, and the inbound acceptor.

The agent sends each sidecar its own certificate and key in the config snapshot (never on
disk: `ssl` only loads a chain from a path, so it goes through an anonymous memfd). A
rotated certificate arrives as a new snapshot; new connections use the new contexts,
established ones keep theirs, so a rotation drops nothing.

Modes, per receiving service:
- strict: inbound connections must complete mTLS with a certificate from the trust bundle;
- permissive: the first byte decides: a TLS handshake (0x16) gets mTLS, anything else is
  served as plaintext with no identity (for migrating a service into the mesh);
- off: plaintext only.
A sidecar always originates mTLS to services whose mode is strict or permissive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, Protocol

from meshctl.proxy.transport import TRANSPORTS

log = logging.getLogger("proxy.tls")

ALPN = ["http/1.1", "h2"]
TLS_HANDSHAKE_BYTE = 0x16
DETECT_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 10.0
ACCEPT_BATCH = 64


class TLSConfigError(ValueError):
    pass


class PeerIdentityError(ssl.SSLError):
    """The peer's certificate is valid but names another workload than the one we meant."""


def _load_chain(ctx: ssl.SSLContext, chain_pem: str, key_pem: str) -> None:
    fd = os.memfd_create("meshctl-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, key_pem.encode() + b"\n" + chain_pem.encode())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _base_context(purpose: int, chain_pem: str, key_pem: str, bundle_pem: str, alpn: list[str] = ALPN) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # identity is the SPIFFE URI, checked by peer_identity()
    ctx.verify_mode = ssl.CERT_REQUIRED
    # An imported intermediate may be the trust anchor itself.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cadata=bundle_pem)
    _load_chain(ctx, chain_pem, key_pem)
    ctx.set_alpn_protocols(alpn)
    return ctx


def peer_identity(ssl_object: Any) -> str | None:
    """The SPIFFE ID in the peer certificate's URI SAN, or None."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI" and value.startswith("spiffe://"):
            return str(value)
    return None


def in_trust_domain(identity: str | None, own_identity: str) -> bool:
    """Whether `identity` belongs to the trust domain of `own_identity` (spiffe://DOMAIN/...)."""
    if identity is None:
        return False
    prefix = own_identity[: own_identity.find("/", len("spiffe://")) + 1]
    return len(prefix) > len("spiffe://") and identity.startswith(prefix)


class TLSConfig:
    """The compiled `tls` part of a snapshot: this sidecar's identity and its contexts."""

    __slots__ = ("mode", "identity", "not_after", "server_context", "client_context", "h2_client_context", "_source")
    mode: str
    server_context: ssl.SSLContext
    client_context: ssl.SSLContext
    h2_client_context: ssl.SSLContext

    def __init__(self, raw: dict[str, Any], previous: TLSConfig | None) -> None:
        mode = raw.get("mode", "strict")
        if mode not in ("strict", "permissive", "off"):
            raise TLSConfigError("tls.mode: must be strict, permissive or off")
        self.mode = mode
        self.identity = str(raw.get("identity", ""))
        self.not_after = float(raw.get("not_after") or 0.0)
        source = (raw.get("cert_pem"), raw.get("key_pem"), raw.get("bundle_pem"))
        self._source = source
        if previous is not None and previous._source == source:
            # Endpoint changes push a snapshot too; rebuilding contexts each time would cost ms.
            self.server_context = previous.server_context
            self.client_context = previous.client_context
            self.h2_client_context = previous.h2_client_context
            return
        parts = [part for part in source if isinstance(part, str) and part]
        if len(parts) != len(source):
            raise TLSConfigError("tls: cert_pem, key_pem and bundle_pem are required")
        chain, key, bundle = parts
        try:
            self.server_context = _base_context(ssl.PROTOCOL_TLS_SERVER, chain, key, bundle)
            self.client_context = _base_context(ssl.PROTOCOL_TLS_CLIENT, chain, key, bundle)
            # The server prefers http/1.1 (ALPN's first entry); offering only h2 asks for HTTP/2.
            self.h2_client_context = _base_context(ssl.PROTOCOL_TLS_CLIENT, chain, key, bundle, ["h2"])
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise TLSConfigError(f"tls: cannot load the certificate: {exc}") from None

    def __repr__(self) -> str:
        return "<TLSConfig %s %s>" % (self.mode, self.identity)


class ClientTLS:
    """How to reach one upstream service: our context and the identity it must present."""

    __slots__ = ("context", "h2_context", "expected_identity", "server_name")

    def __init__(self, context: ssl.SSLContext, expected_identity: str, server_name: str, h2_context: ssl.SSLContext | None = None) -> None:
        self.context = context
        self.h2_context = h2_context or context  # offers only ALPN h2: for HTTP/2 and gRPC streams
        self.expected_identity = expected_identity
        self.server_name = server_name

    def verify(self, transport: asyncio.Transport) -> None:
        presented = peer_identity(transport.get_extra_info("ssl_object"))
        if presented != self.expected_identity:
            transport.abort()
            raise PeerIdentityError(
                "peer identity %s, expected %s" % (presented or "(none)", self.expected_identity)
            )


class ServerTLS(Protocol):
    """What the acceptor needs of a listener's TLS: a mesh sidecar's (TLSConfig) or the ingress's (IngressTLS)."""

    @property
    def mode(self) -> str: ...
    @property
    def server_context(self) -> ssl.SSLContext: ...


class InboundAcceptor:
    """Accepts on the inbound listener and applies the current TLS mode per connection.

    It replaces `loop.create_server` for the inbound listener because the TLS context can
    change with every snapshot (rotation) and permissive mode must look at the first byte
    before it knows whether to start TLS. With `admits` (the local-uid check) it serves
    the plaintext outbound and forward listeners too (`current_tls` giving None), so the
    peer is checked before the connection reaches any protocol.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        current_tls: Callable[[], ServerTLS | None],
        silent_timeout: float | None = None,
        admits: Callable[[socket.socket], bool] | None = None,
    ) -> None:
        self.loop = loop
        self.admits = admits  # the local-uid check (proxy.peers), before any byte is read
        # Set for opaque (tcp) listeners in permissive mode: a client that sends nothing may be
        # waiting for a server-first banner, so after this long it is served as plaintext.
        self.silent_timeout = silent_timeout
        self.sock = sock
        self.factory = factory
        self.current_tls = current_tls
        self.closed = False
        self._pending: set[socket.socket] = set()
        loop.add_reader(sock.fileno(), self._accept_ready)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            for conn in list(self._pending):
                self._drop(conn)

    def _accept_ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                log.warning("accept failed", exc_info=True)
                return
            if self.admits is not None and not self.admits(conn):
                conn.close()
                continue
            conn.setblocking(False)
            tls = self.current_tls()
            if tls is None or tls.mode == "off":
                self._serve(conn, None)
            elif tls.mode == "strict":
                self._serve(conn, tls.server_context)
            else:
                self._detect(conn)

    def _detect(self, conn: socket.socket) -> None:
        self._pending.add(conn)
        if self.silent_timeout is not None:
            timer = self.loop.call_later(self.silent_timeout, self._silent, conn)
        else:
            timer = self.loop.call_later(DETECT_TIMEOUT_S, self._drop, conn)

        def readable() -> None:
            try:
                first = conn.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                first = b""
            timer.cancel()
            self.loop.remove_reader(conn.fileno())
            self._pending.discard(conn)
            if not first:
                conn.close()
                return
            tls = self.current_tls()
            self._serve(conn, tls.server_context if tls is not None and first[0] == TLS_HANDSHAKE_BYTE else None)

        self.loop.add_reader(conn.fileno(), readable)

    def _silent(self, conn: socket.socket) -> None:
        if conn in self._pending:
            self._pending.discard(conn)
            self.loop.remove_reader(conn.fileno())
            self._serve(conn, None)

    def _drop(self, conn: socket.socket) -> None:
        if conn in self._pending:
            self._pending.discard(conn)
            try:
                self.loop.remove_reader(conn.fileno())
            except (ValueError, OSError):
                pass
            conn.close()

    def _serve(self, conn: socket.socket, context: ssl.SSLContext | None) -> None:
        self.loop.create_task(self._connect(conn, context))

    async def _connect(self, conn: socket.socket, context: ssl.SSLContext | None) -> None:
        try:
            if context is None:
                await TRANSPORTS.connect_accepted_socket(self.loop, self.factory, conn)
            else:
                await TRANSPORTS.connect_accepted_socket(
                    self.loop, self.factory, conn, ssl=context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S
                )
        except (OSError, asyncio.TimeoutError, EOFError) as exc:
            # A peer without a valid certificate: refused, and worth a line in the log.
            log.info("inbound handshake refused: %s", exc)
            conn.close()


class IngressTLS:
    """HTTPS for outside clients on the ingress, with the user's certificate; no client certs."""

    __slots__ = ("mode", "server_context", "_source")
    server_context: ssl.SSLContext

    def __init__(self, raw: dict[str, Any], previous: IngressTLS | None) -> None:
        self.mode = "strict"
        source = (raw.get("cert_pem"), raw.get("key_pem"))
        self._source = source
        if previous is not None and previous._source == source:
            self.server_context = previous.server_context
            return
        parts = [part for part in source if isinstance(part, str) and part]
        if len(parts) != len(source):
            raise TLSConfigError("ingress_tls: cert_pem and key_pem are required")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # outside clients: browsers, curl
        try:
            _load_chain(ctx, parts[0], parts[1])
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(f"ingress_tls: cannot load the certificate: {exc}") from None
        ctx.set_alpn_protocols(["h2", "http/1.1"])  # h2 for gRPC and HTTP/2 clients (proxy.dispatch.ingress_h2)
        self.server_context = ctx


def compile_security(raw: dict[str, Any], snapshot: Any, previous: Any) -> None:
    """Fill the snapshot's `tls` and `authz` and each upstream service's `tls` from raw config.

    Raises TLSConfigError or proxy.authz.PolicyError, which the caller turns into a NACK.
    """
    from meshctl.proxy.authz import Policy

    tls_raw = raw.get("tls")
    snapshot.tls = None
    if tls_raw is not None:
        if not isinstance(tls_raw, dict):
            raise TLSConfigError("tls: expected a mapping")
        snapshot.tls = TLSConfig(tls_raw, getattr(previous, "tls", None) if previous is not None else None)
    ingress_raw = raw.get("ingress_tls")
    snapshot.ingress_tls = None
    if ingress_raw is not None:
        if not isinstance(ingress_raw, dict):
            raise TLSConfigError("ingress_tls: expected a mapping")
        snapshot.ingress_tls = IngressTLS(ingress_raw, getattr(previous, "ingress_tls", None))
    authz_raw = raw.get("authz")
    snapshot.authz = None
    if authz_raw is not None:
        if not isinstance(authz_raw, dict):
            raise TLSConfigError("authz: expected a mapping")
        snapshot.authz = Policy(authz_raw, str(raw.get("trust_domain", "")))
    for name, service in snapshot.services.items():
        upstream_tls = service.raw.get("tls")
        service.tls = None
        if upstream_tls:
            if snapshot.tls is None or snapshot.tls.client_context is None:
                raise TLSConfigError("services.%s.tls: needs this sidecar's own tls certificate" % name)
            identity = str(upstream_tls.get("identity", ""))
            service.tls = ClientTLS(snapshot.tls.client_context, identity, "%s.mesh" % name, snapshot.tls.h2_client_context)
