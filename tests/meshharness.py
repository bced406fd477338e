"""Run real meshes in tests: a private MESHCTL_HOME, the real CLI, and cleanup that never fails.

Cleanup stops the mesh with `meshctl down`, then SIGKILLs the agent and every process it
ever started (found by walking the agent's children while it is alive), so a failing test
never leaves processes behind for the next one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
APPS = REPO / "tests" / "apps"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)  # polling interval of a deadline loop
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def http_get(url: str, timeout: float = 10.0, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def environ_of(pid: int) -> dict[str, str]:
    """The environment a process was started with."""
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return dict(item.split("=", 1) for item in fh.read().decode("utf-8", "replace").split("\0") if "=" in item)


def alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Mesh:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.home = tmp / "home"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCTL_")}
        self.env.update(MESHCTL_HOME=str(self.home), NO_COLOR="1", PYTHONUNBUFFERED="1")
        self.seen_pids: set[int] = set()
        self.manifest: Path | None = None

    def write_manifest(self, text: str, name: str = "mesh.yaml") -> Path:
        path = self.tmp / name
        path.write_text(textwrap.dedent(text).replace("{APPS}", str(APPS)).replace("{PY}", sys.executable))
        self.manifest = path
        return path

    def cli(self, *args: str, timeout: float = 90.0, check: bool = False) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "meshctl.cli", *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        self.remember_pids()
        if check and result.returncode != 0:
            raise AssertionError(f"meshctl {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def up(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        assert self.manifest is not None
        return self.cli("up", "-f", str(self.manifest), *extra, check=check)

    def status(self) -> dict:
        return json.loads(self.cli("status", "-o", "json", check=True).stdout)

    def instance(self, iid: str) -> dict:
        for inst in self.status()["instances"]:
            if inst["id"] == iid:
                return inst
        raise KeyError(iid)

    def agent_pid(self) -> int | None:
        try:
            return int((self.home / "agent.pid").read_text())
        except (OSError, ValueError):
            return None

    def remember_pids(self) -> None:
        pid = self.agent_pid()
        if pid is None:
            return
        try:
            agent = psutil.Process(pid)
            self.seen_pids.add(pid)
            for child in agent.children(recursive=True):
                self.seen_pids.add(child.pid)
                for grandchild in _group_members(child.pid):
                    self.seen_pids.add(grandchild)
        except psutil.NoSuchProcess:
            pass

    def living(self) -> list[int]:
        return sorted(p for p in self.seen_pids if alive(p))

    def cleanup(self) -> None:
        self.remember_pids()
        if self.agent_pid() is not None and alive(self.agent_pid()):
            try:
                self.cli("down", timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.living():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members
