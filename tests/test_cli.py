"""The `meshctl` CLI as a real subprocess against a scripted agent on a real unix socket.

`FakeAgent` speaks the control API (docs/protocols.md, part 2) with canned answers, so
these tests pin what the CLI prints, its exit codes and what it sends, without starting
the real agent (the end-to-end `up` lives in the integration tests). Pure helpers of
`meshctl.render`, `meshctl.paths` and `meshctl.cli` are checked with tables of cases.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshctl import render
from meshctl.cli import workdir_here
from meshctl.client import AgentStartError, connect, ensure_agent
from meshctl.paths import prepare_home, resolve_home, unsafe_reason

CLI = [sys.executable, "-m", "meshctl.cli"]
DEADLINE_S = 20.0
NOW = time.time()

INSTANCES = [
    {
        "id": "cart@v1#0", "service": "cart", "version": "v1", "replica": 0,
        "state": "ready", "pid": 4101, "sidecar_pid": 4102, "port": 41000,
        "inbound_port": 43001, "outbound_ports": {"catalog": 43002},
        "restarts": 0, "started_at": NOW - 125, "last_exit": None, "message": None,
    },
    {
        "id": "catalog@v2#1", "service": "catalog", "version": "v2", "replica": 1,
        "state": "backoff", "pid": None, "sidecar_pid": 4202, "port": 41001,
        "inbound_port": 43003, "outbound_ports": {},
        "restarts": 3, "started_at": None, "last_exit": 1, "message": "exited with code 1",
    },
]
STATUS = {"mesh": "shopfast", "ingress": {"host": "127.0.0.1", "port": 8080}, "instances": INSTANCES}
LOG_EVENTS = [
    {"instance": "cart@v1#0", "line": "listening on 41000", "ts": NOW},
    {"instance": "catalog@v2#1", "line": "boom: no database", "ts": NOW},
    {"instance": "cart@v1#0", "line": "GET /items 200", "ts": NOW},
]

Reply = Callable[[dict, "FakeAgent", socket.socket], list[dict]]


def ok(result: Any) -> dict:
    return {"ok": True, "result": result}


def error(code: str, message: str) -> dict:
    return {"ok": False, "error": {"code": code, "message": message}}


class FakeAgent:
    """A scripted control-API peer: one canned reply function per op, every request kept."""

    def __init__(self, home: Path, replies: dict[str, Reply], pid: int | None = None) -> None:
        self.home = home
        self.sock_path = home / "agent.sock"
        self.replies = {"ping": lambda req, agent, conn: [ok(agent.ping_result())], **replies}
        self.pid = os.getpid() if pid is None else pid
        self.requests: list[dict] = []
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.connection.settimeout(DEADLINE_S)
                request = json.loads(self.rfile.readline())
                fake.requests.append(request)
                reply = fake.replies.get(request["op"])
                messages = reply(request, fake, self.connection) if reply else [
                    error("unknown-op", "unknown op %r" % request["op"])
                ]
                for message in messages:
                    self.wfile.write(json.dumps(message).encode() + b"\n")

        self.server = socketserver.ThreadingUnixStreamServer(str(self.sock_path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-agent")
        self.thread.start()

    def ping_result(self) -> dict:
        return {"mesh": "shopfast", "pid": self.pid, "home": str(self.home)}

    def stop_answering(self) -> None:
        """What an exiting agent does: its socket path disappears."""
        self.sock_path.unlink(missing_ok=True)

    def ops(self) -> list[str]:
        return [request["op"] for request in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
        self.stop_answering()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return state


@pytest.fixture
def fake_agent(home: Path) -> Iterator[Callable[..., FakeAgent]]:
    started: list[FakeAgent] = []

    def start(replies: dict[str, Reply], pid: int | None = None) -> FakeAgent:
        agent = FakeAgent(home, replies, pid)
        started.append(agent)
        return agent

    try:
        yield start
    finally:
        for agent in started:
            agent.close()


@pytest.fixture
def stand_in_process() -> Iterator[subprocess.Popen]:
    """A real process playing the agent's pid, so `down` has something to wait for."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    env.update(MESHCTL_HOME=str(home), COLUMNS="200", **extra)
    return env


def run_cli(home: Path, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args],
        env=cli_env(home, **env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )


