"""meshctl's benchmark: the mesh's two-sidecar path against nginx direct and an HAProxy pair.

    python bench/run.py --quick     # ~15 s: small-body throughput on the three paths, printed
    python bench/run.py             # a few minutes: everything, written to docs/benchmarks.md

Steps: start nginx (direct), an HAProxy pair in front of it, and a one-instance mesh around
its own nginx; measure idle memory; interleaved wrk runs (CPU per request and peak memory
alongside); open-loop latency at a constant rate; a py-spy profile of the service's
sidecar under wrk; the cost of observability (meshes: defaults, metrics off, why records off, access
log on; interleaved wrk runs); the control plane (bench/controlplane.py: route-change
propagation in a 20-instance mesh, certificate rotations); HTTP/2 and gRPC through the
mesh against direct (bench/http2.py: h2load, grpc.aio); then the start-up timings
(`meshctl up` of 1, 10 and 50 instances).
`--h2-only` runs just the HTTP/2 part and replaces that section of docs/benchmarks.md.
Every process started here is stopped on the way out (also on Ctrl-C, SIGTERM or SIGHUP),
and the temp dir is removed (kept, for its logs and configs, when BENCH_KEEP_TMP is set).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

import burst
import controlplane
import http2
import pyspy
import report
import targets
import wrk
from procs import BenchError, PeakMemory, cpu_seconds, exit_on_termination, memory

REPO = os.path.dirname(targets.BENCH_DIR)
PACKAGES = ("meshctl",)  # the agent and the sidecar live inside it
BODIES = {"small": "/", "16k": "/16k"}


def throughput(paths: list[targets.Target], body: str, runs: int, seconds: float, warmup: float, connections: int) -> dict[str, Any]:
    """Interleaved wrk runs; CPU of the proxies and of the app over the measured runs."""
    path_url = BODIES[body]
    for target in paths:
        wrk.run("http://127.0.0.1:%d%s" % (target.port, path_url), warmup, connections)
    measured: dict[str, list[wrk.WrkResult]] = {target.name: [] for target in paths}
    cpu: dict[str, list[float]] = {target.name: [0.0, 0.0] for target in paths}
    for _ in range(runs):
        for target in paths:
            before = cpu_seconds(target.proxy_pids), cpu_seconds(target.app_pids)
            result = wrk.run("http://127.0.0.1:%d%s" % (target.port, path_url), seconds, connections)
            after = cpu_seconds(target.proxy_pids), cpu_seconds(target.app_pids)
            cpu[target.name][0] += after[0] - before[0]
            cpu[target.name][1] += after[1] - before[1]
            measured[target.name].append(result)
    table = {}
    for target in paths:
        results = measured[target.name]
        requests = sum(r.requests for r in results)
        median = sorted(results, key=lambda r: r.rps)[len(results) // 2]
        table[target.name] = {
            "rps": statistics.median(r.rps for r in results),
            "runs": [r.rps for r in results],
            "requests": requests,
            "errors": sum(r.errors for r in results),
            "p50": median.latency_p50,
            "p99": median.latency_p99,
            "proxy_cpu_us": cpu[target.name][0] / requests * 1e6 if target.proxy_pids else None,
            "app_cpu_us": cpu[target.name][1] / requests * 1e6,
        }
    return table


def latency(target: targets.Target, rate: float, seconds: float, warmup: float, connections: int) -> dict[str, Any]:
    argv = [sys.executable, os.path.join(targets.BENCH_DIR, "openloop.py"), "--port", str(target.port),
            "--rate", str(rate), "--seconds", str(seconds), "--warmup", str(warmup), "--connections", str(connections)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + warmup + 60, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise BenchError("openloop.py failed: %s" % done.stderr[-1000:])
    return json.loads(done.stdout)


def bursts(paths: list[targets.Target], levels: list[int], requests: int) -> dict[str, Any]:
    """bench/burst.py per concurrency level and path, interleaved: {concurrency: {path: result}}."""
    table: dict[str, Any] = {}
    for concurrency in levels:
        table[str(concurrency)] = {}
        for target in paths:
            result = burst.run_burst("127.0.0.1", target.port, requests, concurrency)
            table[str(concurrency)][target.name] = result
            print("  -c%-5d %-40s %5d of %d failed  %.2f s" % (concurrency, target.name, result["failed"], requests, result["wall_s"]), flush=True)
    return table


def profile(target: targets.Target, service_sidecar: int, seconds: float, connections: int, workdir: str, rate: int = 250) -> dict[str, Any]:
    out_path = os.path.join(workdir, "pyspy.raw")
    recorder = pyspy.record(service_sidecar, seconds, out_path, rate)
    try:
        result = wrk.run("http://127.0.0.1:%d/" % target.port, seconds + 1, connections)
        _, stderr = recorder.communicate(timeout=seconds + 30)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    if recorder.returncode != 0 or not os.path.exists(out_path):
        raise BenchError("py-spy failed: %s" % stderr[-1000:])
    with open(out_path) as raw:
        prof = pyspy.aggregate(raw.read())
    return {
        "rate": rate,
        "seconds": seconds,
        "rps": result.rps,
        "samples": prof.samples,
        "top": [{"function": f.function, "own": f.own, "total": f.total} for f in prof.functions[:15]],
    }


DEFAULTS_LABEL = "defaults (metrics on, access log off, sampling 0.01)"
WHY_LABELS = {"off": "why records off (observability.why: off)", "errors": DEFAULTS_LABEL,
              "all": "why records for every request (observability.why: all)"}
OBSERVABILITY_VARIANTS = {
    DEFAULTS_LABEL: None,
    "metrics off": {"metrics": False},
    "access log on (every request)": {"access_log": "on"},
    WHY_LABELS["off"]: {"why": "off"},
    WHY_LABELS["all"]: {"why": "all"},
}
ENGINE_ROUNDS = 2  # each figure is the minimum of its rounds: the modes interleave, so load bursts hit them alike
ENGINES = (  # bench/engine*.py runs for the why costs: ~15 s of CPU in all
    ["engine.py", "--requests", "1000", "--batches", "15"],
    ["engine_h2.py", "--streams", "1000", "--batches", "15"],
)


def observability_costs(workdir: str, params: dict[str, Any]) -> dict[str, Any]:
    """One-instance meshes differing only in their observability key, measured interleaved."""
    with contextlib.ExitStack() as stack:
        paths = []
        for index, (label, observability) in enumerate(OBSERVABILITY_VARIANTS.items()):
            run = stack.enter_context(targets.mesh(workdir, [targets.NGINX_APP], name="bench-obs%d" % index, observability=observability))
            target = targets.mesh_target(run)
            target.name = label
            paths.append(target)
        return throughput(paths, "small", params["runs"], params["seconds"], params["warmup"], params["connections"])


def why_engines() -> dict[str, dict[str, float]]:
    """Python CPU per request (us) of the sidecar's engines in each `observability.why` mode: {mode: {engine: us}}.

    Interleaved by mode, in ENGINE_ROUNDS rounds (the minimum kept); bench/engine.py gives the
    ingress and inbound HTTP/1.1 figures, bench/engine_h2.py the HTTP/2 one. They run the
    working tree's code (also with --ref).
    """
    figures: dict[str, dict[str, float]] = {mode: {} for mode in WHY_LABELS}
    for _ in range(ENGINE_ROUNDS):
        for script, *options in ENGINES:
            for mode in WHY_LABELS:
                argv = [sys.executable, os.path.join(targets.BENCH_DIR, script), *options, "--why", mode]
                done = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
                if done.returncode != 0:
                    raise BenchError("%s failed: %s" % (script, done.stderr[-1000:]))
                for line in done.stdout.splitlines():
                    name, value, *_ = line.split()
                    figures[mode][name] = min(float(value), figures[mode].get(name, float("inf")))
    return figures


def _timed(argv: list[str], runs: int, cwd: str) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, cwd=cwd, stdin=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def startup(workdir: str, sizes: list[int], source: str) -> dict[str, Any]:
    runs = 7
    result: dict[str, Any] = {
        "import_runs": runs,
        "python_bare": _timed([sys.executable, "-c", "pass"], runs, source),
        "python_import_proxy": _timed([sys.executable, "-c", "import uvloop, meshctl.proxy.__main__"], runs, source),
        "up": {},
    }
    fleet = None
    command = [sys.executable, "-m", "http.server", "$PORT", "--bind", "127.0.0.1"]
    for n in sizes:
        with targets.mesh(workdir, command, replicas=n, name="bench-up-%d" % n) as m:
            result["up"][str(n)] = {"seconds": m.up_seconds}
            if n == max(sizes):
                sidecars = [inst["sidecar_pid"] for inst in m.status["instances"]] + [m.status["ingress"]["sidecar_pid"]]
                mems = [memory(pid) for pid in sidecars]
                fleet = {"instances": n, "sidecars": len(sidecars), "pss_total": sum(x.pss for x in mems), "rss_total": sum(x.rss for x in mems)}
        print("  meshctl up of %d instance(s): %.2f s" % (n, result["up"][str(n)]["seconds"]), flush=True)
    return {"startup": result, "fleet": fleet}


def _version(argv: list[str], pattern: str = r"[\d]+\.[\d.]+\S*") -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except OSError:
        return "not installed"
    match = re.search(pattern, done.stdout + done.stderr)
    return match.group(0) if match else (done.stdout + done.stderr).strip()[:60]


def export_ref(ref: str, workdir: str) -> str:
    """Copy the mesh's packages at `ref` into workdir/src and make every child import them.

    Others may be editing the tree mid-way; `--ref HEAD` benchmarks the last commit instead.
    PYTHONPATH reaches `meshctl`, the agent and, through the agent's environment, the sidecars.
    """
    source = os.path.join(workdir, "src")
    os.mkdir(source)
    archive = subprocess.run(["git", "archive", ref, *PACKAGES], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        raise BenchError("git archive %s failed: %s" % (ref, archive.stderr.decode(errors="replace")))
    subprocess.run(["tar", "-x", "-C", source], input=archive.stdout, check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    return source


def code_version(ref: str | None) -> str:
    if ref:
        commit = subprocess.run(["git", "rev-parse", "--short", ref], capture_output=True, text=True, cwd=REPO).stdout.strip()
        return "%s (`--ref %s`: the committed code, exported)" % (commit, ref)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *PACKAGES], capture_output=True, text=True, cwd=REPO).stdout.strip()
    return "%s%s" % (commit or "unknown", " + uncommitted changes (working tree)" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" without one)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def machine_and_versions(ref: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    cpu = cpu_model()
    machine = {"nproc": os.cpu_count(), "cpu": cpu, "memory": psutil.virtual_memory().total,
               "kernel": "%s %s" % (platform.system(), platform.release()),
               "loadavg": "%.2f %.2f %.2f" % os.getloadavg()}
    try:
        import uvloop
        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "not installed (plain asyncio)"
    versions = {
        "meshctl": code_version(ref),
        "python": platform.python_version(),
        "uvloop": uvloop_version,
        "haproxy": _version(["haproxy", "-v"]),
        "OpenSSL (haproxy)": _version(["haproxy", "-vv"], r"(?<=Running on OpenSSL version : OpenSSL )\S+"),
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "-v"], r"\d+\.\d+\.\d+\S*"),
        "h2load": _version(["h2load", "--version"]),
        "py-spy": _version([pyspy.py_spy(), "--version"]),
    }
    return machine, versions


def _tls_summary(notes: dict[str, Any]) -> str:
    if notes["tls"]:
        return "TLS (status reports it: %s; inbound answers a ClientHello: %s)" % (notes["status_reports_tls"], notes["inbound_speaks_tls"])
    return "plaintext HTTP/1.1 (meshctl's sidecar-to-sidecar mTLS is not in this build: status reports no TLS and the inbound port does not answer a TLS ClientHello)"


def _print_quick(table: dict[str, Any], labels: dict[str, str], notes: dict[str, Any]) -> None:
    width = max(len(name) for name in table)
    for name, entry in table.items():
        cpu = "" if entry["proxy_cpu_us"] is None else "  proxies %.1f us CPU/req" % entry["proxy_cpu_us"]
        print("%-*s %9.0f rps  errors %d%s" % (width, name, entry["rps"], entry["errors"], cpu))
    mesh, haproxy, direct = (table[labels[key]]["rps"] for key in ("mesh", "haproxy", "direct"))
    print("mesh/direct %.2fx   mesh/haproxy %.2fx" % (mesh / direct, mesh / haproxy))
    print("between sidecars: %s" % _tls_summary(notes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small-body throughput only, printed; ~15 s")
    parser.add_argument("--output", default=os.path.join(REPO, "docs", "benchmarks.md"))
    parser.add_argument("--seconds", type=float, help="per wrk run [3 quick, 5 full]")
    parser.add_argument("--runs", type=int, help="wrk runs per path [1 quick, 3 full]")
    parser.add_argument("--ref", help="benchmark the mesh code of this git ref (e.g. HEAD) instead of the working tree")
    parser.add_argument("--up-sizes", default="1,10,50", help="instances for the `meshctl up` timings")
    parser.add_argument("--json", help="also write the raw results here (bench/report.py can render them again)")
    parser.add_argument("--extras-only", action="store_true", help="only the observability costs and the control plane, printed as JSON")
    parser.add_argument("--h2-only", action="store_true",
                        help="only HTTP/2 and gRPC through the mesh vs direct; replaces that section of --output")
    parser.add_argument("--burst-only", action="store_true",
                        help="only the bursts of new connections, mesh vs HAProxy; replaces that section of --output")
    parser.add_argument("--h2-requests", type=int, default=20_000, help="requests per h2load run")
    parser.add_argument("--route-changes", type=int, default=200, help="route changes timed in the control-plane step")
    args = parser.parse_args(argv)
    exit_on_termination()
    seconds = args.seconds or (3.0 if args.quick else 5.0)
    runs = args.runs or (1 if args.quick else 3)
    params = {"connections": 32, "runs": runs, "seconds": seconds, "warmup": 1.0,
              "latency_rate": 1000, "latency_seconds": 10.0, "latency_warmup": 2.0, "latency_connections": 32,
              "burst_requests": 4000, "burst_levels": [500, 1000, 2000]}

    workdir = tempfile.mkdtemp(prefix="meshctl-bench-")
    try:
        return _bench(args, params, workdir)
    except BenchError as exc:
        print("bench: %s" % exc, file=sys.stderr)
        return 1
    finally:
        if os.environ.get("BENCH_KEEP_TMP"):
            print("kept %s" % workdir, file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _h2_only(args: argparse.Namespace, workdir: str) -> int:
    """Measure HTTP/2 and gRPC only and splice the section into the existing page, keeping its other figures."""
    measured = http2.measure(workdir, args.h2_requests, args.runs or 3)
    measured["code"] = code_version(args.ref)
    measured["generated"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = open(args.output).read() if os.path.exists(args.output) else "# Benchmarks\n"
    with open(args.output, "w") as out:
        out.write(report.replace_h2_section(page, measured))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(measured, out, indent=1)
    print("wrote the HTTP/2 section of %s" % args.output)
    return 0


def _burst_only(args: argparse.Namespace, params: dict[str, Any], workdir: str) -> int:
    """Measure the bursts only and splice their section into the existing page, keeping its other figures."""
    with contextlib.ExitStack() as stack:
        direct = stack.enter_context(targets.nginx_app(workdir))
        haproxy = stack.enter_context(targets.haproxy_pair(workdir, direct.port))
        mesh = targets.mesh_target(stack.enter_context(targets.mesh(workdir, [targets.NGINX_APP])))
        measured = bursts([mesh, haproxy], params["burst_levels"], params["burst_requests"])
    when = "%s, mesh code %s" % (datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), code_version(args.ref))
    page = open(args.output).read() if os.path.exists(args.output) else "# Benchmarks\n"
    section = report.render_burst(measured, [mesh.name, haproxy.name], params, measured_apart=when)
    with open(args.output, "w") as out:
        out.write(report.replace_section(page, section, before="## Memory"))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(measured, out, indent=1)
    print("wrote the burst section of %s" % args.output)
    return 0


def _bench(args: argparse.Namespace, params: dict[str, Any], workdir: str) -> int:
    results: dict[str, Any] = {"parameters": params}
    source = export_ref(args.ref, workdir) if args.ref else REPO
    print("mesh code: %s" % code_version(args.ref), flush=True)
    if args.h2_only:
        return _h2_only(args, workdir)
    if args.burst_only:
        return _burst_only(args, params, workdir)
    machine, versions = machine_and_versions(args.ref)  # the load average before the bench's own load
    with contextlib.ExitStack() as stack:
        direct = stack.enter_context(targets.nginx_app(workdir))
        haproxy = stack.enter_context(targets.haproxy_pair(workdir, direct.port))
        mesh_run = stack.enter_context(targets.mesh(workdir, [targets.NGINX_APP]))
        mesh = targets.mesh_target(mesh_run)
        paths = [direct, mesh, haproxy]
        labels = {"direct": direct.name, "mesh": mesh.name, "haproxy": haproxy.name}
        results["labels"] = labels
        results["mesh_tls"] = {**mesh.notes, "summary": _tls_summary(mesh.notes)}
        results["haproxy_tls"] = haproxy.notes["tls"]

        if args.extras_only:
            print(json.dumps({"observability": observability_costs(workdir, params), "why_engines": why_engines(),
                              "control_plane": controlplane.measure(workdir, 20, args.route_changes)}, indent=1))
            return 0

        if args.quick:
            print("wrk -t1 -c%d -d%gs, small body" % (params["connections"], params["seconds"]), flush=True)
            table = throughput(paths, "small", params["runs"], params["seconds"], params["warmup"], params["connections"])
            _print_quick(table, labels, mesh.notes)
            return 0

        sidecar_names = {mesh.proxy_pids[0]: "sidecar (ingress)", mesh.proxy_pids[1]: "sidecar (service inbound)"}
        haproxy_names = {haproxy.proxy_pids[0]: "haproxy (client side)", haproxy.proxy_pids[1]: "haproxy (server side)"}
        idle = {pid: memory(pid) for pid in list(sidecar_names) + list(haproxy_names)}

        results["throughput"] = {}
        with PeakMemory(list(idle)) as peaks:
            for body in BODIES:
                print("throughput, %s body ..." % body, flush=True)
                results["throughput"][body] = throughput(paths, body, params["runs"], params["seconds"], params["warmup"], params["connections"])
                for name, entry in results["throughput"][body].items():
                    print("  %-40s %9.0f rps" % (name, entry["rps"]), flush=True)

        def mem_entry(pid: int) -> dict[str, Any]:
            return {"idle": vars(idle[pid]), "load": vars(peaks.peaks[pid])}

        results["memory"] = {
            "sidecars": {name: mem_entry(pid) for pid, name in sidecar_names.items()},
            "haproxy": {name: mem_entry(pid) for pid, name in haproxy_names.items()},
        }

        print("latency at %d rps ..." % params["latency_rate"], flush=True)
        results["latency"] = {}
        for target in paths:
            results["latency"][target.name] = latency(target, params["latency_rate"], params["latency_seconds"],
                                                      params["latency_warmup"], params["latency_connections"])
            print("  %-40s p99 %.2f ms" % (target.name, results["latency"][target.name]["p99"] * 1e3), flush=True)

        print("profile of the service's sidecar ...", flush=True)
        results["profile"] = profile(mesh, mesh.proxy_pids[1], 10.0, params["connections"], workdir)

        print("bursts of new connections, %d requests per level ..." % params["burst_requests"], flush=True)
        results["burst"] = bursts([mesh, haproxy], params["burst_levels"], params["burst_requests"])

    print("observability on/off ...", flush=True)
    results["observability"] = observability_costs(workdir, params)
    for name, entry in results["observability"].items():
        print("  %-55s %9.0f rps  %.1f us CPU/req" % (name, entry["rps"], entry["proxy_cpu_us"]), flush=True)
    results["why_labels"] = WHY_LABELS
    results["why_engines"] = why_engines()
    for mode, engines in results["why_engines"].items():
        print("  engines, why: %-6s %s" % (mode, "  ".join("%s %.2f us" % item for item in engines.items())), flush=True)

    print("control plane (20 instances) ...", flush=True)
    results["control_plane"] = controlplane.measure(workdir, 20, args.route_changes)
    prop = results["control_plane"]["propagation"]
    print("  route change to every sidecar: p50 %.1f ms, p99 %.1f ms" % (prop["p50"] * 1e3, prop["p99"] * 1e3), flush=True)

    print("HTTP/2 and gRPC ...", flush=True)
    results["h2"] = http2.measure(workdir, args.h2_requests, params["runs"])
    # Issue #17's CPU target compares with the HTTP/1.1 path of this same run.
    results["h2"]["http1_cpu_us"] = results["throughput"]["small"][mesh.name]["proxy_cpu_us"]

    print("start-up ...", flush=True)
    sizes = [int(n) for n in args.up_sizes.split(",") if n]
    started = startup(workdir, sizes, source)
    results["startup"] = started["startup"]
    results["memory"]["fleet"] = started["fleet"]
    results["machine"], results["versions"] = machine, versions
    results["generated"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    notes_path = os.path.join(targets.BENCH_DIR, "hotpath.md")
    notes = open(notes_path).read() if os.path.exists(notes_path) else ""
    text = report.render(results, notes)
    with open(args.output, "w") as out:
        out.write(text)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    print("wrote %s" % args.output)
    for verdict in report.judge_targets(results):
        print("  %-4s %s: %s" % ({True: "PASS", False: "MISS", None: "n/a"}[verdict.passed], verdict.target, verdict.measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
