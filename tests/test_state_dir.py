"""An agent whose state directory, lock file or control socket is gone stops its mesh.

`lost_state()` is checked with a table of cases; the integration tests delete the state
directory (or only the socket) under a real mesh and wait, with a deadline, until the
agent and every process it started have exited, then bring the mesh up again in the same
place and count the agents. A `meshctl up` right after the deletion must not wait for the
old agent's own check: the new agent stops the old one before it serves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest

from meshctl.agent.daemon import StateFiles, agent_home, lost_state
from tests.meshharness import alive, free_port, http_get, wait_for

HOME = Path("/state/mesh")
HELD = StateFiles(home=(1, 10), lock=(1, 11), socket=(1, 12))
STOP_DEADLINE_S = 30.0

TWO_TIER = """
mesh: gone
services:
  back:
    command: {PY} {APPS}/echo.py
    health: {http: /healthz}
    replicas: 2
  front:
    command: {PY} {APPS}/echo.py
    upstreams: [back]
    health: {http: /healthz}
ingress:
  port: PORT
  routes: [{path: /, service: front}]
"""


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        (HELD, None),
        (StateFiles(None, None, None), "the state directory /state/mesh was deleted or moved"),
        (StateFiles((1, 20), None, None), "the state directory /state/mesh was replaced by another directory"),
        (StateFiles((1, 20), (1, 21), (1, 22)), "the state directory /state/mesh was replaced by another directory"),
        (StateFiles((1, 10), None, (1, 12)), "/state/mesh/agent.lock was deleted"),
        (StateFiles((1, 10), (1, 31), (1, 12)), "/state/mesh/agent.lock was replaced by another file"),
        (StateFiles((1, 10), (2, 11), (1, 12)), "/state/mesh/agent.lock was replaced by another file"),
        (StateFiles((1, 10), (1, 11), None), "/state/mesh/agent.sock was deleted"),
        (StateFiles((1, 10), (1, 11), (1, 32)), "/state/mesh/agent.sock was replaced by another file"),
    ],
)
def test_lost_state(now, reason):
    assert lost_state(HOME, HELD, now) == reason


@pytest.mark.parametrize(
    ("argv", "home"),
    [
        (["/usr/bin/python3", "-m", "meshctl.agent", "--home", "/state/mesh"], "/state/mesh"),
        (["python", "-m", "meshctl.agent", "--home", "rel/dir"], "rel/dir"),
        (["python", "-m", "meshctl.agent", "--home"], None),
        (["python", "-m", "meshctl.agent"], None),
        (["python", "-m", "meshctl.proxy", "--home", "/state/mesh"], None),
        (["python", "/somewhere/agent", "--home", "/state/mesh"], None),
        ([], None),
    ],
)
def test_agent_home(argv, home):
    assert agent_home(argv) == home


def agents_of(home: Path) -> list[int]:
    """Every running agent started for this state directory, whatever its lock says."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        wanted = agent_home(proc.info["cmdline"] or [])
        if wanted is not None and Path(wanted).resolve() == home.resolve() and alive(proc.pid):
            found.append(proc.pid)
    return sorted(found)


def start_mesh(mesh) -> tuple[int, list[int], int]:
    """Up with an ingress; returns (ingress port, every pid of the mesh, the agent's pid)."""
    port = free_port()
    mesh.write_manifest(TWO_TIER.replace("PORT", str(port)))
    mesh.up()
    _, _, body = http_get(f"http://127.0.0.1:{port}/spawn")  # an app's own child, too
    mesh.remember_pids()
    pids = {json.loads(body)["pid"], *mesh.seen_pids}
    pids.update(p for inst in mesh.status()["instances"] for p in (inst["pid"], inst["sidecar_pid"]))
    agent = mesh.agent_pid()
    assert agent is not None and agents_of(mesh.home) == [agent]
    assert len(pids) >= 9  # agent, sentinel, ingress, 3 sidecars, 3 apps, the grandchild
    assert all(alive(p) for p in pids)
    return port, sorted(pids), agent


def test_deleting_the_state_dir_stops_the_mesh_and_up_starts_clean(mesh):
    port, pids, agent = start_mesh(mesh)
    shutil.rmtree(mesh.home)
    wait_for(lambda: not [p for p in pids if alive(p)], timeout=STOP_DEADLINE_S,
             what="the agent and every process of the mesh to exit")
    assert not mesh.home.exists()  # the agent does not recreate what the user deleted

    mesh.up()
    new_agent = mesh.agent_pid()
    assert new_agent != agent
    assert agents_of(mesh.home) == [new_agent]
    assert (mesh.home / "agent.sock").exists()
    code, _, body = http_get(f"http://127.0.0.1:{port}/call/back/whoami")  # same ingress port
    assert code == 200 and json.loads(body)["service"] == "back"


def test_deleting_the_control_socket_stops_the_mesh(mesh):
    port, pids, agent = start_mesh(mesh)
    (mesh.home / "agent.sock").unlink()
    wait_for(lambda: not [p for p in pids if alive(p)], timeout=STOP_DEADLINE_S,
             what="the agent and every process of the mesh to exit")
    assert not (mesh.home / "agent.pid").exists()  # the directory was still its own

    mesh.up()
    assert agents_of(mesh.home) == [mesh.agent_pid()] != [agent]
    assert http_get(f"http://127.0.0.1:{port}/whoami")[0] == 200


def test_up_right_after_deleting_the_state_dir_replaces_the_old_mesh(mesh):
    # Faster than the old agent's own check: the new agent stops the old one first.
    port, pids, agent = start_mesh(mesh)
    shutil.rmtree(mesh.home)
    mesh.up()
    wait_for(lambda: not [p for p in pids if alive(p)], timeout=STOP_DEADLINE_S,
             what="every process of the old mesh to exit")
    assert agents_of(mesh.home) == [mesh.agent_pid()] != [agent]
    code, _, body = http_get(f"http://127.0.0.1:{port}/call/back/whoami")
    assert code == 200 and json.loads(body)["service"] == "back"
