"""Chaos under continuous load on real meshes: kill -9 of a replica, a sidecar, the agent;
an upstream that hangs past its route's timeout; and the four live operations (route
change, certificate rotation, rolling restart, scale-down) under one load.

Every test keeps a few keep-alive clients calling through the ingress (ContinuousLoad)
and writes its figures (requests sent, failed, time to recover) to the results directory
that docs/reliability.md is generated from.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.meshharness import alive, free_port, http_get, wait_for
from tests.reliability import ContinuousLoad, Phase, fd_count, record

# Retries for idempotent GETs on every hop, so a failed try moves to another endpoint.
RETRIES = "{{attempts: 3, retry_on: [connect-failure, refused, reset, gateway-error]}}"  # str.format escapes
CHAOS = """
mesh: chaos
services:
  api:
    command: {PY} {APPS}/echo.py
    health: {{http: /healthz, period: 100ms}}
    replicas: 2
    retries: %(retries)s
    routes: [{{match: {{path: {{prefix: /sleep}}}}, timeout: 500ms, retries: {{attempts: 1}}}}]
  front:
    command: {PY} {APPS}/echo.py
    upstreams: [api]
    health: {{http: /healthz, period: 100ms}}
    retries: %(retries)s
ingress:
  port: {port}
  routes: [{{path: /call, service: front}}, {{path: /, service: api}}]
""" % {"retries": RETRIES}

# The brief's figure for callers to recover after a sidecar is SIGKILLed.
SIDECAR_RECOVERY_S = 2.0


@pytest.fixture
def chaos(mesh):
    mesh.port = free_port()
    mesh.write_manifest(CHAOS.format(port=mesh.port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    return mesh


def ready_again(mesh, iid: str, old_pid: int, pid_key: str = "pid") -> dict:
    return wait_for(
        lambda: (i := mesh.instance(iid))["state"] == "ready" and i[pid_key] not in (None, old_pid) and i,
        timeout=30, what=f"{iid} ready again with a new {pid_key}",
    )


def test_kill_9_of_one_replica_loses_at_most_a_thousandth(chaos):
    victim = chaos.instance("api@v1#0")
    with ContinuousLoad(chaos.port, "/whoami") as load:
        load.wait_for_requests(200)
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        after = ready_again(chaos, "api@v1#0", victim["pid"])
        back_after = time.monotonic() - killed_at
        load.wait_for_requests(200)
        end = time.monotonic()
    outcomes = load.between(0, end)
    failures = [o.detail for o in outcomes if not o.ok]
    assert after["restarts"] == victim["restarts"] + 1
    assert after["last_exit"] == "killed by SIGKILL"
    record("chaos_kill_replica", {
        "title": "kill -9 of one of two replicas under load",
        "about": "4 keep-alive clients call api (2 replicas) through the ingress, retries on "
                 "connect-failure/refused/reset/gateway-error; one replica's app is SIGKILLed.",
        "figures": {"requests sent": len(outcomes), "failed": len(failures),
                    "seconds until the replica was ready again": round(back_after, 2)},
    })
    assert len(failures) <= len(outcomes) // 1000, failures[:5]


def test_kill_9_of_a_sidecar_is_restarted_and_callers_recover(chaos):
    victim = chaos.instance("front@v1#0")
    with ContinuousLoad(chaos.port, "/call/api/whoami") as load:
        load.wait_for_requests(100)
        killed_at = time.monotonic()
        os.kill(victim["sidecar_pid"], signal.SIGKILL)
        wait_for(lambda: load.first_success_after(killed_at) is not None, timeout=SIDECAR_RECOVERY_S,
                 interval=0.01, what="a successful request after the sidecar was killed")
        recovery = load.first_success_after(killed_at)
        after = ready_again(chaos, "front@v1#0", victim["sidecar_pid"], pid_key="sidecar_pid")
        load.wait_for_requests(100)
        end = time.monotonic()
    window = load.between(killed_at, end)
    assert after["pid"] == victim["pid"], "the app keeps running while its sidecar restarts"
    failed = [o for o in window if not o.ok]
    # Only what was in flight on the killed sidecar may fail: one request per client worker.
    assert len(failed) <= 4, failed[:5]
    record("chaos_kill_sidecar", {
        "title": "kill -9 of a sidecar under load",
        "about": "4 keep-alive clients call front (1 replica) through the ingress; front's sidecar is "
                 "SIGKILLed; the agent restarts it on the same listening sockets, which it holds, and "
                 "keeps the instance in its callers' endpoints: new connections wait in the kernel's "
                 "backlog for the new sidecar, so only requests in flight at the kill can fail.",
        "figures": {"seconds to the first success after the kill": round(recovery, 3),
                    "requests sent after the kill": len(window),
                    "failed after the kill": sum(not o.ok for o in window)},
    })



def test_kill_9_of_the_agent_leaves_nothing_that_blocks_the_next_up_adopting_it(chaos):
    chaos.remember_pids()
    agent = chaos.agent_pid()
    others = [p for p in chaos.seen_pids if p != agent]
    home = chaos.home
    os.kill(agent, signal.SIGKILL)
    wait_for(lambda: not alive(agent), timeout=30, what="the agent to die")
    # What a crash leaves behind: a socket nobody listens on, a lock nobody holds, a pid
    # file naming a dead process, and the mesh its sentinel keeps serving.
    assert (home / "agent.sock").exists() and (home / "agent.lock").exists()
    assert int((home / "agent.pid").read_text()) == agent
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(str(home / "agent.sock"))
    # A stale pid file that names some other live process must not matter either.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (home / "agent.pid").write_text(f"{bystander.pid}\n")
        chaos.up()
        assert alive(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()
    new_agent = chaos.agent_pid()
    assert new_agent not in (agent, bystander.pid) and alive(new_agent)
    assert all(alive(p) for p in others)  # the kept mesh was adopted, not restarted
    assert chaos.status()["mesh"] == "chaos"
    assert http_get(f"http://127.0.0.1:{chaos.port}/whoami")[0] == 200


def test_hanging_upstream_times_out_and_leaks_nothing(chaos):
    watched = sidecar_pids(chaos)
    for _ in range(20):  # warm every replica's pooled connections, not just one
        assert http_get(f"http://127.0.0.1:{chaos.port}/whoami")[0] == 200
    baseline = {pid: fd_count(pid) for pid in watched}
    answers = []
    for _ in range(20):
        code, headers, _ = http_get(f"http://127.0.0.1:{chaos.port}/sleep?ms=20000", timeout=15)
        answers.append((code, headers.get("x-mesh-error")))
    assert answers == [(504, "timeout")] * 20
    assert http_get(f"http://127.0.0.1:{chaos.port}/whoami")[0] == 200

    def settled():
        # The total: which replica a pooled connection lands on may change, a leak may not.
        now = {pid: fd_count(pid) for pid in watched}
        return sum(now.values()) <= sum(baseline.values()) and now

    final = wait_for(settled, timeout=15, interval=0.2, what=f"sidecar fds back to {baseline}")
    record("chaos_hanging_upstream", {
        "title": "an upstream that hangs past the route timeout",
        "about": "20 requests to an app that sleeps 20 s behind a 500 ms route timeout.",
        "figures": {"504 timeout answers": len(answers),
                    "sidecar fds before": sum(baseline.values()), "sidecar fds after": sum(final.values())},
    })


def sidecar_pids(mesh) -> list[int]:
    """Every sidecar of the mesh, the ingress included (`python -m meshctl.proxy` children of the agent)."""
    agent = psutil.Process(mesh.agent_pid())
    return [p.pid for p in agent.children(recursive=True) if p.cmdline()[1:3] == ["-m", "meshctl.proxy"]]


OPERATIONS = """
mesh: zerodown
certificates: {{leaf_lifetime: 1h}}
services:
  api:
    health: {{http: /healthz, period: 100ms}}
    versions:
      v1: {{command: {PY} {APPS}/echo.py, replicas: 2}}
      v2: {{command: {PY} {APPS}/echo.py}}
    split: {{v1: 100}}
    retries: %(retries)s
