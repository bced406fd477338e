"""Many `meshctl` commands at once against one state directory (issue #22).

Real CLIs in parallel on a fresh MESHCTL_HOME: five `up` at once start one agent and one
set of instances, and all return 0; `up` racing `down` ends either up (and `up` said 0) or
down with nothing left (and `up` said a `down` overtook it); ten `route split` at once
leave the split of the last one ACKed, every sidecar SYNCED.
"""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from meshctl.agent.daemon import is_orphan
from meshctl.cli import Applied, OVERTAKEN_BY_DOWN, overtaken
from meshctl.client import exit_reason
from tests.meshharness import alive, free_port, http_get, wait_for
from tests.test_state_dir import agents_of

TINY = """
mesh: tiny
services:
  hello:
    command: {PY} {APPS}/echo.py
    health: {http: /healthz, period: 50ms}
ingress:
  port: PORT
  routes: [{path: /, service: hello}]
"""

TWO_VERSIONS = """
mesh: split
services:
  api:
    health: {http: /healthz, period: 50ms}
    versions:
      v1: {command: {PY} {APPS}/echo.py}
      v2: {command: {PY} {APPS}/echo.py}
    split: {v1: 100}
ingress:
  port: PORT
  routes: [{path: /, service: api}]
"""

PARALLEL_UPS = 5
UP_ROUNDS = 10
SPLIT_CLIENTS = 10
COMMAND_TIMEOUT_S = 120.0


