"""The agent may die; the data plane keeps serving (issue #21, part 1).

A kill -9 of the agent leaves every app and sidecar serving with its last config and
certificates, held by the sentinel: 0 requests fail under steady load while no agent runs.
`meshctl down` still stops everything at once, and with no agent back within
`agent_grace` the sentinel stops everything itself, so nothing is left running for ever.
"""

from __future__ import annotations

import os
import signal

from meshctl.agent.meshstate import STATE_FILE
from meshctl.agent.sentinel import Kept, append_lines, apply_message, sentinel_home
from tests.meshharness import alive, free_port, http_get, wait_for
from tests.reliability import ContinuousLoad
from tests.test_state_dir import TWO_TIER


REQUESTS_WITHOUT_AGENT = 300
GONE_DEADLINE_S = 30.0


def start(mesh, grace: str | None = None) -> tuple[int, int, list[int]]:
    """Up; returns (ingress port, the agent's pid, every other pid of the mesh)."""
    port = free_port()
    text = TWO_TIER.replace("PORT", str(port)) + (f"agent_grace: {grace}\n" if grace else "")
    mesh.write_manifest(text)
    mesh.up()
    mesh.remember_pids()
    agent = mesh.agent_pid()
    others = [p for p in mesh.seen_pids if p != agent]
    assert len(others) >= 8  # sentinel, ingress, 3 sidecars, 3 apps
    return port, agent, others


def app_log_bytes(mesh) -> int:
    """The size of the back apps' log files: each request adds a line."""
    return sum(path.stat().st_size for path in (mesh.home / "logs").glob("back@v1#*[0-9].log"))


def test_kill_9_of_the_agent_loses_no_request_and_down_still_stops_all(mesh):
    port, agent, others = start(mesh)
    with ContinuousLoad(port, "/call/back/whoami") as load:
        load.wait_for_requests(50)
        os.kill(agent, signal.SIGKILL)
        wait_for(lambda: not alive(agent), what="the agent to die")
        killed, logged = load.completed(), app_log_bytes(mesh)
        load.wait_for_requests(REQUESTS_WITHOUT_AGENT)
        failures = [o.detail for o in load.outcomes if not o.ok]
    assert load.completed() - killed >= REQUESTS_WITHOUT_AGENT
    assert failures == []
    assert app_log_bytes(mesh) > logged  # the sentinel drains the apps' output into their logs
    assert all(alive(p) for p in others)  # the same processes served throughout
    result = mesh.cli("down", check=True)  # adopts nothing: stops the kept mesh at once
    assert "no agent" in result.stdout
    wait_for(lambda: not any(alive(p) for p in others), timeout=GONE_DEADLINE_S,
             what="every process of the kept mesh to stop")
    assert not (mesh.home / "keeper.sock").exists()


def test_no_agent_within_agent_grace_stops_everything(mesh):
    port, agent, others = start(mesh, grace="3s")
    os.kill(agent, signal.SIGKILL)
    wait_for(lambda: not alive(agent), what="the agent to die")
    assert http_get(f"http://127.0.0.1:{port}/call/back/whoami")[0] == 200  # still serving
    wait_for(lambda: not any(alive(p) for p in others), timeout=GONE_DEADLINE_S,
             what="the sentinel to stop every process once agent_grace passed")


def test_up_after_a_crash_replaces_a_kept_mesh_it_cannot_adopt(mesh):
    port, agent, others = start(mesh)
    os.kill(agent, signal.SIGKILL)
    wait_for(lambda: not alive(agent), what="the agent to die")
    (mesh.home / STATE_FILE).unlink()  # as if written by a meshctl of another format
    mesh.up()
    assert not any(alive(p) for p in others)  # stopped before the new agent started its own
    assert mesh.agent_pid() != agent
    assert http_get(f"http://127.0.0.1:{port}/call/back/whoami")[0] == 200


def test_sentinel_messages():
    kept = Kept()
    assert apply_message("+12 /logs/a.log", [5, 6], kept) == []
    assert apply_message("+13", [], kept) == []
    assert apply_message("grace 3", [], kept) == [] and kept.grace_s == 3.0
    assert apply_message("grace soon", [7], kept) == [7] and kept.grace_s == 3.0
    assert apply_message("garbage", [8], kept) == [8]
    assert apply_message("hold 12", [9, 10], kept) == [] and kept.groups[12].held == [9, 10]
    assert apply_message("hold 99", [11], kept) == [11]  # no such group: not held
    assert apply_message("-12", [], kept) == [5, 6, 9, 10]
    assert sorted(kept.groups) == [13]
    assert apply_message("exit", [], kept) == [] and kept.clean_exit


def test_sentinel_home():
    assert sentinel_home(["/py", "-m", "meshctl.agent.sentinel", "--home", "/state"]) == "/state"
    assert sentinel_home(["/py", "-m", "meshctl.agent", "--home", "/state"]) is None
    assert sentinel_home(["/py", "-m", "meshctl.agent.sentinel"]) is None


def test_sentinel_appends_whole_lines_stamped(tmp_path):
    log = tmp_path / "app.log"
    rest = append_lines(str(log), b"GET /a", b"\nGET /b\nGET")
    assert rest == b"GET"
    assert append_lines(str(log), rest, b" /c") == b"GET /c"
    lines = log.read_bytes().splitlines()
    assert [line.split(b" ", 1)[1] for line in lines] == [b"GET /a", b"GET /b"]
