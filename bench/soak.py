"""Soak: the ShopFast demo's real traffic mix through the whole mesh for a long time (`make soak`).

    python bench/soak.py [--rate auto|N] [--seconds 600]

SOAK_SECONDS and SOAK_RATE override the defaults. It brings up a copy of
templates/shopfast.yaml (PAYMENTS_FAILURE_RATE as the demo has it) in a private state
directory with a free ingress port and drives it with the demo's own mix
(demo-services/loadgen.py: browse the page, which calls catalog, cart and the gRPC
recommend service; list products; view carts; add items; check out through payments), so
every one of the nine sidecars carries traffic. The load is open loop: requests are due
at fixed times and their latency counts from that time, so a stall shows as latency and
failures, not as a slower client.

`--rate auto` (the default) first finds the highest rate the demo sustains on this
machine: steps of STEP_SECONDS, each 1.5 times the last, until one misses (achieved rate
under 95 % of the target, p99 over 1 s, or a failure that is not a deliberate payment
failure); the soak then runs at the last step that held, and the report names the
processes that were busiest at the step that missed (the limit).

During the soak, at a quarter, half and three quarters of the run: a live `route split
cart v1=50 v2=50`, a `certs rotate`, and a rolling `restart catalog`. Every sidecar's RSS
and open fds are read at the start (after warm-up), at half time and at the end.

Passes when no request failed except the demo's deliberate payment failures (checkouts
answered 502 whose cause is payments' own 503 `payments-unavailable`, counted apart), the
live operations all succeeded, no instance crashed, no sidecar's RSS grew by 10 % or more
over the second half and the fds ended where they started. The leak verdict looks at the
second half because the first one holds the allocator's climb to the run's peak concurrency:
CPython keeps the arenas a burst of connections needed, so RSS steps up early and then stays
flat, while a leak keeps growing with the requests served. The whole run's growth is
reported beside it. Writes its figures to the reliability results
directory (tests/reliability.py) and exits 1 on a miss.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "demo-services"))

import loadgen  # noqa: E402
from procs import exit_on_termination  # noqa: E402
from targets import stop_mesh  # noqa: E402
from tests.meshharness import free_port  # noqa: E402
from tests.reliability import record  # noqa: E402

RSS_GROWTH_LIMIT = 0.10
FD_SLACK = 16  # pooled connections to upstreams grow and shrink with the moment's concurrency
WORKERS = 48  # concurrent client connections: enough that the schedule, not the client, sets the rate
STEP_SECONDS = 20.0
FIRST_STEP_RPS = 20.0
STEP_FACTOR = 1.5
SUSTAINED_SHARE = 0.95
SUSTAINED_P99_S = 1.0
REC_BOX = b"Recommended for you"
STEP_COLUMNS = ("target rps", "achieved rps", "p99 ms", "failed", "held", "busiest", "machine", "first failure")
OPERATIONS = (  # (share of the run, label, meshctl arguments)
    (0.25, "route split cart v1=50 v2=50", ("route", "split", "cart", "v1=50", "v2=50")),
    (0.50, "certs rotate", ("certs", "rotate")),
    (0.75, "restart catalog", ("restart", "catalog")),
)


def soak_manifest(directory: Path, port: int) -> Path:
    manifest = yaml.safe_load((REPO / "templates" / "shopfast.yaml").read_text())
    manifest["workdir"] = str(REPO)
    manifest["ingress"]["port"] = port
    path = directory / "shopfast-soak.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


# -- the load ----------------------------------------------------------------------------------


def classify(status: int | str, body: bytes) -> str:
    """ok, deliberate (the demo's scripted payment failure) or failed."""
    if status == loadgen.CONNECTION_ERROR:
        return "failed"
    if int(status) < 500:
        return "ok"
    # A checkout whose charge payments itself refused (503 payments-unavailable), with no
    # mesh error on the way: the demo's PAYMENTS_FAILURE_RATE at work.
    if b"payments-unavailable" in body and b"mesh_error" not in body:
        return "deliberate"
    return "failed"


class BodyClient(loadgen.Client):
    """loadgen's keep-alive client, keeping the last body (to classify failures, see the gRPC box)."""

    body = b""

    def _exchange(self, request: loadgen.PlannedRequest, headers: dict[str, str]) -> int:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self.connection.request(request.method, self.base_path + request.path, body=request.body, headers=headers)
            response = self.connection.getresponse()
            self.body = response.read()
        except BaseException:
            self.close()
            raise
        return response.status


@dataclass
class Tally:
    """What a stretch of load did: counts by outcome and action, latencies from the due time."""

    started: float = field(default_factory=time.monotonic)
    outcomes: Counter = field(default_factory=Counter)
    by_action: Counter = field(default_factory=Counter)
    failed_by_action: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    pages: int = 0
    pages_with_recommendations: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: loadgen.PlannedRequest, status: int | str, body: bytes, latency: float) -> None:
        kind = classify(status, body)
        with self.lock:
            self.outcomes[kind] += 1
            self.by_action[request.action] += 1
            self.statuses[status] += 1
            self.latencies.append(latency)
            if kind == "failed":
                self.failed_by_action[request.action] += 1
                if len(self.failures) < 10:
                    self.failures.append("%s %s: %s %r" % (request.method, request.path, status, body[:160]))
            if request.action == "browse" and status == 200:
                self.pages += 1
                self.pages_with_recommendations += REC_BOX in body

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def p(self, fraction: float) -> float:
        with self.lock:
            return loadgen.percentile(self.latencies, fraction)


