"""The foundation end to end: real agent, real sidecars, real apps, real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket

from tests.meshharness import alive, free_port, http_get, wait_for

TWO_TIER = """
mesh: {name}
services:
  back:
    command: {PY} {APPS}/echo.py
    health: {{http: /healthz}}
    env: {{READY_DELAY: "{delay}"}}
    replicas: 2
  front:
    command: {PY} {APPS}/echo.py
    upstreams: [back]
    health: {{http: /healthz}}
    env: {{REQUIRE_UPSTREAMS: "1"}}
ingress:
  port: {port}
  routes: [{{path: /, service: front}}]
"""


def two_tier(name="twotier", port=None, delay="0"):
    return TWO_TIER.format(name=name, port=port or free_port(), delay=delay, PY="{PY}", APPS="{APPS}")


def test_up_status_traffic_down(mesh):
    port = free_port()
    mesh.write_manifest(two_tier(port=port))
    result = mesh.up()
    assert "ready" in result.stdout.lower()
    status = mesh.status()
    assert status["mesh"] == "twotier"
    ids = sorted(i["id"] for i in status["instances"])
    assert ids == ["back@v1#0", "back@v1#1", "front@v1#0"]
    for inst in status["instances"]:
        assert inst["state"] == "ready"
        assert alive(inst["pid"]) and alive(inst["sidecar_pid"])
        assert set(inst) >= {"service", "version", "replica", "state", "pid", "sidecar_pid", "port", "restarts"}

    # Ingress -> front's sidecar -> front -> BACK_URL (front's sidecar) -> back's sidecar -> back.
    code, _, body = http_get(f"http://127.0.0.1:{port}/whoami")
    assert code == 200 and json.loads(body)["service"] == "front"
    replicas = set()
    for _ in range(20):
        code, _, body = http_get(f"http://127.0.0.1:{port}/call/back/whoami")
        assert code == 200, body
        replicas.add(json.loads(body)["replica"])
    assert replicas == {"0", "1"}  # both replicas of back serve

    pids = [p for i in status["instances"] for p in (i["pid"], i["sidecar_pid"])]
    down = mesh.cli("down")
    assert down.returncode == 0, down.stderr
    wait_for(lambda: not any(alive(p) for p in pids), what="every process to exit")
    wait_for(lambda: not mesh.living(), what="no process of the mesh left")
    assert not (mesh.home / "agent.sock").exists()


def test_dependency_order(mesh):
    # back takes a while to listen; front exits 7 if started before back answers.
    mesh.write_manifest(two_tier(delay="1.0"))
    mesh.up()
    front = mesh.instance("front@v1#0")
    assert front["restarts"] == 0, front
    backs = [mesh.instance(f"back@v1#{r}") for r in (0, 1)]
    assert all(front["started_at"] >= b["started_at"] for b in backs)


def test_crash_restarts_with_backoff_then_ready_again(mesh):
    port = free_port()
    mesh.write_manifest(two_tier(port=port))
    mesh.up()
    before = mesh.instance("front@v1#0")
    http_get(f"http://127.0.0.1:{port}/crash")
    wait_for(lambda: mesh.instance("front@v1#0")["restarts"] == 1, what="a restart")
    after = wait_for(
        lambda: (i := mesh.instance("front@v1#0"))["state"] == "ready" and i, what="ready again"
    )
    assert after["pid"] != before["pid"]
    assert after["port"] == before["port"]
    assert after["outbound_ports"] == before["outbound_ports"]  # BACK_URL stays valid
    assert "exited with code 1" in (after["last_exit"] or "")
    code, _, _ = http_get(f"http://127.0.0.1:{port}/call/back/whoami")
    assert code == 200


def test_quick_crashes_end_in_failed_and_up_names_it(mesh):
    mesh.write_manifest(
        """
        mesh: crashy
        services:
          broken:
            command: {PY} {APPS}/echo.py
            env: {EXIT_AT_START: "3"}
            restart: {backoff: 50ms, max_backoff: 100ms, max_quick_crashes: 3}
        """
    )
    result = mesh.up("--timeout", "30", check=False)
    assert result.returncode == 1
    out = result.stdout + result.stderr
    assert "broken@v1#0" in out
    assert "exiting at start as told" in out  # the last lines of its log
    inst = mesh.instance("broken@v1#0")
    assert inst["state"] == "failed"
    assert inst["restarts"] == 2
    assert "code 3" in inst["message"]


def test_no_orphans_after_down_including_grandchildren(mesh):
    port = free_port()
    mesh.write_manifest(two_tier(port=port))
    mesh.up()
    code, _, body = http_get(f"http://127.0.0.1:{port}/spawn")
    grandchild = json.loads(body)["pid"]
    assert alive(grandchild)
    mesh.remember_pids()
    assert mesh.cli("down").returncode == 0
    wait_for(lambda: not alive(grandchild), what="the app's own child to be stopped")
    wait_for(lambda: not mesh.living(), what="nothing left")


def test_sigkill_of_agent_leaves_no_orphans_and_next_up_starts_clean(mesh):
    port = free_port()
    # The sentinel keeps the mesh serving for agent_grace after the agent died, then stops it.
    mesh.write_manifest(two_tier(port=port) + "agent_grace: 1s\n")
    mesh.up()
    _, _, body = http_get(f"http://127.0.0.1:{port}/spawn")
    grandchild = json.loads(body)["pid"]
    mesh.remember_pids()
    agent = mesh.agent_pid()
    others = [p for p in mesh.seen_pids if p != agent]
    assert len(others) >= 8  # 3 apps, 3 sidecars, ingress, sentinel, grandchild
    os.kill(agent, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in others) and not alive(grandchild), what="every process to die")
    # The stale socket, lock and pid file must not stop the next start.
    assert mesh.up().returncode == 0
    assert mesh.status()["mesh"] == "twotier"
    code, _, _ = http_get(f"http://127.0.0.1:{port}/whoami")
    assert code == 200


def test_two_meshes_side_by_side(mesh_factory):
    a, b = mesh_factory("a"), mesh_factory("b")
    port_a, port_b = free_port(), free_port()
    a.write_manifest(two_tier(name="mesh-a", port=port_a))
    b.write_manifest(two_tier(name="mesh-b", port=port_b))
    a.up()
    b.up()
    assert a.status()["mesh"] == "mesh-a" and b.status()["mesh"] == "mesh-b"
    assert http_get(f"http://127.0.0.1:{port_a}/whoami")[0] == 200
    assert http_get(f"http://127.0.0.1:{port_b}/whoami")[0] == 200
    assert a.cli("down").returncode == 0
    assert http_get(f"http://127.0.0.1:{port_b}/call/back/whoami")[0] == 200
    assert b.status()["mesh"] == "mesh-b"


def test_ingress_port_in_use_is_refused_before_anything_starts(mesh):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        mesh.write_manifest(two_tier(port=port))
        result = mesh.up(check=False)
        assert result.returncode == 1
        assert f"ingress.port {port}" in result.stderr and "already in use" in result.stderr
        status = mesh.status()
        assert status["instances"] == []


def test_missing_binary_is_named_before_anything_starts(mesh):
    mesh.write_manifest(
        """
        mesh: nobin
        services:
          ghost:
            command: definitely-not-a-binary-xyz --flag
        """
    )
    result = mesh.up(check=False)
    assert result.returncode == 1
    assert "services.ghost.command: 'definitely-not-a-binary-xyz' not found" in result.stderr
    assert mesh.status()["instances"] == []


def test_up_with_changed_manifest_restarts_only_what_changed(mesh):
    port = free_port()
    mesh.write_manifest(two_tier(port=port))
    mesh.up()
    before = {i["id"]: i["pid"] for i in mesh.status()["instances"]}
    mesh.write_manifest(two_tier(port=port).replace("REQUIRE_UPSTREAMS: \"1\"", "REQUIRE_UPSTREAMS: \"1\", X: \"2\""))
    mesh.up()
    after = {i["id"]: i["pid"] for i in mesh.status()["instances"]}
    assert after["back@v1#0"] == before["back@v1#0"] and after["back@v1#1"] == before["back@v1#1"]
    assert after["front@v1#0"] != before["front@v1#0"]
    assert http_get(f"http://127.0.0.1:{port}/call/back/whoami")[0] == 200


def test_sigterm_to_the_agent_stops_the_mesh_and_the_agent(mesh):
    # Regression: a cancelled config pusher once left the agent hanging in shutdown.
    mesh.write_manifest(two_tier())
    mesh.up()
    mesh.remember_pids()
    agent = mesh.agent_pid()
    os.kill(agent, signal.SIGTERM)
    wait_for(lambda: not alive(agent), what="the agent to exit after SIGTERM")
    wait_for(lambda: not mesh.living(), what="every process of the mesh to stop")
    assert not (mesh.home / "agent.sock").exists()


PORT_MOVE = """
mesh: portmove
services:
  api:
    command: {PY} {APPS}/echo.py
    health: {{http: /healthz}}
    restart: {{backoff: 3s, max_backoff: 3s}}
