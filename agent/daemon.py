"""The agent's entry point: `python -m agent --home DIR`.

One agent per state directory, enforced with an flock on `agent.lock` (the kernel releases
it when the agent dies, however it dies, so a stale lock can't block the next start). A
socket file left by a crashed agent is removed once the lock is ours.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import io
import logging
import os
import signal
import stat
import sys
from pathlib import Path

from agent.control import ControlServer
from agent.logs import LogBook
from agent.process import Sentinel
from agent.supervisor import Supervisor

log = logging.getLogger("agent")


class StateDirError(Exception):
    pass


def check_state_dir(home: Path) -> None:
    """The state directory holds keys and the control socket: it must be ours and private."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = home.stat()
    if info.st_uid != os.getuid():
        raise StateDirError(f"{home} belongs to uid {info.st_uid}, not to you (uid {os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateDirError(
            f"{home} is writable by others (mode {stat.S_IMODE(info.st_mode):o}); run `chmod 700 {home}`"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(home, 0o700)


def take_lock(home: Path) -> int:
    fd = os.open(home / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirError(f"another agent already runs in {home}") from None
    return fd


def dump_tasks() -> None:
    """`kill -USR1 <agent pid>` writes every task's stack to agent.log: for a stuck agent."""
    for task in asyncio.all_tasks():
        buffer = io.StringIO()
        task.print_stack(file=buffer)
        log.warning("task %s:\n%s", task.get_name(), buffer.getvalue())


async def serve(home: Path) -> None:
    loop = asyncio.get_running_loop()
    sentinel = Sentinel()
    sup = Supervisor(str(home), LogBook(home / "logs"), sentinel)
    finished = asyncio.Event()
    stopping = False

    async def shutdown() -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        log.info("stopping the mesh")
        try:
            await sup.down()
        finally:
            finished.set()

    control = ControlServer(sup, str(home), shutdown)
    sock_path = home / "agent.sock"
    sock_path.unlink(missing_ok=True)  # ours now: the lock proves no live agent holds it
    await control.start(str(sock_path))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, lambda: loop.create_task(shutdown()))
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    log.info("agent %d serving %s", os.getpid(), sock_path)
    try:
        await finished.wait()
    finally:
        await control.close()
        sock_path.unlink(missing_ok=True)
        sentinel.close()
        log.info("agent stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent", description="meshctl's supervising agent")
    parser.add_argument("--home", required=True, help="the state directory")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    home = Path(args.home).resolve()
    try:
        check_state_dir(home)
        lock_fd = take_lock(home)
    except StateDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pid_path = home / "agent.pid"
    pid_path.write_text(f"{os.getpid()}\n")
    os.chmod(pid_path, 0o600)
    if sys.version_info < (3, 12):
        # Child watching without a thread per child: spawning uses preexec_fn, which
        # must not fork while other threads may hold locks.
        loop = asyncio.new_event_loop()
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(loop)
        asyncio.set_child_watcher(watcher)
        try:
            loop.run_until_complete(serve(home))
        finally:
            loop.close()
    else:
        asyncio.run(serve(home))
    pid_path.unlink(missing_ok=True)
    os.close(lock_fd)
    return 0
