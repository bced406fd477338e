"""`meshctl why`: every decision the mesh made for one request, hop by hop, in words.

The agent gathers the sidecars' decision records (meshctl/agent/control_why.py); the
sentences are meshctl/explain.py.
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from meshctl import explain, render
from meshctl.common import EXIT_USAGE, agent_or_exit


def _usage(message: str, hint: str | None = None) -> typer.Exit:
    render.print_error(render.make_console(stderr=True), message, hint)
    return typer.Exit(EXIT_USAGE)


def _headers(pairs: list[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise _usage(f"--header {pair!r}: expected NAME=VALUE", "for example --header x-user=alice")
        headers[name.strip().lower()] = value
    return headers


def why(
    request_id: Annotated[str | None, typer.Argument(
        metavar="[REQUEST_ID|SERVICE]", help="The x-request-id to explain (with --last-failure: a service).")] = None,
    last_failure: Annotated[bool, typer.Option("--last-failure", help="Explain the most recent request in which a hop failed (even if a retry saved it).")] = False,
    recent: Annotated[bool, typer.Option("--recent", help="List recent explained requests.")] = False,
    status: Annotated[str | None, typer.Option("--status", help="With --recent: a class such as 5xx or a code.")] = None,
    service: Annotated[str | None, typer.Option("--service", help="With --recent or --last-failure: only requests that crossed it.")] = None,
    source: Annotated[str | None, typer.Option("--from", help="Plan a request not sent: from this service (or ingress).")] = None,
    target: Annotated[str | None, typer.Option("--to", help="Plan a request not sent: to this service.")] = None,
    path: Annotated[str, typer.Option("--path", help="With --from/--to: the request path.")] = "/",
    method: Annotated[str, typer.Option("--method", help="With --from/--to: the request method.")] = "GET",
    header: Annotated[list[str], typer.Option("--header", help="With --from/--to: NAME=VALUE, repeatable.")] = [],  # noqa: B006
    output: Annotated[str, typer.Option("-o", "--output", help="text or json.")] = "text",
) -> None:
    """Every decision the mesh made for a request: routes, endpoints, tries, retries, timeouts, authorization."""
    if output not in ("text", "table", "json"):
        raise _usage(f"-o {output!r}: expected text or json")
    if last_failure and request_id is not None:
        service, request_id = service or request_id, None  # `why --last-failure payments`
    modes = [bool(request_id), last_failure, recent, source is not None or target is not None]
    if sum(modes) != 1:
        raise _usage("give one of REQUEST_ID, --last-failure [SERVICE], --recent, or --from SERVICE --to SERVICE",
                     "copy the request id from the x-request-id response header, or `meshctl tap`")
    client = agent_or_exit()
    if source is not None or target is not None:
        if source is None or target is None:
            raise _usage("--from and --to go together")
        plan = client.request("why-plan", **{"from": source, "to": target, "method": method, "path": path, "headers": _headers(header)})
        print(json.dumps(plan, indent=2) if output == "json" else explain.tell_plan(plan))
        return
    if recent:
        rows = client.request("why", recent=True, status=status, service=service)
        if output == "json":
            print(json.dumps(rows, indent=2))
            return
        cells = [[time.strftime("%H:%M:%S", time.localtime(r["ts"])) if r["ts"] else "-", r["request_id"],
                  "%s %s" % (r["method"], r["path"]), str(r["status"]), r["error"] or "-", " > ".join(r["services"]),
                  r["failed_at"] or "-"] for r in rows]
        print(render.plain_table(("TIME", "REQUEST ID", "REQUEST", "STATUS", "MESH ERROR", "SERVICES", "FAILED AT"), cells))
        return
    if last_failure:
        story = client.request("why", last_failure=True, service=service)
    else:
        story = client.request("why", request_id=request_id)
    print(json.dumps(story, indent=2) if output == "json" else explain.tell(story))


def register(app: typer.Typer) -> None:
    app.command("why")(why)
