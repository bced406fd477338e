"""HTTP/2 through the mesh against direct: h2load against an h2c nginx, and gRPC unary calls.

HTTP/2 enters the mesh here at a caller's outbound listener (the ingress hands HTTP/2 to the same H2Proxy),
so the mesh here has two services: `web`, the h2c app, declared `protocol: grpc` (h2c
prior knowledge on the outbound listener, h2 over mTLS between the sidecars, h2c to the
app; an `http` service would reach its app over HTTP/1.1, which an h2c-only nginx does not
speak), and `client`, a placeholder app whose sidecar gives it an outbound port for web.

* h2load: `h2load -n N -c 16 -m M` (prior-knowledge h2c) against nginx direct and against
  client's outbound port for web, runs interleaved; per-request latencies from h2load's
  --log-file; CPU of the two sidecars per request from /proc.
* gRPC: N unary `recommend.Recommend/ForItem` calls with C in flight from one grpc.aio
  client process, against demo-services/recommend.py direct and through the mesh.
* gRPC server streaming: one call answered by BULK_MESSAGES messages of BULK_MESSAGE_BYTES
  (a grpcio server of this file, `serve-bulk`), MB/s received by the client, direct and
  through the mesh.

    python bench/http2.py                 # all three, printed as JSON
    python bench/http2.py serve-nginx     # the h2c app (reads PORT and BENCH_TMP), used by the above
    python bench/http2.py serve-bulk      # the streaming gRPC app (reads PORT), used by the above
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import targets
from procs import BenchError, cpu_seconds, exit_on_termination, free_port, group_pids, spawned

H2_SCRIPT = os.path.abspath(__file__)
RECOMMEND = os.path.join(os.path.dirname(targets.BENCH_DIR), "demo-services", "recommend.py")
CONNECTIONS = 16
STREAMS = (10, 1)
BULK_MESSAGES = 4096
BULK_MESSAGE_BYTES = 16 * 1024  # 64 MiB per streaming call

_NGINX_H2C = """\
{user_line}
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    http2_max_concurrent_streams 128;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} http2;
        location = / {{ default_type text/plain; return 200 "hello, mesh!\\n"; }}
    }}
}}
"""


def serve_nginx() -> None:
    """Exec nginx serving h2c (prior knowledge) on 127.0.0.1:$PORT: GET / -> a 13-byte body."""
    directory = tempfile.mkdtemp(prefix="nginx-h2c.", dir=os.environ.get("BENCH_TMP") or None)
    os.mkdir(os.path.join(directory, "tmp"))
    # Started by root, nginx's worker would run as nobody and could not read a private temp dir.
    user_line = "user root;" if os.getuid() == 0 else ""
    config = os.path.join(directory, "nginx.conf")
    with open(config, "w") as out:
        out.write(_NGINX_H2C.format(user_line=user_line, dir=directory, port=os.environ["PORT"]))
    os.execvp("nginx", ["nginx", "-c", config, "-p", directory, "-g", "daemon off;"])


def serve_bulk() -> None:
    """A grpcio server on 127.0.0.1:$PORT whose `bench.Bulk/Stream` answers count messages of size bytes."""
    from concurrent import futures

    import grpc

    def stream(request: bytes, context: Any) -> Iterator[bytes]:
        count, size = (int(part) for part in request.split(b","))
        message = b"b" * size
        for _ in range(count):
            yield message

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    identity = {"request_deserializer": None, "response_serializer": None}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Bulk", {"Stream": grpc.unary_stream_rpc_method_handler(stream, **identity)}),))
    server.add_insecure_port("127.0.0.1:%s" % os.environ["PORT"])
    server.start()
    server.wait_for_termination()


def _wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError("%s exited with %s before listening on %d" % (proc.args, proc.returncode, port))
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        time.sleep(0.02)
    raise BenchError("nothing listens on port %d after %.0f s" % (port, timeout))


@contextlib.contextmanager
def direct_app(workdir: str, command: list[str], name: str) -> Iterator[targets.Target]:
    port = free_port()
    env = {"PORT": str(port), "BENCH_TMP": workdir}
    with spawned(command, env=env, log_path=os.path.join(workdir, "%s-direct.log" % name)) as proc:
        _wait_for_port(port, proc)
        yield targets.Target("direct", port, app_pids=group_pids(proc.pid))


def caller_manifest(name: str, app_command: list[str], ingress_port: int, workdir: str) -> str:
    """web (the h2 app, `protocol: grpc`, TCP health) and client (a placeholder listing web as an upstream)."""
    env = {"BENCH_TMP": workdir}
    placeholder = [sys.executable, "-m", "http.server", "$PORT", "--bind", "127.0.0.1"]
    manifest = {
        "mesh": name,
        "workdir": workdir,
        "services": {
            "web": {"command": app_command, "protocol": "grpc", "env": env},
            "client": {"command": placeholder, "upstreams": ["web"]},
        },
        "ingress": {"port": ingress_port, "routes": [{"path": "/", "service": "client"}]},
    }
    return json.dumps(manifest, indent=2) + "\n"


@contextlib.contextmanager
def mesh_app(workdir: str, app_command: list[str], name: str) -> Iterator[targets.Target]:
    """The path client app -> client's sidecar (outbound) -> mTLS h2 -> web's sidecar -> web."""
    text = caller_manifest(name, app_command, free_port(), workdir)
    with targets.mesh_from_manifest(workdir, text, name, 30) as m:
        by_service = {inst["service"]: inst for inst in m.status["instances"]}
        client, web = by_service["client"], by_service["web"]
        tls = targets.mesh_tls(m.status, web["inbound_port"])
        label = "mesh (h2, mTLS between sidecars)" if tls["tls"] else "mesh (h2, plaintext between sidecars)"
        yield targets.Target(label, client["outbound_ports"]["web"], proxy_pids=[client["sidecar_pid"], web["sidecar_pid"]],
                             app_pids=group_pids(web["pid"]), notes=tls)


def parse_h2load(text: str) -> dict[str, Any]:
    """Requests, seconds, rps and failures from h2load's text report."""
    result: dict[str, Any] = {}
    for line in text.splitlines():
        words = line.replace(",", "").split()
        if line.startswith("finished in"):
            result["seconds"] = float(words[2].rstrip("ms")) / (1000.0 if words[2].endswith("ms") else 1.0)
            result["rps"] = float(words[3])
        elif line.startswith("requests:"):
            counts = dict(zip(words[2::2], (int(w) for w in words[1::2])))
            result["requests"] = counts["succeeded"] + counts["failed"]
            result["succeeded"] = counts["succeeded"]
            result["errors"] = counts["failed"] + counts["errored"] + counts["timeout"]  # failed: not 2xx/3xx
            result["started"] = counts["total"]
    if "rps" not in result or "requests" not in result:
        raise BenchError("h2load printed no summary: %s" % text[-1000:])
    return result