def drive(port: int, rps: float, seconds: float, seed: int = 1) -> Tally:
    """Open-loop load of the demo's mix at `rps` for `seconds`; returns when every request ended."""
    target = loadgen.parse_args(["--url", "http://127.0.0.1:%d" % port]).target
    skus = loadgen.fetch_skus(target, 10.0)
    shoppers = loadgen.Shoppers(["shopper-%02d" % i for i in range(1, 51)])
    pacer = loadgen.Pacer(rps, seconds, None)
    tally = Tally()
    seeder = random.Random(seed)

    def worker(rng: random.Random) -> None:
        client = BodyClient(target, 10.0)
        try:
            while True:
                due = pacer.next_slot()
                if due is None:
                    return
                time.sleep(max(0.0, due - time.monotonic()))  # the open loop's schedule
                planned = shoppers.plan(rng, skus)
                try:
                    status: int | str = client.send(planned)
                    body = client.body
                except (OSError, http.client.HTTPException) as exc:
                    status, body = loadgen.CONNECTION_ERROR, repr(exc).encode()
                tally.add(planned, status, body, time.monotonic() - due)
                shoppers.observe(planned, status)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(random.Random(seeder.random()),), daemon=True) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tally.elapsed = time.monotonic() - tally.started  # type: ignore[attr-defined]
    return tally


# -- the mesh's processes ------------------------------------------------------------------------


