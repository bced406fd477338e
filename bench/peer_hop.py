"""The hop between two sidecars alone: pooled HTTP/1.1 against HTTP/1.1 multiplexed over h2.

Issue #7 item 4 asks whether carrying the sidecars' HTTP/1.1 requests as h2 streams over a
few mTLS connections (as Linkerd's proxies do between themselves) beats the pooled
keep-alive HTTP/1.1 connections meshctl uses. This measures only that hop, with the
sidecar's own code, so the figures are the ones such an adapter would pay. The two ends
(the inbound sidecar's, serving; the outbound sidecar's, keeping C requests in flight over
pooled HTTP/1.1 or as h2 streams over K connections) are in bench/peer_hop_ends.py; this
module is the driver: it issues their certificates, starts them as processes, runs the
modes and writes the table.

CPU is user + system time of both processes over the measured phase only (connections,
handshakes and a warm-up happen before it), each end reading its own getrusage(): to the
microsecond, where /proc/<pid>/stat counts 10 ms ticks. The server answers `cpu` on its
stdin; both ends leave when their stdin closes, and the harness stops their process groups
on any failure, SIGINT, SIGTERM or SIGHUP. Modes are interleaved, repeated `--runs` times; the
table gives the median rate and the CPU over all runs.

    python bench/peer_hop.py --quick      # ~10 s, printed
    python bench/peer_hop.py --write      # full, also written to docs/peer-transport.md
    python bench/peer_hop.py serve|drive  # the two ends, started by the above
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import select
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil

from peer_hop_ends import PHASE_TIMEOUT_S, REPO, drive, serve  # first: puts the repository on sys.path
from procs import BenchError, exit_on_termination, stop_group

SCRIPT = os.path.abspath(__file__)
DOC = os.path.join(REPO, "docs", "peer-transport.md")
SECTION_TITLE = "## Between sidecars: pooled HTTP/1.1 vs HTTP/1.1 multiplexed over h2"
TRUST_DOMAIN = "peerhop.local"


# -- the harness ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    protocol: str  # "h1" or "h2"
    connections: int

    @property
    def label(self) -> str:
        if self.protocol == "h1":
            return "HTTP/1.1 pooled, %d conns" % self.connections
        return "HTTP/1.1 over h2, %d conn%s" % (self.connections, "" if self.connections == 1 else "s")


def write_tls_blocks(workdir: str) -> tuple[str, str]:
    """Leaves for `web` (server) and `client` from a fresh CA of the mesh's kind; the two `tls` blocks as files."""
    from pathlib import Path

    from meshctl.agent.ca import CertificateAuthority, spiffe_id

    ca = CertificateAuthority(Path(workdir) / "ca", "peerhop")
    web = ca.issue(spiffe_id(TRUST_DOMAIN, "web"), 3600)
    caller = ca.issue(spiffe_id(TRUST_DOMAIN, "client"), 3600)
    paths = []
    for name, leaf, peer in (("server", web, caller), ("client", caller, web)):
        block = {"mode": "strict", "identity": leaf.identity, "cert_pem": leaf.chain_pem, "key_pem": leaf.key_pem,
                 "bundle_pem": ca.bundle_pem, "not_after": leaf.not_after, "peer_identity": peer.identity}
        path = os.path.join(workdir, "tls-%s.json" % name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(block, out)
        paths.append(path)
    return paths[0], paths[1]


@contextlib.contextmanager
def end_process(argv: list[str], log_path: str) -> Iterator[subprocess.Popen]:
    """One end of the hop in its own session, JSON lines out, commands in; always stopped on the way out.

    Closing its stdin asks it to leave; on an exception (or SIGINT/SIGTERM in the harness)
    its process group is stopped at once.
    """
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    try:
        yield proc
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)
    finally:
        stop_group(proc)
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]


def read_message(proc: subprocess.Popen, timeout: float, log_path: str) -> dict[str, Any]:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""  # type: ignore[union-attr]
    if not line:
        with open(log_path, "rb") as log:
            tail = log.read()[-1500:].decode(errors="replace")
        raise BenchError("%s said nothing within %.0f s (exit %s): %s" % (os.path.basename(log_path), timeout, proc.poll(), tail))
    return json.loads(line)


def tell(proc: subprocess.Popen, command: str) -> None:
    proc.stdin.write(command.encode() + b"\n")  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]


@dataclass(frozen=True)
class HopServer:
    proc: subprocess.Popen
    port: int
    log_path: str

    def cpu_seconds(self) -> float:
        tell(self.proc, "cpu")
        return read_message(self.proc, 10.0, self.log_path)["cpu"]


@contextlib.contextmanager
def hop_server(workdir: str, tls_path: str) -> Iterator[HopServer]:
    log_path = os.path.join(workdir, "hop-server.log")
    with end_process([sys.executable, SCRIPT, "serve", "--tls", tls_path], log_path) as proc:
        yield HopServer(proc, read_message(proc, 30.0, log_path)["port"], log_path)


