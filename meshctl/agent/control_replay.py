"""Control API ops `record` and `replay`: capture a service's requests, send them again.

`record` opens a recording in the sidecars of every instance of the service (proxy.record)
and streams their `record-event`s as `{"event": ...}` lines until `duration` has passed or
`limit` requests came, then closes it and answers `{"recorded": n}`.

`replay` reads a recording (JSON lines, as `meshctl record` writes them; the CLI passes
the file's absolute path, as `apply` does with a manifest), picks one sidecar that routes
to the service and has it send each request, paced at `rate` per second and at most
MAX_OUTSTANDING at a time (proxy.replay). Each request gives one result tagged with the
replay's id; the answer is the same report `shadow-report` gives (agent.shadow_report).
Unsafe methods are skipped (and counted) unless `unsafe`.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from meshctl.agent import overrides as ovr
from meshctl.agent.control_shadow import ShadowResults
from meshctl.agent.errors import AgentError
from meshctl.agent.observability import Observability
from meshctl.agent.shadow_report import ShadowTally
from meshctl.agent.supervisor import Supervisor

Handler = Callable[[dict, asyncio.StreamWriter], Awaitable[Any]]
MAX_RECORD_S = 3600.0
MAX_OUTSTANDING = 16
MAX_REPLAY_REQUESTS = 100_000
REPLAY_TIMEOUT_S = 15.0
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REDACTED = "<redacted>"
STREAM_QUEUE = 10000


class BadReplayRequest(AgentError):
    code = "bad-request"


class NoRoute(AgentError):
    code = "no-route"


def _number(request: dict, name: str, default: float | None, low: float, high: float) -> float | None:
    value = request.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
        raise BadReplayRequest(f'"{name}" must be a number more than {low:g} and at most {high:g}')
    return float(value)


def read_recording(path: str, unsafe: bool) -> tuple[list[dict], int]:
    """The requests of a recording file to send, and how many unsafe ones were skipped."""
    requests, skipped = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                except ValueError as exc:
                    raise BadReplayRequest(f"{path}:{number}: not a JSON line ({exc}); record files come from `meshctl record`") from None
                if not isinstance(request, dict) or not isinstance(request.get("method"), str) or not isinstance(request.get("path"), str):
                    raise BadReplayRequest(f"{path}:{number}: expected an object with method and path")
                if request["method"].upper() in UNSAFE_METHODS and not unsafe:
                    skipped += 1
                    continue
                # A redacted secret is left out rather than sent as "<redacted>".
                request["headers"] = [pair for pair in request.get("headers") or [] if not (
                    isinstance(pair, list) and len(pair) == 2 and pair[1] == REDACTED)]
                requests.append(request)
                if len(requests) > MAX_REPLAY_REQUESTS:
                    raise BadReplayRequest(f"{path}: more than {MAX_REPLAY_REQUESTS} requests; split the file")
    except OSError as exc:
        raise BadReplayRequest(f"cannot read {path}: {exc.strerror or exc}") from None
    return requests, skipped


def replay_ops(sup: Supervisor, obs: Observability, results: ShadowResults) -> dict[str, Handler]:
    async def record(request: dict, writer: asyncio.StreamWriter) -> dict:
        service = request.get("service")
        if not isinstance(service, str) or not service:
            raise BadReplayRequest('"service" must be a non-empty string')
        ovr.service_spec(sup.require_manifest(), service)
        duration = _number(request, "duration", 30.0, 0.0, MAX_RECORD_S)
        limit = request.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise BadReplayRequest('"limit" must be a whole number >= 1')
        handles = [inst.sidecar for inst in sup.instances.values() if inst.spec.service == service and inst.sidecar.running]
        if not handles:
            raise NoRoute(f"no running instance of {service} to record at")
        queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=STREAM_QUEUE)

        def push(event: dict) -> None:
            if not queue.full():
                queue.put_nowait(event)

        record_id = obs.open_listener(push)
        message = {"type": "record", "id": record_id, "limit": limit, "include_secrets": request.get("include_secrets") is True}
        for handle in handles:
            handle.send(message)
        writer.write(json.dumps({"event": {"recording": True, "instances": len(handles)}}).encode() + b"\n")
        await writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration  # type: ignore[operator]
        count = 0
        try:
            while limit is None or count < limit:
                try:
                    event = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
                writer.write(json.dumps({"event": event}, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
                count += 1
        finally:
            obs.close_listener(record_id)
            for handle in handles:
                handle.send({"type": "unrecord", "id": record_id})
        return {"service": service, "recorded": count}

    async def replay(request: dict, writer: asyncio.StreamWriter) -> dict:
        path = request.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise BadReplayRequest('replay needs "path", the absolute path of a recording')
        service, version, primary = request.get("service"), request.get("version"), request.get("compare")
        if not isinstance(service, str) or not isinstance(version, str):
            raise BadReplayRequest('"service" and "version" must be strings')
        spec = ovr.service_spec(sup.require_manifest(), service)
        ovr.check_version(spec, version)
        if primary is not None:
            if not isinstance(primary, str):
                raise BadReplayRequest('"compare" must be a version name')
            ovr.check_version(spec, primary)
        rate = _number(request, "rate", 20.0, 0.0, 10_000.0)
        timeout = _number(request, "timeout", REPLAY_TIMEOUT_S, 0.0, 600.0)
        requests, skipped = read_recording(path, request.get("unsafe") is True)
        routing = sup.live.routing_sidecars(service)
        if not routing:
            raise NoRoute(f"no sidecar routes to {service} (no ingress route and no caller); replay sends through one")
        _name, handle = routing[0]
        tag = uuid.uuid4().hex
        tally = results.by_tag[tag] = ShadowTally(service, version)
        loop = asyncio.get_running_loop()
        try:
            for index, recorded in enumerate(requests):
                while index - (tally.compared + tally.failed) >= MAX_OUTSTANDING:
                    await asyncio.sleep(0.005)  # results arrive in batches on the sidecar's channel
                handle.send({"type": "replay", "tag": tag, "service": service, "version": version, "compare": primary,
                             "timeout": timeout, "request": recorded})
                await asyncio.sleep(1.0 / rate)  # type: ignore[operator]
            deadline = loop.time() + timeout + 5.0  # type: ignore[operator]
            while tally.compared + tally.failed < len(requests) and loop.time() < deadline:
                await asyncio.sleep(0.05)
        finally:
            results.by_tag.pop(tag, None)
        report = tally.report()
        report["replay"] = {"file": path, "sent": len(requests), "skipped_unsafe": skipped, "compare": primary,
                            "through": _name, "unanswered": len(requests) - tally.compared - tally.failed}
        return report

    return {"record": record, "replay": replay}
