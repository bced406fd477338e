"""SIGTERM to a running benchmark stops every process it started and removes its temp dirs.

    .venv/bin/python -m pytest bench/test_cleanup.py

Each case starts a real entry point of bench/ as a subprocess (as `make bench` would), waits
until the processes of the step named in the case exist, sends SIGTERM to the entry point
alone (what `pkill -f bench/http2.py` does), then checks that it exited through its cleanup
(status 143, not a death by the signal), that nothing it started still runs and that its
temp dir is empty.

What it started is found by a marker in the environment, which every descendant inherits
(the mesh's agent is detached from the benchmark, and its sidecars and apps from the agent),
plus the descendants of those processes (nginx's workers rewrite their environment).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
MARK = "BENCH_CLEANUP_MARK"  # not MESHCTL_*: the agent drops those from its children's environment
SETUP_DEADLINE_S = 60.0
EXIT_DEADLINE_S = 90.0  # `meshctl down` has 60 s, the last-resort kill 10 s more
GONE_DEADLINE_S = 10.0

Processes = set[psutil.Process]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def started_by(token: str) -> Processes:
    """Every running process with `MARK=token` in its environment, and their descendants."""
    marked = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(MARK) == token:
                marked.add(proc)
    found = set(marked)
    for proc in marked:
        with contextlib.suppress(psutil.Error):
            found.update(proc.children(recursive=True))
    return {proc for proc in found if _running(proc)}


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return "(gone)"


def has(fragment: str) -> Callable[[list[str]], bool]:
    return lambda cmdlines: any(fragment in line for line in cmdlines)


def all_of(*predicates: Callable[[list[str]], bool]) -> Callable[[list[str]], bool]:
    return lambda cmdlines: all(predicate(cmdlines) for predicate in predicates)


def _kill_all(procs: Processes) -> None:
    """SIGKILL the groups of `procs` (never ours) and `procs` themselves; a test's last resort."""
    own_group = os.getpgrp()
    for proc in procs:
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            group = os.getpgid(proc.pid)
            if group != own_group:
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            proc.kill()


class BenchRun:
    """One benchmark process and everything seen running on its behalf."""

    def __init__(self, proc: subprocess.Popen, token: str, tmpdir: Path, log_path: Path) -> None:
        self.proc = proc
        self.token = token
        self.tmpdir = tmpdir
        self.log_path = log_path
        self.seen: Processes = set()

    def running(self) -> Processes:
        """What runs now: marked processes and descendants, and all seen before that still run.

        Seen ones count because an orphaned nginx master has rewritten its environment.
        """
        self.seen |= started_by(self.token)
        return {proc for proc in self.seen if _running(proc)}

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]


@contextlib.contextmanager
def bench_process(argv: list[str], tmp_path: Path) -> Iterator[BenchRun]:
    """Start `argv` in bench/ with a marker and a private TMPDIR; kill all it left when the test ends."""
    # Short: the mesh's unix sockets live in a home under it, and their paths have 107 bytes at most.
    tmpdir = Path(tempfile.mkdtemp(prefix="bc-", dir="/tmp"))
    log_path = tmp_path / "bench.log"
    token = uuid.uuid4().hex
    env = {**os.environ, MARK: token, "TMPDIR": str(tmpdir), "NO_COLOR": "1"}
    env.pop("BENCH_KEEP_TMP", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    run = BenchRun(proc, token, tmpdir, log_path)
    try:
        yield run
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _kill_all(run.running())
        shutil.rmtree(tmpdir, ignore_errors=True)


def wait_for_step(run: BenchRun, ready: Callable[[list[str]], bool]) -> None:
    """Poll until the processes the benchmark started satisfy `ready`."""
    deadline = time.monotonic() + SETUP_DEADLINE_S
    running: Processes = set()
    while time.monotonic() < deadline:
        assert run.proc.poll() is None, "the benchmark ended (%s) before the step: %s" % (run.proc.returncode, run.log_tail())
        running = run.running()
        if ready([_cmdline(p) for p in running]):
            return
        time.sleep(0.05)
    pytest.fail("the step never came within %.0f s; running: %s\n%s" % (
        SETUP_DEADLINE_S, sorted(_cmdline(p) for p in running), run.log_tail()))


def assert_cleaned_up(run: BenchRun) -> None:
    try:
        status = run.proc.wait(EXIT_DEADLINE_S)
    except subprocess.TimeoutExpired:
        pytest.fail("the benchmark still runs %.0f s after SIGTERM: %s" % (EXIT_DEADLINE_S, run.log_tail()))
    assert status == 128 + signal.SIGTERM, "exit status %s, not through its cleanup: %s" % (status, run.log_tail())
    deadline = time.monotonic() + GONE_DEADLINE_S
    left = run.running()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = run.running()
    assert not left, "still running after the benchmark exited: %s" % sorted(_cmdline(p) for p in left)
    assert sorted(os.listdir(run.tmpdir)) == [], "temp files left behind"


CASES = [
    pytest.param(
        ["bench/peer_hop.py", "--requests", "10000000", "--runs", "1", "--concurrency", "4"],
        all_of(has("peer_hop.py serve"), has("peer_hop.py drive")),
        set(),
        id="peer_hop-both-ends-running",
    ),
    pytest.param(
        ["bench/http2.py", "--requests", "100000000", "--runs", "1"],
        all_of(has("h2load"), has("-m agent --home"), has("agent.sentinel"), has("-m proxy"), has("nginx: worker")),
        {"nginx", "h2load"},
        id="http2-mesh-up-under-load",
    ),
    pytest.param(
        ["bench/run.py", "--quick", "--seconds", "600"],
        has("-m agent --home"),
        {"nginx", "haproxy", "wrk"},
        id="run-during-meshctl-up",
    ),
]


def _skip_without(tools: set[str]) -> None:
    missing = sorted(tool for tool in tools if shutil.which(tool) is None)
    if missing:
        pytest.skip("needs %s (make bench-deps)" % ", ".join(missing))


@pytest.mark.parametrize("argv, ready, tools", CASES)
def test_sigterm_stops_everything(argv: list[str], ready: Callable[[list[str]], bool], tools: set[str], tmp_path: Path) -> None:
    _skip_without(tools)
    with bench_process(argv, tmp_path) as run:
        wait_for_step(run, ready)
        run.proc.send_signal(signal.SIGTERM)
        assert_cleaned_up(run)


def test_sigterm_to_the_group_as_timeout_sends_it(tmp_path: Path) -> None:
    """`timeout` signals its child, then the child's whole group (h2load and `meshctl` among them).

    A second SIGTERM that comes after the first was handled must not cut the cleanup short.
    """
    argv, ready, tools = CASES[1].values
    _skip_without(tools)
    with bench_process(argv, tmp_path) as run:
        wait_for_step(run, ready)
        run.proc.send_signal(signal.SIGTERM)
        os.killpg(run.proc.pid, signal.SIGTERM)
        assert_cleaned_up(run)


REPEATED_SIGNAL = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from procs import exit_on_termination
exit_on_termination()
try:
    os.kill(os.getpid(), signal.SIGTERM)
finally:
    os.kill(os.getpid(), signal.SIGHUP)
    print("cleaned up")
"""


def test_a_repeated_signal_does_not_interrupt_the_cleanup() -> None:
    done = subprocess.run([sys.executable, "-c", REPEATED_SIGNAL, str(BENCH_DIR)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stdout == "cleaned up\n"
    assert "SIGHUP again, still cleaning up" in done.stderr
