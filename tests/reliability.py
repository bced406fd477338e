"""Reliability test helpers: continuous load with per-phase accounting, process probes, results.

`ContinuousLoad` keeps a few keep-alive clients calling one URL in background threads and
records every request (start, end, ok), so a test can ask how many requests a phase sent
and lost, or how long after a kill the first request succeeded. `fd_count` and `rss` read
a process's open descriptors and memory through psutil. `record` writes a test's figures
as JSON into the results directory (`$MESH_RESULTS_DIR`, default `.state/reliability`),
and `python -m tests.reliability` turns that directory into docs/reliability.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(os.environ.get("MESH_RESULTS_DIR", REPO / ".state" / "reliability"))


@dataclass
class Outcome:
    start: float
    end: float
    ok: bool
    detail: str = ""


@dataclass
class Phase:
    name: str
    start: float
    end: float | None = None
    sent: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"operation": self.name, "sent": self.sent, "failed": self.failed,
                "seconds": round((self.end or time.monotonic()) - self.start, 2), "failures": self.failures[:5]}


class ContinuousLoad:
    """`workers` threads, each on its own keep-alive connection, calling GET `path` back to back."""

    def __init__(self, port: int, path: str = "/whoami", workers: int = 4, timeout: float = 10.0) -> None:
        self.port = port
        self.path = path
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"load-{i}", daemon=True) for i in range(workers)]

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            start = time.monotonic()
            try:
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read()
                ok, detail = 200 <= response.status < 300, f"status {response.status}: {body[:80]!r}"
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                ok, detail = False, f"error: {exc!r}"
                conn.close()
                conn = None
            with self._lock:
                self.outcomes.append(Outcome(start, time.monotonic(), ok, "" if ok else detail))
        if conn is not None:
            conn.close()

    def __enter__(self) -> ContinuousLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def completed(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_for_requests(self, count: int, timeout: float = 60.0) -> None:
        base = self.completed()
        deadline = time.monotonic() + timeout
        while self.completed() < base + count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the load made fewer than {count} requests in {timeout}s")
            time.sleep(0.02)  # polling interval of a deadline loop

    def between(self, start: float, end: float) -> list[Outcome]:
        """Requests that started in [start, end)."""
        with self._lock:
            return [o for o in self.outcomes if start <= o.start < end]

    def first_success_after(self, moment: float) -> float | None:
        """Seconds from `moment` to the end of the first successful request started after it."""
        with self._lock:
            ends = [o.end for o in self.outcomes if o.ok and o.start >= moment]
        return min(ends) - moment if ends else None

    @contextmanager
    def phase(self, name: str, phases: list[Phase], settle: int = 20):
        """Account every request started while the block runs (and `settle` more after it)."""
        current = Phase(name, time.monotonic())
        phases.append(current)
        yield current
        self.wait_for_requests(settle)
        current.end = time.monotonic()
        outcomes = self.between(current.start, current.end)
        current.sent = len(outcomes)
        current.failures = [o.detail for o in outcomes if not o.ok]
        current.failed = len(current.failures)


def fd_count(pid: int) -> int:
    return psutil.Process(pid).num_fds()


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def machine() -> dict:
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "kernel": platform.release(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}


def record(name: str, figures: dict) -> Path:
    """Write one test's figures to RESULTS_DIR/<name>.json, with the date and the machine."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"name": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), **figures}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


# -- the report ------------------------------------------------------------------------

def _load(directory: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render(results: dict[str, dict]) -> str:
    lines = ["# Reliability figures", "",
             "Generated by `python -m tests.reliability` from the JSON results the reliability tests",
             "(tests/test_chaos.py, tests/test_abuse.py) and the soak (`make soak`, bench/soak.py) write",
             f"into `{RESULTS_DIR.relative_to(REPO) if RESULTS_DIR.is_relative_to(REPO) else RESULTS_DIR}`. "
             "Each section names the run's date and machine. The tests run under `make test` "
             "(`pytest -n 2`), so their figures come from a machine busy with the rest of the suite; "
             "`make soak` runs alone (SOAK_SECONDS shortens it).", "",
             "The soak keeps payments' deliberate failures (PAYMENTS_FAILURE_RATE, as the demo has it) and "
             "counts them apart: a checkout whose charge payments itself refused is the demo working as "
             "scripted; every other failed request is the mesh's (or an app's saturation).", ""]
    for name, result in results.items():
        m = result.get("machine", {})
        lines += [f"## {result.get('title', name)}", "",
                  f"Run {result.get('date')} on {m.get('cpus')} CPUs ({m.get('machine')}, "
                  f"{m.get('memory_gb')} GB, Linux {m.get('kernel')}, Python {m.get('python')}).", ""]
        if result.get("about"):
            lines += [result["about"], ""]
        if result.get("operations"):
            lines += [_row("operation", "requests sent", "failed", "seconds"), _row("---", "---:", "---:", "---:")]
            lines += [_row(o["operation"], o["sent"], o["failed"], o["seconds"]) for o in result["operations"]]
            lines.append("")
        if result.get("figures"):
            lines += [_row("figure", "value"), _row("---", "---:")]
            lines += [_row(k, v) for k, v in result["figures"].items()]
            lines.append("")
        for table in result.get("tables", ()):
            lines += [f"**{table['title']}**", "", _row(*table["columns"]), _row(*["---"] * len(table["columns"]))]
            lines += [_row(*cells) for cells in table["rows"]]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="turn the reliability results into docs/reliability.md")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "reliability.md")
    args = parser.parse_args(argv)
    args.out.write_text(render(_load(args.results)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