def meshctl(env: dict, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshctl.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def mesh_processes(env: dict) -> dict[str, tuple[int, int | None]]:
    """instance id -> (sidecar pid, app pid), the ingress included."""
    status = json.loads(meshctl(env, "status", "-o", "json").stdout)
    found = {i["id"]: (i["sidecar_pid"], i["pid"]) for i in status["instances"]}
    if status.get("ingress"):
        found["ingress"] = (status["ingress"]["sidecar_pid"], None)
    return found


def sample(pids: dict[str, int]) -> dict[str, dict]:
    out = {}
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            out[name] = {"pid": pid, "rss": proc.memory_info().rss, "fds": proc.num_fds()}
        except psutil.NoSuchProcess:
            out[name] = {"pid": pid, "rss": None, "fds": None}
    return out


class CpuWatch:
    """CPU share of every app and sidecar, and of the whole machine, over a stretch of load:
    a process near 100 % of one core is the bottleneck; none near it, on a machine whose
    cores are all busy, means the limit is the CPU left over by everything else running."""

    def __init__(self, processes: dict[str, tuple[int, int | None]]) -> None:
        psutil.cpu_percent(None)
        self.procs = {}
        for name, (sidecar, app) in processes.items():
            for label, pid in ((name + " sidecar", sidecar), (name + " app", app)):
                if pid:
                    try:
                        self.procs[label] = psutil.Process(pid)
                        self.procs[label].cpu_percent(None)
                    except psutil.NoSuchProcess:
                        pass

    def busiest(self, count: int = 3) -> list[tuple[str, float]]:
        shares = {}
        for label, proc in self.procs.items():
            try:
                shares[label] = proc.cpu_percent(None)
            except psutil.NoSuchProcess:
                continue
        return sorted(shares.items(), key=lambda item: -item[1])[:count]

    def machine(self) -> str:
        return "all %d CPUs %.0f %% busy, load average %.1f" % (psutil.cpu_count(), psutil.cpu_percent(None), os.getloadavg()[0])


# -- finding the rate ------------------------------------------------------------------------------


def step_held(tally: Tally, rps: float) -> bool:
    achieved = tally.total / tally.elapsed  # type: ignore[attr-defined]
    return achieved >= SUSTAINED_SHARE * rps and tally.p(0.99) <= SUSTAINED_P99_S and tally.outcomes["failed"] == 0


def find_rate(port: int, env: dict) -> tuple[float, list[dict], str]:
    """The highest step rate that held, each step's figures, and what limited the next one."""
    steps, rps, best, limit = [], FIRST_STEP_RPS, 0.0, "not reached"
    while True:
        watch = CpuWatch(mesh_processes(env))
        tally = drive(port, rps, STEP_SECONDS, seed=int(rps))
        busiest, machine = watch.busiest(), watch.machine()
        held = step_held(tally, rps)
        steps.append({"target rps": round(rps, 1), "achieved rps": round(tally.total / tally.elapsed, 1),  # type: ignore[attr-defined]
                      "p99 ms": round(tally.p(0.99) * 1000, 1), "failed": tally.outcomes["failed"], "held": held,
                      "busiest": ", ".join("%s %.0f %%" % item for item in busiest), "machine": machine,
                      "first failure": tally.failures[0] if tally.failures else ""})
        print("step %.0f rps: %s" % (rps, steps[-1]), file=sys.stderr, flush=True)
        if not held:
            why = "p99 %.0f ms over %.0f ms" % (tally.p(0.99) * 1000, SUSTAINED_P99_S * 1000) if tally.p(0.99) > SUSTAINED_P99_S else (
                "%d failed" % tally.outcomes["failed"] if tally.outcomes["failed"] else "achieved %s rps" % steps[-1]["achieved rps"])
            limit = "at %.0f rps: %s; busiest: %s; %s" % (rps, why, steps[-1]["busiest"], machine)
            return best, steps, limit
        best, rps = rps, rps * STEP_FACTOR


# -- the soak --------------------------------------------------------------------------------------


def sample_at_half(pids: dict[str, int], seconds: float, started: float, done: threading.Event,
                   into: dict[str, dict]) -> None:
    if not done.wait(max(0.0, started + seconds / 2 - time.monotonic())):
        into.update(sample(pids))


def run_operations(env: dict, seconds: float, started: float, done: threading.Event, log: list[dict]) -> None:
    for share, label, args in OPERATIONS:
        if done.wait(max(0.0, started + share * seconds - time.monotonic())):
            return
        began = time.monotonic()
        result = meshctl(env, *args)
        log.append({"operation": label, "at s": round(began - started, 1), "exit": result.returncode,
                    "seconds": round(time.monotonic() - began, 2),
                    "error": (result.stderr or result.stdout).strip()[-200:] if result.returncode else ""})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default=os.environ.get("SOAK_RATE", "auto"), help="requests per second, or auto")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    args = parser.parse_args(argv)
    exit_on_termination()
    with tempfile.TemporaryDirectory(prefix="meshctl-soak-") as tmp:
        home = Path(tmp) / "home"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCTL_")}
        env.update(MESHCTL_HOME=str(home), NO_COLOR="1")
        port = free_port()
        manifest = soak_manifest(Path(tmp), port)
        done = threading.Event()
        operations: list[dict] = []
        tally: Tally | None = None
        half: dict[str, dict] = {}
        try:
            subprocess.run([sys.executable, "-m", "meshctl.cli", "up", "-f", str(manifest)], env=env, check=True, cwd=REPO)
            steps, limit = [], "not searched (a fixed --rate)"
            if args.rate == "auto":
                rate, steps, limit = find_rate(port, env)
                if rate == 0:
                    print("the demo did not hold even %.0f rps on this machine" % FIRST_STEP_RPS, file=sys.stderr)
                    return 1
            else:
                rate = float(args.rate)
            warmup = min(30.0, args.seconds / 10)
            drive(port, rate, warmup)
            before_processes = mesh_processes(env)
            sidecar_pids = {name: pids[0] for name, pids in before_processes.items()}
            first = sample(sidecar_pids)
            started = time.monotonic()
            ops = threading.Thread(target=run_operations, args=(env, args.seconds, started, done, operations))
            halfway = threading.Thread(target=sample_at_half, args=(sidecar_pids, args.seconds, started, done, half))
            ops.start()
            halfway.start()
            tally = drive(port, rate, args.seconds, seed=7)
            done.set()
            ops.join()
            halfway.join()
            after_processes = mesh_processes(env)
            last = sample({name: pids[0] for name, pids in after_processes.items()})
            restarts = sum(i["restarts"] for i in json.loads(meshctl(env, "status", "-o", "json").stdout)["instances"])
        finally:
            done.set()
            survivors = stop_mesh(str(home))
            if survivors:
                print("warning: meshctl down left pids %s running; killed them" % survivors, file=sys.stderr)
            if (tally is None or tally.outcomes["failed"]) and (home / "logs").is_dir():
                # Keep what the mesh logged, so a failure can be explained after the temp dir is gone.
                kept = REPO / ".state" / "soak-logs"
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(home / "logs", kept)
                shutil.copy(home / "agent.log", kept / "agent.log")
                print("mesh logs kept in %s" % kept, file=sys.stderr)
    return report(args, rate, steps, limit, tally, operations, first, half, last, restarts)