def _established_to(pid: int, port: int) -> int:
    process = psutil.Process(pid)
    sockets = process.net_connections("tcp") if hasattr(process, "net_connections") else process.connections("tcp")
    return sum(1 for s in sockets if s.status == psutil.CONN_ESTABLISHED and s.raddr and s.raddr.port == port)


def one_run(server: HopServer, tls_path: str, mode: Mode, concurrency: int, requests: int, warmup: int,
            workdir: str) -> dict[str, Any]:
    """One client process for `mode`; the CPU of both ends over its measured phase."""
    log_path = os.path.join(workdir, "hop-client.log")
    argv = [sys.executable, SCRIPT, "drive", "--port", str(server.port), "--tls", tls_path, "--mode", mode.protocol,
            "--connections", str(mode.connections), "--concurrency", str(concurrency), "--requests", str(requests),
            "--warmup", str(warmup)]
    with end_process(argv, log_path) as proc:
        ready = read_message(proc, 60.0, log_path)
        connections = _established_to(proc.pid, server.port)
        before = server.cpu_seconds()
        tell(proc, "go")
        result = read_message(proc, PHASE_TIMEOUT_S + 30.0, log_path)
        result["server_cpu"] = server.cpu_seconds() - before
    result.update(connections=connections, warmup_errors=ready["warmup_errors"])
    return result


def summarise(mode: Mode, results: list[dict[str, Any]]) -> dict[str, Any]:
    served = sum(r["requests"] for r in results)
    server_cpu = sum(r["server_cpu"] for r in results)
    client_cpu = sum(r["client_cpu"] for r in results)
    rates = [r["completed"] / r["seconds"] for r in results]
    return {
        "protocol": mode.protocol,
        "connections": max(r["connections"] for r in results),
        "rps": statistics.median(rates),
        "runs": rates,
        "requests": served,
        "completed": sum(r["completed"] for r in results),
        "errors": sum(r["errors"] + r["warmup_errors"] for r in results),
        "cpu_us": (server_cpu + client_cpu) / served * 1e6,
        "client_cpu_us": client_cpu / served * 1e6,
        "server_cpu_us": server_cpu / served * 1e6,
    }


def measure(workdir: str, requests: int, concurrency: int, runs: int, h2_connections: tuple[int, ...] = (1, 2),
            warmup: int | None = None) -> dict[str, Any]:
    """Every mode `runs` times, interleaved; the dict the table and the doc section are made of."""
    modes = [Mode("h1", concurrency)] + [Mode("h2", k) for k in h2_connections]
    warmup = max(concurrency, requests // 10) if warmup is None else warmup
    server_tls, client_tls = write_tls_blocks(workdir)
    measured: dict[Mode, list[dict[str, Any]]] = {mode: [] for mode in modes}
    with hop_server(workdir, server_tls) as server:
        for _ in range(runs):
            for mode in modes:
                measured[mode].append(one_run(server, client_tls, mode, concurrency, requests, warmup, workdir))
    return {"requests": requests, "concurrency": concurrency, "runs": runs, "warmup": warmup,
            "modes": {mode.label: summarise(mode, measured[mode]) for mode in modes}}


# -- the report --------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    """The machine and the versions, described as bench/run.py describes them."""
    import run

    cpu = run.cpu_model()
    import h2
    import uvloop

    from meshctl.proxy.h2conn import CODEC

    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": psutil.virtual_memory().total,
            "kernel": "%s %s" % (platform.system(), platform.release()), "loadavg": "%.2f %.2f %.2f" % os.getloadavg(),
            "meshctl": run.code_version(None), "python": platform.python_version(), "uvloop": uvloop.__version__,
            "h2": h2.__version__, "h2_codec": _codec_version(CODEC), "openssl": ssl.OPENSSL_VERSION}


def _codec_version(codec: str) -> str:
    if codec == "ngh2":
        import ngh2

        return "ngh2 %s" % ngh2.__version__
    return "h2 (fallback)"


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = [["between the sidecars", "conns", "requests/s (median)", "runs", "CPU us/request (both ends)",
             "client end", "server end", "errors"]]
    for label, entry in result["modes"].items():
        rows.append([label, "%d" % entry["connections"], "%.0f" % entry["rps"], " / ".join("%.0f" % r for r in entry["runs"]),
                     "%.1f" % entry["cpu_us"], "%.1f" % entry["client_cpu_us"], "%.1f" % entry["server_cpu_us"],
                     "%d" % entry["errors"]])
    return rows


