"""The control API: newline-delimited JSON on agent.sock (docs/protocols.md, part 2).

The only way in for the CLI. Each connection sends one request; the answer is one line,
or a stream of event lines for `logs --follow`. Errors carry a stable code.

Live control (`route-*`, `scale`, `restart`, `promote`) changes the overrides on top of
the manifest (agent.overrides); `proxy-status` and `proxy-config` show what each sidecar
was pushed and has ACKed. `dashboard` starts the web dashboard (agent.dashboard), which
builds its pages from these same ops through `call()`. `debug-traffic` pushes traffic
keys unvalidated: it exists so tests can drive a sidecar's NACK path, and is not part of
the CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from meshctl.agent import overrides as ovr
from meshctl.agent import promote
from meshctl.agent.control_obs import observability_ops
from meshctl.agent.control_replay import replay_ops
from meshctl.agent.control_security import security_ops
from meshctl.agent.control_shadow import ShadowResults, live_shadow_version, shadow_ops
from meshctl.agent.dashboard import Dashboard
from meshctl.agent.control_why import why_ops
from meshctl.agent.errors import AgentError
from meshctl.agent.logs import LogLine
from meshctl.agent.manifest import parse_manifest, read_manifest_text
from meshctl.agent.observability import Observability
from meshctl.agent.supervisor import Supervisor

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1024 * 1024
REDACTED = "<redacted>"
SECRET_KEYS = ("key", "private_key")


class BadRequest(AgentError):
    code = "bad-request"


class UnknownService(AgentError):
    code = "unknown-service"


def redact(value: Any) -> Any:
    """A copy without private keys: fields named key/private_key, and any *_pem holding one."""
    if isinstance(value, dict):
        out = {}
        for name, item in value.items():
            secret = name in SECRET_KEYS or (
                name.endswith("_pem") and isinstance(item, str) and "PRIVATE KEY" in item
            )
            out[name] = REDACTED if secret and item is not None else redact(item)
        return out
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def _string(request: dict, name: str) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f'"{name}" must be a non-empty string')
    return value


def _optional_string(request: dict, name: str) -> str | None:
    return None if request.get(name) is None else _string(request, name)


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class ControlServer:
    def __init__(self, supervisor: Supervisor, home: str, on_down: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.sup = supervisor
        self.home = home
        self.on_down = on_down
        self.server: asyncio.AbstractServer | None = None
        self._ops: dict[str, Callable[[dict, asyncio.StreamWriter], Awaitable[Any]]] = {
            "ping": self._ping,
            "apply": self._apply,
            "status": self._status,
            "logs": self._logs,
            "down": self._down,
            "route-show": self._route_show,
            "route-split": self._route_split,
            "route-set": self._route_set,
            "route-reset": self._route_reset,
            "diff": self._diff,
            "proxy-status": self._proxy_status,
            "proxy-config": self._proxy_config,
            "scale": self._scale,
            "restart": self._restart,
            "promote": self._promote,
            "debug-traffic": self._debug_traffic,
        }
        self._ops.update(security_ops(supervisor))
        self.observability = Observability(supervisor.live.sidecars)
        supervisor.on_sidecar_message = self.observability.on_message
        self._ops.update(observability_ops(supervisor, self.observability))
        self.shadow_results = ShadowResults(live_shadow_version(supervisor))
        self.observability.on_shadow_results = self.shadow_results.on_results
        self._ops.update(shadow_ops(supervisor, self.shadow_results))
        self._ops.update(replay_ops(supervisor, self.observability, self.shadow_results))
        self._ops.update(why_ops(supervisor, self.observability))
        self.stats: promote.StatsSource = self.observability  # live per-version numbers
        self.promotions: dict[str, promote.Promotion] = {}
        self.dashboard = Dashboard(self, home)
        self._ops["dashboard"] = self.dashboard.open

    async def start(self, path: str) -> None:
        old_umask = os.umask(0o177)  # the socket is born 0600, never briefly wider
        try:
            self.server = await asyncio.start_unix_server(self._handle, path=path, limit=MAX_REQUEST_BYTES)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        await self.observability.start()

    async def close(self) -> None:
        await self.dashboard.close()
        await self.observability.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def has_op(self, op: str) -> bool:
        return op in self._ops

    async def call(self, op: str, request: dict) -> Any:
        """Answer one non-streaming op in-process, as a request on the socket would be (the dashboard)."""
        return await self._ops[op](request, None)  # type: ignore[arg-type]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                raw = await reader.readline()
            except ValueError:
                raise BadRequest(f"request longer than {MAX_REQUEST_BYTES} bytes") from None
            if not raw:
                writer.close()  # the client sent nothing: close, or its socket stays open here
                return
            try:
                request = json.loads(raw)
            except ValueError:
                raise BadRequest("request is not valid JSON") from None
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise BadRequest('request must be an object with a string "op"')
            handler = self._ops.get(request["op"])
            if handler is None:
                err = AgentError(f"unknown op {request['op']!r}; known: {', '.join(self._ops)}")
                err.code = "unknown-op"
                raise err
            result = await handler(request, writer)
            writer.write(_line({"ok": True, "result": result}))
        except AgentError as exc:
            writer.write(_line({"ok": False, "error": {"code": exc.code, "message": str(exc)}}))
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            return
        except Exception as exc:
            log.error("control request failed", exc_info=True)
            writer.write(_line({"ok": False, "error": {"code": "internal", "message": f"internal error: {exc}"}}))
        try:
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        except ConnectionError:
            pass

    async def _ping(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        return {"mesh": self.sup.manifest.mesh if self.sup.manifest else None, "pid": os.getpid(), "home": self.home}

    async def _apply(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        path = request.get("manifest_path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise BadRequest('apply needs "manifest_path", an absolute path')
        # The `${VAR}` values of the caller's environment, not the agent's (agent/interpolate.py).
        environ = request.get("environ", {})
        if not isinstance(environ, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in environ.items()
        ):
            raise BadRequest('"environ" must map variable names to strings')
        text = read_manifest_text(path)
        manifest = parse_manifest(text, path, environ=environ)
        metrics_warning = await self.observability.serve_metrics(manifest.observability.metrics_port)
        result = await self.sup.apply(manifest, {"text": text, "source": path, "environ": environ})
        if metrics_warning and isinstance(result, dict):
            result["metrics_warning"] = metrics_warning
        return result

    async def _status(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        return self.sup.status()

    def _instances_for(self, service: Any) -> list[str]:
        if service is None:
            return list(self.sup.instances)
        if not isinstance(service, str):
            raise BadRequest('"service" must be a string')
        if service not in self.sup.service_names():
            raise UnknownService(f"no service {service!r} in mesh {self.sup.manifest.mesh if self.sup.manifest else '-'}")
        return [i for i, inst in self.sup.instances.items() if inst.spec.service == service]

    async def _logs(self, request: dict, writer: asyncio.StreamWriter) -> None:
        ids = self._instances_for(request.get("service"))
        tail = request.get("tail", 100)
        if not isinstance(tail, int) or tail < 0:
            raise BadRequest('"tail" must be a whole number >= 0')
        lines: list[LogLine] = []
        for iid in ids:
            lines.extend(self.sup.logbook.tail(iid, iid, tail))
        lines.sort(key=lambda entry: entry.ts)
        for entry in lines[-tail:] if tail else []:
            writer.write(_line({"event": entry.to_json()}))
        await writer.drain()
        if not request.get("follow"):
            return None
        wanted = set(ids) if request.get("service") is not None else None
        queue: asyncio.Queue[LogLine] = asyncio.Queue(maxsize=10000)

        def on_line(entry: LogLine) -> None:
            if (wanted is None or entry.instance in wanted) and not queue.full():
                queue.put_nowait(entry)

        unsubscribe = self.sup.logbook.follow(on_line)
        try:
            while True:
                entry = await queue.get()
                writer.write(_line({"event": entry.to_json()}))
                await writer.drain()
        finally:
            unsubscribe()

    async def _down(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        asyncio.get_running_loop().create_task(self.on_down())
        return {"stopping": [*(["ingress"] if self.sup.ingress else []), *self.sup.instances]}

    # -- live control -----------------------------------------------------------------

    async def _route_show(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        manifest = self.sup.require_manifest()
        wanted = _optional_string(request, "service")
        names = [wanted] if wanted else [s.name for s in manifest.services]
        services = {}
        for name in names:
            spec = ovr.service_spec(manifest, name)
            base = ovr.base_traffic(spec)
            live = ovr.effective_traffic(spec, self.sup.overrides.service(name))
            live.update(self.sup.unchecked_traffic.get(name, {}))
            services[name] = {
                "versions": [v.name for v in spec.versions],
                "manifest": {"split": base.get("split"), "routes": base.get("routes") or []},
                "live": {"split": live.get("split"), "routes": live.get("routes") or [], "shadow": live.get("shadow")},
                "overridden": not self.sup.overrides.service(name).empty or name in self.sup.unchecked_traffic,
                "promotion": self.promotions[name].to_json() if name in self.promotions else None,
            }
        return {"mesh": manifest.mesh, "config_version": self.sup.config_version, "services": services}

    async def _route_split(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        service = _string(request, "service")
        split = request.get("split")
        if not isinstance(split, dict):
            raise BadRequest('"split" must be an object of version to weight')
        return await self.sup.live.change_overrides(
            service, lambda live, manifest: ovr.with_split(live, manifest, service, split),
            request.get("wait", True) is not False,
        )

    async def _route_set(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        service = _string(request, "service")
        header, value, version = _string(request, "header"), str(request.get("value", "")), _string(request, "version")
        return await self.sup.live.change_overrides(
            service, lambda live, manifest: ovr.with_rule(live, manifest, service, header, value, version),
            request.get("wait", True) is not False,
        )

    async def _route_reset(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        service = _string(request, "service")
        ovr.service_spec(self.sup.require_manifest(), service)  # an unknown service cancels nothing
        cancelled = self._cancel_promotion(service)
        self.sup.unchecked_traffic.pop(service, None)
        result = await self.sup.live.change_overrides(
            service, lambda live, manifest: ovr.without(live, manifest, service),
            request.get("wait", True) is not False,
        )
        return {**result, "cancelled_promotion": cancelled}

    async def _diff(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        manifest = self.sup.require_manifest()
        return {"mesh": manifest.mesh, "source": manifest.source,
                "differences": ovr.diff(manifest, self.sup.overrides)}

    async def _proxy_status(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        return {"config_version": self.sup.config_version, "sidecars": self.sup.live.proxy_status()}

    async def _proxy_config(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        name = _string(request, "instance")
        handle = self.sup.live.sidecar_named(name)
        if handle is None:
            known = ", ".join(n for n, _ in self.sup.live.sidecars())
            err = AgentError(f"no sidecar {name!r} (sidecars: {known})")
            err.code = "unknown-instance"
            raise err
        return {"instance": name, "pushed": handle.pushed_version, "acked": handle.acked_version,
                "nack": handle.nack, "config": redact(handle.last_snapshot)}

    async def _scale(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        count = request.get("replicas")
        if isinstance(count, bool) or not isinstance(count, int):
            raise BadRequest('"replicas" must be a whole number')
        return await self.sup.live.scale(_string(request, "service"), self._version_of(request), count)

    def _version_of(self, request: dict) -> str:
        service = _string(request, "service")
        version = _optional_string(request, "version")
        if version is None:
            spec = ovr.service_spec(self.sup.require_manifest(), service)
            if len(spec.versions) > 1:
                raise BadRequest(f"service {service} has versions {', '.join(v.name for v in spec.versions)}; "
                                 f"say which, e.g. {service}@{spec.versions[0].name}")
            version = spec.versions[0].name
        return version

    async def _restart(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        return await self.sup.live.restart(_string(request, "service"), _optional_string(request, "version"))

    async def _promote(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        manifest = self.sup.require_manifest()
        service, canary = _string(request, "service"), _string(request, "version")
        spec = ovr.service_spec(manifest, service)
        ovr.check_version(spec, canary)
        try:
            limits = promote.Thresholds(
                step=int(request.get("step", 10)),
                interval_s=float(request.get("interval", 30.0)),
                max_error_rate=float(request.get("max_error_rate", 0.01)),
                max_p99_ms=None if request.get("max_p99_ms") is None else float(request["max_p99_ms"]),
            )
        except (TypeError, ValueError, OverflowError):
            raise BadRequest('"step", "interval", "max_error_rate" and "max_p99_ms" must be numbers') from None
        split = ovr.effective_traffic(spec, self.sup.overrides.service(service))["split"]
        baseline = max((v for v in split if v != canary), key=lambda v: split[v], default=None)
        if baseline is None:
            raise BadRequest(f"{service} sends all traffic to {canary} already")

        async def apply_split(new_split: dict[str, int]) -> None:
            await self.sup.live.change_overrides(
                service, lambda live, manifest: ovr.with_split(live, manifest, service, new_split)
            )

        self._cancel_promotion(service)
        promotion = promote.Promotion(service, canary, baseline, split.get(canary, 0), limits, self.stats, apply_split)
        self.promotions[service] = promotion
        promotion.start()
        return promotion.to_json()

    def _cancel_promotion(self, service: str) -> bool:
        promotion = self.promotions.pop(service, None)
        if promotion is None or promotion.task is None or promotion.task.done():
            return False
        promotion.task.cancel()
        return True

    async def _debug_traffic(self, request: dict, writer: asyncio.StreamWriter) -> dict:
        service = _string(request, "service")
        ovr.service_spec(self.sup.require_manifest(), service)
        traffic = request.get("traffic")
        if not isinstance(traffic, dict):
            raise BadRequest('"traffic" must be an object of traffic keys')
        self.sup.unchecked_traffic[service] = traffic
        return await self.sup.live.push_routes(service, request.get("wait", True) is not False)
