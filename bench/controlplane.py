"""Control-plane timings: route changes reaching every sidecar, and certificate rotations.

The mesh: service `web` with versions v1 and v2 (one replica each) and `caller` with
`instances - 2` replicas that list web as an upstream, so a route change to web must
reach the ingress and every caller sidecar. Requests go straight to the agent's control
socket (JSON lines, docs/protocols.md part 2), so the figures carry no CLI start-up:

* propagation: `route-split` with `wait: true` answers once every sidecar that routes
  to web ACKed the new snapshot; the time from sending it to that answer, many times;
* rotation: `certs-rotate` (every leaf renewed and ACKed) and `certs-rotate` with
  `ca: true` (the three ACKed CA phases), a few times each.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from typing import Any

import targets
from procs import BenchError, free_port


def agent_request(home: str, op: str, timeout: float = 120.0, **fields: Any) -> tuple[float, Any]:
    """(seconds to the answer, result) of one control op; raises BenchError on an error answer."""
    request = json.dumps({"op": op, **fields}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(os.path.join(home, "agent.sock"))
        started = time.perf_counter()
        conn.sendall(request)
        with conn.makefile("rb") as replies:
            for raw in replies:
                message = json.loads(raw)
                if "event" in message:
                    continue
                elapsed = time.perf_counter() - started
                if message.get("ok") is True:
                    return elapsed, message.get("result")
                raise BenchError("%s failed: %s" % (op, message.get("error")))
    raise BenchError("the agent closed the connection before answering %s" % op)


def propagation_manifest(name: str, instances: int, ingress_port: int, workdir: str) -> str:
    app = [targets.NGINX_APP]
    env = {"BENCH_TMP": workdir}
    manifest = {
        "mesh": name,
        "workdir": workdir,
        "services": {
            "web": {"health": {"http": "/"}, "env": env, "versions": {"v1": {"command": app}, "v2": {"command": app}}},
            "caller": {"command": app, "health": {"http": "/"}, "env": env, "replicas": instances - 2, "upstreams": ["web"]},
        },
        "ingress": {"port": ingress_port, "routes": [{"path": "/", "service": "web"}]},
    }
    return json.dumps(manifest, indent=2) + "\n"


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def measure(workdir: str, instances: int = 20, changes: int = 100, rotations: int = 3) -> dict[str, Any]:
    """Route-change propagation and certificate rotation times on a mesh of `instances`."""
    manifest = propagation_manifest("bench-cp", instances, free_port(), workdir)
    with targets.mesh_from_manifest(workdir, manifest, "bench-cp", timeout=max(60, 3 * instances)) as mesh:
        sidecars = len(mesh.status["instances"]) + 1
        times: list[float] = []
        acked: list[int] = []
        problems = 0
        for index in range(changes):
            weight = (index * 37) % 101
            seconds, result = agent_request(mesh.home, "route-split", service="web", split={"v1": weight, "v2": 100 - weight}, wait=True)
            times.append(seconds)
            acked.append(len(result.get("sidecars") or []))
            problems += len(result.get("problems") or [])
        agent_request(mesh.home, "route-reset", service="web", wait=True)
        leaves = [agent_request(mesh.home, "certs-rotate", timeout=300.0)[0] for _ in range(rotations)]
        ca = [agent_request(mesh.home, "certs-rotate", timeout=600.0, ca=True)[0] for _ in range(rotations)]
    return {
        "instances": instances,
        "sidecars": sidecars,
        "propagation": {
            "changes": changes,
            "p50": statistics.median(times),
            "p99": _percentile(times, 0.99),
            "max": max(times),
            "acked_min": min(acked),
            "acked_max": max(acked),
            "problems": problems,
        },
        "rotation": {"runs": rotations, "leaves": leaves, "ca": ca},
    }
