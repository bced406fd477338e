"""ShopFast load generator: realistic shopping traffic at one ingress URL, then a summary.

    python demo-services/loadgen.py --url http://127.0.0.1:8080 --rps 20 --duration 60

A weighted mix of browsing the shop page, listing products, viewing carts, adding items
and checking out, spread over --users shoppers (sent as `x-user`, so carts are real).
Checkouts go to shoppers whose cart holds something. Requests go out at --rps (0: as fast
as --concurrency connections allow) until --duration seconds or --requests requests, or
until Ctrl-C / SIGTERM; then it prints requests, counts per status and p50/p95/p99.
Only the given URL is ever contacted. Exit status 1 when no request got any response.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import signal
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

FALLBACK_SKUS = ("mug-01", "tee-02", "socks-04", "sticker-05")
CONNECTION_ERROR = "conn-error"


@dataclass(frozen=True)
class Action:
    name: str
    method: str
    path: str
    weight: int


ACTIONS = (
    Action("browse", "GET", "/", 30),
    Action("products", "GET", "/api/products", 25),
    Action("view-cart", "GET", "/api/cart", 15),
    Action("add", "POST", "/api/cart/items", 22),
    Action("checkout", "POST", "/api/checkout", 8),
)
ADD = ACTIONS[3]


@dataclass(frozen=True)
class PlannedRequest:
    action: str
    method: str
    path: str
    user: str
    body: bytes | None = None


class Shoppers:
    """Which shoppers have something in their cart, as far as our own requests tell."""

    def __init__(self, users: Sequence[str]) -> None:
        self.users = tuple(users)
        self._with_items: set[str] = set()
        self._lock = threading.Lock()

    def plan(self, rng: random.Random, skus: Sequence[str]) -> PlannedRequest:
        action = rng.choices(ACTIONS, weights=[a.weight for a in ACTIONS])[0]
        user = rng.choice(self.users)
        if action.name == "checkout":
            with self._lock:
                ready = sorted(self._with_items)
            if not ready:
                action = ADD  # nobody can check out yet: shop first, as a person would
            else:
                user = rng.choice(ready)
        body = None
        if action is ADD:
            body = json.dumps({"sku": rng.choice(skus), "qty": rng.choice((1, 1, 1, 2, 3))}).encode()
        return PlannedRequest(action.name, action.method, action.path, user, body)

    def observe(self, request: PlannedRequest, status: int | str) -> None:
        with self._lock:
            if request.action == "add" and status == 200:
                self._with_items.add(request.user)
            elif request.action == "checkout" and status in (200, 400):
                self._with_items.discard(request.user)  # paid, or the cart was already empty


class Pacer:
    """Hands out send times: request i is due at start + i / rps. None once the run is over."""

    def __init__(
        self, rps: float, duration: float | None, max_requests: int | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rps = rps
        self.duration = duration
        self.max_requests = max_requests
        self.clock = clock
        self.start = clock()
        self.issued = 0
        self._lock = threading.Lock()

    def next_slot(self) -> float | None:
        with self._lock:
            if self.max_requests is not None and self.issued >= self.max_requests:
                return None
            due = self.start + self.issued / self.rps if self.rps > 0 else self.clock()
            if self.duration is not None and due - self.start >= self.duration:
                return None
            self.issued += 1
            return due


@dataclass
class Results:
    statuses: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    by_action: Counter = field(default_factory=Counter)
    failures_by_action: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, request: PlannedRequest, status: int | str, latency_ms: float) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.by_action[request.action] += 1
            if status == CONNECTION_ERROR or int(status) >= 500:
                self.failures_by_action[request.action] += 1
            if status != CONNECTION_ERROR:
                self.latencies_ms.append(latency_ms)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of unsorted samples; 0.0 when there are none."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(len(ordered) * fraction)))
    return ordered[rank - 1]


def summarize(results: Results, target: str, elapsed_s: float) -> str:
    total = results.total
    rate = total / elapsed_s if elapsed_s > 0 else 0.0
    statuses = "  ".join("%s: %d" % (status, count) for status, count in sorted(results.statuses.items(), key=str))
    lat = results.latencies_ms
    ok = sum(count for status, count in results.statuses.items() if status != CONNECTION_ERROR and int(status) < 500)
    lines = [
        "ShopFast loadgen summary",
        "  target      %s" % target,
        "  requests    %d in %.1f s (%.1f/s)" % (total, elapsed_s, rate),
        "  success     %.1f %% (no 5xx, no connection error)" % (100.0 * ok / total if total else 0.0),
        "  status      %s" % (statuses or "none"),
        "  latency ms  p50 %.1f  p95 %.1f  p99 %.1f  max %.1f"
        % (percentile(lat, 0.50), percentile(lat, 0.95), percentile(lat, 0.99), max(lat, default=0.0)),
        "  by action   %s"
        % "  ".join(
            "%s %d (%d failed)" % (name, count, results.failures_by_action[name])
            for name, count in sorted(results.by_action.items())
        ),
    ]
    return "\n".join(lines)


class Client:
    """One keep-alive connection to the target, reopened after a failure."""

    def __init__(self, target: urllib.parse.SplitResult, timeout: float) -> None:
        self.host = target.hostname or "127.0.0.1"
        self.port = target.port or 80
        self.base_path = target.path.rstrip("/")
        self.timeout = timeout
        self.connection: http.client.HTTPConnection | None = None

    def send(self, request: PlannedRequest) -> int:
        headers = {"x-user": request.user, "accept": "application/json, text/html"}
        if request.body is not None:
            headers["content-type"] = "application/json"
        reused = self.connection is not None
        try:
            return self._exchange(request, headers)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self.close()
            if not reused:
                raise
            # The server closed an idle keep-alive connection before reading this request.
            return self._exchange(request, headers)

    def _exchange(self, request: PlannedRequest, headers: dict[str, str]) -> int:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self.connection.request(request.method, self.base_path + request.path, body=request.body, headers=headers)
            response = self.connection.getresponse()
            response.read()
        except BaseException:
            self.close()
            raise
        return response.status

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def fetch_skus(target: urllib.parse.SplitResult, timeout: float) -> tuple[str, ...]:
    connection = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port or 80, timeout=timeout)
    try:
        connection.request("GET", target.path.rstrip("/") + "/api/products", headers={"accept": "application/json"})
        response = connection.getresponse()
        data = json.loads(response.read()) if response.status == 200 else {}
        return tuple(product["sku"] for product in data.get("products", ())) or FALLBACK_SKUS
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
        return FALLBACK_SKUS
    finally:
        connection.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="ingress URL [%(default)s]")
    parser.add_argument("--rps", type=float, default=10.0, help="requests per second, 0 = unthrottled [%(default)s]")
    parser.add_argument("--duration", type=float, default=None, help="seconds to run [until Ctrl-C]")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many requests")
    parser.add_argument("--concurrency", type=int, default=4, help="parallel connections [%(default)s]")
    parser.add_argument("--users", type=int, default=25, help="distinct shoppers [%(default)s]")
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds [%(default)s]")
    parser.add_argument("--seed", type=int, default=None, help="fix the random mix")
    parser.add_argument("--report-every", type=float, default=5.0, help="progress line period, 0 = off")
    args = parser.parse_args(argv)
    target = urllib.parse.urlsplit(args.url)
    if target.scheme != "http" or not target.hostname:
        parser.error("--url must be an http:// URL")
    if args.rps < 0 or args.concurrency < 1 or args.users < 1 or (args.requests is not None and args.requests < 0):
        parser.error("--rps must be >= 0; --concurrency, --users and --requests must be positive")
    args.target = target
    return args


def run(args: argparse.Namespace) -> int:
    skus = fetch_skus(args.target, args.timeout)
    shoppers = Shoppers(["shopper-%02d" % i for i in range(1, args.users + 1)])
    pacer = Pacer(args.rps, args.duration, args.requests)
    results = Results()
    stop = threading.Event()
    all_done = threading.Event()
    remaining = [args.concurrency]
    remaining_lock = threading.Lock()
    seeder = random.Random(args.seed)

    def worker(rng: random.Random) -> None:
        client = Client(args.target, args.timeout)
        try:
            while not stop.is_set():
                due = pacer.next_slot()
                if due is None or stop.wait(max(0.0, due - time.monotonic())):
                    return
                planned = shoppers.plan(rng, skus)
                started = time.perf_counter()
                try:
                    status: int | str = client.send(planned)
                except (OSError, http.client.HTTPException):
                    status = CONNECTION_ERROR
                results.record(planned, status, (time.perf_counter() - started) * 1000)
                shoppers.observe(planned, status)
        finally:
            client.close()
            with remaining_lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    all_done.set()

    threads = [
        threading.Thread(target=worker, args=(random.Random(seeder.random()),), name="loadgen-%d" % i, daemon=True)
        for i in range(args.concurrency)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while not all_done.wait(args.report_every or None):
            elapsed = time.monotonic() - started
            print("  %6.1fs  %6d requests  %6.1f/s" % (elapsed, results.total, results.total / elapsed), flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted, finishing requests in flight", flush=True)
    stop.set()
    for thread in threads:
        thread.join()
    print(summarize(results, args.url, time.monotonic() - started), flush=True)
    if results.total and results.statuses[CONNECTION_ERROR] == results.total:
        print("no request got a response: is the mesh up at %s?" % args.url, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(parse_args(None)))
