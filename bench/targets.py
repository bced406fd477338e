"""The systems under test, each a context manager that leaves nothing running behind it.

* `nginx_app`: the app, bench/nginx-app.sh on a free port (the "direct" path).
* `haproxy_pair`: two single-threaded haproxy processes in front of an app port, plain
  HTTP in, TLS 1.3 with client certificates (mTLS) between them, connections reused.
* `mesh`: `meshctl up` of a generated manifest in a private MESHCTL_HOME, `meshctl down`
  on the way out (`stop_mesh`), then SIGKILL for the process group of any process of the
  mesh that outlived it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

from certs import SERVER_NAME, make_pki
from procs import BenchError, free_port, group_pids, kill_leftovers, spawned, wait_for_http, wait_gone, with_descendants

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
NGINX_APP = os.path.join(BENCH_DIR, "nginx-app.sh")
MESHCTL = os.path.join(os.path.dirname(sys.executable), "meshctl")


@dataclass
class Target:
    """One path to the app: where to send requests and which processes do the proxying."""

    name: str
    port: int
    proxy_pids: list[int] = field(default_factory=list)
    app_pids: list[int] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def nginx_app(workdir: str) -> Iterator[Target]:
    port = free_port()
    env = {"PORT": str(port), "BENCH_TMP": workdir}
    with spawned([NGINX_APP], env=env, log_path=os.path.join(workdir, "nginx-direct.log")) as proc:
        wait_for_http(port, proc=proc)
        yield Target("direct", port, app_pids=group_pids(proc.pid))


_HAPROXY_COMMON = """\
global
    nbthread 1
    maxconn 4096
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
"""

_HAPROXY_SERVER_SIDE = _HAPROXY_COMMON + """\
frontend mtls_in
    bind 127.0.0.1:{listen} ssl crt {server_pem} ca-file {ca} verify required
    default_backend app
backend app
    http-reuse always
    server app 127.0.0.1:{app}
"""

_HAPROXY_CLIENT_SIDE = _HAPROXY_COMMON + """\
frontend plain_in
    bind 127.0.0.1:{listen}
    default_backend peer
backend peer
    http-reuse always
    server peer 127.0.0.1:{peer} ssl crt {client_pem} ca-file {ca} verify required verifyhost {server_name}
"""


@contextlib.contextmanager
def haproxy_pair(workdir: str, app_port: int) -> Iterator[Target]:
    """client -> haproxy (plain) -> mTLS -> haproxy -> app."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise BenchError("haproxy is not installed (make bench-deps)")
    pki = make_pki(workdir)
    server_port, client_port = free_port(), free_port()
    configs = {
        "haproxy-server.cfg": _HAPROXY_SERVER_SIDE.format(listen=server_port, server_pem=pki.server, ca=pki.ca, app=app_port),
        "haproxy-client.cfg": _HAPROXY_CLIENT_SIDE.format(
            listen=client_port, peer=server_port, client_pem=pki.client, ca=pki.ca, server_name=SERVER_NAME
        ),
    }
    for name, text in configs.items():
        with open(os.path.join(workdir, name), "w") as out:
            out.write(text)
    server_cfg, client_cfg = (os.path.join(workdir, name) for name in configs)
    with spawned([haproxy, "-db", "-f", server_cfg], log_path=os.path.join(workdir, "haproxy-server.log")) as server:
        with spawned([haproxy, "-db", "-f", client_cfg], log_path=os.path.join(workdir, "haproxy-client.log")) as client:
            wait_for_http(client_port, proc=client)
            if server.poll() is not None:
                raise BenchError("the server-side haproxy exited with %s" % server.returncode)
            yield Target(
                "haproxy",
                client_port,
                proxy_pids=[client.pid, server.pid],
                notes={"tls": "TLS 1.3, client certificate verified (mTLS), ECDSA P-256"},
            )


