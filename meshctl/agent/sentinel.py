"""The sentinel: keeps the data plane through an agent crash, and stops it if no agent returns.

The agent starts one sentinel per mesh, connected by a SOCK_SEQPACKET socketpair on its
stdin, and sends one message per event: `+PGID` when it starts a process group (with the
agent's ends of that group's stdout pipe and config channel attached as SCM_RIGHTS),
`-PGID` when the group is gone, `grace SECONDS` (the manifest's `agent_grace`), and `exit`
on a clean shutdown, everything stopped already.

If the agent dies otherwise (SIGKILL, crash) the socket reaches EOF and the sentinel keeps
the mesh: because it holds a copy of every pipe and channel end, no app or sidecar sees a
broken pipe or a closed channel, so they go on serving with their last config and
certificates. Meanwhile it reads what they write (app output is appended to their log
files, channel messages are dropped) so that none blocks on a full pipe. It listens on
`keeper.sock` in the 0700 state directory, where `stop` stops the mesh at once (a new
agent or `meshctl down` asks). If nothing asks within the grace, it stops every group
itself as `meshctl down` would, SIGTERM then SIGKILL, so nothing is left running for ever.

It runs in its own session so that a signal aimed at the agent's group does not take it
along, and it imports nothing but the standard library so that it starts fast.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

KEEPER_SOCKET = "keeper.sock"
DEFAULT_GRACE_S = 300.0
STOP_GRACE_S = 5.0  # between SIGTERM and SIGKILL when the grace is over
MAX_MESSAGE = 4096
MAX_FDS = 8
POLL_S = 0.05


@dataclass
class Group:
    """One process group and the fds the sentinel holds for it; `log` names its stdout's log file."""

    pgid: int
    fds: list[int] = field(default_factory=list)
    log: str | None = None


@dataclass
class Kept:
    groups: dict[int, Group] = field(default_factory=dict)
    grace_s: float = DEFAULT_GRACE_S
    clean_exit: bool = False


def apply_message(message: str, fds: list[int], kept: Kept) -> list[int]:
    """Apply one message from the agent; returns the fds no longer held (for the caller to close)."""
    head, _, rest = message.strip().partition(" ")
    if head == "exit":
        kept.clean_exit = True
        return list(fds)
    if head == "grace":
        with suppress(ValueError):
            kept.grace_s = max(0.0, float(rest))
        return list(fds)
    if len(head) < 2 or head[0] not in "+-" or not head[1:].isdigit():
        return list(fds)
    pgid = int(head[1:])
    if head[0] == "+":
        group = kept.groups.setdefault(pgid, Group(pgid))
        group.fds.extend(fds)
        group.log = rest or group.log
        return []
    gone = kept.groups.pop(pgid, None)
    return [*fds, *(gone.fds if gone else [])]


def signal_groups(groups: list[int], sig: int) -> None:
    for pgid in groups:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_groups(groups: list[int], grace_s: float) -> None:
    """SIGTERM every group, wait up to `grace_s` for them to go, then SIGKILL what is left."""
    signal_groups(groups, signal.SIGTERM)
    give_up_at = time.monotonic() + grace_s
    while any(group_alive(pgid) for pgid in groups) and time.monotonic() < give_up_at:
        time.sleep(POLL_S)  # polling interval of a deadline loop
    signal_groups(groups, signal.SIGKILL)


def stamp(line: bytes) -> bytes:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)).encode() + b".%03d " % int(now % 1 * 1000) + line


def follow_agent(agent: socket.socket, kept: Kept) -> None:
    """Hold what the agent sends until it closes its end."""
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(agent, MAX_MESSAGE, MAX_FDS)
        except InterruptedError:
            continue
        except OSError:
            return
        if not message:
            return
        for fd in apply_message(message.decode(errors="replace"), fds, kept):
            os.close(fd)
        if kept.clean_exit:
            return


