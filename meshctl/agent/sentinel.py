"""The sentinel: keeps the data plane through an agent crash, and stops it if no agent returns.

The agent starts one sentinel per mesh, connected by a SOCK_SEQPACKET socketpair on its
stdin, and sends one message per event: `+PGID` when it starts a process group (with the
agent's ends of that group's stdout pipe and config channel attached as SCM_RIGHTS),
`hold PGID` with fds to keep without reading (a sidecar's listening sockets), `-PGID` when
the group is gone, `grace SECONDS` (the manifest's `agent_grace`), and `exit` on a clean
shutdown, everything stopped already.

If the agent dies otherwise (SIGKILL, crash) the socket reaches EOF and the sentinel keeps
the mesh: because it holds a copy of every pipe and channel end, no app or sidecar sees a
broken pipe or a closed channel, so they go on serving with their last config and
certificates. Meanwhile it reads what they write (app output is appended to their log
files, channel messages are dropped) so that none blocks on a full pipe. It listens on
`keeper.sock` in the 0700 state directory, where `stop` stops the mesh at once (a new
agent or `meshctl down` asks). If nothing asks within the grace, it stops every group
itself as `meshctl down` would, SIGTERM then SIGKILL, so nothing is left running for ever.

A new agent may instead send `adopt` there (agent.adopt): the sentinel hands it a copy of
every fd it holds, one `group PGID DRAINED` message per group (the first DRAINED fds were
read, the rest held), then `adopted SECONDS` (how long the mesh ran without an agent), and
from then on serves that connection as its agent's, with the grace timer stopped until
that agent dies too. keeper.sock is SOCK_SEQPACKET so that messages and their fds keep
their boundaries.

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    import psutil

KEEPER_SOCKET = "keeper.sock"
DEFAULT_GRACE_S = 300.0
STOP_GRACE_S = 5.0  # between SIGTERM and SIGKILL when the grace is over
MAX_MESSAGE = 4096
MAX_FDS = 200  # under the kernel's SCM_MAX_FD (253): a sidecar with many upstreams holds one socket each
POLL_S = 0.05


@dataclass
class Group:
    """One process group and the fds the sentinel holds for it; `log` names its stdout's log file."""

    pgid: int
    fds: list[int] = field(default_factory=list)  # read while no agent runs: stdout pipe first, then channels
    log: str | None = None
    held: list[int] = field(default_factory=list)  # never read: listening sockets


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
    if head == "hold":
        group = kept.groups.get(int(rest)) if rest.isdigit() else None
        if group is None:
            return list(fds)
        group.held.extend(fds)
        return []
    if len(head) < 2 or head[0] not in "+-" or not head[1:].isdigit():
        return list(fds)
    pgid = int(head[1:])
    if head[0] == "+":
        group = kept.groups.setdefault(pgid, Group(pgid))
        group.fds.extend(fds)
        group.log = rest or group.log
        return []
    gone = kept.groups.pop(pgid, None)
    return [*fds, *(gone.fds + gone.held if gone else [])]


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
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
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


def hand_over(conn: socket.socket, kept: Kept, without_agent_s: float) -> bool:
    """Send a copy of every fd held to the agent that adopts the mesh; False if it went away."""
    try:
        for group in kept.groups.values():
            socket.send_fds(conn, [f"group {group.pgid} {len(group.fds)}".encode()], [*group.fds, *group.held])
        conn.sendall(f"adopted {without_agent_s:.3f}".encode())
    except OSError:
        return False
    return True