ingress:
  port: {port}
  routes: [{{path: /, service: api}}]
""" % {"retries": RETRIES}


def test_live_operations_in_sequence_under_one_load_lose_nothing(mesh):
    port = free_port()
    mesh.write_manifest(OPERATIONS.format(port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    phases: list[Phase] = []
    with ContinuousLoad(port, "/whoami") as load:
        load.wait_for_requests(100)
        with load.phase("route change (split v1=50 v2=50)", phases):
            mesh.cli("route", "split", "api", "v1=50", "v2=50", check=True)
        with load.phase("certificate rotation (every leaf)", phases):
            mesh.cli("certs", "rotate", check=True, timeout=120)
        with load.phase("CA rotation (three phases)", phases):
            mesh.cli("certs", "rotate", "--ca", check=True, timeout=120)
        with load.phase("rolling restart (3 instances)", phases):
            mesh.cli("restart", "api", check=True, timeout=120)
        with load.phase("scale-down (v1 2 -> 1)", phases):
            mesh.cli("scale", "api@v1=1", check=True, timeout=120)
    record("zero_downtime_operations", {
        "title": "live operations in sequence under one continuous load",
        "about": "4 keep-alive clients call api (v1 x2, v2 x1) through the ingress without a pause "
                 "while the operations run one after the other through the CLI; each row counts "
                 "the requests started from the command's start until 20 more completed after it returned.",
        "operations": [p.to_json() for p in phases],
    })
    assert sorted(i["id"] for i in mesh.status()["instances"]) == ["api@v1#0", "api@v2#0"]
    assert {p.name: p.failures for p in phases} == {p.name: [] for p in phases}