def rss_growth(a: dict | None, b: dict | None) -> float | None:
    """RSS growth from sample a to b of the same process, or None (gone, replaced, unreadable)."""
    if a is None or b is None or a["pid"] != b["pid"] or not a["rss"] or not b["rss"]:
        return None
    return (b["rss"] - a["rss"]) / a["rss"]


def report(args, rate, steps, limit, tally: Tally, operations, first, half, last, restarts) -> int:
    rows, growth, second_half, fd_change = [], {}, {}, {}
    for name in sorted(set(first) | set(last)):
        a, m, b = first.get(name), half.get(name), last.get(name)
        if (whole := rss_growth(a, b)) is not None:
            growth[name] = whole
            fd_change[name] = b["fds"] - a["fds"]
        if (late := rss_growth(m, b)) is not None:
            second_half[name] = late
        rows.append([name, _mb(a), _mb(m), _mb(b), _fds(a), _fds(b),
                     "" if a is None or b is None or a["pid"] == b["pid"] else "replaced by the restart"])
    verdicts = {
        "no failed request (deliberate payment failures apart)": tally.outcomes["failed"] == 0,
        "every live operation succeeded": len(operations) == len(OPERATIONS) and all(o["exit"] == 0 for o in operations),
        "RSS growth under 10 % per sidecar over the second half": bool(second_half)
        and max(second_half.values()) < RSS_GROWTH_LIMIT,
        "fds flat per sidecar": bool(fd_change) and max(fd_change.values()) <= FD_SLACK,
        "no instance crashed": restarts == 0,
    }
    elapsed = tally.elapsed  # type: ignore[attr-defined]
    figures = {
        "rate (rps)": round(rate, 1), "how the rate was chosen": "highest step that held" if steps else "given",
        "what stopped the next step (busiest processes in % of one core; the machine)": limit,
        "seconds": args.seconds, "requests": tally.total, "achieved rps": round(tally.total / elapsed, 1),
        "failed": tally.outcomes["failed"], "deliberate payment failures (apart)": tally.outcomes["deliberate"],
        "failed by action": dict(tally.failed_by_action) or "none",
        "requests by action": dict(sorted(tally.by_action.items())),
        "pages with the gRPC recommendations box": "%d of %d" % (tally.pages_with_recommendations, tally.pages),
        "p50 ms": round(tally.p(0.5) * 1000, 1), "p99 ms": round(tally.p(0.99) * 1000, 1),
        "p99.9 ms": round(tally.p(0.999) * 1000, 1), "max ms": round(tally.p(1.0) * 1000, 1),
        "largest RSS growth of one sidecar, whole run": "%.1f %%" % (100 * max(growth.values(), default=0.0)),
        "largest RSS growth of one sidecar, second half": "%.1f %%" % (100 * max(second_half.values(), default=0.0)),
        "instance restarts (crashes)": restarts,
        **{f"pass: {k}": "yes" if v else "NO" for k, v in verdicts.items()},
    }
    if tally.failures:
        figures["first failures"] = " / ".join(tally.failures[:3])
    tables = [{"title": "live operations during the run", "columns": ["operation", "at s", "exit", "seconds", "error"],
               "rows": [[o["operation"], o["at s"], o["exit"], o["seconds"], o["error"]] for o in operations]},
              {"title": "every sidecar at the start (after warm-up), at half time and at the end",
               "columns": ["sidecar", "RSS MB start", "RSS MB half", "RSS MB end", "fds start", "fds end", "note"],
               "rows": rows}]
    if steps:
        tables.insert(0, {"title": "finding the rate: %g s steps" % STEP_SECONDS,
                          "columns": list(STEP_COLUMNS), "rows": [[s[c] for c in STEP_COLUMNS] for s in steps]})
    record("soak", {
        "title": f"soak: the ShopFast mix at {rate:.4g} rps for {args.seconds:g} s",
        "about": "bench/soak.py: demo-services/loadgen.py's mix (browse the page with its gRPC box, products, carts, "
                 "adds, checkouts through payments) through the ingress, open loop, latency from each request's due "
                 "time; payments keeps the demo's PAYMENTS_FAILURE_RATE, and its deliberate failures are counted apart. "
                 "During the run: " + ", ".join(label for _, label, _ in OPERATIONS) + ".",
        "figures": figures,
        "tables": tables,
    })
    print(json.dumps(figures, indent=2, default=str))
    return 0 if all(verdicts.values()) else 1


def _mb(entry: dict | None) -> str:
    return "-" if entry is None or entry["rss"] is None else "%.1f" % (entry["rss"] / 2**20)


def _fds(entry: dict | None) -> str:
    return "-" if entry is None or entry["fds"] is None else str(entry["fds"])


if __name__ == "__main__":
    raise SystemExit(main())
