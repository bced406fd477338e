"""Control API ops for identity and authorization: certs, rotation, CA import, policy check.

Rotations run their phases (meshctl/agent/ca.py) with `Supervisor.converge()` between them, so
each phase is ACKed by every sidecar before the next starts: no peer ever meets a
certificate it does not trust yet, and no request fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from meshctl.agent.ca import CAError
from meshctl.agent.compile import INGRESS_ID, SidecarIdentity, identity_of, mtls_mode, security_config
from meshctl.agent.errors import AgentError
from meshctl.agent.instance import owner_key
from meshctl.agent.model import Manifest
from meshctl.agent.supervisor import Supervisor
from meshctl.proxy.authz import Policy

Handler = Callable[[dict, asyncio.StreamWriter], Awaitable[Any]]


class NoMesh(AgentError):
    code = "no-mesh"


class RotationFailed(AgentError):
    code = "rotation-failed"


class UnknownService(AgentError):
    code = "unknown-service"


class BadSecurityRequest(AgentError):
    code = "bad-request"


def authz_verdict(manifest: Manifest, source: str, target: str, method: str, path: str,
                  headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Would `source` (a service, `ingress` or a SPIFFE ID) be let in by `target`'s sidecars?
    Decided by proxy.authz, the code the sidecars run (`policy check`, `why --from`)."""
    names = [s.name for s in manifest.services]
    if target not in names:
        raise UnknownService(f"no service {target!r} in mesh {manifest.mesh}")
    if source.startswith("spiffe://"):
        source_id = source
    elif source == INGRESS_ID:
        source_id = identity_of(manifest, None)
    elif source in names:
        source_id = identity_of(manifest, source)
    else:
        raise UnknownService(f"no service {source!r} in mesh {manifest.mesh} (nor a spiffe:// ID or ingress)")
    method = method.upper()
    who = manifest.service(target)
    authz = security_config(manifest, SidecarIdentity(target, target, None), None)["authz"]
    if authz is None:
        allowed, rule = True, "no policy for this service (default_policy allow)"
    else:
        fields = {name.lower(): value for name, value in (headers or {}).items()}
        decision = Policy(authz, manifest.security.trust_domain).check(source_id, method, path, fields)
        allowed, rule = decision.allowed, decision.rule
    return {"from": source_id, "to": identity_of(manifest, target), "method": method, "path": path,
            "decision": "allow" if allowed else "deny", "rule": rule, "mtls": mtls_mode(manifest, who)}


def security_ops(sup: Supervisor) -> dict[str, Handler]:
    rotation_lock = asyncio.Lock()

    def identities():
        if sup.identities is None or sup.manifest is None:
            raise NoMesh("no mesh has been applied yet; run `meshctl up -f mesh.yaml`")
        return sup.identities

    async def converge_or_raise(step: str) -> None:
        problems = await sup.live.converge(None)
        if problems:
            raise RotationFailed(f"{step}: " + "; ".join(problems))

    async def certs(request: dict, writer: asyncio.StreamWriter) -> dict:
        report = identities().report()
        owners = {owner_key(i): i for i in sup.live.sidecar_owners()}
        rows = []
        for owner, leaf in report["leaves"].items():
            inst = owners.get(owner)
            rows.append({"instance": INGRESS_ID if inst is None else inst.id, "owner": owner, **leaf})
        manifest = sup.require_manifest()
        return {"mesh": manifest.mesh, "trust_domain": manifest.security.trust_domain,
                "root": report["root"], "certificates": rows}

    async def rotate(request: dict, writer: asyncio.StreamWriter) -> dict:
        ids = identities()
        service = request.get("service")
        started = time.monotonic()
        async with rotation_lock:
            if request.get("ca"):
                ids.ca.stage_new_root()
                await converge_or_raise("trusting the new CA")
                ids.commit_ca()
                await converge_or_raise("reissuing every certificate")
                ids.ca.finish()
                await converge_or_raise("retiring the old CA")
                rotated = "ca"
            else:
                manifest = sup.require_manifest()
                if service is not None and service not in [s.name for s in manifest.services]:
                    raise UnknownService(f"no service {service!r} in mesh {manifest.mesh}")
                owners = [owner_key(i) for i in sup.live.sidecar_owners()
                          if service is None or i.spec.service == service]
                if service is None and sup.ingress is not None:
                    owners.append(INGRESS_ID)
                ids.force_renewal(owners)
                await converge_or_raise("pushing the new certificates")
                rotated = service or "all"
        return {"rotated": rotated, "seconds": round(time.monotonic() - started, 3), "root": ids.ca.root_info()}

    async def import_ca(request: dict, writer: asyncio.StreamWriter) -> dict:
        ids = identities()
        cert, key = request.get("cert_pem"), request.get("key_pem")
        if not isinstance(cert, str) or not isinstance(key, str):
            raise CAError('import-ca needs "cert_pem" and "key_pem" strings')
        async with rotation_lock:
            ids.ca.stage_import(cert.encode(), key.encode())
            await converge_or_raise("trusting the imported CA")
            ids.commit_ca()
            await converge_or_raise("reissuing every certificate")
            ids.ca.finish()
            await converge_or_raise("retiring the old CA")
        return {"root": ids.ca.root_info()}

    async def policy_check(request: dict, writer: asyncio.StreamWriter) -> dict:
        identities()
        source, target = request.get("from"), request.get("to")
        if not isinstance(source, str) or not isinstance(target, str):
            raise BadSecurityRequest('policy-check needs "from" and "to" strings')
        return authz_verdict(sup.manifest, source, target, str(request.get("method") or "GET"), str(request.get("path") or "/"))  # type: ignore[arg-type]

    return {"certs": certs, "certs-rotate": rotate, "import-ca": import_ca, "policy-check": policy_check}
