"""Control API ops for observability: metrics, stat, tap, edges, traces, access logs.

`traces-export` answers the OTLP exporter's counts (`{endpoint, exported, dropped, failed,
queued, last_error}`), or null when the manifest names no collector.

Read-outs of agent.observability.Observability; `tap` and `access-logs` with `follow`
stream `{"event": ...}` lines like `logs --follow` until the client closes the socket.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import psutil

from meshctl.agent.compile import identity_of
from meshctl.agent.errors import AgentError
from meshctl.agent.observability import FILE_SD_NAME, Observability
from meshctl.agent.stats import ServiceStats, add_process_usage, edge_rates, with_quiet
from meshctl.agent.supervisor import Supervisor

Handler = Callable[[dict, asyncio.StreamWriter], Awaitable[Any]]
MAX_WINDOW_S = 120.0
STREAM_QUEUE = 10000


class BadObsRequest(AgentError):
    code = "bad-request"


class UnknownTrace(AgentError):
    code = "unknown-trace"


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _count(request: dict, name: str, default: int) -> int:
    value = request.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadObsRequest(f'"{name}" must be a whole number >= 0')
    return value


def _window(request: dict) -> float:
    window = request.get("window", 10.0)
    if not isinstance(window, (int, float)) or isinstance(window, bool) or not 0 < window <= MAX_WINDOW_S:
        raise BadObsRequest(f'"window" must be seconds in (0, {MAX_WINDOW_S:g}]')
    return float(window)


def edges_from(windows: list[tuple[dict | None, dict]], snapshots: dict[str, dict], trust_domain: str | None) -> list[dict]:
    """Who calls whom, from the callers' outbound rows, with both identities and mTLS.

    `requests` counts since the callers' sidecars started; `rps` is the rate over the window.
    """
    rates = edge_rates(windows)
    counts: dict[tuple[str, str], list[int]] = {}
    for older, newer in windows:
        del older
        for row in newer["requests"]:
            if row[0] != "outbound":
                continue
            entry = counts.setdefault((row[1], row[2]), [0, 0])
            entry[0] += row[7]
            if row[5] < 500 and not row[6]:
                entry[1] += row[7]
    out = []
    for (source, destination), (requests, ok) in sorted(counts.items()):
        pushed = snapshots.get(source) or {}
        tls = ((pushed.get("services") or {}).get(destination) or {}).get("tls")
        out.append({
            "source": source,
            "destination": destination,
            "client_identity": (pushed.get("tls") or {}).get("identity") if tls else None,
            "server_identity": tls.get("identity") if tls else None,
            "mtls": tls is not None,
            "requests": requests,
            "rps": round(rates.get((source, destination), 0.0), 3),
            "success_rate": round(ok / requests, 4) if requests else None,
        })
    return out


def observability_ops(sup: Supervisor, obs: Observability) -> dict[str, Handler]:
    processes: dict[int, psutil.Process] = {}

    def process_usage() -> dict[tuple[str, str], tuple[float, int]]:
        usage: dict[tuple[str, str], tuple[float, int]] = {}
        for inst in sup.instances.values():
            pid = inst.sidecar.pid
            if pid is None:
                continue
            try:
                proc = processes.get(pid) or processes.setdefault(pid, psutil.Process(pid))
                cpu, rss = proc.cpu_percent(None), proc.memory_info().rss
            except psutil.Error:
                processes.pop(pid, None)
                continue
            key = (inst.spec.service, inst.spec.version.name)
            before = usage.get(key, (0.0, 0))
            usage[key] = (before[0] + cpu, before[1] + rss)
        return usage

    latest_usage: dict[tuple[str, str], tuple[float, int]] = {}

    def sample_usage() -> None:
        latest_usage.clear()
        latest_usage.update(process_usage())

    obs.sample_usage = sample_usage
    obs.file_sd_path = os.path.join(sup.home, FILE_SD_NAME)

    def scrape_targets() -> list[dict]:
        mesh = sup.manifest.mesh if sup.manifest is not None else ""
        status = sup.status()
        groups = []
        for row in ([status["ingress"]] if status["ingress"] else []) + status["instances"]:
            if row.get("admin_port"):
                labels = {"mesh": mesh, "instance": row.get("id", "ingress")}
                if row.get("service"):
                    labels.update(service=row["service"], version=row["version"])
                groups.append({"targets": ["127.0.0.1:%d" % row["admin_port"]], "labels": labels})
        return groups

    obs.scrape_targets = scrape_targets
    obs.export_settings = lambda: sup.manifest.observability.otlp if sup.manifest is not None else None

    async def metrics(request: dict, writer: asyncio.StreamWriter) -> dict:
        result: dict[str, Any] = {"url": obs.url, "port": obs.port}
        if request.get("raw"):
            result["text"] = obs.exposition()
        return result

    async def stat(request: dict, writer: asyncio.StreamWriter) -> dict:
        direction = request.get("direction", "inbound")
        if direction not in ("inbound", "outbound"):
            raise BadObsRequest('"direction" must be inbound or outbound')
        result = obs.stat(_window(request), direction, bool(request.get("routes")))
        running = {(inst.spec.service, inst.spec.version.name) for inst in sup.instances.values()}
        rows = with_quiet([ServiceStats(**row) for row in result["services"]], running)
        if request.get("usage"):
            add_process_usage(rows, dict(latest_usage))
        result["services"] = [row.to_json() for row in rows]
        return result

    async def stream(writer: asyncio.StreamWriter, subscribe: Callable[[Callable[[dict], None]], Callable[[], None]]) -> None:
        queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=STREAM_QUEUE)

        def push(event: dict) -> None:
            if not queue.full():
                queue.put_nowait(event)

        unsubscribe = subscribe(push)
        try:
            while True:
                writer.write(_line({"event": await queue.get()}))
                await writer.drain()
        finally:
            unsubscribe()

    async def tap(request: dict, writer: asyncio.StreamWriter) -> None:
        fields = {name: request.get(name) for name in ("service", "path_prefix", "method", "status", "max_rps")}

        def subscribe(push: Callable[[dict], None]) -> Callable[[], None]:
            tap_id = obs.open_tap(fields, push)
            return lambda: obs.close_tap(tap_id)

        writer.write(_line({"event": {"tapping": True}}))
        await writer.drain()
        await stream(writer, subscribe)

    async def access_logs(request: dict, writer: asyncio.StreamWriter) -> None:
        service = request.get("service")
        wanted = (lambda e: True) if not service else (lambda e: service in (e["source"], e["destination"]))
        for event in list(obs.access)[-_count(request, "tail", 100):]:
            if wanted(event):
                writer.write(_line({"event": event}))
        await writer.drain()
        if not request.get("follow"):
            return None

        def subscribe(push: Callable[[dict], None]) -> Callable[[], None]:
            def follower(event: dict) -> None:
                if wanted(event):
                    push(event)

            obs.access_followers.add(follower)
            return lambda: obs.access_followers.discard(follower)

        await stream(writer, subscribe)

    async def edges(request: dict, writer: asyncio.StreamWriter) -> list[dict]:
        snapshots: dict[str, dict] = {}
        for _name, handle in sup.live.sidecars():
            pushed = handle.last_snapshot or {}
            snapshots[pushed.get("service") or "ingress"] = pushed
        domain = sup.manifest.security.trust_domain if sup.manifest is not None else None
        rows = edges_from(obs.windows(_window(request)), snapshots, domain)
        if domain is not None:
            for row in rows:
                if row["mtls"] and row["client_identity"] is None:
                    row["client_identity"] = identity_of(sup.manifest, None if row["source"] == "ingress" else row["source"])  # type: ignore[arg-type]
        return rows

    async def traces(request: dict, writer: asyncio.StreamWriter) -> list[dict]:
        return obs.traces.summaries(_count(request, "limit", 20), request.get("service"))

    async def traces_export(request: dict, writer: asyncio.StreamWriter) -> dict | None:
        return obs.export_counts()

    async def trace(request: dict, writer: asyncio.StreamWriter) -> dict:
        prefix = request.get("id")
        if not isinstance(prefix, str) or not prefix:
            raise BadObsRequest('"id" must be a trace id or a prefix of one')
        found = obs.traces.find(prefix)
        if len(found) != 1:
            raise UnknownTrace(f"{len(found)} traces match {prefix!r}; give more of the id")
        spans = obs.traces.spans(found[0])
        return {"trace_id": found[0], "spans": [asdict(span) for span in spans]}

    return {
        "metrics": metrics,
        "stat": stat,
        "tap": tap,
        "edges": edges,
        "traces": traces,
        "trace": trace,
        "traces-export": traces_export,
        "access-logs": access_logs,
    }
