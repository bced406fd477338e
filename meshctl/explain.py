"""`meshctl why`: decision records of one request stitched into a story, and told in words.

Pure: the agent gathers each sidecar's records (meshctl/proxy/decisions.py) and calls
`stitch()`; the CLI prints `tell()` or `tell_plan()`. The JSON `stitch()` returns is a
stable interface (the dashboard shows it):

    {"request_id", "status", "by", "error", "hops": [{"sidecar", "service", "direction",
     "route", "version", "tries": [{"endpoint", "status", "error", "duration_ms",
     "retry_reason", ...}], "authz", "timeout_ms", "error", ...}]}

Hops are in the order the request crossed them, found from what each hop says rather than
from clocks (a sidecar's loop clock ticks in milliseconds): a caller's hop is followed by
the inbound hops of the endpoints it tried, in try order; an inbound hop by the calls its
app made while serving it (the outbound hops of that same sidecar). Start times only
break ties and order what is not connected.
"""

from __future__ import annotations

import time
from typing import Any

_DIRECTION_ORDER = {"ingress": 0, "outbound": 1, "inbound": 2}
_HOP_KEYS = ("sidecar", "service", "caller_service", "direction", "protocol", "method", "path", "peer_identity", "mtls",
             "status", "grpc_status", "grpc_name", "by", "error", "duration_ms", "version", "balancer", "limits", "timeouts", "authz", "faults", "mirror", "ts")


def hop_of(record: dict[str, Any]) -> dict[str, Any]:
    """One sidecar's record as a hop of the story."""
    hop = {key: record.get(key) for key in _HOP_KEYS}
    hop["route"] = record.get("route")
    hop["tries"] = [
        {key: attempt.get(key) for key in ("endpoint", "version", "status", "grpc_status", "grpc_name", "error", "outcome", "start_ms", "duration_ms",
                                           "retried", "retry_reason", "backoff_ms")}
        for attempt in record.get("tries") or ()
    ]
    timeouts = record.get("timeouts") or {}
    hop["timeout_ms"] = timeouts.get("request_ms")
    return hop


