"""Processes for the benchmark: start them, wait for them, measure them, always stop them.

Every process the harness starts goes through `spawned`, a context manager that puts the
child in its own session and, on the way out (also on an exception), sends SIGTERM to its
process group, waits, then SIGKILLs what is left. Measurements read /proc through psutil:
CPU seconds (user + system) and memory (RSS, and PSS, which splits shared pages among the
processes that share them, so a fleet of sidecars is not counted twice).

Python's default action for SIGTERM and SIGHUP ends the process at once, skipping every
`finally`; each entry point calls `exit_on_termination` first, so those signals unwind
the main thread like Ctrl-C does and every process and temp dir is cleaned up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import psutil

STOP_GRACE = 5.0
TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class BenchError(Exception):
    """A benchmark step could not run (a tool missing, a process that never got ready)."""


def exit_on_termination() -> None:
    """Make SIGTERM and SIGHUP raise SystemExit(128 + signal) in the main thread, once.

    A repeat is only reported: `timeout` sends SIGTERM to the child and then to its whole
    group, and a second exception would cut short the cleanup the first one started.
    """
    def handler(signum: int, _frame: object) -> None:
        if exiting:
            print("bench: %s again, still cleaning up" % signal.Signals(signum).name, file=sys.stderr)
            return
        exiting.append(signum)
        raise SystemExit(128 + signum)

    exiting: list[int] = []
    for signum in TERMINATION_SIGNALS:
        signal.signal(signum, handler)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(port: int, path: str = "/", timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Poll until GET `path` on 127.0.0.1:`port` answers 200, or raise BenchError."""
    request = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path.encode()
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError("process %s exited with %s before answering on port %d" % (proc.args, proc.returncode, port))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(request)
                head = sock.recv(64)
            if head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200"):
                return
            last = repr(head[:40])
        except OSError as exc:
            last = str(exc)
        time.sleep(0.02)
    raise BenchError("port %d did not answer 200 on %s within %.0f s (%s)" % (port, path, timeout, last))


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE) -> None:
    """SIGTERM the process group led by `proc`, then SIGKILL it after `grace` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while others in its group live on (nginx's worker).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)


@contextlib.contextmanager
def spawned(argv: Sequence[str], env: dict[str, str] | None = None, log_path: str | None = None) -> Iterator[subprocess.Popen]:
    """Run `argv` in its own session for the duration of the block."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            list(argv),
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log_path else subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        if log_path:
            log.close()
    try:
        yield proc
    finally:
        stop_group(proc)


def alive(pids: Iterable[int]) -> list[int]:
    """Those of `pids` that run (a zombie has finished)."""
    running = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
    return running


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Poll until none of `pids` runs or `timeout` passes; those still running."""
    deadline = time.monotonic() + timeout
    running = alive(pids)
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = alive(running)
    return running


def with_descendants(pids: Iterable[int]) -> list[int]:
    """`pids` that run and everything they started, recursively (an nginx master's workers)."""
    found: set[int] = set()
    for pid in alive(pids):
        found.add(pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    return sorted(found)


def kill_leftovers(pids: Sequence[int]) -> list[int]:
    """SIGKILL the process groups of those of `pids` still alive, and them; return them.

    The mesh starts every process in its own session, so its group takes along what that
    process started, wherever it was reparented. Our own group is never a target.
    """
    survivors = alive(pids)
    own_group = os.getpgrp()
    for pid in survivors:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group != own_group:
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return survivors


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time consumed so far by `pids` (children not included)."""
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def group_pids(leader: int) -> list[int]:
    """`leader` and its descendants (nginx's master and worker, haproxy's process)."""
    proc = psutil.Process(leader)
    return [proc.pid] + [child.pid for child in proc.children(recursive=True)]


@dataclass(frozen=True)
class Memory:
    rss: int
    pss: int


def memory(pid: int) -> Memory:
    info = psutil.Process(pid).memory_full_info()
    return Memory(rss=info.rss, pss=info.pss)


class PeakMemory:
    """Samples the memory of some processes in a thread, keeping each one's peak RSS and PSS."""

    def __init__(self, pids: Sequence[int], interval: float = 0.25) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.peaks: dict[int, Memory] = {pid: Memory(0, 0) for pid in self.pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for pid in self.pids:
                try:
                    now = memory(pid)
                except psutil.NoSuchProcess:
                    continue
                peak = self.peaks[pid]
                self.peaks[pid] = Memory(max(peak.rss, now.rss), max(peak.pss, now.pss))