def keep_mesh(home: Path, kept: Kept) -> socket.socket | None:
    """The agent is gone: keep everything serving until a new agent adopts the mesh (its
    connection is returned), or `stop` or the end of the grace (everything is stopped, None)."""
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
    orphaned_at = time.monotonic()
    deadline = orphaned_at + kept.grace_s
    askers: list[socket.socket] = []
    adopter: socket.socket | None = None
    while time.monotonic() < deadline and adopter is None:
        for key, _ in selector.select(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            if key.data == "listener":
                assert listener is not None  # registered only when it exists
                conn, _ = listener.accept()
                conn.settimeout(1.0)
                with suppress(OSError):
                    request = conn.recv(64).strip()
                    if request == b"stop":
                        askers.append(conn)
                        deadline = 0.0
                        continue
                    if request == b"adopt" and adopter is None:
                        flush_pending(kept, pending)
                        if hand_over(conn, kept, time.monotonic() - orphaned_at):
                            conn.settimeout(None)
                            adopter = conn
                            break
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
    selector.close()
    if adopter is None:
        stop_groups(sorted(kept.groups), STOP_GRACE_S)
    if listener is not None:
        listener.close()
        with suppress(OSError):
            if os.stat(path).st_ino == bound:  # else the next sentinel's
                path.unlink()
    for conn in askers:  # each reads EOF once everything is stopped
        conn.close()
    return adopter


def flush_pending(kept: Kept, pending: dict[int, bytes]) -> None:
    """Before a handover: the partial last lines read so far go to the logs, ended here."""
    for group in kept.groups.values():
        if group.fds and pending.get(group.fds[0]) and group.log is not None:
            append_lines(group.log, pending.pop(group.fds[0]), b"\n")


def ask_to_stop(home: Path, timeout_s: float) -> bool:
    """Ask the sentinel keeping a mesh in `home` to stop it; True once it has (or is at it),
    False if none listens on keeper.sock."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
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


def kept_sentinels(home: Path) -> Iterator[psutil.Process]:
    """The sentinels of `home` that keep a mesh with no agent, or are about to.

    Found by their command line, so one that has just seen its agent die and has not yet
    opened keeper.sock is found too. One whose parent is an agent, or whose mesh a live
    agent has adopted (named by `agent.pid`, not us), is left out: that agent answers.
    Not run by the sentinel itself (psutil is no import of its own).
    """
    import psutil

    adopter = live_agent_pid(home)
    for proc in psutil.process_iter(["cmdline", "uids", "ppid"]):
        try:
            wanted = sentinel_home(proc.info["cmdline"] or [])
            if wanted is None or proc.info["uids"].real != os.getuid() or Path(wanted).resolve() != home.resolve():
                continue
        except (psutil.Error, OSError, TypeError):
            continue
        if parent_is_agent(proc.info["ppid"]) or adopter is not None:
            continue  # its agent runs: that one answers for the mesh
        yield proc


def parent_is_agent(ppid: int) -> bool:
    import psutil

    try:
        parent = psutil.Process(ppid)
        return parent.status() != psutil.STATUS_ZOMBIE and parent.cmdline()[1:3] == ["-m", "meshctl.agent"]
    except (psutil.Error, OSError):
        return False  # gone, or a zombie: a dead agent


def live_agent_pid(home: Path) -> int | None:
    """The pid in `agent.pid` if an agent of `home` other than this process runs under it."""
    import psutil

    try:
        pid = int((home / "agent.pid").read_text())
        argv = psutil.Process(pid).cmdline()
    except (OSError, ValueError, psutil.Error):
        return None
    if pid == os.getpid() or argv[1:4] != ["-m", "meshctl.agent", "--home"] or len(argv) < 5:
        return None
    return pid if Path(argv[4]).resolve() == home.resolve() else None


def stop_kept_mesh(home: Path, timeout_s: float) -> bool:
    """Stop the mesh a sentinel keeps in `home` after its agent died; True if there was one.

    Used by a new agent that cannot adopt that mesh, and by `meshctl down` when no agent
    answers.
    """
    import psutil

    give_up_at = time.monotonic() + timeout_s
    found = False
    for proc in kept_sentinels(home):
        found = True
        with suppress(psutil.Error):
            while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < give_up_at:
                if ask_to_stop(home, max(0.1, give_up_at - time.monotonic())):
                    break
                time.sleep(POLL_S)  # it has not opened keeper.sock yet; polling interval of a deadline loop
            proc.wait(max(0.0, give_up_at - time.monotonic()))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m meshctl.agent.sentinel")
    parser.add_argument("--home", required=True, help="the state directory")
    home = Path(parser.parse_args(argv).home)
    # Terminal signals must not stop the sentinel before it has done its one job.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    agent: socket.socket | None = socket.socket(fileno=sys.stdin.fileno())
    kept = Kept()
    while agent is not None:
        follow_agent(agent, kept)
        agent.close()
        if kept.clean_exit or not kept.groups:
            return
        agent = keep_mesh(home, kept)  # the next agent's connection, once one adopts the mesh


if __name__ == "__main__":
    main()
