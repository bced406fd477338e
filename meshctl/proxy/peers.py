"""Local isolation: only processes of the mesh's own uid may connect to a sidecar.

The agent puts its uid in every snapshot (`local_uid`). Each accepted connection on a
gated listener is checked before a byte is read: on a Unix socket the kernel tells the
peer's uid (SO_PEERCRED); on a loopback TCP connection the peer is the socket at the
other end, whose owner the kernel's sock_diag netlink interface reports for an exact
4-tuple in one round trip (what `ss` reads; /proc/net/tcp holds the same uid but costs a
scan of every socket on the host, 150 ms with 10 000 of them). Anything else is refused:
a peer that is not on loopback, or whose socket is already gone.

Refusals are counted in metrics and logged at most once a minute per listener, so a
scanner cannot fill the log. The pure parts (the netlink request, the reply, the log
decision) are separate from the one function that does I/O.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable

log = logging.getLogger("proxy.peers")

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NO_COOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF
LOG_EVERY_S = 60.0

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_DIAG_REQUEST = struct.Struct("=BBBBI")  # family, protocol, extensions, pad, states
_SOCKID_PORTS = struct.Struct("!HH")  # source port, destination port (network order)
_SOCKID_TAIL = struct.Struct("=III")  # interface, cookie (two words)
_UID_OFFSET = _NLMSG.size + 4 + 48 + 12  # inet_diag_msg: 4 bytes, the sockid, expires/rqueue/wqueue
_UCRED = struct.Struct("=iII")  # pid, uid, gid


def diag_request(family: int, local: tuple, remote: tuple, sequence: int = 1) -> bytes:
    """A sock_diag query for the socket whose own end is `local` and whose peer is `remote`."""
    packed_local, packed_remote = (_packed(family, address[0]) for address in (local, remote))
    body = (
        _DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, ALL_STATES)
        + _SOCKID_PORTS.pack(local[1], remote[1])
        + packed_local
        + packed_remote
        + _SOCKID_TAIL.pack(0, NO_COOKIE, NO_COOKIE)
    )
    return _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, sequence, 0) + body


def _packed(family: int, host: str) -> bytes:
    return socket.inet_pton(family, host).ljust(16, b"\0")


def uid_from_reply(reply: bytes) -> tuple[int, int | None]:
    """(sequence, the socket owner's uid) from a sock_diag reply; uid None for an error (no such socket)."""
    if len(reply) < _NLMSG.size:
        return -1, None
    _, kind, _, sequence, _ = _NLMSG.unpack_from(reply)
    if kind != SOCK_DIAG_BY_FAMILY or len(reply) < _UID_OFFSET + 4:
        return sequence, None
    return sequence, struct.unpack_from("=I", reply, _UID_OFFSET)[0]


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


class RefusalLog:
    """When to log refused connections: the first at once, then a summary at most once a minute."""

    def __init__(self) -> None:
        self.pending: dict[str, list] = {}  # listener -> [count since the last line, last uid, time of the last line]

    def note(self, listener: str, uid: int | None, now: float) -> str | None:
        entry = self.pending.get(listener)
        if entry is None:
            self.pending[listener] = [0, uid, now]
            return "refused a connection to the %s listener from %s: only the mesh's own uid may connect" % (
                listener, _who(uid))
        entry[0] += 1
        entry[1] = uid
        if now - entry[2] < LOG_EVERY_S:
            return None
        count, entry[0], entry[2] = entry[0], 0, now
        return "refused %d connections to the %s listener in the last %ds, the last from %s" % (
            count, listener, int(LOG_EVERY_S), _who(uid))


def _who(uid: int | None) -> str:
    return "uid %d" % uid if uid is not None else "an unknown peer"


class PeerGate:
    """Admits a connection when its peer runs as `uid`; counts and logs the others."""

    def __init__(self, uid: int, clock: Callable[[], float], count: Callable[[str, int | None], None]) -> None:
        self.uid = uid
        self.clock = clock
        self.count = count  # (listener kind, peer uid) -> metrics
        self.refusals = RefusalLog()
        self._diag: socket.socket | None = None
        self._sequence = 0

    def admits(self, conn: socket.socket, listener: str) -> bool:
        uid = self.peer_uid(conn)
        if uid == self.uid:
            return True
        self.count(listener, uid)
        line = self.refusals.note(listener, uid, self.clock())
        if line is not None:
            log.warning("%s", line)
        return False

    def peer_uid(self, conn: socket.socket) -> int | None:
        """The uid owning the other end of `conn`, or None when it cannot be known."""
        try:
            if conn.family == socket.AF_UNIX:
                uid: int = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]
                return uid
            local, remote = conn.getsockname(), conn.getpeername()
        except OSError:
            return None
        if not is_loopback(remote[0]):
            return None
        # The peer's socket: its own end is our remote address, its peer is our local one.
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        return self._query(diag_request(conn.family, remote, local, self._sequence), self._sequence)

    def _query(self, request: bytes, sequence: int) -> int | None:
        # The kernel answers inside send(), so the blocking recv() returns at once.
        for _ in range(2):  # a second try with a fresh netlink socket if the first one broke
            diag = self._diag
            if diag is None:
                diag = self._diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
                diag.settimeout(1.0)
            try:
                diag.send(request)
                for _ in range(4):  # skip a late answer to an earlier query, should one be queued
                    answered, uid = uid_from_reply(diag.recv(65536))
                    if answered == sequence:
                        return uid
                return None
            except OSError as exc:
                diag.close()
                self._diag = None
                if exc.errno in (errno.EPROTONOSUPPORT, errno.EPERM, errno.EACCES):
                    log.error("cannot ask the kernel who connected (sock_diag: %s): refusing", exc)
                    return None
        return None

    def close(self) -> None:
        if self._diag is not None:
            self._diag.close()
            self._diag = None
