"""Control API ops for shadow traffic: `shadow-start`, `shadow-stop`, `shadow-report`.

A live shadow is an override like a split (agent.overrides.Shadow): persisted, shown by
`route-show` and `diff`, dropped by `route-reset`. Its results arrive from the callers'
sidecars as `shadow-results` batches and are added up in one agent.shadow_report
.ShadowTally per service, which `shadow-report` reads; starting a shadow starts a new
tally, stopping one keeps the last tally readable. A manifest's `mirror: {compare: ...}`
has its own tally per service (its results are not `live`), which the report shows when
no live shadow runs and it is the newer. Results tagged with a replay id go to that
replay's tally instead (agent.control_replay).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from meshctl.agent import overrides as ovr
from meshctl.agent.errors import AgentError
from meshctl.agent.shadow_report import ShadowTally
from meshctl.agent.supervisor import Supervisor

Handler = Callable[[dict, asyncio.StreamWriter], Awaitable[Any]]


class BadShadowRequest(AgentError):
    code = "bad-request"


class NoShadow(AgentError):
    code = "no-shadow"


def _strings(request: dict, name: str) -> tuple[str, ...]:
    value = request.get(name) or []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadShadowRequest(f'"{name}" must be a list of strings')
    return tuple(value)


def shadow_from_request(request: dict) -> ovr.Shadow:
    version = request.get("version")
    if not isinstance(version, str) or not version:
        raise BadShadowRequest('"version" must be a non-empty string')
    percent = request.get("percent", 100.0)
    if isinstance(percent, bool) or not isinstance(percent, (int, float)):
        raise BadShadowRequest('"percent" must be a number')
    path = request.get("path") or "/"
    if not isinstance(path, str):
        raise BadShadowRequest('"path" must be a string')
    return ovr.Shadow(version, float(percent), path, request.get("unsafe") is True,
                      tuple(h.lower() for h in _strings(request, "ignore_headers")),
                      tuple(p if p.startswith("$") else "$." + p for p in _strings(request, "ignore_json")))


class ShadowResults:
    """The tallies of live shadows (by service) and of replays (by id).

    `live_version(service)` is the version the service's live shadow copies to now, None
    without one: the copies a shadow sent before it was switched to another version end
    later (a hanging shadow's only after their timeout), and their results must not
    replace the new shadow's tally with one of the old version.
    """

    def __init__(self, live_version: Callable[[str], str | None]) -> None:
        self.live_version = live_version
        self.by_service: dict[str, ShadowTally] = {}  # live shadows
        self.from_manifest: dict[str, ShadowTally] = {}
        self.by_tag: dict[str, ShadowTally] = {}

    def __repr__(self) -> str:
        return "<ShadowResults %d services, %d replays>" % (len(self.by_service), len(self.by_tag))

    def on_results(self, results: list[dict]) -> None:
        for result in results:
            if not isinstance(result, dict):
                continue
            tag = result.get("tag")
            if tag is not None:
                tally = self.by_tag.get(tag)
                if tally is not None:
                    tally.add(result)
                continue
            service, version = str(result.get("service")), str(result.get("version"))
            tallies = self.by_service if result.get("live") else self.from_manifest
            tally = tallies.get(service)
            if tally is None or tally.version != version:
                if result.get("live") and self.live_version(service) != version:
                    continue  # a late answer to a copy of an earlier shadow
                tally = tallies[service] = ShadowTally(service, version)
            tally.add(result)


def live_shadow_version(sup: Supervisor) -> Callable[[str], str | None]:
    """For ShadowResults: the version each service's live shadow copies to, from the overrides."""
    def version(service: str) -> str | None:
        shadow = sup.overrides.service(service).shadow
        return None if shadow is None else shadow.version
    return version


def shadow_ops(sup: Supervisor, results: ShadowResults) -> dict[str, Handler]:
    def service_of(request: dict) -> str:
        service = request.get("service")
        if not isinstance(service, str) or not service:
            raise BadShadowRequest('"service" must be a non-empty string')
        return service

    async def start(request: dict, writer: asyncio.StreamWriter) -> dict:
        service = service_of(request)
        shadow = shadow_from_request(request)
        ovr.with_shadow(sup.overrides, sup.require_manifest(), service, shadow)  # refused here, before anything
        results.by_service[service] = ShadowTally(service, shadow.version)
        outcome = await sup.live.change_overrides(
            service, lambda live, manifest: ovr.with_shadow(live, manifest, service, shadow),
            request.get("wait", True) is not False)
        return {**outcome, "shadow": shadow.to_json()}

    async def stop(request: dict, writer: asyncio.StreamWriter) -> dict:
        service = service_of(request)
        ovr.without_shadow(sup.overrides, sup.require_manifest(), service)  # "no live shadow" before anything
        return await sup.live.change_overrides(
            service, lambda live, manifest: ovr.without_shadow(live, manifest, service),
            request.get("wait", True) is not False)

    async def report(request: dict, writer: asyncio.StreamWriter) -> dict:
        service = service_of(request)
        ovr.service_spec(sup.require_manifest(), service)
        live = sup.overrides.service(service).shadow
        tally = results.by_service.get(service)
        manifest_tally = results.from_manifest.get(service)
        if live is None and manifest_tally is not None and (tally is None or manifest_tally.updated > tally.updated):
            tally = manifest_tally
        if tally is None:
            if live is None:
                raise NoShadow(f"{service} has no shadow and no results yet; start one with `meshctl shadow {service} VERSION`"
                               " or give a route's mirror `compare: true` in the manifest")
            tally = results.by_service[service] = ShadowTally(service, live.version)
        ignored = () if live is None else tuple(f"header:{h}" for h in live.ignore_headers) + tuple(
            f"body:{p}" for p in live.ignore_json)
        return {**tally.report(ignored), "live": live is not None}

    return {"shadow-start": start, "shadow-stop": stop, "shadow-report": report}
