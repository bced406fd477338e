"""The agent's exception hierarchy.

Every error the agent reports to a user carries a stable `code` (see docs/protocols.md,
"Error codes"), so that the CLI and scripts can tell errors apart without parsing text.
"""

from __future__ import annotations

from dataclasses import dataclass


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    code = "internal"


class ManifestError(AgentError):
    """The manifest could not be loaded; `problems` lists every problem found, by line.

    Defined here rather than in `agent.manifest` so that modules which only report
    manifest errors need not import the loader; `agent.manifest` re-exports it.
    """

    code = "manifest-invalid"

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


@dataclass(frozen=True)
class Problem:
    """One problem in a manifest, printed as `mesh.yaml:14: services.cart.command: required`."""

    file: str
    line: int | None  # 1-based; None when the problem is with the file as a whole
    path: str  # dotted path of the key concerned, e.g. services.frontend.upstreams[1]
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else "%s:%d" % (self.file, self.line)
        if self.path:
            return "%s: %s: %s" % (where, self.path, self.message)
        return "%s: %s" % (where, self.message)


class ApplyError(AgentError):
    """The manifest is valid but cannot run here: a missing binary, a port in use."""

    code = "apply-failed"


class MeshMismatch(AgentError):
    code = "mesh-mismatch"


class RolloutError(AgentError):
    """A replacement never became ready; the instance it was to replace keeps serving."""

    code = "rollout-failed"


class NotConverged(AgentError):
    """A sidecar NACKed a new config or did not ACK it in time."""

    code = "not-converged"


class MeshStopping(AgentError):
    """A `meshctl down` (or a signal) is stopping the mesh: no change is started any more."""

    code = "mesh-stopping"
