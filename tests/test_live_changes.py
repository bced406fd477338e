"""Pure units of agent.live: LiveChanges driven through a fake MeshHost (no processes).

The supervisor gives LiveChanges only the small `MeshHost` Protocol, so its decisions
(which sidecars route to a service, when a push has converged, what proxy-status says)
can be checked against sidecars whose pushed and ACKed versions the test sets.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from meshctl.agent.errors import AgentError
from meshctl.agent.live import LiveChanges
from meshctl.agent.overrides import MeshOverrides


def _sidecar(pushed: int, acked: int, services: tuple[str, ...] = ("web",), nack: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        pushed_version=pushed, acked_version=acked, nack=nack, running=True, pid=100 + pushed, last_ack_at=None,
        last_snapshot={"services": {name: {} for name in services}},
    )


class FakeHost:
    """The MeshHost part of a supervisor: a mesh with fixed sidecars, counting the pushes."""

    def __init__(self, sidecars: dict[str, SimpleNamespace]) -> None:
        self.instances = {name: SimpleNamespace(id=name, endpoint_id=name, sidecar=handle) for name, handle in sidecars.items()}
        self.overrides = MeshOverrides()
        self.ingress = None
        self.config_version = max((h.pushed_version for h in sidecars.values()), default=0)
        self.apply_lock = asyncio.Lock()
        self.pushes = 0
        self.push_requests = 0

    def require_live(self) -> None:
        pass

    def require_manifest(self) -> None:
        raise AgentError("no mesh is running; run `meshctl up -f mesh.yaml`")

    def request_push(self) -> None:
        self.push_requests += 1

    async def push_all(self) -> list[str]:
        self.pushes += 1
        return []


def test_converge_pushes_and_returns_no_problem_once_every_routing_sidecar_acked():
    host = FakeHost({"a#0": _sidecar(3, 3), "b#0": _sidecar(3, 3, services=("db",))})
    live = LiveChanges(host)
    assert asyncio.run(live.converge("web", timeout=5.0)) == []
    assert host.pushes == 1
    assert [name for name, _ in live.routing_sidecars("web")] == ["a#0"]
    assert [name for name, _ in live.routing_sidecars(None)] == ["a#0", "b#0"]


def test_converge_names_a_nack_and_a_stale_sidecar_at_the_deadline():
    host = FakeHost({"a#0": _sidecar(4, 3, nack="services.web: bad"), "b#0": _sidecar(4, 3), "c#0": _sidecar(4, 4)})
    problems = asyncio.run(LiveChanges(host).converge(None, timeout=0.05))
    assert problems == [
        "a#0 rejected config v4: services.web: bad",
        "b#0 has not acknowledged config v4 (STALE)",
    ]


def test_proxy_status_and_push_without_wait():
    host = FakeHost({"a#0": _sidecar(2, 2), "b#0": _sidecar(3, 2, nack="no"), "c#0": _sidecar(3, 2)})
    live = LiveChanges(host)

    async def run() -> tuple[list[dict], dict]:
        return live.proxy_status(), await live.push_routes("web", wait=False)

    rows, pushed = asyncio.run(run())
    assert [(row["sidecar"], row["state"]) for row in rows] == [("a#0", "SYNCED"), ("b#0", "NACK"), ("c#0", "STALE")]
    assert pushed == {"service": "web", "version": None, "sidecars": [], "problems": []} and host.push_requests == 1
    assert live.sidecar_named("b#0") is host.instances["b#0"].sidecar and live.sidecar_named("z#0") is None


def test_a_change_without_a_manifest_is_refused_before_anything_changes():
    host = FakeHost({"a#0": _sidecar(1, 1)})
    before = host.overrides
    with pytest.raises(AgentError, match="no mesh is running"):
        asyncio.run(LiveChanges(host).change_overrides("web", lambda overrides, manifest: overrides))
    assert host.overrides is before and host.pushes == 0