def conclusion(result: dict[str, Any]) -> str:
    """Which way of carrying requests won, in the measured figures."""
    modes = result["modes"]
    pooled_label = next(label for label, entry in modes.items() if entry["protocol"] == "h1")
    pooled = modes[pooled_label]
    h2_label = max((label for label, entry in modes.items() if entry["protocol"] == "h2"), key=lambda label: modes[label]["rps"])
    best_h2 = modes[h2_label]
    faster, slower = (pooled_label, h2_label) if pooled["rps"] >= best_h2["rps"] else (h2_label, pooled_label)
    ratio = modes[faster]["rps"] / modes[slower]["rps"]
    cheaper = pooled_label if pooled["cpu_us"] <= best_h2["cpu_us"] else h2_label
    other = h2_label if cheaper == pooled_label else pooled_label
    return (
        "**%s** wins on this machine: %.0f requests/s against %.0f for %s, %.2fx (%s is the best h2 variant). "
        "CPU for the hop, both ends together: %.1f us per request pooled, %.1f us over h2 (%s), so %s costs "
        "%.1f us (%.0f %%) less per request than %s."
        % (faster, modes[faster]["rps"], modes[slower]["rps"], slower, ratio, h2_label,
           pooled["cpu_us"], best_h2["cpu_us"], h2_label, cheaper, modes[other]["cpu_us"] - modes[cheaper]["cpu_us"],
           (1 - modes[cheaper]["cpu_us"] / modes[other]["cpu_us"]) * 100, other)
    )


def _markdown_table(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines.extend("| " + " | ".join(row) + " |" for row in rows[1:])
    return lines


def render_section(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        SECTION_TITLE,
        "",
        "Generated by `bench/peer_hop.py --write` on %s; do not edit by hand." % result["generated"],
        "",
        "Only the hop between two sidecars, with the sidecar's own code (proxy.tls, proxy.http1, proxy.h2conn) in two",
        "processes on uvloop over TLS 1.3 with client certificates from a CA of the mesh's kind (meshctl/agent/ca.py): the",
        "outbound end keeps %d requests in flight (like `wrk -c%d`), %d requests per run after %d of warm-up, %d"
        % (result["concurrency"], result["concurrency"], result["requests"], result["warmup"], result["runs"]),
        "interleaved runs per mode. A request is a GET with five header fields (Connection: keep-alive is dropped on",
        "the way) plus the three the sidecar adds (x-forwarded-for, forwarded, x-request-id); the",
        "answer is a 200 with a 13-byte body. The h2 modes include the adapter at both ends: HTTP/1.1 head to h2",
        "fields and back for the request, and for the response. CPU is user + system time (getrusage) of both",
        "processes over the measured phases (handshakes and warm-up excluded), divided by the requests served.",
        "",
        *_markdown_table(table_rows(result)),
        "",
        conclusion(result),
        "",
        "| machine | |",
        "|---|---|",
        "| CPU | %s (%s cores visible) |" % (machine["cpu"], machine["nproc"]),
        "| memory | %.1f GiB |" % (machine["memory"] / 1024 ** 3),
        "| kernel | %s |" % machine["kernel"],
        "| load average before the run | %s |" % machine["loadavg"],
        "| meshctl | %s |" % machine["meshctl"],
        "| Python / uvloop / h2 | %s / %s / %s |" % (machine["python"], machine["uvloop"], machine["h2"]),
        "| HTTP/2 codec (proxy.h2conn) | %s |" % machine.get("h2_codec", "h2"),
        "| TLS | %s |" % machine["openssl"],
        "",
    ]
    return "\n".join(lines)


def replace_section(page: str, title: str, section: str) -> str:
    """`page` with the `## title` section (up to the next `## ` heading) replaced by `section`, or it appended."""
    lines = page.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == title), None)
    if start is None:
        return page.rstrip("\n") + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")


def print_table(result: dict[str, Any]) -> None:
    rows = table_rows(result)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    print(conclusion(result).replace("**", ""))


PAGE_HEAD = "# Transport between sidecars\n\nMeasurements of how the sidecars carry requests to each other (issue #7).\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", choices=["measure", "serve", "drive"], default="measure")
    parser.add_argument("--quick", action="store_true", help="a ~10 s run, printed only")
    parser.add_argument("--write", action="store_true", help="also write the section of docs/peer-transport.md")
    parser.add_argument("--requests", type=int, help="requests per run [8000 quick, 40000 full]")
    parser.add_argument("--runs", type=int, help="runs per mode [1 quick, 3 full]")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tls", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["h1", "h2"], help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role in ("serve", "drive"):
        import uvloop

        if args.role == "serve":
            uvloop.run(serve(args.tls))
        else:
            uvloop.run(drive(args.port, args.tls, args.mode, args.connections, args.concurrency, args.requests, args.warmup))
        return 0
    exit_on_termination()  # SIGTERM and SIGHUP unwind through every `with`, which stops the ends
    requests = args.requests or (8000 if args.quick else 40_000)
    runs = args.runs or (1 if args.quick else 3)
    machine = machine_facts()  # the load average before the bench's own load
    workdir = tempfile.mkdtemp(prefix="meshctl-peer-hop-")
    try:
        result = measure(workdir, requests, args.concurrency, runs)
    except BenchError as exc:
        print("bench: %s" % exc, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["machine"] = machine
    result["generated"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print_table(result)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)
    if args.write:
        page = PAGE_HEAD
        if os.path.exists(DOC):
            with open(DOC) as current:
                page = current.read()
        with open(DOC, "w") as out:
            out.write(replace_section(page, SECTION_TITLE, render_section(result)))
        print("wrote %s" % DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
