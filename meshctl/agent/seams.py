"""What the dashboard asks of the control server, as a `typing.Protocol`.

(`Instance` sees the supervisor through `InstanceHost`, declared next to it in instance.py.)
The control server creates the `Dashboard`; it takes its owner through this interface
instead of importing its module back, so the import graph has no cycle (tests/test_import_cycles.py). This module imports nothing of the agent at run time.
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
