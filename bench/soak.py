"""Soak: the ShopFast demo mesh at a constant request rate for a long time (`make soak`).

    python bench/soak.py [--rate 1000] [--seconds 600] [--path /api/products]

SOAK_SECONDS and SOAK_RATE override the defaults. It brings up a copy of
templates/shopfast.yaml in a private state directory with a free ingress port and
PAYMENTS_FAILURE_RATE 0 (the demo's deliberate payment failures would be app errors, not
mesh errors; with them off every non-200 is the mesh's), drives it with bench/openloop.py
(open loop, so a stall shows as failures and latency, not as a slower client) on
/healthz through the ingress and frontend's sidecar (two sidecars, the frontend app; the
demo's /api/products saturates the Python demo apps at about 650 rps on a 2-core
machine, so it is a `--path` choice, not the default), and
samples every sidecar's RSS and open fds meanwhile. Passes when no request failed, no
sidecar's RSS grew by 10 % or more from the first sample after warm-up, and the fds
ended where they started. Writes its figures to the reliability results directory
(tests/reliability.py) and exits 1 on a miss.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from procs import exit_on_termination  # noqa: E402
from targets import stop_mesh  # noqa: E402
from tests.meshharness import free_port  # noqa: E402
from tests.reliability import record  # noqa: E402

RSS_GROWTH_LIMIT = 0.10
FD_SLACK = 16  # pooled connections to upstreams grow and shrink with the moment's concurrency


def soak_manifest(directory: Path, port: int) -> Path:
    manifest = yaml.safe_load((REPO / "templates" / "shopfast.yaml").read_text())
    manifest["workdir"] = str(REPO)
    manifest["ingress"]["port"] = port
    manifest["services"]["payments"]["env"]["PAYMENTS_FAILURE_RATE"] = "0"
    path = directory / "shopfast-soak.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def sidecars(agent_pid: int) -> dict[str, psutil.Process]:
    agent = psutil.Process(agent_pid)
    found = {}
    for proc in agent.children(recursive=True):
        if proc.cmdline()[1:3] == ["-m", "meshctl.proxy"]:
            found[str(proc.pid)] = proc
    return found


def sample(procs: dict[str, psutil.Process]) -> dict[str, dict]:
    out = {}
    for pid, proc in procs.items():
        try:
            out[pid] = {"rss": proc.memory_info().rss, "fds": proc.num_fds()}
        except psutil.NoSuchProcess:
            out[pid] = {"rss": None, "fds": None}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=float(os.environ.get("SOAK_RATE", 1000)))
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    parser.add_argument("--path", default="/healthz", help="ingress sidecar -> frontend sidecar -> frontend")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args(argv)
    exit_on_termination()
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="meshctl-soak-") as tmp:
        home = Path(tmp) / "home"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCTL_")}
        env.update(MESHCTL_HOME=str(home), NO_COLOR="1")
        port = free_port()
        manifest = soak_manifest(Path(tmp), port)
        out, load, thread = "", None, None
        samples: list[tuple[float, dict]] = []
        done = threading.Event()
        try:
            subprocess.run([python, "-m", "meshctl.cli", "up", "-f", str(manifest)], env=env, check=True, cwd=REPO)
            agent_pid = int((home / "agent.pid").read_text())
            procs = sidecars(agent_pid)
            warmup = min(30.0, args.seconds / 10)

            def sampler() -> None:
                while not done.wait(max(1.0, args.seconds / 60)):
                    samples.append((time.monotonic(), sample(procs)))

            load = subprocess.Popen(
                [python, str(REPO / "bench" / "openloop.py"), "--port", str(port), "--path", args.path,
                 "--rate", str(args.rate), "--seconds", str(args.seconds), "--warmup", str(warmup),
                 "--connections", str(args.connections)],
                stdout=subprocess.PIPE, text=True, cwd=REPO,
            )
            started = time.monotonic()
            thread = threading.Thread(target=sampler, name="sampler")
            thread.start()
            out, _ = load.communicate()
            result = json.loads(out)
            restarts = sum(i["restarts"] for i in json.loads(subprocess.run(
                [python, "-m", "meshctl.cli", "status", "-o", "json"], env=env, capture_output=True, text=True,
                check=True).stdout)["instances"])
        finally:
            # The sampler thread is not a daemon: left waiting, it would keep the interpreter from exiting.
            done.set()
            if thread is not None:
                thread.join()
            if load is not None and load.poll() is None:
                load.kill()
                load.wait()
            survivors = stop_mesh(str(home))
            if survivors:
                print("warning: meshctl down left pids %s running; killed them" % survivors, file=sys.stderr)
            failed = load is None or load.returncode != 0 or json.loads(out or "{}").get("failed")
            if failed and (home / "logs").is_dir():
                # Keep what the mesh logged, so a failure can be explained after the temp dir is gone.
                kept = REPO / ".state" / "soak-logs"
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(home / "logs", kept)
                shutil.copy(home / "agent.log", kept / "agent.log")
                print("mesh logs kept in %s" % kept, file=sys.stderr)
    measured = [s for t, s in samples if t - started >= warmup + 1.0] or [s for _, s in samples]
    first, last = measured[0], measured[-1]
    growth = {pid: (last[pid]["rss"] - first[pid]["rss"]) / first[pid]["rss"] for pid in first
              if first[pid]["rss"] and last[pid]["rss"]}
    fd_change = {pid: last[pid]["fds"] - first[pid]["fds"] for pid in first
                 if first[pid]["fds"] is not None and last[pid]["fds"] is not None}
    verdicts = {
        "no failed request": result["failed"] == 0,
        "RSS growth under 10 % per sidecar": max(growth.values()) < RSS_GROWTH_LIMIT,
        "fds flat per sidecar": max(fd_change.values()) <= FD_SLACK,
        "no restart": restarts == 0,
    }
    figures = {
        "path": args.path, "target rate (rps)": args.rate, "seconds": args.seconds,
        "requests sent": result["sent"], "completed": result["completed"], "failed": result["failed"],
        "failure kinds": result.get("failure kinds") or "none",
        "achieved rps": round(result["achieved_rps"], 1),
        "p50 ms": _ms(result["p50"]), "p99 ms": _ms(result["p99"]), "p99.9 ms": _ms(result["p99.9"]),
        "max ms": _ms(result["max"]), "sidecars": len(procs),
        "sidecar RSS first..last (MB, sum)": "%.1f .. %.1f" % (
            sum(v["rss"] for v in first.values()) / 2**20, sum(v["rss"] or 0 for v in last.values()) / 2**20),
        "largest RSS growth of one sidecar": "%.1f %%" % (100 * max(growth.values())),
        "sidecar fds first..last (sum)": "%d .. %d" % (
            sum(v["fds"] for v in first.values()), sum(v["fds"] or 0 for v in last.values())),
        "instance restarts": restarts,
        **{f"pass: {k}": "yes" if v else "NO" for k, v in verdicts.items()},
    }
    record("soak", {
        "title": f"soak: {args.rate:g} rps for {args.seconds:g} s through ShopFast",
        "about": f"bench/soak.py: GET {args.path} through the ingress and frontend's sidecar, "
                 "open loop with bench/openloop.py; PAYMENTS_FAILURE_RATE 0, so every failure is the mesh's. "
                 "RSS and fds of every sidecar sampled from the end of the warm-up to the end.",
        "figures": figures,
    })
    print(json.dumps(figures, indent=2))
    return 0 if all(verdicts.values()) else 1


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


if __name__ == "__main__":
    raise SystemExit(main())
