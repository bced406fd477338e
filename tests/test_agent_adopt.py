"""A new agent re-adopts the mesh a crashed agent left serving (issue #21, part 1).

Under steady load through the ingress, kill -9 the agent: no request fails while no agent
runs, nor while a new one (started by `meshctl status` or `meshctl up`) adopts the mesh.
The same processes serve throughout, live route changes work and traffic follows them,
status says how long the mesh ran without an agent, an adopted app that dies is restarted,
and a second crash with `agent_grace: 3s` still leaves no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from meshctl.agent.adopt import open_same_process
from meshctl.agent.meshstate import STATE_FILE
from tests.meshharness import alive, free_port, http_get, wait_for
from tests.reliability import ContinuousLoad

GONE_DEADLINE_S = 30.0
REQUESTS_WITHOUT_AGENT = 200
WITHOUT_AGENT_S = 10.0
ADOPTED_GRACE_S = 15.0  # long enough for a loaded machine to adopt within it

CANARY = """
mesh: adopted
services:
  back:
    health: {{http: /healthz}}
    versions:
      v1: {{command: {PY} {APPS}/echo.py, replicas: 2}}
      v2: {{command: {PY} {APPS}/echo.py}}
    split: {{v1: 100}}
  front:
    command: {PY} {APPS}/echo.py
    upstreams: [back]
    health: {{http: /healthz}}