def latencies_from_log(path: str) -> list[float]:
    """Seconds per request from h2load's --log-file (start us, status, elapsed us per line)."""
    with open(path) as log:
        return sorted(int(line.split()[2]) / 1e6 for line in log if line.strip())


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def h2load(port: int, requests: int, streams: int, workdir: str) -> dict[str, Any]:
    if shutil.which("h2load") is None:
        raise BenchError("h2load is not installed (make bench-deps: nghttp2-client)")
    log_path = os.path.join(workdir, "h2load.log")
    argv = ["h2load", "-n", str(requests), "-c", str(CONNECTIONS), "-m", str(streams), "--log-file", log_path,
            "http://127.0.0.1:%d/" % port]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise BenchError("h2load failed (%d): %s" % (done.returncode, (done.stdout + done.stderr)[-1000:]))
    result = parse_h2load(done.stdout)
    ordered = latencies_from_log(log_path)
    os.unlink(log_path)
    result.update(mean=statistics.fmean(ordered) if ordered else None, p50=_percentile(ordered, 0.5), p99=_percentile(ordered, 0.99))
    return result


def interleaved_table(
    paths: list[targets.Target], runs: int, run_one: Callable[[targets.Target], dict[str, Any]],
    row: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """`runs` rounds of `run_one` over every path in turn; per path `row(median run)` plus the
    rps of every run, errors and requests over all runs, and the sidecars' CPU per request."""
    measured: dict[str, list[dict[str, Any]]] = {t.name: [] for t in paths}
    cpu = {t.name: 0.0 for t in paths}
    for _ in range(runs):
        for target in paths:
            before = cpu_seconds(target.proxy_pids)
            measured[target.name].append(run_one(target))
            cpu[target.name] += cpu_seconds(target.proxy_pids) - before
    table = {}
    for target in paths:
        results = measured[target.name]
        served = sum(r["requests"] for r in results)
        median = sorted(results, key=lambda r: r["rps"])[len(results) // 2]
        table[target.name] = {
            **row(median), "runs": [r["rps"] for r in results], "errors": sum(r["errors"] for r in results),
            "requests": served, "proxy_cpu_us": cpu[target.name] / served * 1e6 if target.proxy_pids and served else None,
        }
    return table


def h2load_table(paths: list[targets.Target], requests: int, streams: int, runs: int, workdir: str) -> dict[str, Any]:
    """Interleaved h2load runs per path after a warm-up; rps of the median run, CPU over all runs."""
    for target in paths:
        h2load(target.port, max(1000, requests // 10), streams, workdir)
    return interleaved_table(
        paths, runs, lambda target: h2load(target.port, requests, streams, workdir),
        lambda median: {key: median[key] for key in ("rps", "mean", "p50", "p99")},
    )


GRPC_CLIENT = r'''
import asyncio, json, sys, time
import grpc

async def main(port, calls, concurrency):
    async with grpc.aio.insecure_channel("127.0.0.1:%d" % port) as channel:
        method = channel.unary_unary("/recommend.Recommend/ForItem",
                                     request_serializer=lambda b: b, response_deserializer=lambda b: b)
        await method(b"mug-01", timeout=10)
        latencies, errors = [], 0
        remaining = iter(range(calls))

        async def worker():
            nonlocal errors
            for _ in remaining:
                started = time.perf_counter()
                try:
                    await method(b"mug-01", timeout=10)
                    latencies.append(time.perf_counter() - started)
                except grpc.aio.AioRpcError:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    print(json.dumps({"seconds": elapsed, "latencies": latencies, "errors": errors}))

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
'''


def _client_json(script: str, args: list[int], what: str, timeout: float) -> dict[str, Any]:
    """Run a client `script` (its own process, so it does not share this one's CPU) and read its JSON line."""
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise BenchError("the %s failed: %s" % (what, done.stderr[-1000:]))
    return json.loads(done.stdout)


def grpc_run(port: int, calls: int, concurrency: int) -> dict[str, Any]:
    raw = _client_json(GRPC_CLIENT, [port, calls, concurrency], "grpc client", 300)
    ordered = sorted(raw["latencies"])
    return {"rps": len(ordered) / raw["seconds"], "requests": len(ordered) + raw["errors"], "errors": raw["errors"],
            "mean": statistics.fmean(ordered) if ordered else None, "p50": _percentile(ordered, 0.5), "p99": _percentile(ordered, 0.99)}


def grpc_table(paths: list[targets.Target], calls: int, concurrency: int, runs: int) -> dict[str, Any]:
    return interleaved_table(paths, runs, lambda target: grpc_run(target.port, calls, concurrency), dict)


BULK_CLIENT = r'''
import json, sys, time
import grpc

port, count, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
with grpc.insecure_channel("127.0.0.1:%d" % port, options=[("grpc.max_receive_message_length", 1 << 24)]) as channel:
    call = channel.unary_stream("/bench.Bulk/Stream", request_serializer=None, response_deserializer=None)
    list(call(b"1,1", timeout=30))  # connected and warm
    started = time.perf_counter()
    received = sum(len(message) for message in call(b"%d,%d" % (count, size), timeout=300))
    print(json.dumps({"seconds": time.perf_counter() - started, "bytes": received}))
'''


def bulk_run(port: int, count: int, size: int) -> dict[str, Any]:
    raw = _client_json(BULK_CLIENT, [port, count, size], "streaming grpc client", 330)
    complete = raw["bytes"] == count * size
    return {"rps": raw["bytes"] / raw["seconds"] / 1e6, "requests": count, "errors": 0 if complete else 1, "seconds": raw["seconds"]}


def bulk_table(paths: list[targets.Target], runs: int) -> dict[str, Any]:
    """MB/s of one server-streaming call per run (the `rps` key carries MB/s); sidecar CPU per MB."""
    table = interleaved_table(paths, runs, lambda target: bulk_run(target.port, BULK_MESSAGES, BULK_MESSAGE_BYTES),
                              lambda median: {"rps": median["rps"]})
    megabytes = BULK_MESSAGES * BULK_MESSAGE_BYTES / 1e6
    for entry in table.values():
        cpu_per_message = entry.pop("proxy_cpu_us")
        entry["proxy_cpu_ms_per_mb"] = None if cpu_per_message is None else cpu_per_message * BULK_MESSAGES / megabytes / 1e3
    return table


def sidecar_codec() -> str:
    """The HTTP/2 codec the sidecars pick (meshctl/proxy/h2conn.py: MESHCTL_H2_CODEC, else ngh2 if installed)."""
    forced = os.environ.get("MESHCTL_H2_CODEC")
    if forced:
        return "%s (MESHCTL_H2_CODEC)" % forced
    return "ngh2" if importlib.util.find_spec("ngh2") is not None else "h2 (ngh2 not installed)"


def measure(workdir: str, requests: int = 20_000, runs: int = 3, grpc_calls: int = 5000, grpc_concurrency: int = 16) -> dict[str, Any]:
    """Both scenarios; the dict bench/report.py renders as the HTTP/2 section."""
    result: dict[str, Any] = {"connections": CONNECTIONS, "requests": requests, "runs": runs, "h2load": {}, "codec": sidecar_codec()}
    nginx = [sys.executable, H2_SCRIPT, "serve-nginx"]
    with direct_app(workdir, nginx, "nginx-h2c") as direct, mesh_app(workdir, nginx, "bench-h2") as mesh:
        result["mesh_label"] = mesh.name
        for streams in STREAMS:
            print("h2load -c%d -m%d ..." % (CONNECTIONS, streams), flush=True)
            result["h2load"][str(streams)] = table = h2load_table([direct, mesh], requests, streams, runs, workdir)
            for name, entry in table.items():
                print("  %-40s %9.0f rps  errors %d" % (name, entry["rps"], entry["errors"]), flush=True)
    if importlib.util.find_spec("grpc") is None:
        result["grpc"] = None
        return result
    recommend = [sys.executable, RECOMMEND]
    print("grpc ForItem, %d calls, %d in flight ..." % (grpc_calls, grpc_concurrency), flush=True)
    with direct_app(workdir, recommend, "recommend") as direct, mesh_app(workdir, recommend, "bench-grpc") as mesh:
        result["grpc"] = {"calls": grpc_calls, "concurrency": grpc_concurrency, "runs": runs,
                          "table": grpc_table([direct, mesh], grpc_calls, grpc_concurrency, runs)}
        for name, entry in result["grpc"]["table"].items():
            print("  %-40s %9.0f calls/s  errors %d" % (name, entry["rps"], entry["errors"]), flush=True)
    bulk = [sys.executable, H2_SCRIPT, "serve-bulk"]
    print("grpc server streaming, %d x %d bytes ..." % (BULK_MESSAGES, BULK_MESSAGE_BYTES), flush=True)
    with direct_app(workdir, bulk, "bulk") as direct, mesh_app(workdir, bulk, "bench-bulk") as mesh:
        result["grpc_stream"] = {"messages": BULK_MESSAGES, "message_bytes": BULK_MESSAGE_BYTES, "runs": runs,
                                 "table": bulk_table([direct, mesh], runs)}
        for name, entry in result["grpc_stream"]["table"].items():
            print("  %-40s %9.1f MB/s  errors %d" % (name, entry["rps"], entry["errors"]), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=["measure", "serve-nginx", "serve-bulk"], default="measure")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.mode == "serve-nginx":
        serve_nginx()
    if args.mode == "serve-bulk":
        serve_bulk()
        return 0
    exit_on_termination()
    workdir = tempfile.mkdtemp(prefix="meshctl-bench-h2-")
    try:
        print(json.dumps(measure(workdir, args.requests, args.runs), indent=1))
    except BenchError as exc:
        print("bench: %s" % exc, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