def bind_keeper_socket(path: Path) -> socket.socket | None:
    """Listen on keeper.sock, born 0600; None if the state directory is gone."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        with suppress(FileNotFoundError):
            path.unlink()  # left by an earlier sentinel killed with -9; ours is the only mesh here
        listener.bind(str(path))
        listener.listen(8)
        return listener
    except OSError:
        listener.close()
        return None
    finally:
        os.umask(old_umask)


def append_lines(log_file: str, pending: bytes, data: bytes) -> bytes:
    """Append the complete lines of `pending + data`, stamped as the agent does; returns the rest."""
    *lines, rest = (pending + data).split(b"\n")
    if lines:
        with suppress(OSError), open(log_file, "ab") as log:
            log.write(b"".join(stamp(line) + b"\n" for line in lines))
    return rest


def keep_mesh(home: Path, kept: Kept) -> None:
    """The agent is gone: keep everything serving until `stop` or the grace ends, then stop it."""
    path = home / KEEPER_SOCKET
    listener = bind_keeper_socket(path)  # None: the directory is gone, only the grace remains
    bound = os.stat(path).st_ino if listener is not None else None
    selector = selectors.DefaultSelector()
    if listener is not None:
        selector.register(listener, selectors.EVENT_READ, "listener")
    for group in kept.groups.values():
        for index, fd in enumerate(group.fds):
            # The first fd is the group's stdout pipe; the rest are channels, drained only.
            selector.register(fd, selectors.EVENT_READ, group.log if index == 0 else None)
    pending: dict[int, bytes] = {}
    deadline = time.monotonic() + kept.grace_s
    askers: list[socket.socket] = []
    while time.monotonic() < deadline:
        for key, _ in selector.select(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if key.data == "listener":
                assert listener is not None  # registered only when it exists
                conn, _ = listener.accept()
                conn.settimeout(1.0)
                with suppress(OSError):
                    if conn.recv(64).strip() == b"stop":
                        askers.append(conn)
                        deadline = 0.0
                        continue
                conn.close()
                continue
            try:
                data = os.read(key.fd, 65536)
            except OSError:
                data = b""
            if not data:
                selector.unregister(key.fd)
            elif key.data is not None:
                pending[key.fd] = append_lines(key.data, pending.get(key.fd, b""), data)
    stop_groups(sorted(kept.groups), STOP_GRACE_S)
    if listener is not None:
        listener.close()
        with suppress(OSError):
            if os.stat(path).st_ino == bound:  # else the next sentinel's
                path.unlink()
    for conn in askers:  # each reads EOF once everything is stopped
        conn.close()


def ask_to_stop(home: Path, timeout_s: float) -> bool:
    """Ask the sentinel keeping a mesh in `home` to stop it; True once it has (or is at it),
    False if none listens on keeper.sock."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout_s)
        try:
            conn.connect(str(home / KEEPER_SOCKET))
            conn.sendall(b"stop\n")
            while conn.recv(64):
                pass
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:
            return True  # it answered, then failed or took too long: it stops regardless
    return True


def sentinel_home(argv: list[str]) -> str | None:
    """The --home of a sentinel's command line, None if it is not one."""
    if list(argv[1:4]) != ["-m", "meshctl.agent.sentinel", "--home"] or len(argv) < 5:
        return None
    return argv[4]


def stop_kept_mesh(home: Path, timeout_s: float) -> bool:
    """Stop the mesh a sentinel keeps in `home` after its agent died; True if there was one.

    Sentinels are found by their command line, so one that has just seen its agent die
    and not yet opened keeper.sock is waited for, not missed. Used by a new agent before
    it starts its own mesh, and by `meshctl down` when no agent answers. Not run by the
    sentinel itself (psutil is no import of its own).
    """
    import psutil

    give_up_at = time.monotonic() + timeout_s
    found = False
    for proc in psutil.process_iter(["cmdline", "uids", "ppid"]):
        try:
            wanted = sentinel_home(proc.info["cmdline"] or [])
            if wanted is None or proc.info["uids"].real != os.getuid() or Path(wanted).resolve() != home.resolve():
                continue
            parent = psutil.Process(proc.info["ppid"]).cmdline() if proc.info["ppid"] > 1 else []
            if parent[1:3] == ["-m", "meshctl.agent"]:
                continue  # its agent runs: that one answers for the mesh
        except (psutil.Error, OSError, TypeError):
            continue
        found = True
        while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < give_up_at:
            if ask_to_stop(home, max(0.1, give_up_at - time.monotonic())):
                break
            time.sleep(POLL_S)  # it has not opened keeper.sock yet; polling interval of a deadline loop
        with suppress(psutil.Error):
            proc.wait(max(0.0, give_up_at - time.monotonic()))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m meshctl.agent.sentinel")
    parser.add_argument("--home", required=True, help="the state directory")
    home = Path(parser.parse_args(argv).home)
    # Terminal signals must not stop the sentinel before it has done its one job.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    agent = socket.socket(fileno=sys.stdin.fileno())
    kept = Kept()
    follow_agent(agent, kept)
    if kept.clean_exit or not kept.groups:
        return
    keep_mesh(home, kept)


if __name__ == "__main__":
    main()