def run_cli_on_terminal(home: Path, *args: str, **env: str) -> tuple[int, str]:
    """Run with stdout on a pseudo-terminal; returns the exit code and raw output."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*CLI, *args], env=cli_env(home, TERM="xterm-256color", **env),
            stdout=follower, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )
        os.close(follower)
        follower = -1
        chunks = []
        give_up_at = time.monotonic() + DEADLINE_S
        while time.monotonic() < give_up_at:
            readable, _, _ = select.select([leader], [], [], 1.0)
            if not readable:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = proc.wait(timeout=DEADLINE_S)
        proc.stderr.close()
        return code, b"".join(chunks).decode()
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


GOOD_MANIFEST = """\
mesh: shopfast
services:
  web:
    command: python3 -m http.server
    replicas: 2
"""
TYPO_MANIFEST = """\
mesh: shopfast
services:
  web:
    comand: python3 -m http.server
"""


# --- status ---------------------------------------------------------------------------------


def test_status_table_is_plain_when_piped(home: Path, fake_agent) -> None:
    def fresh_status(req, agent, conn):
        # Uptime is computed against the clock when the agent answers, not when this module loaded.
        instances = [dict(i, started_at=time.time() - 125 if i["started_at"] else None) for i in INSTANCES]
        return [ok(dict(STATUS, instances=instances))]

    fake_agent({"status": fresh_status})
    result = run_cli(home, "status")
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == "mesh shopfast · ingress http://127.0.0.1:8080/"
    assert lines[1].split() == list(render.STATUS_COLUMNS)
    cart = lines[2].split("   ")
    assert [cell.strip() for cell in cart if cell.strip()][:5] == ["cart", "v1", "0", "ready", "4101"]
    assert "app 41000 · in 43001" in lines[2]
    assert "2m0" in lines[2]  # started 125 s ago
    assert lines[3].split()[:5] == ["catalog", "v2", "1", "backoff", "-"]


def test_status_json_has_the_documented_keys(home: Path, fake_agent) -> None:
    fake_agent({"status": lambda req, agent, conn: [ok(STATUS)]})
    result = run_cli(home, "status", "-o", "json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["mesh"] == "shopfast"
    first = document["instances"][0]
    assert {k: first[k] for k in render.JSON_INSTANCE_KEYS} == {
        "service": "cart", "version": "v1", "replica": 0, "state": "ready",
        "pid": 4101, "sidecar_pid": 4102, "port": 41000, "restarts": 0,
    }
    assert [i["state"] for i in document["instances"]] == ["ready", "backoff"]


@pytest.mark.parametrize(
    ("no_color", "expect_colour"),
    [(None, True), ("1", False)],
    ids=["colour", "NO_COLOR"],
)
def test_status_on_a_terminal_colours_states_unless_no_color(
    home: Path, fake_agent, no_color: str | None, expect_colour: bool
) -> None:
    fake_agent({"status": lambda req, agent, conn: [ok(STATUS)]})
    extra = {"NO_COLOR": no_color} if no_color else {}
    code, output = run_cli_on_terminal(home, "status", **extra)
    assert code == 0
    assert "cart" in output and "app 41000 · in 43001" in output
    green = "\x1b[32m"
    assert (green in output) is expect_colour


def test_status_without_agent_exits_1_with_hint(home: Path) -> None:
    result = run_cli(home, "status")
    assert result.returncode == 1
    assert f"error: no mesh running (MESHCTL_HOME={home})" in result.stderr
    assert "hint: start one with `meshctl up -f mesh.yaml`" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_stale_socket_counts_as_no_agent(home: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(home / "agent.sock"))
    stale.close()  # the file stays, nothing listens
    assert connect(home) is None
    result = run_cli(home, "status", "-o", "json")
    assert result.returncode == 1
    assert "no mesh running" in result.stderr


def test_agent_error_object_is_shown_with_its_code(home: Path, fake_agent) -> None:
    fake_agent({"logs": lambda req, agent, conn: [error("unknown-service", "no service 'nope' in mesh shopfast")]})
    result = run_cli(home, "logs", "nope")
    assert result.returncode == 1
    assert "error: unknown-service: no service 'nope' in mesh shopfast" in result.stderr
    assert "meshctl status" in result.stderr


def test_agent_dropping_the_connection_is_a_clear_failure(home: Path, fake_agent) -> None:
    fake_agent({"status": lambda req, agent, conn: []})  # closes without an answer
    result = run_cli(home, "status")
    assert result.returncode == 1
    assert "error: the agent closed the connection before answering `status`" in result.stderr
    assert f"hint: see {home / 'agent.log'}" in result.stderr
    assert "Traceback" not in result.stderr


# --- logs -----------------------------------------------------------------------------------


def test_logs_prefix_each_line_with_its_instance(home: Path, fake_agent) -> None:
    agent = fake_agent({"logs": lambda req, agent, conn: [*({"event": e} for e in LOG_EVENTS), ok(None)]})
    result = run_cli(home, "logs", "cart", "--tail", "7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "cart@v1#0 | listening on 41000",
        "catalog@v2#1 | boom: no database",
        "cart@v1#0 | GET /items 200",
    ]
    assert agent.requests[-1] == {"op": "logs", "service": "cart", "tail": 7, "follow": False}


def test_logs_on_a_terminal_colour_only_the_prefix(home: Path, fake_agent) -> None:
    fake_agent({"logs": lambda req, agent, conn: [*({"event": e} for e in LOG_EVENTS), ok(None)]})
    code, output = run_cli_on_terminal(home, "logs")
    assert code == 0
    assert "cart@v1#0 | \x1b[0mlistening on 41000" in output
    assert output.count("\x1b[") >= 2 * len(LOG_EVENTS)


def test_logs_follow_stops_cleanly_on_ctrl_c(home: Path, fake_agent) -> None:
    def follow(request: dict, agent: FakeAgent, conn: socket.socket) -> list[dict]:
        for event in LOG_EVENTS[:2]:
            conn.sendall(json.dumps({"event": event}).encode() + b"\n")
        conn.recv(1)  # until the client hangs up
        return []

    agent = fake_agent({"logs": follow})
    # As in a terminal: a test run started in the background (`make test &`, nohup) has SIGINT
    # ignored, the child would inherit that, and Python installs no KeyboardInterrupt handler.
    proc = subprocess.Popen(
        [*CLI, "logs", "-f"], env=cli_env(home), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout.readline() == "cart@v1#0 | listening on 41000\n"
        assert proc.stdout.readline() == "catalog@v2#1 | boom: no database\n"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=DEADLINE_S)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert "Traceback" not in stderr
    assert agent.requests[-1]["follow"] is True


# --- down -----------------------------------------------------------------------------------


def test_down_without_agent_exits_0(home: Path) -> None:
    result = run_cli(home, "down")
    assert result.returncode == 0
    assert result.stdout.strip() == f"no mesh running in {home}"


@pytest.mark.parametrize("key", ["stopped", "stopping"])
def test_down_waits_for_the_agent_to_exit(home: Path, fake_agent, stand_in_process, key: str) -> None:
    def down(request: dict, agent: FakeAgent, conn: socket.socket) -> list[dict]:
        agent.stop_answering()
        stand_in_process.terminate()
        stand_in_process.wait()
        return [ok({key: ["cart@v1#0", "catalog@v2#1"]})]

    agent = fake_agent({"down": down}, pid=stand_in_process.pid)
    result = run_cli(home, "down")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "mesh shopfast stopped (2 instances)"
    assert agent.ops() == ["ping", "down"]


def test_down_kills_an_agent_that_outlives_the_timeout(home: Path, fake_agent, stand_in_process) -> None:
    def down(request: dict, agent: FakeAgent, conn: socket.socket) -> list[dict]:
        agent.stop_answering()  # but the process lingers
        return [ok({"stopped": []})]

    fake_agent({"down": down}, pid=stand_in_process.pid)
    result = run_cli(home, "down", "--timeout", "0.5")
    assert result.returncode == 0, result.stderr
    assert f"the agent (pid {stand_in_process.pid}) did not exit within 0.5 s" in result.stdout
    assert "SIGKILL" in result.stdout
    assert stand_in_process.wait(timeout=DEADLINE_S) == -signal.SIGKILL


# --- up (against the scripted agent; the real one is the integration tests' business) ------


def scripted_status(states: list[dict[str, str]]) -> Reply:
    """Answer successive `status` requests with these states, repeating the last."""
    answers = iter(states)
    last: list[dict[str, str]] = []

    def reply(request: dict, agent: FakeAgent, conn: socket.socket) -> list[dict]:
        states_now = next(answers, None) or last[0]
        last[:] = [states_now]
        instances = [
            {**INSTANCES[0], "id": instance_id, "service": "web", "replica": int(instance_id[-1]),
             "state": state, "message": "exited with code 3" if state == "failed" else None}
            for instance_id, state in states_now.items()
        ]
        return [ok({**STATUS, "instances": instances})]

    return reply


def test_up_applies_and_waits_until_every_instance_is_ready(home: Path, tmp_path: Path, fake_agent) -> None:
    pytest.importorskip("meshctl.agent.manifest")
    manifest = write(tmp_path / "mesh.yaml", GOOD_MANIFEST)
    agent = fake_agent({
        "apply": lambda req, agent, conn: [ok({"mesh": "shopfast", "changed": [], "stopped": [],
                                              "started": ["web@v1#0", "web@v1#1"]})],
        "status": scripted_status([
            {"web@v1#0": "starting"},
            {"web@v1#0": "ready", "web@v1#1": "starting"},
            {"web@v1#0": "ready", "web@v1#1": "ready"},
        ]),
    })
    result = run_cli(home, "up", "-f", str(manifest))
    assert result.returncode == 0, result.stderr
    assert "mesh shopfast: 2/2 instances ready (started 2, changed 0, stopped 0)" in result.stdout
    assert "ingress: http://127.0.0.1:8080/" in result.stdout
    assert "0/2 ready · starting: web@v1#0 · pending: web@v1#1" in result.stdout
    apply = next(r for r in agent.requests if r["op"] == "apply")
    assert apply["manifest_path"] == str(manifest.resolve())


def test_up_names_the_failed_instance_with_its_last_log_lines(home: Path, tmp_path: Path, fake_agent) -> None:
    pytest.importorskip("meshctl.agent.manifest")
    manifest = write(tmp_path / "mesh.yaml", GOOD_MANIFEST)
    events = [{"instance": "web@v1#1", "line": f"line {n}", "ts": NOW} for n in range(15)]
    events.insert(3, {"instance": "web@v1#0", "line": "from the healthy sibling", "ts": NOW})
    fake_agent({
        "apply": lambda req, agent, conn: [ok({"mesh": "shopfast", "changed": [], "stopped": [], "started": []})],
        "status": scripted_status([{"web@v1#0": "ready", "web@v1#1": "failed"}]),
        "logs": lambda req, agent, conn: [*({"event": e} for e in events), ok(None)],
    })
    result = run_cli(home, "up", "-f", str(manifest))
    assert result.returncode == 1
    assert "error: 1 instance failed: web@v1#1" in result.stderr
    assert "web@v1#1: failed (exited with code 3)" in result.stderr
    shown = [line.strip() for line in result.stderr.splitlines() if line.strip().startswith("| ")]
    assert shown == [f"| line {n}" for n in range(5, 15)]
    assert "meshctl logs web" in result.stderr


def test_up_times_out_naming_instances_not_ready(home: Path, tmp_path: Path, fake_agent) -> None:
    pytest.importorskip("meshctl.agent.manifest")
    manifest = write(tmp_path / "mesh.yaml", GOOD_MANIFEST)
    fake_agent({
        "apply": lambda req, agent, conn: [ok({"mesh": "shopfast", "changed": [], "stopped": [], "started": []})],
        "status": scripted_status([{"web@v1#0": "ready", "web@v1#1": "starting"}]),
        "logs": lambda req, agent, conn: [ok([])],
    })
    result = run_cli(home, "up", "-f", str(manifest), "--timeout", "0.3")
    assert result.returncode == 1
    assert "error: 1 instance(s) not ready after 0.3 s" in result.stderr
    assert "web@v1#1: starting" in result.stderr
    assert "(it wrote no log lines)" in result.stderr


def test_up_waits_for_the_ingress_when_the_agent_reports_it(home: Path, tmp_path: Path, fake_agent) -> None:
    pytest.importorskip("meshctl.agent.manifest")
    manifest = write(
        tmp_path / "mesh.yaml",
        GOOD_MANIFEST + "ingress:\n  port: 8080\n  routes: [{path: /, service: web}]\n",
    )
    ready = {"web@v1#0": "ready", "web@v1#1": "ready"}
    status_with_ingress = scripted_status([ready])

    def status(request: dict, agent: FakeAgent, conn: socket.socket) -> list[dict]:
        [answer] = status_with_ingress(request, agent, conn)
        answer["result"]["ingress"] = {"host": "127.0.0.1", "port": 8080, "ready": False}
        return [answer]

    fake_agent({
        "apply": lambda req, agent, conn: [ok({"mesh": "shopfast", "changed": [], "stopped": [], "started": []})],
        "status": status,
    })
    result = run_cli(home, "up", "-f", str(manifest), "--timeout", "0.3")
    assert result.returncode == 1
    assert "  ingress: starting" in result.stderr
    assert "web@v1#" not in result.stderr


def test_up_rejects_an_invalid_manifest_before_starting_anything(home: Path, tmp_path: Path) -> None:
    pytest.importorskip("meshctl.agent.manifest")
    manifest = write(tmp_path / "mesh.yaml", TYPO_MANIFEST)
    result = run_cli(home, "up", "-f", str(manifest))
    assert result.returncode == 2
    assert f"{manifest}:4: services.web.comand: unknown key 'comand'" in result.stderr
    assert not (home / "agent.sock").exists()
    assert not (home / "agent.log").exists()


def test_ensure_agent_reports_an_agent_that_dies_at_start(home: Path) -> None:
    stand_in = [sys.executable, "-c", "import sys; print('cannot bind: boom', flush=True); sys.exit(3)"]
    with pytest.raises(AgentStartError) as failure:
        ensure_agent(home, command=stand_in)
    assert "exit code 3" in str(failure.value)
    assert failure.value.log_tail == ["cannot bind: boom"]
    assert stat.S_IMODE((home / "agent.log").stat().st_mode) == 0o600


# --- local commands ---------------------------------------------------------------------------


def test_validate_accepts_a_good_manifest(home: Path, tmp_path: Path) -> None:
    pytest.importorskip("meshctl.agent.manifest")
    manifest = write(tmp_path / "mesh.yaml", GOOD_MANIFEST)
    result = run_cli(home, "validate", "-f", str(manifest))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{manifest}: ok (mesh shopfast, 1 service, 2 instances)"


def test_validate_reports_a_typo_by_file_and_line(home: Path, tmp_path: Path) -> None:
    pytest.importorskip("meshctl.agent.manifest")
    manifest = write(tmp_path / "mesh.yaml", TYPO_MANIFEST)
    result = run_cli(home, "validate", "-f", str(manifest))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {manifest} is not a valid manifest (1 problem)")
    assert f"{manifest}:4: services.web.comand: unknown key 'comand' (did you mean 'command'?)" in result.stderr


def test_schema_prints_json_schema(home: Path) -> None:
    result = run_cli(home, "schema")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["$schema"].startswith("https://json-schema.org/")
    assert "services" in document["properties"]


def test_version(home: Path) -> None:
    result = run_cli(home, "--version")
    assert result.returncode == 0
    assert result.stdout.startswith("meshctl ")


def test_unknown_option_is_a_usage_error(home: Path) -> None:
    assert run_cli(home, "status", "-o", "yaml").returncode == 2


@pytest.mark.parametrize("template", ["hello", "shopfast"])
def test_init_writes_mesh_yaml_and_the_demo_and_refuses_to_overwrite(
    home: Path, tmp_path: Path, template: str
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    result = run_cli(home, "init", "--template", template, cwd=project)
    assert result.returncode == 0, result.stderr
    written = (project / "mesh.yaml").read_text()
    assert "\nworkdir: .  " in written or "\nworkdir: .\n" in written
    # Every command of the template finds its script in the copied demo folder.
    for script in re.findall(r"python (demo-services/\w+\.py)", written):
        assert (project / script).is_file(), script
    assert "meshctl up -f mesh.yaml" in result.stdout

    (project / "demo-services" / "hello.py").write_text("# edited\n")
    again = run_cli(home, "init", "--template", template, cwd=project)
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert (project / "demo-services" / "hello.py").read_text() == "# edited\n"
    assert run_cli(home, "init", "--template", template, "--force", cwd=project).returncode == 0
    assert (project / "demo-services" / "hello.py").read_text() != "# edited\n"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("mesh: a\nworkdir: ..\n", "mesh: a\nworkdir: .\n"),
        ("workdir: ../demo  # where it runs\n", "workdir: .  # where it runs\n"),
        ("workdir: '..'\n", "workdir: .\n"),
        ("mesh: a\nservices:\n  web:\n    workdir: sub\n",
         "mesh: a\nservices:\n  web:\n    workdir: sub\nworkdir: .\n"),
    ],
    ids=["dotdot", "comment-kept", "quoted", "service-workdir-untouched"],
)
def test_workdir_here(template: str, expected: str) -> None:
    assert workdir_here(template) == expected


# --- state directory ----------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "reason"), [(0o777, "world-writable"), (0o770, "group-writable")])
def test_an_unsafe_state_directory_is_refused(home: Path, mode: int, reason: str) -> None:
    home.chmod(mode)
    result = run_cli(home, "status")
    assert result.returncode == 1
    assert f"error: refusing state directory {home}: it is {reason}" in result.stderr
    assert f"chmod 700 {home}" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_a_state_directory_owned_by_someone_else_is_refused(home: Path) -> None:
    os.chown(home, 54321, -1)
    result = run_cli(home, "down")
    assert result.returncode == 1
    assert "owned by uid 54321" in result.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MESHCTL_HOME": "/x/mesh"}, "/x/mesh"),
        ({"MESHCTL_HOME": "/x/mesh", "XDG_STATE_HOME": "/y"}, "/x/mesh"),
        ({"XDG_STATE_HOME": "/y"}, "/y/meshctl"),
        ({"MESHCTL_HOME": "", "XDG_STATE_HOME": "/y"}, "/y/meshctl"),
    ],
)
def test_resolve_home(env: dict[str, str], expected: str) -> None:
    assert resolve_home(env) == Path(expected)


def test_resolve_home_defaults_under_the_home_directory() -> None:
    assert resolve_home({}) == Path.home() / ".local" / "state" / "meshctl"


@pytest.mark.parametrize(
    ("mode", "owner", "reason"),
    [
        (0o700, 1000, None),
        (0o755, 1000, None),
        (0o775, 1000, "it is group-writable"),
        (0o1777, 1000, "it is world-writable"),
        (0o700, 0, "it is owned by uid 0, not by you (uid 1000)"),
    ],
)
def test_unsafe_reason(mode: int, owner: int, reason: str | None) -> None:
    assert unsafe_reason(stat.S_IFDIR | mode, owner, 1000) == reason


def test_prepare_home_creates_a_private_directory(tmp_path: Path) -> None:
    fresh = tmp_path / "new" / "state"
    assert prepare_home(fresh) == fresh
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700


def test_local_commands_leave_the_state_directory_alone(tmp_path: Path) -> None:
    pytest.importorskip("meshctl.agent.manifest")
    fresh = tmp_path / "never-created"
    manifest = write(tmp_path / "mesh.yaml", GOOD_MANIFEST)
    assert run_cli(fresh, "validate", "-f", str(manifest)).returncode == 0
    assert run_cli(fresh, "status").returncode == 1
    assert run_cli(fresh, "down").returncode == 0
    assert not fresh.exists()


# --- rendering ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (-3, "0s"), (42.9, "42s"), (60, "1m00s"), (187, "3m07s"),
     (3600, "1h00m"), (7500, "2h05m"), (86400 * 4 + 3 * 3600 + 5, "4d03h")],
)
def test_humanize_duration(seconds: float, text: str) -> None:
    assert render.humanize_duration(seconds) == text


@pytest.mark.parametrize(
    ("instance", "text"),
    [
        ({"port": 41000, "inbound_port": 43001}, "app 41000 · in 43001"),
        ({"port": 41000, "inbound_port": None}, "app 41000"),
        ({}, "-"),
    ],
)
def test_format_ports(instance: dict, text: str) -> None:
    assert render.format_ports(instance) == text


def test_progress_line_groups_by_state() -> None:
    states = {"a@v1#0": "ready", "b@v1#0": "starting", "c@v1#0": "backoff", "d@v1#0": "starting"}
    assert render.progress_line(states) == "1/4 ready · starting: b@v1#0, d@v1#0 · backoff: c@v1#0"


def test_instance_colour_is_stable_and_from_the_palette() -> None:
    colours = {render.instance_colour(f"svc@v1#{n}") for n in range(20)}
    assert colours <= set(render.INSTANCE_COLOURS)
    assert len(colours) > 1
    assert render.instance_colour("cart@v1#0") == render.instance_colour("cart@v1#0")


def test_plain_table_pads_columns_without_trailing_blanks() -> None:
    table = render.plain_table(("A", "LONGER"), [["xyz", "1"], ["q", ""]])
    assert table.splitlines() == ["A     LONGER", "xyz   1", "q"]


def test_status_json_keeps_agent_extras_after_documented_keys() -> None:
    document = render.status_json(STATUS)
    assert list(document["instances"][0])[: len(render.JSON_INSTANCE_KEYS)] == list(render.JSON_INSTANCE_KEYS)
    assert document["instances"][0]["inbound_port"] == 43001