def run_together(mesh, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Start every command at once, wait for all; each is killed if it outlives the timeout."""
    procs = [
        subprocess.Popen([sys.executable, "-m", "meshctl.cli", *args], env=mesh.env, text=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for args in commands
    ]
    results = []
    try:
        for args, proc in zip(commands, procs):
            out, err = proc.communicate(timeout=COMMAND_TIMEOUT_S)
            results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    mesh.remember_pids()
    return results


def mesh_processes(agent: int) -> set[int]:
    """The agent's descendants: its sentinel, and each sidecar and app it started."""
    return {child.pid for child in psutil.Process(agent).children(recursive=True)}


def assert_one_mesh(mesh) -> None:
    agent = mesh.agent_pid()
    assert agent is not None and agents_of(mesh.home) == [agent]
    status = mesh.status()
    instances = status["instances"]
    assert [i["id"] for i in instances] == ["hello@v1#0"] and instances[0]["state"] == "ready"
    expected = {instances[0]["pid"], instances[0]["sidecar_pid"], status["ingress"]["sidecar_pid"]}
    # Besides those three, only the sentinel: no second set of sidecars or apps.
    extra = mesh_processes(agent) - expected
    assert len(extra) == 1, extra
    assert "meshctl.agent.sentinel" in " ".join(psutil.Process(extra.pop()).cmdline())


@pytest.mark.parametrize("round_number", range(UP_ROUNDS))
def test_five_ups_at_once_start_one_agent_and_one_mesh(mesh, round_number):
    port = free_port()
    mesh.write_manifest(TINY.replace("PORT", str(port)))
    results = run_together(mesh, *[("up", "-f", str(mesh.manifest))] * PARALLEL_UPS)
    for result in results:
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        assert "1/1 instances ready" in result.stdout
    assert_one_mesh(mesh)
    assert http_get(f"http://127.0.0.1:{port}/whoami")[0] == 200


@pytest.mark.parametrize("mesh_running", [False, True], ids=["fresh", "running"])
def test_up_racing_down_ends_up_or_down_never_half(mesh, mesh_running):
    port = free_port()
    mesh.write_manifest(TINY.replace("PORT", str(port)))
    if mesh_running:
        mesh.up()  # the race is then against a running mesh's agent
    up, down = run_together(mesh, ("up", "-f", str(mesh.manifest)), ("down",))
    assert down.returncode == 0, down.stderr
    if up.returncode != 0:
        assert up.returncode == 1 and OVERTAKEN_BY_DOWN in up.stderr, up.stderr
    # Which one wins is the scheduler's choice; either end is whole.
    if agents_of(mesh.home):  # `down` came first (or found no agent yet): `up` made the mesh
        assert up.returncode == 0, up.stderr
        assert_one_mesh(mesh)
        assert http_get(f"http://127.0.0.1:{port}/whoami")[0] == 200
    else:  # `down` came last: it overtook `up`, or `up` had returned before it
        wait_for(lambda: not mesh.living(), timeout=30, what="every process of the stopped mesh to exit")


def test_ten_route_splits_at_once_end_on_the_last_acked(mesh):
    mesh.write_manifest(TWO_VERSIONS.replace("PORT", str(free_port())))
    mesh.up()
    weights = [(10 * n, 100 - 10 * n) for n in range(SPLIT_CLIENTS)]
    results = run_together(mesh, *[("route", "split", "api", f"v1={a}", f"v2={b}") for a, b in weights])
    acked = []
    for (a, b), result in zip(weights, results):
        assert result.returncode == 0, result.stderr
        version = int(result.stdout.split("config v", 1)[1].split()[0])
        acked.append((version, {"v1": a, "v2": b}))
    versions = [version for version, _ in acked]
    assert len(set(versions)) == SPLIT_CLIENTS  # one after the other: each its own version
    last_split = max(acked, key=lambda entry: entry[0])[1]
    shown = json.loads(mesh.cli("route", "show", "api", "-o", "json", check=True).stdout)
    assert shown["services"]["api"]["live"]["split"] == last_split
    sidecars = json.loads(mesh.cli("proxy-status", "-o", "json", check=True).stdout)["sidecars"]
    assert sidecars and all(row["state"] == "SYNCED" for row in sidecars), sidecars
    snapshot = json.loads(mesh.cli("proxy-config", "ingress", check=True).stdout)["config"]
    assert snapshot["services"]["api"]["split"] == last_split


def test_only_a_lock_file_other_than_ours_makes_an_orphan():
    ours = (1, 11)
    assert not is_orphan([], ours)  # a sibling that has not taken the lock yet
    assert not is_orphan([ours], ours)  # a sibling that opened ours and will find it taken
    assert is_orphan([(1, 99)], ours)  # holds a deleted or replaced agent.lock
    assert is_orphan([(2, 11)], ours)  # holds one in another file system (a moved directory)


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ({"manifest": {"generation": 3, "source": "/a.yaml"}, "stopping": False}, None),
        ({"manifest": {"generation": 3}, "stopping": True}, OVERTAKEN_BY_DOWN),
        ({"manifest": {"generation": 4, "source": "/b.yaml"}},
         "another `meshctl up` applied /b.yaml after this one; the mesh runs that manifest now, not a.yaml"),
        ({}, None),  # an older agent says nothing of generations
    ],
)
def test_overtaken(status, reason, tmp_path):
    from pathlib import Path

    assert overtaken(status, Applied(tmp_path, 3, Path("a.yaml"))) == reason


def test_two_different_manifests_at_once_name_the_winner(mesh):
    first = mesh.write_manifest(TINY.replace("PORT", str(free_port())), name="first.yaml")
    second = mesh.write_manifest(TINY.replace("PORT", str(free_port())), name="second.yaml")
    results = run_together(mesh, ("up", "-f", str(first)), ("up", "-f", str(second)))
    codes = sorted(result.returncode for result in results)
    status = mesh.status()
    winner = status["manifest"]["source"]
    assert winner in (str(first), str(second))
    for path, result in zip((first, second), results):
        if str(path) == winner:
            assert result.returncode == 0, result.stderr
        elif result.returncode:
            # The other lost only if it was applied first and overtaken while it waited.
            assert f"another `meshctl up` applied {winner} after this one" in result.stderr, result.stderr
    assert codes in ([0, 0], [0, 1])
    assert alive(mesh.agent_pid())


def test_a_stopped_agent_leaves_word_why(mesh):
    mesh.write_manifest(TINY.replace("PORT", str(free_port())))
    mesh.up()
    agent = mesh.agent_pid()
    mesh.cli("down", check=True)
    assert exit_reason(mesh.home, agent) == "down"
    assert exit_reason(mesh.home, agent + 1) is None  # what another agent wrote says nothing of this one
