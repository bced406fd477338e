"""Control API ops for `meshctl why`: gather decision records, or plan a request not sent.

* `why` with `request_id`: every sidecar's records of that request, stitched
  (meshctl/explain.py) into `{"request_id", "status", "hops": [...]}`;
* `why` with `recent: true` (and `status`, `service`, `limit`): one summary per recent
  recorded request, newest first; with `last_failure: true` the newest failed one, stitched;
* `why-plan` (`from`, `to`, `method`, `path`, `headers`): the FROM sidecar routes the
  request with its live router, balancer and outlier state (proxy.decisions.plan); the
  authorization comes from proxy.authz as `policy check` decides it; instances of TO that
  are starting or draining are listed too (sidecars only know ready endpoints).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from meshctl import explain
from meshctl.agent.compile import INGRESS_ID
from meshctl.agent.control_security import NoMesh, UnknownService, authz_verdict
from meshctl.agent.errors import AgentError
from meshctl.agent.lifecycle import State
from meshctl.agent.observability import Observability
from meshctl.agent.supervisor import Supervisor
from meshctl.proxy.decisions import MAX_RECENT

Handler = Callable[[dict, asyncio.StreamWriter], Awaitable[Any]]
KEPT = ("records are kept for requests that ended in 5xx, a mesh error or a non-OK gRPC status and for requests sent with "
        "`x-mesh-debug: 1` (`observability.why: all` keeps every request); each sidecar keeps the newest ones")


class BadWhyRequest(AgentError):
    code = "bad-request"


class UnknownRequest(AgentError):
    code = "unknown-request"


def _records(answers: list[dict]) -> list[dict]:
    return [record for answer in answers for record in answer.get("records") or ()]


def why_ops(sup: Supervisor, obs: Observability) -> dict[str, Handler]:
    async def why(request: dict, writer: asyncio.StreamWriter) -> Any:
        request_id = request.get("request_id")
        if isinstance(request_id, str) and request_id:
            records = _records(await obs.ask({"type": "why?", "request_id": request_id}))
            if not records:
                raise UnknownRequest(f"no sidecar has a record of request {request_id}: {KEPT}")
            return explain.stitch(request_id, records)
        if not request.get("recent") and not request.get("last_failure"):
            raise BadWhyRequest('why needs "request_id", "recent" or "last_failure"')
        service = request.get("service")
        status = request.get("status")
        if status is not None and not explain.valid_status_filter(status):
            raise BadWhyRequest(f'"status" {status!r}: expected a class such as 5xx or a code such as 503')
        records = _records(await obs.ask({"type": "why?", "recent": MAX_RECENT}))
        rows = [row for row in explain.summaries(records)
                if (not service or service in row["services"]) and explain.matches_status(row["status"], status)]
        if request.get("last_failure"):
            failed = [row for row in rows if row["failed"]]
            if not failed:
                where = f" involving {service}" if service else ""
                raise UnknownRequest(f"no failed request{where} on record: {KEPT}")
            request_id = failed[0]["request_id"]
            return explain.stitch(request_id, [r for r in records if r.get("request_id") == request_id])
        limit = request.get("limit", 20)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise BadWhyRequest('"limit" must be a whole number >= 1')
        return rows[:limit]

    async def why_plan(request: dict, writer: asyncio.StreamWriter) -> dict:
        manifest = sup.manifest
        if manifest is None:
            raise NoMesh("no mesh has been applied yet; run `meshctl up -f mesh.yaml`")
        source, target = request.get("from"), request.get("to")
        if not isinstance(source, str) or not isinstance(target, str):
            raise BadWhyRequest('why-plan needs "from" and "to" strings')
        names = [service.name for service in manifest.services]
        if source != INGRESS_ID and source not in names:
            raise UnknownService(f"no service {source!r} in mesh {manifest.mesh} (nor ingress)")
        if target not in names:
            raise UnknownService(f"no service {target!r} in mesh {manifest.mesh}")
        method = str(request.get("method") or "GET").upper()
        path = str(request.get("path") or "/")
        headers = request.get("headers") or {}
        if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise BadWhyRequest('"headers" must map names to values')
        callers = [name for name, handle in sup.live.sidecars()
                   if handle.running and target in (handle.last_snapshot or {}).get("services", {})
                   and (name == source if source == INGRESS_ID else name.startswith(source + "@"))]
        if not callers:
            raise UnknownService(f"{source} does not call {target}: {target} is not among its upstreams (or it is not running)")
        answers = await obs.ask({"type": "why-plan?", "to": target, "method": method, "path": path, "headers": headers},
                                only=lambda name: name == callers[0])
        if not answers:
            raise UnknownRequest(f"{callers[0]} did not answer in time; try again")
        plan = dict(answers[0]["plan"])
        if "error" in plan:
            raise UnknownService(f"{callers[0]}: {plan['error']}")
        plan.update({"from": source, "method": method, "path": path, "headers": headers})
        plan["authz"] = authz_verdict(manifest, source, target, method, path, headers)
        not_ready: dict[str, list[dict]] = {}
        for inst in sup.live.sidecar_owners():
            if inst.spec.service != target or (inst.state is State.READY and inst.in_rotation):
                continue
            state = "draining" if inst.state is State.READY else inst.state.value
            not_ready.setdefault(inst.spec.version.name, []).append({"instance": inst.endpoint_id, "state": state})
        plan["not_ready"] = not_ready
        return plan

    return {"why": why, "why-plan": why_plan}