ingress:
  port: {port}
  routes: [{{path: /, service: front}}]
{extra}"""


def start(mesh, extra: str = "") -> int:
    port = free_port()
    mesh.write_manifest(CANARY.format(port=port, extra=extra, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    mesh.remember_pids()
    return port


def processes(mesh) -> dict[str, tuple]:
    """(app pid, sidecar pid, ports) of every instance and of the ingress."""
    status = mesh.status()
    found = {inst["id"]: (inst["pid"], inst["sidecar_pid"], inst["port"], inst["inbound_port"])
             for inst in status["instances"]}
    found["ingress"] = (None, status["ingress"]["sidecar_pid"], status["ingress"]["port"], None)
    return found


def pids_of(found: dict[str, tuple]) -> set[int]:
    return {pid for app, sidecar, *_ in found.values() for pid in (app, sidecar) if pid}


def kill_agent(mesh) -> int:
    agent = mesh.agent_pid()
    assert agent is not None
    os.kill(agent, signal.SIGKILL)
    wait_for(lambda: not alive(agent), what="the agent to die")
    return agent


def app_log_bytes(mesh) -> int:
    return sum(path.stat().st_size for path in (mesh.home / "logs").glob("back@*[0-9].log"))


def versions_answering(port: int, count: int) -> set[str]:
    answers = set()
    for _ in range(count):
        code, _, body = http_get(f"http://127.0.0.1:{port}/call/back/whoami")
        assert code == 200, body
        answers.add(json.loads(body)["version"])
    return answers


def test_a_new_agent_re_adopts_the_mesh_with_no_failed_request(mesh):
    port = start(mesh)
    before = processes(mesh)
    config_version = mesh.status()["config_version"]
    with ContinuousLoad(port, "/call/back/whoami") as load:
        load.wait_for_requests(50)
        first = kill_agent(mesh)
        killed_at = time.monotonic()
        wait_for(lambda: time.monotonic() - killed_at >= WITHOUT_AGENT_S, timeout=WITHOUT_AGENT_S + 5,
                 what="the mesh to serve for a while with no agent")  # the scenario, not a synchronisation
        assert len(load.between(killed_at, time.monotonic())) >= REQUESTS_WITHOUT_AGENT
        status = mesh.status()  # needs an agent: starts one, which adopts the mesh
        load.wait_for_requests(REQUESTS_WITHOUT_AGENT)
        failures = [o.detail for o in load.outcomes if not o.ok]
    assert failures == []
    second = mesh.agent_pid()
    assert second not in (None, first)
    assert processes(mesh) == before  # the same pids, the same ingress port
    assert status["config_version"] > config_version  # continued, never back
    assert all(inst["state"] == "ready" for inst in status["instances"])
    assert [period["agent"] for period in status["without_agent"]] == [second]
    assert status["without_agent"][0]["seconds"] >= WITHOUT_AGENT_S
    table = mesh.cli("status", check=True).stdout
    assert f"without an agent until agent {second} re-adopted it" in table
    assert "SYNCED" in mesh.cli("proxy-status", check=True).stdout

    # Live changes reach the adopted sidecars, and traffic follows them; the adopted apps'
    # output still reaches their log files, now read by the new agent.
    logged = app_log_bytes(mesh)
    assert versions_answering(port, 10) == {"v1"}
    mesh.cli("route", "split", "back", "v2=100", "v1=0", check=True)
    assert versions_answering(port, 10) == {"v2"}
    wait_for(lambda: app_log_bytes(mesh) > logged, what="adopted apps' lines in their logs")

    # A second crash: the sentinel that followed the adopting agent stops all after the grace.
    mesh.write_manifest(mesh.manifest.read_text() + "agent_grace: 3s\n")
    assert "changed 0, stopped 0" in mesh.up().stdout
    assert processes(mesh) == before
    pids = pids_of(before)
    assert len(pids) == 9  # 4 apps, 5 sidecars
    kill_agent(mesh)
    assert http_get(f"http://127.0.0.1:{port}/call/back/whoami")[0] == 200  # still serving
    wait_for(lambda: not any(alive(p) for p in pids), timeout=GONE_DEADLINE_S,
             what="every process to stop once agent_grace passed")
    wait_for(lambda: not mesh.living(), timeout=GONE_DEADLINE_S, what="the sentinel to exit too")


def test_an_adopted_app_that_dies_is_restarted_and_up_adopts(mesh):
    port = start(mesh)
    before = processes(mesh)
    kill_agent(mesh)
    assert os.stat(mesh.home / STATE_FILE).st_mode & 0o777 == 0o600
    mesh.up()  # adopts, then finds the manifest unchanged
    after = processes(mesh)
    assert after == before
    victim = before["back@v1#0"][0]
    os.kill(victim, signal.SIGKILL)  # not the new agent's child: noticed through its pidfd
    wait_for(lambda: (pid := mesh.instance("back@v1#0")["pid"]) not in (None, victim) and pid,
             what="the adopted app to be restarted")
    restarted = mesh.instance("back@v1#0")
    assert restarted["restarts"] == 1 and restarted["sidecar_pid"] == before["back@v1#0"][1]
    wait_for(lambda: mesh.instance("back@v1#0")["state"] == "ready", what="the restarted app to be ready")
    assert http_get(f"http://127.0.0.1:{port}/call/back/whoami")[0] == 200

    # What the adopting agent started (through the sentinel it adopted) is adopted in turn.
    mesh.remember_pids()
    running = processes(mesh)
    kill_agent(mesh)
    status = mesh.status()
    assert processes(mesh) == running
    assert len(status["without_agent"]) == 2 and status["without_agent"][1]["agent"] == mesh.agent_pid()
    assert "(2 times," in mesh.cli("status", check=True).stdout
    assert http_get(f"http://127.0.0.1:{port}/call/back/whoami")[0] == 200
    mesh.remember_pids()
    mesh.cli("down", check=True)
    assert not (mesh.home / STATE_FILE).exists()  # nothing left to adopt
    wait_for(lambda: not mesh.living(), timeout=GONE_DEADLINE_S, what="down to stop every process")


def test_only_the_recorded_process_is_adopted_never_a_reused_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        created = psutil.Process(proc.pid).create_time()
        pidfd = open_same_process({"pid": proc.pid, "created": created})
        assert pidfd is not None
        os.close(pidfd)
        assert open_same_process({"pid": proc.pid, "created": created - 1.0}) is None  # another process
        assert open_same_process(None) is None
    finally:
        proc.kill()
        proc.wait()
    assert open_same_process({"pid": proc.pid, "created": created}) is None  # gone


def test_a_process_group_the_record_does_not_know_is_stopped_never_orphaned(mesh):
    port = start(mesh, f"agent_grace: {ADOPTED_GRACE_S:g}s\n")
    before = processes(mesh)
    kill_agent(mesh)
    killed_at = time.monotonic()
    # As if the agent died between starting back@v1#1 and writing it down.
    record_path = mesh.home / STATE_FILE
    record = json.loads(record_path.read_text())
    record["instances"] = [i for i in record["instances"] if i["id"] != "back@v1#1"]
    record_path.write_text(json.dumps(record))
    mesh.status()
    unknown = before["back@v1#1"][:2]
    wait_for(lambda: not any(alive(p) for p in unknown), what="the group nobody recorded to be stopped")
    wait_for(lambda: mesh.instance("back@v1#1")["state"] == "ready", what="back@v1#1 started afresh")
    after = processes(mesh)
    assert not set(after.pop("back@v1#1")[:2]) & set(unknown)
    assert after == {k: v for k, v in before.items() if k != "back@v1#1"}  # the others adopted
    assert versions_answering(port, 4) == {"v1"}
    # The adoption stopped the sentinel's grace timer: past it, everything still serves.
    wait_for(lambda: time.monotonic() - killed_at > ADOPTED_GRACE_S + 2, timeout=ADOPTED_GRACE_S + 5,
             what="agent_grace to pass")  # the scenario, not a synchronisation
    assert all(alive(pid) for pid in pids_of(after)) and versions_answering(port, 2) == {"v1"}


def test_a_mesh_that_cannot_be_adopted_is_stopped_then_started_afresh(mesh):
    port = start(mesh)
    before = pids_of(processes(mesh))
    kill_agent(mesh)
    record_path = mesh.home / STATE_FILE
    record = json.loads(record_path.read_text())
    record["manifest"]["text"] = "mesh: [not a manifest"
    record_path.write_text(json.dumps(record))
    assert mesh.status()["instances"] == []  # the new agent runs no mesh
    wait_for(lambda: not any(alive(p) for p in before), timeout=GONE_DEADLINE_S,
             what="the mesh it could not adopt to be stopped")
    assert not record_path.exists()
    mesh.up()
    assert not pids_of(processes(mesh)) & before
    assert versions_answering(port, 2) == {"v1"}
