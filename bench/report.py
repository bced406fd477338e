"""docs/benchmarks.md from the measured results: pure functions, plain data in, Markdown out.

`results` is the dict bench/run.py builds (see `run.full`); the targets are judged here,
in `judge_targets`, so the rule for PASS and MISS is written down in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MB = 1024 * 1024


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    passed: bool | None  # None: could not be measured


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else "%.2f" % (seconds * 1e3)


def _mb(size: int | None) -> str:
    return "n/a" if size is None else "%.1f" % (size / MB)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def judge_targets(results: dict[str, Any]) -> list[Verdict]:
    labels = results["labels"]
    mesh, haproxy = labels["mesh"], labels["haproxy"]
    small = results["throughput"]["small"]
    verdicts = []

    ratio = _ratio(small[mesh]["rps"], small[haproxy]["rps"])
    verdicts.append(Verdict(
        "mesh throughput >= 0.8x HAProxy's (small body, -c32)",
        "%.0f vs %.0f rps = %.2fx" % (small[mesh]["rps"], small[haproxy]["rps"], ratio),
        ratio >= 0.8,
    ))

    cpu_mesh, cpu_haproxy = small[mesh]["proxy_cpu_us"], small[haproxy]["proxy_cpu_us"]
    ratio = _ratio(cpu_mesh, cpu_haproxy)
    verdicts.append(Verdict(
        "sidecar CPU per request <= 1.25x HAProxy's (both proxies)",
        "%.1f vs %.1f us = %.2fx" % (cpu_mesh, cpu_haproxy, ratio),
        ratio <= 1.25,
    ))

    latency = results["latency"]
    p99_mesh, p99_haproxy = latency[mesh]["p99"], latency[haproxy]["p99"]
    verdicts.append(Verdict(
        "p99 at 1,000 rps <= HAProxy p99 + 1 ms",
        "%s ms vs %s ms + 1 ms" % (_ms(p99_mesh), _ms(p99_haproxy)),
        None if p99_mesh is None or p99_haproxy is None else p99_mesh <= p99_haproxy + 0.001,
    ))

    idle_rss = max(entry["idle"]["rss"] for entry in results["memory"]["sidecars"].values())
    verdicts.append(Verdict("idle sidecar RSS <= 30 MB", "%s MB (largest of the two)" % _mb(idle_rss), idle_rss <= 30 * MB))

    up10 = results["startup"]["up"].get("10")
    verdicts.append(Verdict(
        "`meshctl up` of 10 instances <= 3 s",
        "n/a" if up10 is None else "%.2f s" % up10["seconds"],
        None if up10 is None else up10["seconds"] <= 3.0,
    ))

    control = results.get("control_plane")
    prop = control["propagation"] if control else None
    verdicts.append(Verdict(
        "route propagation p99 < 100 ms (%s-instance mesh, %s sidecars ACK each change)" % (
            (control["instances"], prop["acked_min"]) if control else ("n/a", "n/a")),
        "n/a" if prop is None else "p99 %s ms over %d changes (p50 %s ms)" % (_ms(prop["p99"]), prop["changes"], _ms(prop["p50"])),
        None if prop is None else prop["p99"] < 0.1 and prop["problems"] == 0,
    ))
    if results.get("h2") and not isinstance(results["h2"], str):
        verdicts += judge_h2_targets(results["h2"], small[mesh]["proxy_cpu_us"])
    why = judge_why(results)
    if why is not None:
        verdicts.append(why)
    return verdicts


def _why_entries(results: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """{mode: the observability table's entry} for why off, errors (the defaults) and all, when measured."""
    obs, labels = results.get("observability"), results.get("why_labels")
    if not obs or not labels or any(label not in obs for label in labels.values()):
        return None
    return {mode: obs[label] for mode, label in labels.items()}


def judge_why(results: dict[str, Any]) -> Verdict | None:
    """Issue #18: with the default (`why: errors`) throughput stays within 3 % of recording off."""
    entries = _why_entries(results)
    if entries is None:
        return None
    off, default = entries["off"], entries["errors"]
    ratio = _ratio(default["rps"], off["rps"])
    return Verdict(
        "mesh throughput with `observability.why: errors` (the default) within 3 % of `why: off`",
        "%.0f vs %.0f rps = %.3fx (sidecar CPU %.1f vs %.1f us/req)" % (
            default["rps"], off["rps"], ratio, default["proxy_cpu_us"], off["proxy_cpu_us"]),
        ratio >= 0.97,
    )


def render_why(results: dict[str, Any], params: dict[str, Any], measured_apart: str = "") -> list[str]:
    """The cost of `meshctl why` decision records: the three modes' meshes and engines, as ratios to `why: off`.

    `measured_apart` names the run when the section was spliced into a page of another run.
    """
    entries = _why_entries(results)
    if entries is None:
        return []
    engines = results.get("why_engines") or {}
    names = list(engines.get("off", {}))
    off = entries["off"]
    origin = "of the run named at the top" if not measured_apart else "of another `make bench` run (%s)" % measured_apart
    out = ["## Cost of `meshctl why`", "",
           "The why meshes of \"Cost of observability\" %s (wrk -t1 -c%d, %d interleaved runs of %g s each), as "
           "ratios to recording off; the target is the default's throughput within 3 %% of `why: off`. The engine "
           "columns are Python CPU per request of the sidecar's engine alone in each mode (bench/engine.py for the "
           "HTTP/1.1 ingress and inbound, bench/engine_h2.py for an HTTP/2 stream; minimum over batches and rounds, "
           "run after the meshes): they move much less with the machine's load than wrk's figures. `errors` keeps a "
           "record only for failed, retried or `x-mesh-debug` requests (none here); `all` builds one for every "
           "request." % (origin, params["connections"], params["runs"], params["seconds"]), ""]
    rows = []
    for mode, entry in entries.items():
        row = [mode + (" (default)" if mode == "errors" else ""), "%.0f" % entry["rps"], "%.3f" % (entry["rps"] / off["rps"]),
               "%.1f" % entry["proxy_cpu_us"], "%.3f" % (entry["proxy_cpu_us"] / off["proxy_cpu_us"])]
        for name in names:
            figure, base = engines.get(mode, {}).get(name), engines["off"][name]
            row.append("n/a" if figure is None else "%.2f (%.3fx)" % (figure, figure / base))
        rows.append(row)
    header = ["observability.why", "mesh rps", "x off", "sidecar CPU us/req", "x off"] + ["engine %s us" % name for name in names]
    out += _table(header, rows)
    verdict = judge_why(results)
    if verdict is not None:
        out += ["%s: %s, %s." % (_mark(verdict.passed), verdict.target, verdict.measured), ""]
    return out


def _mesh_entry(table: dict[str, Any]) -> dict[str, Any]:
    return next(entry for path, entry in table.items() if path != "direct")


def judge_h2_targets(h2: dict[str, Any], http1_cpu_us: float | None) -> list[Verdict]:
    """Issue #17's targets: HTTP/2 at about HTTP/1.1's cost; `http1_cpu_us` from the same run (None: not measured)."""
    verdicts = []
    h2load = h2["h2load"].get("10")
    if h2load is not None:
        mesh = _mesh_entry(h2load)
        cpu = mesh["proxy_cpu_us"]
        ratio = _ratio(cpu, http1_cpu_us)
        verdicts.append(Verdict(
            "sidecar CPU per HTTP/2 request <= 1.5x the HTTP/1.1 path's (h2load -m10 vs wrk, both sidecars)",
            "n/a" if ratio is None else "%.1f vs %.1f us = %.2fx" % (cpu, http1_cpu_us, ratio),
            None if ratio is None else ratio <= 1.5,
        ))
        ratio = _ratio(mesh["rps"], h2load["direct"]["rps"])
        verdicts.append(Verdict(
            "`h2load -m10` through the mesh >= 0.25x direct",
            "%.0f vs %.0f rps = %.3fx" % (mesh["rps"], h2load["direct"]["rps"], ratio), ratio >= 0.25,
        ))
    grpc = h2.get("grpc")
    if grpc:
        mesh = _mesh_entry(grpc["table"])
        ratio = _ratio(mesh["rps"], grpc["table"]["direct"]["rps"])
        verdicts.append(Verdict(
            "gRPC unary through the mesh >= 0.5x direct grpcio calls/s",
            "%.0f vs %.0f calls/s = %.2fx" % (mesh["rps"], grpc["table"]["direct"]["rps"], ratio), ratio >= 0.5,
        ))
    stream = h2.get("grpc_stream")
    if stream:
        mesh = _mesh_entry(stream["table"])
        verdicts.append(Verdict(
            "gRPC server streaming MB/s, mesh vs direct (reported)",
            "%.1f vs %.1f MB/s = %.2fx" % (mesh["rps"], stream["table"]["direct"]["rps"],
                                          _ratio(mesh["rps"], stream["table"]["direct"]["rps"])), None,
        ))
    return verdicts


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _mark(passed: bool | None) -> str:
    return {True: "PASS", False: "MISS", None: "n/a"}[passed]


H2_TITLE = "## HTTP/2 through the mesh"
BURST_TITLE = "## Bursts of new connections"


def _h2_rows(table: dict[str, Any]) -> list[list[str]]:
    direct_rps = table["direct"]["rps"]
    rows = []
    for path, entry in table.items():
        rows.append([path, "%.0f" % entry["rps"], "%.0f .. %.0f" % (min(entry["runs"]), max(entry["runs"])),
                     "%.3f" % (entry["rps"] / direct_rps), _ms(entry["mean"]), _ms(entry["p50"]), _ms(entry["p99"]),
                     "n/a" if entry["proxy_cpu_us"] is None else "%.1f" % entry["proxy_cpu_us"], str(entry["errors"])])
    return rows


def render_h2(h2: dict[str, Any] | str) -> list[str]:
    """The HTTP/2 section (bench/http2.py's results), or the note of why it was not measured."""
    out = [H2_TITLE, ""]
    if isinstance(h2, str):
        return out + [h2, ""]
    out += ["bench/http2.py. HTTP/2 enters the mesh here at a caller's outbound listener (the ingress hands "
            "HTTP/2 to the same H2Proxy), so the mesh has two services: `web`, the app, declared `protocol: grpc`, and "
            "`client`, a placeholder app that lists web as an upstream. The mesh path: h2load -> client's "
            "sidecar (outbound listener, h2c prior knowledge) -> h2 over mTLS (ALPN h2) -> web's sidecar "
            "(inbound) -> the app over h2c. Direct: the same app, its own process, no proxy. Runs "
            "interleaved across the two paths after a warm-up; rps of the median run; latency per request "
            "from h2load's --log-file (closed loop: it grows with the streams in flight); proxy CPU is "
            "user+sys of the two sidecars over all runs divided by the requests served.", ""]
    if h2.get("generated"):
        out += ["Measured separately (`bench/run.py --h2-only`) on %s, mesh code %s; the other sections "
                "are from the run named at the top." % (h2["generated"], h2["code"]), ""]
    for streams, table in h2["h2load"].items():
        out += ["### h2load -c%d -m%s, 13-byte body (nginx h2c, `listen ... http2`)" % (h2["connections"], streams), "",
                "%d runs of %d requests per path, %d connections with up to %s stream(s) in flight on each." % (
                    h2["runs"], h2["requests"], h2["connections"], streams), ""]
        out += _table(["path", "rps", "runs (min .. max)", "x direct", "mean ms", "p50 ms", "p99 ms",
                       "sidecar CPU us/req", "errors"], _h2_rows(table))
    grpc = h2.get("grpc")
    if grpc:
        out += ["### gRPC unary (`recommend.Recommend/ForItem`, demo-services/recommend.py)", "",
                "One grpc.aio client process (one channel: one HTTP/2 connection) makes %d calls with %d in flight, "
                "%d runs per path; the server is grpcio's thread-pool server. Latency per call, client side." % (
                    grpc["calls"], grpc["concurrency"], grpc["runs"]), ""]
        out += _table(["path", "calls/s", "runs (min .. max)", "x direct", "mean ms", "p50 ms", "p99 ms",
                       "sidecar CPU us/call", "errors"], _h2_rows(grpc["table"]))
    stream = h2.get("grpc_stream")
    if stream:
        direct_mbs = stream["table"]["direct"]["rps"]
        out += ["### gRPC server streaming (bench/http2.py `serve-bulk`)", "",
                "One call answered by %d messages of %d bytes (%.0f MiB), %d runs per path; MB/s as the client "
                "received them." % (stream["messages"], stream["message_bytes"],
                                    stream["messages"] * stream["message_bytes"] / MB, stream["runs"]), ""]
        out += _table(["path", "MB/s", "runs (min .. max)", "x direct", "sidecar CPU ms/MB", "errors"], [
            [path, "%.1f" % entry["rps"], "%.1f .. %.1f" % (min(entry["runs"]), max(entry["runs"])), "%.2f" % (entry["rps"] / direct_mbs),
             "n/a" if entry["proxy_cpu_ms_per_mb"] is None else "%.2f" % entry["proxy_cpu_ms_per_mb"], str(entry["errors"])]
            for path, entry in stream["table"].items()])
    if h2.get("codec"):
        out += ["HTTP/2 codec in the sidecars (proxy.h2conn): %s." % h2["codec"], ""]
    http1_cpu = h2.get("http1_cpu_us")
    out += ["### HTTP/2 targets", ""]
    out += _table(["target", "measured", "verdict"],
                  [[v.target, v.measured, _mark(v.passed)] for v in judge_h2_targets(h2, http1_cpu)])
    return out


def replace_section(page: str, section: list[str], before: str | None = None) -> str:
    """`page` with the section titled `section[0]` replaced by `section`, the rest kept as it is.

    A page without that section gets it before the section titled `before`, or at the end.
    """
    lines = page.rstrip("\n").split("\n")
    title = section[0]
    if title in lines:
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    elif before in lines:
        start = end = lines.index(before)  # type: ignore[arg-type]
    else:
        return "\n".join(lines + [""] + section).rstrip() + "\n"
    return "\n".join(lines[:start] + section + lines[end:]).rstrip() + "\n"


def replace_h2_section(page: str, h2: dict[str, Any]) -> str:
    """`page` with its HTTP/2 section replaced by a fresh one (for `run.py --h2-only`)."""
    return replace_section(page, render_h2(h2))


def render_burst(table: dict[str, Any], paths: list[str], params: dict[str, Any], measured_apart: str = "") -> list[str]:
    """Bursts of new connections (bench/burst.py): failures and wall time per concurrency level.

    `measured_apart` names the run when the section was measured alone (`run.py --burst-only`).
    """
    out = [BURST_TITLE, "",
           "bench/burst.py: %d requests per level, each on a new client connection (`connection: close`), "
           "from that many concurrent clients at once (asyncio, two processes), through the ingress to nginx "
           "and through the HAProxy pair to nginx. Failed: any answer but a 200, or a connect, reset or 60 s "
           "timeout on the client's side; wall: first connect to last response. The paths interleave per "
           "level; in `make bench` the bursts come after the runs above, so the proxies' pools are warm." % params["burst_requests"], ""]
    header = ["concurrency"]
    for path in paths:
        header += ["%s failed" % path, "%s wall s" % path]
    rows, reasons = [], []
    for concurrency, entry in table.items():
        row = ["{:,}".format(int(concurrency))]
        for path in paths:
            result = entry[path]
            row += ["{:,} of {:,}".format(result["failed"], result["requests"]), "%.2f" % result["wall_s"]]
            if result["failures"]:
                listed = ", ".join("%s x%d" % item for item in result["failures"].items())
                reasons.append("%s at %s: %s" % (path, concurrency, listed))
        rows.append(row)
    out += _table(header, rows)
    if reasons:
        out += ["Failures: " + "; ".join(reasons) + ".", ""]
    if measured_apart:
        out += ["Measured separately (`bench/run.py --burst-only`, the proxies freshly started, so the first "
                "level also grows their pools) on %s; the other sections are from the run named at the top." % measured_apart, ""]
    return out


def render(results: dict[str, Any], notes: str = "") -> str:
    """The Markdown page; `notes` (bench/hotpath.md: where the time goes, what was tried) goes last."""
    labels = results["labels"]
    paths = [labels["direct"], labels["mesh"], labels["haproxy"]]
    params = results["parameters"]
    out = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (bench/run.py) on %s; do not edit by hand." % results["generated"],
        "Every number comes from one run on the machine below, with everything on 127.0.0.1;",
        "the load generators share the machine's %s cores with the proxies and the app." % results["machine"]["nproc"],
        "",
        "The three paths to the same app (nginx, one worker, keep-alive; bench/nginx-app.sh):",
        "",
        "* **%s**: the client talks to nginx." % labels["direct"],
        "* **%s**: client -> ingress sidecar -> the service's sidecar (inbound) -> nginx, "
        "started by `meshctl up`. Between the sidecars: %s." % (labels["mesh"], results["mesh_tls"]["summary"]),
        "* **%s**: client -> haproxy (plain HTTP in) -> haproxy -> nginx; %s; "
        "`nbthread 1` each, `http-reuse always`." % (labels["haproxy"], results["haproxy_tls"]),
        "",
        "## Machine",
        "",
    ]
    machine = results["machine"]
    out += _table(["what", "value"], [
        ["CPU", "%s (%s cores visible)" % (machine["cpu"], machine["nproc"])],
        ["memory", "%.1f GiB" % (machine["memory"] / 1024 ** 3)],
        ["kernel", machine["kernel"]],
        ["load average before the run", machine["loadavg"] + " (other work on the machine shares the cores)"],
        ["meshctl code", results["versions"]["meshctl"]],
    ])
    out += ["## Versions", ""]
    out += _table(["tool", "version"], [[name, value] for name, value in results["versions"].items() if name != "meshctl"])

    out += ["## Targets", ""]
    out += _table(["target", "measured", "verdict"],
                  [[v.target, v.measured, _mark(v.passed)] for v in judge_targets(results)])

    out += ["## Throughput", "",
            "wrk -t1 -c%d, %d runs of %g s per path after a %g s warm-up, runs interleaved across "
            "paths; rps is the median run. Latency columns are wrk's own (closed loop: they "
            "grow with the queue, see the next section for latency under a fixed load). "
            "CPU per request is user+sys of the two proxy processes over all runs divided by the "
            "requests served (from /proc via psutil)." % (
                params["connections"], params["runs"], params["seconds"], params["warmup"]), ""]
    for body, title in (("small", "13-byte body (`GET /`)"), ("16k", "16 KiB body (`GET /16k`)")):
        table = results["throughput"][body]
        direct_rps = table[labels["direct"]]["rps"]
        rows = []
        for path in paths:
            entry = table[path]
            rows.append([
                path,
                "%.0f" % entry["rps"],
                "%.0f .. %.0f" % (min(entry["runs"]), max(entry["runs"])),
                "%.2f" % (entry["rps"] / direct_rps),
                _ms(entry["p50"]), _ms(entry["p99"]),
                "n/a" if entry["proxy_cpu_us"] is None else "%.1f" % entry["proxy_cpu_us"],
                "%.1f" % entry["app_cpu_us"],
                str(entry["errors"]),
            ])
        out += ["### " + title, ""]
        out += _table(["path", "rps", "runs (min .. max)", "x direct", "p50 ms", "p99 ms",
                       "proxy CPU us/req", "nginx CPU us/req", "errors"], rows)
        mesh_rps, haproxy_rps = table[labels["mesh"]]["rps"], table[labels["haproxy"]]["rps"]
        out += ["mesh / HAProxy: **%.2fx**; mesh / direct: %.2fx." % (mesh_rps / haproxy_rps, mesh_rps / direct_rps), ""]

    lat = results["latency"]
    out += ["## Latency at a constant %d rps" % params["latency_rate"], "",
            "bench/openloop.py: open loop, %d keep-alive connections, %g s after a %g s warm-up; each "
            "latency runs from the request's scheduled send time to the last byte of its response, "
            "so queueing behind a stall is counted (no coordinated omission). Milliseconds." % (
                params["latency_connections"], params["latency_seconds"], params["latency_warmup"]), ""]
    rows = []
    for path in paths:
        entry = lat[path]
        rows.append([path, "%d/%d" % (entry["completed"], entry["sent"]), str(entry["failed"]),
                     _ms(entry["p50"]), _ms(entry["p90"]), _ms(entry["p99"]), _ms(entry["p99.9"]), _ms(entry["max"])])
    out += _table(["path", "completed/sent", "failed", "p50", "p90", "p99", "p99.9", "max"], rows)

    if results.get("burst"):
        out += render_burst(results["burst"], [labels["mesh"], labels["haproxy"]], params)

    mem = results["memory"]
    out += ["## Memory", "",
            "psutil memory_full_info: RSS counts shared pages (the interpreter, uvloop) in every "
            "process; PSS divides them among the processes sharing them. Idle: after start-up, before "
            "any load; under load: the peak sampled every 0.25 s during the throughput runs. MB.", ""]
    rows = []
    for name, entry in list(mem["sidecars"].items()) + list(mem["haproxy"].items()):
        rows.append([name, _mb(entry["idle"]["rss"]), _mb(entry["idle"]["pss"]), _mb(entry["load"]["rss"]), _mb(entry["load"]["pss"])])
    out += _table(["process", "idle RSS", "idle PSS", "load RSS", "load PSS"], rows)
    fleet = mem.get("fleet")
    if fleet:
        out += ["In the %d-instance mesh below, the %d sidecars (ingress included) take %.1f MB PSS in all, "
                "%.1f MB each on average (RSS %.1f MB each)." % (
                    fleet["instances"], fleet["sidecars"], fleet["pss_total"] / MB,
                    fleet["pss_total"] / MB / fleet["sidecars"], fleet["rss_total"] / MB / fleet["sidecars"]), ""]

    start = results["startup"]
    out += ["## Start-up", "",
            "A sidecar's own start (spawn to the ACK of its first config) is not visible from "
            "outside, so two things are measured instead:", "",
            "* the interpreter part: `python -c 'import uvloop, proxy.__main__'` (every module the "
            "sidecar loads before it reads its config), median of %d runs, against `python -c pass`;" % start["import_runs"],
            "* the whole: wall time of `meshctl up` (agent start, apps, sidecars, readiness probes with "
            "the default 200 ms period, until `up` returns with every instance ready) of a mesh of N "
            "replicas of `python -m http.server`, plus the ingress sidecar.", ""]
    out += _table(["measured", "seconds"], [
        ["`python -c pass`", "%.3f" % start["python_bare"]],
        ["`python -c 'import uvloop, proxy.__main__'`", "%.3f" % start["python_import_proxy"]],
    ] + [["`meshctl up`, %s instance(s)" % n, "%.2f" % entry["seconds"]] for n, entry in start["up"].items()])

    obs = results.get("observability")
    if obs:
        base = next(iter(obs.values()))
        out += ["## Cost of observability", "",
                "One-instance meshes that differ only in their `observability` key, each the same "
                "two-sidecar path as above, wrk -t1 -c%d, %d interleaved runs of %g s each. With "
                "`metrics: false` the sidecars record no request metrics (Observer.exchange_done skips "
                "the registry; with sampling 0 as well the hook is not called at all); `access_log: on` "
                "sends every request's access line to the agent, in batches (one message per 0.1 s or 256 lines); "
                "`why: off` keeps no decision records (the default keeps them for failed and `x-mesh-debug` "
                "requests only, meshctl/proxy/decisions.py) and `why: all` keeps one for every request." % (params["connections"], params["runs"], params["seconds"]), ""]
        rows = []
        for name, entry in obs.items():
            rows.append([name, "%.0f" % entry["rps"], "%.0f .. %.0f" % (min(entry["runs"]), max(entry["runs"])),
                         "%.2f" % (entry["rps"] / base["rps"]), "%.1f" % entry["proxy_cpu_us"], str(entry["errors"])])
        out += _table(["mesh", "rps", "runs (min .. max)", "x defaults", "sidecar CPU us/req", "errors"], rows)
        out += render_why(results, params)

    control = results.get("control_plane")
    if control:
        prop, rot = control["propagation"], control["rotation"]
        out += ["## Control plane", "",
                "bench/controlplane.py: a mesh of %d instances (web v1 and v2, %d `caller` replicas with "
                "web as an upstream), %d sidecars with the ingress. Requests go to the agent's control "
                "socket directly (no CLI start-up in the figures)." % (control["instances"], control["instances"] - 2, control["sidecars"]), "",
                "* Route-change propagation: `route-split` of web with `wait: true` answers when every sidecar "
                "that routes to web (%d..%d of them ACKed each change) has ACKed the new snapshot; time from "
                "sending the op to that answer, %d changes with different weights: **p50 %s ms, p99 %s ms, "
                "max %s ms**; %d sidecars NACKed or stayed stale." % (
                    prop["acked_min"], prop["acked_max"], prop["changes"], _ms(prop["p50"]), _ms(prop["p99"]),
                    _ms(prop["max"]), prop["problems"]),
                "* Certificate rotation (`meshctl certs rotate`: every leaf reissued, pushed and ACKed): %s s; "
                "CA rotation (`meshctl certs rotate --ca`: the three ACKed phases): %s s (each run in order)." % (
                    ", ".join("%.2f" % t for t in rot["leaves"]), ", ".join("%.2f" % t for t in rot["ca"])),
                ""]
    if results.get("h2"):
        out += render_h2(results["h2"])

    prof = results["profile"]
    out += ["## Profile of the service's sidecar", "",
            "py-spy record --nonblocking at %d Hz for %g s on the server-side sidecar (the service's "
            "inbound) while wrk -t1 -c%d drove the mesh path with the small body (%.0f rps during "
            "the profile). %d busy samples; idle time in the event loop is not sampled. "
            "Own: samples with the function innermost; total: with it anywhere on the stack. "
            "Functions are named with their file. py-spy sees Python frames only: time in uvloop's C "
            "code (socket reads and writes, epoll dispatch, callback scheduling) is charged to the "
            "innermost Python caller, so `transport.write` shows inside the function that calls it, "
            "and the loop's own C work shows as `main (meshctl/proxy/__main__.py)`, which runs the loop." % (
                prof["rate"], prof["seconds"], params["connections"], prof["rps"], prof["samples"]), ""]
    rows = []
    for fn in prof["top"]:
        rows.append(["`%s`" % fn["function"], "%.1f%%" % (100.0 * fn["own"] / prof["samples"]),
                     "%.1f%%" % (100.0 * fn["total"] / prof["samples"])])
    out += _table(["function", "own", "total"], rows)
    if notes:
        out += [notes.strip(), ""]
    return "\n".join(out).rstrip() + "\n"