def stitch(request_id: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every sidecar's record of `request_id`, in the order the request crossed them."""
    hops = [hop_of(record) for record in crossing_order(records)]
    first = hops[0] if hops else {}
    return {
        "request_id": request_id,
        "status": first.get("status"),
        "by": first.get("by"),
        "error": first.get("error"),
        "method": first.get("method"),
        "path": first.get("path"),
        "ts": first.get("ts"),
        "hops": hops,
    }


def crossing_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records in the order the request crossed them (see the module docstring)."""
    by_time = sorted(records, key=lambda r: (r.get("ts") or 0.0, _DIRECTION_ORDER.get(str(r.get("direction")), 3)))
    children: dict[int, list[dict[str, Any]]] = {}
    claimed: set[int] = set()
    for record in by_time:
        if record.get("direction") == "inbound":
            calls = [other for other in by_time if other.get("direction") == "outbound" and other.get("sidecar") == record.get("sidecar")]
        else:
            tried = [attempt.get("endpoint") for attempt in record.get("tries") or ()]
            calls = [other for endpoint in dict.fromkeys(tried) for other in by_time
                     if other.get("direction") == "inbound" and other.get("sidecar") == endpoint]
        calls = [call for call in calls if id(call) not in claimed and call is not record]
        claimed.update(id(call) for call in calls)
        children[id(record)] = calls
    ordered: list[dict[str, Any]] = []
    seen: set[int] = set()

    def visit(record: dict[str, Any]) -> None:
        if id(record) in seen:
            return
        seen.add(id(record))
        ordered.append(record)
        for child in children[id(record)]:
            visit(child)

    for record in by_time:
        if id(record) not in claimed:
            visit(record)
    for record in by_time:  # a cycle of claims (cannot happen with real ids) still shows every record
        visit(record)
    return ordered


def is_failure(hop: dict[str, Any]) -> bool:
    return bool(hop.get("error")) or (hop.get("status") or 0) >= 500


def summaries(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per request id, newest first: `why --recent`."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        request_id = record.get("request_id")
        if request_id:
            by_id.setdefault(request_id, []).append(record)
    rows = []
    for request_id, group in by_id.items():
        story = stitch(request_id, group)
        hops = story["hops"]
        failed = [hop for hop in hops if is_failure(hop)]
        rows.append({
            "request_id": request_id,
            "ts": story["ts"],
            "method": story["method"],
            "path": story["path"],
            "status": story["status"],
            "error": story["error"] or next((hop["error"] for hop in failed if hop["error"]), None),
            "services": list(dict.fromkeys(hop["service"] for hop in hops if hop.get("service"))),
            "failed": bool(failed),  # some hop failed, even if a retry saved the request
            "failed_at": failed[-1]["sidecar"] if failed else None,
            "hops": len(hops),
        })
    rows.sort(key=lambda row: row["ts"] or 0.0, reverse=True)
    return rows


def valid_status_filter(wanted: Any) -> bool:
    """`5xx`-style classes and three-digit codes are the filters `matches_status` knows."""
    if not isinstance(wanted, str) or len(wanted) != 3 or not wanted[0] in "12345":
        return False
    return wanted[1:].lower() == "xx" or wanted.isdigit()


def matches_status(status: int | None, wanted: str | None) -> bool:
    """`5xx`, `4xx`, or an exact code such as `503`."""
    if not wanted:
        return True
    if status is None:
        return False
    wanted = wanted.lower()
    if len(wanted) == 3 and wanted.endswith("xx") and wanted[0].isdigit():
        return status // 100 == int(wanted[0])
    return wanted.isdigit() and status == int(wanted)


# -- in words ---------------------------------------------------------------------------------


def _limit(value: float | None) -> str:
    """A timeout in force: its value, or "none" where it is not set."""
    return "none" if value is None else _ms(value)


def _ms(value: float | None) -> str:
    if value is None:
        return "?"
    if value < 1:
        return "under 1 ms"
    if value >= 1000:
        return "%g s" % round(value / 1000, 3)
    return "%d ms" % round(value) if value >= 10 else "%.1f ms" % value


def _endpoint_label(endpoint: str | None) -> str:
    return "the app" if endpoint in (None, "app") else endpoint


def _outcome_words(attempt: dict[str, Any], timeouts: dict[str, Any] | None) -> str:
    """What happened to one try, as a verb phrase."""
    outcome, status = attempt.get("outcome"), attempt.get("status")
    took = _ms(attempt.get("duration_ms"))
    if outcome == "response":
        grpc = attempt.get("grpc_name")
        if grpc is not None:
            return "answered grpc-status %s%s after %s" % (grpc, " (HTTP %s)" % status if status else "", took)
        return "answered %s after %s" % (status, took)
    if outcome == "reset":
        return "reset the connection after %s" % took
    if outcome == "refused":
        return "refused the connection"
    if outcome == "connect-failure":
        return "could not be connected (%s)" % (attempt.get("error") or "connect failure")
    if outcome == "connected":
        return "accepted the connection after %s" % took
    if outcome == "timeout":
        fired = (timeouts or {}).get("fired")
        if fired == "per_try":
            return "did not answer within the per-try timeout (%s)" % _ms((timeouts or {}).get("per_try_ms"))
        if fired == "request":
            return "did not answer within the request timeout (%s)" % _ms((timeouts or {}).get("request_ms"))
        if fired == "deadline":
            return "did not answer within the caller's grpc-timeout (%s)" % _ms((timeouts or {}).get("deadline_ms"))
        return "timed out after %s" % took
    if outcome == "stream-idle-timeout":
        return "moved no byte either way for the stream idle timeout (%s)" % _ms((timeouts or {}).get("stream_idle_ms"))
    if outcome:
        return "ended with %s after %s" % (outcome, took)
    return "answered %s after %s" % (status, took)


def tries_sentence(tries: list[dict[str, Any]], timeouts: dict[str, Any] | None) -> str:
    """The tries of one hop as one sentence: each try, each retry and its reason."""
    if not tries:
        return ""
    parts = ["%s %s" % (_endpoint_label(tries[0]["endpoint"]), _outcome_words(tries[0], timeouts))]
    for before, attempt in zip(tries, tries[1:]):
        backoff = before.get("backoff_ms")
        parts.append("the retry (%s) went to %s%s and %s" % (
            before.get("retry_reason") or "retried", _endpoint_label(attempt["endpoint"]),
            " after a %s backoff" % _ms(backoff) if backoff else "",
            _outcome_words(attempt, timeouts).replace("answered", "got", 1)))
    last = tries[-1]
    if not last.get("retried") and last.get("retry_reason"):
        parts.append("not retried: %s" % last["retry_reason"])
    return "; ".join(parts) + "."


def _rule_words(route: dict[str, Any]) -> str:
    if route.get("rule", -1) < 0:
        origin = "a live override" if route.get("source") == "override" else "the manifest"
        return "the service split (from %s)" % origin
    origin = "a live override" if route.get("source") == "override" else "the manifest"
    conditions = route.get("conditions") or []
    return "rule %d (from %s: %s)" % (route["rule"], origin, " and ".join(conditions) or "matches every request")


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        inner = ", ".join("%s: %s" % (k, _compact(v)) for k, v in value.items() if v not in (None, [], {}))
        return "{%s}" % inner
    if isinstance(value, list):
        return "[%s]" % ", ".join(_compact(v) for v in value)
    return str(value)


def route_sentence(route: dict[str, Any] | None, service: str) -> str:
    if not route:
        return ""
    words = ["route to %s: %s" % (service, _rule_words(route))]
    for miss in route.get("misses") or ():
        words.append("rule %d did not match (%s)" % (miss["rule"], miss["condition"]))
    split = route.get("split")
    if isinstance(split, dict) and len(split) > 1:
        shown = " ".join("%s=%s" % (v, w) for v, w in split.items())
        words.append("the split %s drew %s" % (shown, route.get("version")))
    elif route.get("version"):
        words.append("version %s" % route["version"])
    return "; ".join(words) + "."


def _final_words(hop: dict[str, Any]) -> str:
    grpc = hop.get("grpc_name")
    status = hop.get("status") if grpc is None else "grpc-status %s (HTTP %s)" % (grpc, hop.get("status"))
    if hop.get("by") == "mesh" and hop.get("error"):
        return "the mesh answered %s (x-mesh-error: %s)" % (status, hop["error"]) if status else "the mesh ended it (%s)" % hop["error"]
    return "%s answered %s" % ("the app" if hop.get("direction") == "inbound" else "the upstream", status)


def hop_lines(hop: dict[str, Any]) -> list[str]:
    """A hop in plain sentences."""
    direction = hop.get("direction")
    sidecar = hop.get("sidecar")
    lines = []
    if direction == "inbound":
        caller = hop.get("peer_identity") or "an unauthenticated caller"
        lines.append("%s received %s %s from %s%s." % (sidecar, hop.get("method"), hop.get("path"), caller,
                                                       " over mTLS" if hop.get("mtls") else " in plaintext"))
        authz = hop.get("authz")
        if authz:
            lines.append("Authorization: %s (decided by %s)." % (authz["decision"].upper(), authz["rule"]))
    elif hop.get("protocol") == "tcp":
        lines.append("%s relayed a TCP connection to %s%s." % (sidecar, hop.get("service"), " over mTLS" if hop.get("mtls") else ""))
    else:
        lines.append("%s sent %s %s to %s%s." % (sidecar if direction != "ingress" else "the ingress", hop.get("method"),
                                                 hop.get("path"), hop.get("service"), " over mTLS" if hop.get("mtls") else ""))
        route = route_sentence(hop.get("route"), hop.get("service") or "?")
        if route:
            lines.append(route)
        balancer = hop.get("balancer") or {}
        skipped = balancer.get("skipped") or []
        if skipped:
            lines.append("The %s balancer skipped %s." % (balancer.get("algorithm"), ", ".join(
                "%s (%s)" % (entry["endpoint"], entry["reason"]) for entry in skipped)))
        if balancer.get("panic"):
            lines.append("Every endpoint was ejected: the balancer sent anyway (panic mode).")
    limits = hop.get("limits") or {}
    if limits.get("circuit_open"):
        lines.append("The circuit was open: connection and queue limits were full.")
    elif limits.get("queued"):
        lines.append("It waited %s in the queue for a connection slot." % _ms(limits.get("queued_ms")))
    for fault in hop.get("faults") or ():
        if fault["kind"] == "delay":
            lines.append("A delay fault of %s was injected." % _ms(fault["ms"]))
        else:
            lines.append("An abort fault answered %s." % fault.get("status"))
    if hop.get("mirror"):
        lines.append("A copy was mirrored to %s." % hop["mirror"])
    sentence = tries_sentence(hop.get("tries") or [], hop.get("timeouts"))
    if sentence:
        lines.append(sentence)
    timeouts = hop.get("timeouts") or {}
    if timeouts.get("fired") == "deadline":
        lines.append("The caller's deadline (grpc-timeout %s) passed." % _ms(timeouts.get("deadline_ms")))
    elif timeouts.get("fired"):
        which, key = {"request": ("request", "request_ms"), "stream_idle": ("stream idle", "stream_idle_ms")}.get(
            timeouts["fired"], ("per-try", "per_try_ms"))
        lines.append("The %s timeout (%s) fired." % (which, _ms(timeouts.get(key))))
    tries = hop.get("tries") or []
    answered_by_try = len(tries) == 1 and hop.get("by") == "app" and tries[0].get("status") == hop.get("status")
    relayed = hop.get("protocol") == "tcp" and not hop.get("error")  # the tries said it: the relay connected
    if not answered_by_try and not relayed:
        final = _final_words(hop)
        lines.append("%s%s in %s." % (final[0].upper(), final[1:], _ms(hop.get("duration_ms"))))
    return lines


def tell(story: dict[str, Any]) -> str:
    """The whole story, hop by hop."""
    when = time.strftime("%H:%M:%S", time.localtime(story["ts"])) if story.get("ts") else "?"
    if story.get("method") == "TCP":  # a relay's connects (raw TCP has no request id: the sidecar gave it one)
        head = "TCP connection %s to %s at %s" % (story["request_id"], (story["hops"] or [{}])[0].get("service"), when)
    else:
        head = "request %s: %s %s at %s -> %s" % (story["request_id"], story.get("method"), story.get("path"), when, story.get("status"))
    if story.get("error"):
        head += " (x-mesh-error: %s)" % story["error"]
    out = [head]
    for number, hop in enumerate(story["hops"], 1):
        out.append("%d. %s (%s)" % (number, hop.get("sidecar"), hop.get("direction")))
        out.extend("   " + line for line in hop_lines(hop))
    origin = failure_origin(story)
    if origin is not None:
        number, hop = origin
        out.append("It went wrong at hop %d, %s (%s): %s." % (
            number, hop.get("sidecar"), hop.get("direction"),
            "x-mesh-error %s" % hop["error"] if hop.get("error") else "status %s from the app" % hop.get("status")))
    return "\n".join(out)


def failure_origin(story: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """The last hop in crossing order that failed (the one the failure started from), numbered from 1."""
    failed = [(number, hop) for number, hop in enumerate(story["hops"], 1) if is_failure(hop) or (hop.get("status") or 0) >= 400]
    return failed[-1] if failed and (is_failure(story["hops"][0]) or (story.get("status") or 0) >= 400) else None


def tell_plan(plan: dict[str, Any]) -> str:
    """`why --from --to`: what would happen to a request not sent."""
    route = plan.get("route") or {}
    lines = ["%s %s from %s to %s (as %s would route it now):" % (
        plan.get("method"), plan.get("path"), plan.get("from"), plan.get("service"), plan.get("sidecar"))]
    sentence = route_sentence(route, plan.get("service") or "?")
    if sentence:
        lines.append("  " + sentence)
    split = route.get("split") or {}
    if split:
        lines.append("  Split: %s." % " ".join("%s=%s" % (v, w) for v, w in split.items()))
    for version, endpoints in (plan.get("versions") or {}).items():
        shown = []
        for entry in endpoints:
            state = "ejected for %ss" % entry["ejected_for_s"] if entry["ejected"] else "available"
            shown.append("%s %s" % (entry["endpoint"], state))
        for entry in (plan.get("not_ready") or {}).get(version, []):
            shown.append("%s %s" % (entry["instance"], entry["state"]))
        lines.append("  %s endpoints (%s): %s." % (version, plan.get("algorithm"), ", ".join(shown) or "none"))
    authz = plan.get("authz")
    if authz:
        lines.append("  Authorization: %s (decided by %s)." % (authz["decision"].upper(), authz["rule"]))
    timeouts = plan.get("timeouts") or {}
    lines.append("  Timeouts: request %s, stream idle %s, connect %s%s." % (
        _limit(timeouts.get("request_ms")), _limit(timeouts.get("stream_idle_ms")), _ms(timeouts.get("connect_ms")),
        ", per try %s" % _ms(timeouts["per_try_ms"]) if timeouts.get("per_try_ms") else ""))
    retries = plan.get("retries")
    if retries:
        lines.append("  Retries: up to %d attempts on %s%s." % (
            retries["attempts"], ", ".join(retries["retry_on"]),
            "" if retries["method_retried"] else "; %s is not idempotent, so only a failed connect is retried" % plan.get("method")))
    else:
        lines.append("  Retries: none configured.")
    if plan.get("fault"):
        lines.append("  Faults: %s." % _compact(plan["fault"]))
    if plan.get("mirror"):
        lines.append("  Mirror: %s." % _compact(plan["mirror"]))
    return "\n".join(lines)
