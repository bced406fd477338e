"""The running mesh as a new agent needs it to adopt the mesh after a crash.

The agent rewrites `mesh.state.json` (0600, in the 0700 state directory, atomically:
written aside, then renamed) on every change: the manifest text it runs, the config
version, each instance's app and sidecar (pid and create time: a pid alone could be a
reused one), ports, the fd numbers each sidecar knows its listening sockets by, restart
counts, every sidecar's leaf certificate, and the periods the mesh ran without an agent.
Route and replica overrides have their own file (agent.overrides), the CA its directory
(agent.ca). A clean `down` removes the file, so only a crashed agent's mesh is adopted.

What cannot be written down, the fds (stdout pipes, config channels, listening sockets),
the sentinel holds (agent.sentinel); agent.adopt puts both together again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import psutil

if TYPE_CHECKING:
    from meshctl.agent.instance import Ingress, Instance
    from meshctl.agent.sidecar import SidecarHandle
    from meshctl.agent.identity import IdentityManager
    from meshctl.agent.model import Manifest
    from meshctl.agent.process import Sentinel

log = logging.getLogger(__name__)

STATE_FILE = "mesh.state.json"
FORMAT = 1


def process_identity(proc: Any) -> dict[str, Any] | None:
    """{"pid", "created"} of a running process, None if it is not running."""
    if proc is None or proc.returncode is not None:
        return None
    try:
        return {"pid": proc.pid, "created": psutil.Process(proc.pid).create_time()}
    except psutil.Error:
        return None


def sidecar_record(handle: SidecarHandle, owner: Instance | Ingress) -> dict[str, Any] | None:
    identity = process_identity(handle.proc)
    if identity is None:
        return None
    sockets = owner.sockets()
    return {
        **identity,
        "acked": handle.acked_version,
        "sockets": list(sockets),  # the order in which the sentinel holds them
        "fds": [handle.fd_in_sidecar(sock.fileno()) for sock in sockets.values()],
    }


def instance_record(inst: Instance) -> dict[str, Any]:
    return {
        "id": inst.id,
        "generation": inst.generation,
        "state": inst.state.value,
        "app_port": inst.app_port,
        "restarts": inst.restarts,
        "quick_crashes": inst.quick_crashes,
        "started_at": inst.started_at,
        "last_exit": inst.last_exit,
        "app": process_identity(inst.app),
        "sidecar": sidecar_record(inst.sidecar, inst),
    }


class RecordedMesh(Protocol):
    """What the record reads of the supervisor (agent/supervisor.py), without importing it back."""

    manifest: Manifest | None
    manifest_record: dict | None
    ingress: Ingress | None
    sentinel: Sentinel | None
    config_version: int
    manifest_generation: int
    instances: dict[str, Instance]
    identities: IdentityManager | None
    without_agent: list[dict]


def mesh_record(sup: RecordedMesh) -> dict[str, Any]:
    assert sup.manifest is not None and sup.manifest_record is not None
    ingress = sup.ingress
    return {
        "format": FORMAT,
        "agent_pid": os.getpid(),
        "sentinel_pid": sup.sentinel.pid if sup.sentinel is not None else None,
        "mesh": sup.manifest.mesh,
        "manifest": sup.manifest_record,
        "config_version": sup.config_version,
        "manifest_generation": sup.manifest_generation,
        "instances": [instance_record(inst) for inst in sup.instances.values()],
        "ingress": None if ingress is None else {
            "host": ingress.host, "port": ingress.port, "sidecar": sidecar_record(ingress.sidecar, ingress),
        },
        "leaves": sup.identities.export_leaves() if sup.identities is not None else {},
        "without_agent": sup.without_agent,
    }


def save(home: Path, record: dict[str, Any]) -> None:
    path = home / STATE_FILE
    aside = path.with_name(path.name + ".tmp")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(record, out, separators=(",", ":"))
    os.replace(aside, path)


def load(home: Path) -> dict[str, Any] | None:
    """The record a crashed agent left, None if there is none or it is not one we can read."""
    try:
        record = json.loads((home / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", home / STATE_FILE, exc)
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        log.warning("%s was written by another meshctl; it cannot be adopted", home / STATE_FILE)
        return None
    return record


def remove(home: Path) -> None:
    (home / STATE_FILE).unlink(missing_ok=True)