ingress:
  port: {port}
  routes: [{{path: /, service: api}}]
"""


def take_port(port: int) -> socket.socket | None:
    """A listening socket on 127.0.0.1:`port`, or None while something else holds it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the crashed app's connections linger in TIME_WAIT
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
    except OSError:
        sock.close()
        return None
    return sock


def test_a_restart_gives_the_app_another_port_when_its_own_was_taken(mesh):
    """Between a crash and the restart another process takes the app's $PORT: the app moves, traffic follows."""
    ingress = free_port()
    mesh.write_manifest(PORT_MOVE.format(port=ingress, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    before = mesh.instance("api@v1#0")
    squatter = None
    for _ in range(5):  # the 3 s backoff leaves time to take the port; if the restart wins, crash it again
        pid = mesh.instance("api@v1#0")["pid"]
        try:
            http_get(f"http://127.0.0.1:{ingress}/crash")
        except OSError:
            pass  # the app exits before it answers
        squatter = wait_for(
            lambda: take_port(before["port"]) or (mesh.instance("api@v1#0")["pid"] not in (pid, None) and "restarted"),
            what="the app's port free again (or the app back on it)",
        )
        if isinstance(squatter, socket.socket):
            break
        wait_for(lambda: mesh.instance("api@v1#0")["state"] == "ready", what="ready again before another try")
    assert isinstance(squatter, socket.socket), "the restart always won the race for the port"
    try:
        after = wait_for(
            lambda: (i := mesh.instance("api@v1#0"))["state"] == "ready" and i["pid"] != before["pid"] and i,
            timeout=20, what="ready again on another port",
        )
        assert after["port"] != before["port"]
        code, _, body = http_get(f"http://127.0.0.1:{ingress}/whoami")
        assert code == 200 and json.loads(body)["service"] == "api"
    finally:
        squatter.close()
