"""What an instance asks of the supervisor that runs it, and the dashboard of the control server,
as `typing.Protocol`s.

The supervisor creates `Instance`s and the control server creates the `Dashboard`; they take
their owner through these interfaces instead of importing its module back, so the import graph
has no cycle (tests/test_import_cycles.py). This module imports nothing of the agent at run time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from meshctl.agent import process
    from meshctl.agent.logs import LogBook
    from meshctl.agent.model import Manifest
    from meshctl.agent.observability import Observability
    from meshctl.agent.promote import Promotion
    from meshctl.agent.sidecar import SidecarHandle


class InstanceHost(Protocol):
    """The supervisor as an `Instance` (or the `Ingress`) sees it (agent/supervisor.py's Supervisor)."""

    @property
    def home(self) -> str: ...

    @property
    def logbook(self) -> LogBook: ...

    @property
    def sentinel(self) -> process.Sentinel | None: ...

    @property
    def manifest(self) -> Manifest | None: ...

    def base_env(self) -> dict[str, str]: ...

    def sidecar_message(self, message: dict) -> None: ...

    def sentinel_unregister(self, pid: int) -> None: ...

    def state_changed(self) -> None: ...

    async def wait_state_change(self) -> None: ...

    def unready_upstreams(self, upstreams: Iterable[str]) -> list[str]: ...

    async def start_sidecar(self, handle: SidecarHandle, owner: Any) -> None: ...  # owner: an Instance or the Ingress


class HasManifest(Protocol):
    @property
    def manifest(self) -> Manifest | None: ...


class DashboardSource(Protocol):
    """The control server as the dashboard reads it (agent/control.py's ControlServer): the same
    operations as the CLI's, so `meshctl stat` and the dashboard never disagree."""

    @property
    def sup(self) -> HasManifest: ...

    @property
    def promotions(self) -> dict[str, Promotion]: ...

    @property
    def observability(self) -> Observability: ...

    def has_op(self, op: str) -> bool: ...

    async def call(self, op: str, request: dict) -> Any: ...
