"""The agent's listening sockets and the app's address: ports and Unix socket paths.

The agent binds every sidecar listener itself and passes it in by fd, so a restarted sidecar
serves the very same ports; the app binds its own `$PORT` (or `$MESH_SOCKET`), which is
therefore only reserved while the app holds it.
"""

from __future__ import annotations

import os
import socket

# The kernel caps it at net.core.somaxconn (4096 since Linux 5.4): 2,000 clients connecting
# at once to the ingress overflowed 1024, and each dropped SYN waits a second to be resent.
LISTEN_BACKLOG = 4096
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)  # passed explicitly with pass_fds, never leaked to apps
    return sock


def bound_port(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return bound_port(sock)


def port_is_free(port: int) -> bool:
    """Whether an app could listen on 127.0.0.1:`port` now (binding as servers do, SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def prepare_socket_path(path: str) -> str | None:
    """Make way for the app to bind `path` (a private directory, no stale socket); the problem, if any."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        return (f"listen: unix: the socket path {path} is {len(os.fsencode(path))} bytes, over the "
                f"{UNIX_PATH_MAX} a Unix socket allows; use a shorter MESHCTL_HOME")
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    try:
        os.unlink(path)  # left by the app's last run: it would make the new bind fail
    except FileNotFoundError:
        pass
    return None
