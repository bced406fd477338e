"""Shell completion: the script for each shell, and names from the running mesh.

Typer drives completion (`meshctl --install-completion`, or `meshctl completion SHELL`
printed into a file the shell reads); the functions here give it the service names,
versions and instance ids of the mesh running for `$MESHCTL_HOME`. They only ever ask
an agent that is already running, never start one, and answer nothing on any error:
a completion must not print or hang.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from meshctl.client import connect
from meshctl.paths import existing_home, resolve_home

PROG_NAME = "meshctl"
COMPLETE_VAR = "_MESHCTL_COMPLETE"


class Shell(str, Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def running_instances() -> list[dict[str, Any]]:
    """The running mesh's instances (from `status`), or [] when there is none to ask."""
    try:
        home = existing_home(resolve_home())
        client = connect(home) if home is not None else None
        if client is None:
            return []
        return list(client.request("status").get("instances") or [])
    except Exception:  # noqa: BLE001 - a completion never fails loudly
        return []


def _versions_of(instances: list[dict[str, Any]], service: str | None) -> list[str]:
    return sorted({row["version"] for row in instances if service is None or row["service"] == service})


def _starting(candidates: list[str], incomplete: str) -> list[str]:
    return [name for name in candidates if name.startswith(incomplete)]


def complete_service(incomplete: str) -> list[str]:
    return _starting(sorted({row["service"] for row in running_instances()}), incomplete)


def complete_version(ctx: typer.Context, incomplete: str) -> list[str]:
    return _starting(_versions_of(running_instances(), ctx.params.get("service")), incomplete)


def complete_weights(ctx: typer.Context, incomplete: str) -> list[str]:
    """`route split cart v1=90 v2=10`: each version not yet given, as `VERSION=`."""
    given = {word.split("=", 1)[0] for word in ctx.params.get("weights") or ()}
    versions = [v for v in _versions_of(running_instances(), ctx.params.get("service")) if v not in given]
    return _starting([version + "=" for version in versions], incomplete)


def complete_target(incomplete: str) -> list[str]:
    """SERVICE or SERVICE@VERSION (restart, scale)."""
    instances = running_instances()
    names = {row["service"] for row in instances} | {"%s@%s" % (row["service"], row["version"]) for row in instances}
    return _starting(sorted(names), incomplete)


def complete_instance(incomplete: str) -> list[str]:
    return _starting(sorted(row["id"] for row in running_instances()) + ["ingress"], incomplete)


def completion(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print the shell completion script; e.g. `meshctl completion bash >> ~/.bashrc`."""
    from typer._completion_shared import get_completion_script

    print(get_completion_script(prog_name=PROG_NAME, complete_var=COMPLETE_VAR, shell=shell.value))


def register(app: typer.Typer) -> None:
    app.command()(completion)