def _meshctl(home: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "MESHCTL_HOME": home, "NO_COLOR": "1"}
    return subprocess.run([MESHCTL, *args], env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def manifest_yaml(name: str, command: list[str], replicas: int, ingress_port: int, env: dict[str, str], workdir: str,
                  observability: dict[str, Any] | None = None) -> str:
    """A one-service manifest; JSON is valid YAML, so no YAML writer is needed."""
    service = {"command": command, "health": {"http": "/"}, "env": env, "replicas": replicas}
    manifest: dict[str, Any] = {
        "mesh": name,
        "workdir": workdir,
        "services": {"web": service},
        "ingress": {"port": ingress_port, "routes": [{"path": "/", "service": "web"}]},
    }
    if observability:
        manifest["observability"] = observability
    return json.dumps(manifest, indent=2) + "\n"


@dataclass
class Mesh:
    home: str
    status: dict[str, Any]
    up_seconds: float
    up_output: str


@contextlib.contextmanager
def mesh(workdir: str, command: list[str], replicas: int = 1, name: str = "bench", observability: dict[str, Any] | None = None) -> Iterator[Mesh]:
    """`meshctl up` a one-service mesh; always `meshctl down` it and reap what is left."""
    text = manifest_yaml(name, command, replicas, free_port(), {"BENCH_TMP": workdir}, workdir, observability)
    with mesh_from_manifest(workdir, text, "%s-%d" % (name, replicas), max(30, replicas)) as m:
        yield m


@contextlib.contextmanager
def mesh_from_manifest(workdir: str, text: str, name: str, timeout: float) -> Iterator[Mesh]:
    """`meshctl up` the manifest `text` in a private home; always `meshctl down` it and reap what is left."""
    home = tempfile.mkdtemp(prefix="meshctl-home-", dir=workdir)
    os.chmod(home, 0o700)
    manifest = os.path.join(workdir, "%s.yaml" % name)
    with open(manifest, "w") as out:
        out.write(text)
    pids: list[int] = []
    try:
        started = time.monotonic()
        up = _meshctl(home, "up", "-f", manifest, "--timeout", "%g" % timeout, timeout=timeout + 120.0)
        up_seconds = time.monotonic() - started
        status = _status(home)
        pids = _mesh_pids(status)
        if up.returncode != 0:
            raise BenchError("meshctl up failed (%d): %s%s" % (up.returncode, up.stdout[-2000:], up.stderr[-2000:]))
        not_ready = [inst["id"] for inst in status["instances"] if inst["state"] != "ready"]
        if not_ready or not status["ingress"] or not status["ingress"].get("ready"):
            raise BenchError("meshctl up returned but not all is ready: %s" % (not_ready or "ingress"))
        yield Mesh(home, status, up_seconds, up.stdout)
    finally:
        survivors = stop_mesh(home, pids)
        if survivors:
            print("warning: meshctl down left pids %s running; killed them" % survivors, file=sys.stderr)
        shutil.rmtree(home, ignore_errors=True)


def agent_pids(home: str) -> list[int]:
    """The agent of the mesh kept in `home` (`python -m meshctl.agent --home HOME`), found by its command line.

    Its pid file may not exist yet: a signal can end `meshctl up` after it started the agent.
    """
    home = os.path.realpath(home)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(flag == "--home" and os.path.realpath(value) == home for flag, value in zip(cmdline, cmdline[1:])):
            found.append(proc.pid)
    return found


def stop_mesh(home: str, known_pids: list[int] | None = None) -> list[int]:
    """`meshctl down` the mesh kept in `home`, then SIGKILL the process groups of whatever outlived it.

    The processes to watch are taken before `down`: the agent and all it started (sentinel,
    sidecars, apps and their children) plus `known_pids`. Returns those that had to be killed.
    """
    pids = with_descendants([*(known_pids or []), *agent_pids(home)])
    with contextlib.suppress(subprocess.TimeoutExpired):
        _meshctl(home, "down", timeout=60.0)
    return kill_leftovers(wait_gone(pids, 10.0))


def _status(home: str) -> dict[str, Any]:
    result = _meshctl(home, "status", "-o", "json", timeout=30.0)
    if result.returncode != 0:
        return {"instances": [], "ingress": None}
    return json.loads(result.stdout)


def _mesh_pids(status: dict[str, Any]) -> list[int]:
    """Every process of the mesh: agent, sidecars, apps and their children."""
    pids: set[int] = set()
    for inst in status.get("instances", []):
        for key in ("pid", "sidecar_pid"):
            if inst.get(key):
                with contextlib.suppress(psutil.NoSuchProcess):
                    pids.update(group_pids(inst[key]))
    ingress_pid = (status.get("ingress") or {}).get("sidecar_pid")
    if ingress_pid:
        with contextlib.suppress(psutil.NoSuchProcess):
            pids.add(ingress_pid)
            pids.add(psutil.Process(ingress_pid).ppid())  # the agent
    return sorted(pid for pid in pids if pid > 1)


def mesh_target(m: Mesh) -> Target:
    """The two-sidecar path of a one-instance mesh: ingress sidecar -> service sidecar -> app."""
    (inst,) = m.status["instances"]
    tls = mesh_tls(m.status, inst["inbound_port"])
    label = "mesh (mTLS between sidecars)" if tls["tls"] else "mesh (plaintext between sidecars)"
    return Target(
        label,
        m.status["ingress"]["port"],
        proxy_pids=[m.status["ingress"]["sidecar_pid"], inst["sidecar_pid"]],
        app_pids=group_pids(inst["pid"]),
        notes=tls,
    )


_OFF = (None, False, "", "off", "disabled", "plaintext", "none")


def _reported_tls(value: Any) -> bool:
    """True when some key named like tls/mtls in status says it is on."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if "tls" in key.lower():
                setting = inner.get("enabled", inner.get("mode")) if isinstance(inner, dict) else inner
                if setting not in _OFF:
                    return True
            elif _reported_tls(inner):
                return True
    if isinstance(value, list):
        return any(_reported_tls(item) for item in value)
    return False


def _inbound_speaks_tls(port: int) -> bool:
    """Send a TLS ClientHello to a sidecar's inbound port: does a TLS record come back?"""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="probe.bench")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            sock.sendall(outgoing.read())
            first = sock.recv(1)
    except OSError:
        return False
    return first in (b"\x16", b"\x15")  # handshake or alert record: the peer speaks TLS


def mesh_tls(status: dict[str, Any], inbound_port: int) -> dict[str, Any]:
    """What the mesh does between sidecars, from `meshctl status` and from the wire."""
    reported = _reported_tls(status)
    on_wire = _inbound_speaks_tls(inbound_port)
    return {
        "tls": reported or on_wire,
        "status_reports_tls": reported,
        "inbound_speaks_tls": on_wire,
    }
