"""The ShopFast demo services, without the mesh: real processes wired to each other directly.

Each service runs as `python demo-services/<name>.py` on a free 127.0.0.1 port, with its
upstreams passed as `<NAME>_URL`, exactly the contract the mesh fulfils. A small recording
HTTP server in the test stands in for upstreams where the test must see what was sent.
The pure parts (pricing, percentiles, pacing, trace labels) are checked as tables.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo-services"
TEMPLATES = REPO / "templates"
READY_DEADLINE_S = 20.0
STOP_DEADLINE_S = 10.0

TRACE = {
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "vendor=demo",
    "b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
    "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
    "x-b3-spanid": "e457b5a2e4d86bd1",
    "x-b3-parentspanid": "05e3ac9a4f6e3b90",
    "x-b3-sampled": "1",
    "x-request-id": "6e8f1c3a-demo-request",
}


def load_demo_module(name: str) -> ModuleType:
    """Import demo-services/<name>.py under a unique name; its sibling `shopkit` must resolve."""
    if str(DEMO) not in sys.path:
        sys.path.insert(0, str(DEMO))
    spec = importlib.util.spec_from_file_location("shopfast_" + name, DEMO / (name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


shopkit = load_demo_module("shopkit")
cart_module = load_demo_module("cart")
loadgen = load_demo_module("loadgen")
orderfeed = load_demo_module("orderfeed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def request(
    method: str, url: str, payload=None, headers: dict[str, str] | None = None, body: bytes | None = None
) -> Reply:
    host_port = url.split("//", 1)[1].split("/", 1)
    host, port = host_port[0].split(":")
    path = "/" + (host_port[1] if len(host_port) > 1 else "")
    outgoing = dict(headers or {})
    if payload is not None:
        body = json.dumps(payload).encode()
        outgoing["content-type"] = "application/json"
    connection = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        connection.request(method, path, body=body, headers=outgoing)
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


@dataclass
class RunningService:
    name: str
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.port

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Launcher:
    """Starts demo services on free ports, waits for /healthz, and stops them all at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[RunningService] = []

    def start(self, script: str, env: dict[str, str] | None = None, name: str | None = None, probe: str = "http") -> RunningService:
        name = name or script
        port = free_port()
        log_path = self.log_dir / ("%s-%d.log" % (name, port))
        full_env = {key: value for key, value in os.environ.items() if not key.endswith("_URL")}
        full_env.update({"PORT": str(port), "MESH_SERVICE": script, "PYTHONUNBUFFERED": "1", **(env or {})})
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, str(DEMO / (script + ".py"))],
                cwd=REPO,
                env=full_env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        service = RunningService(name, process, port, log_path)
        self.running.append(service)
        self._wait_ready(service, probe)
        return service

    def _wait_ready(self, service: RunningService, probe: str = "http") -> None:
        deadline = time.monotonic() + READY_DEADLINE_S
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                pytest.fail("%s exited with %s:\n%s" % (service.name, service.process.returncode, service.log()))
            try:
                if probe == "tcp":  # a gRPC app has no HTTP/1.1 /healthz; the mesh probes it the same way
                    socket.create_connection(("127.0.0.1", service.port), timeout=1).close()
                    return
                if request("GET", service.url + "/healthz").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)  # poll interval, not synchronisation: the deadline decides
        pytest.fail("%s not healthy within %ss:\n%s" % (service.name, READY_DEADLINE_S, service.log()))

    def stop(self, service: RunningService) -> int:
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
        try:
            return service.process.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait()
            raise

    def stop_all(self) -> None:
        for service in reversed(self.running):
            try:
                self.stop(service)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


@dataclass
class Shop:
    catalog: RunningService
    payments: RunningService
    cart: RunningService
    frontend: RunningService


def start_shop(launcher: Launcher, cart_env: dict | None = None, payments_env: dict | None = None) -> Shop:
    catalog = launcher.start("catalog")
    payments = launcher.start("payments", {"PAYMENTS_LATENCY_MS": "0", **(payments_env or {})})
    cart = launcher.start("cart", {"CATALOG_URL": catalog.url, "PAYMENTS_URL": payments.url, **(cart_env or {})})
    frontend = launcher.start("frontend", {"CATALOG_URL": catalog.url, "CART_URL": cart.url})
    return Shop(catalog, payments, cart, frontend)


@pytest.fixture
def shop(launcher: Launcher) -> Shop:
    return start_shop(launcher)


def wait_for_log(service: RunningService, fragment: str) -> str:
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        log = service.log()
        if fragment in log:
            return log
        time.sleep(0.05)
    pytest.fail("%r never appeared in the log of %s:\n%s" % (fragment, service.name, service.log()))


# --- catalog -------------------------------------------------------------------------------


def test_catalog_lists_a_dozen_products_and_finds_one_by_sku(launcher: Launcher) -> None:
    catalog = launcher.start("catalog", {"MESH_VERSION": "v1", "MESH_REPLICA": "1"})

    listing = request("GET", catalog.url + "/products")
    one = request("GET", catalog.url + "/products/mug-01")
    missing = request("GET", catalog.url + "/products/nope")

    assert listing.status == 200
    products = listing.json()["products"]
    assert len(products) == 12
    assert {"sku", "name", "price_cents"} <= set(products[0])
    assert listing.json()["served_by"] == {"service": "catalog", "version": "v1", "replica": "1"}
    assert one.status == 200 and one.json()["name"] == "Sidecar Mug"
    assert missing.status == 404 and missing.json()["error"] == "unknown-sku"
    assert "catalog@v1#1 GET /products 200" in wait_for_log(catalog, "GET /products/nope 404")


def test_keep_alive_serves_many_requests_on_one_connection(launcher: Launcher) -> None:
    catalog = launcher.start("catalog")
    connection = http.client.HTTPConnection("127.0.0.1", catalog.port, timeout=10)
    try:
        for path in ("/healthz", "/products", "/products/tee-02", "/missing", "/products"):
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            assert response.version == 11
            assert int(response.getheader("Content-Length")) == len(body)
            assert not response.will_close
    finally:
        connection.close()


def test_unknown_route_and_method_have_json_errors(launcher: Launcher) -> None:
    catalog = launcher.start("catalog")

    not_found = request("GET", catalog.url + "/nowhere")
    wrong_method = request("DELETE", catalog.url + "/products")

    assert not_found.status == 404 and not_found.json()["error"] == "not-found"
    assert wrong_method.status == 405 and wrong_method.headers["allow"] == "GET"


# --- cart and payments ---------------------------------------------------------------------


def test_cart_adds_items_per_user_and_prices_them(shop: Shop) -> None:
    added = request("POST", shop.cart.url + "/cart/items", {"sku": "mug-01", "qty": 2}, {"x-user": "ada"})
    again = request("POST", shop.cart.url + "/cart/items", {"sku": "socks-04"}, {"x-user": "ada"})
    ada = request("GET", shop.cart.url + "/cart", headers={"x-user": "ada"})
    bob = request("GET", shop.cart.url + "/cart", headers={"cookie": "user=bob"})

    assert added.status == 200 and again.status == 200
    cart = ada.json()
    assert cart["user"] == "ada"
    assert [(item["sku"], item["qty"]) for item in cart["items"]] == [("mug-01", 2), ("socks-04", 1)]
    assert cart["subtotal_cents"] == 2 * 1200 + 900
    assert cart["total_cents"] == cart["subtotal_cents"]
    assert cart["flavor"] == "standard" and cart["version"] == "v1"
    assert bob.json()["user"] == "bob" and bob.json()["items"] == []


@pytest.mark.parametrize(
    ("payload", "status", "error"),
    [
        ({"sku": "no-such-thing"}, 404, "unknown-sku"),
        ({"sku": "mug-01", "qty": 0}, 400, "bad-request"),
        ({"qty": 1}, 400, "bad-request"),
        (["mug-01"], 400, "bad-request"),
    ],
)
def test_cart_rejects_bad_items(shop: Shop, payload, status: int, error: str) -> None:
    reply = request("POST", shop.cart.url + "/cart/items", payload)
    assert (reply.status, reply.json()["error"]) == (status, error)


def test_cart_v2_takes_ten_percent_off(launcher: Launcher) -> None:
    shop = start_shop(launcher, cart_env={"CART_FLAVOR": "discount", "MESH_VERSION": "v2"})

    cart = request("POST", shop.cart.url + "/cart/items", {"sku": "hoodie-03", "qty": 2}).json()

    assert cart["flavor"] == "discount" and cart["version"] == "v2"
    assert cart["subtotal_cents"] == 9800
    assert cart["discount_cents"] == 980
    assert cart["total_cents"] == 8820


def test_checkout_charges_payments_and_empties_the_cart(shop: Shop) -> None:
    request("POST", shop.cart.url + "/cart/items", {"sku": "lamp-11"}, {"x-user": "cy"})

    checkout = request("POST", shop.cart.url + "/checkout", headers={"x-user": "cy"})
    after = request("GET", shop.cart.url + "/cart", headers={"x-user": "cy"})
    empty = request("POST", shop.cart.url + "/checkout", headers={"x-user": "cy"})

    assert checkout.status == 200
    order = checkout.json()
    assert order["status"] == "paid"
    assert order["payment"]["status"] == "approved"
    assert order["payment"]["amount_cents"] == order["total_cents"] == 3900
    assert after.json()["items"] == []
    assert empty.status == 400 and empty.json()["error"] == "cart-empty"
    wait_for_log(shop.payments, "POST /charge 200")


def test_checkout_reports_failure_when_payments_fails(launcher: Launcher) -> None:
    shop = start_shop(launcher, payments_env={"PAYMENTS_FAILURE_RATE": "1.0"})
    request("POST", shop.cart.url + "/cart/items", {"sku": "cap-06"})

    direct = request("POST", shop.cart.url + "/checkout")
    via_frontend = request("POST", shop.frontend.url + "/api/checkout")
    kept = request("GET", shop.cart.url + "/cart")

    assert direct.status == 502 and direct.json()["error"] == "payment-failed"
    assert direct.json()["upstream_status"] == 503
    assert via_frontend.status == 502 and via_frontend.json()["detail"]["error"] == "payment-failed"
    assert [item["sku"] for item in kept.json()["items"]] == ["cap-06"]


# --- frontend ------------------------------------------------------------------------------


def test_frontend_json_api_goes_through_to_catalog_and_cart(shop: Shop) -> None:
    products = request("GET", shop.frontend.url + "/api/products")
    added = request("POST", shop.frontend.url + "/api/cart/items", {"sku": "tee-02"}, {"x-user": "dee"})
    cart = request("GET", shop.frontend.url + "/api/cart", headers={"x-user": "dee"})
    checkout = request("POST", shop.frontend.url + "/api/checkout", headers={"x-user": "dee"})

    assert products.status == 200 and len(products.json()["products"]) == 12
    assert added.status == 200
    assert [item["sku"] for item in cart.json()["items"]] == ["tee-02"]
    assert checkout.status == 200 and checkout.json()["status"] == "paid"


def test_frontend_page_shows_products_cart_and_cart_version(shop: Shop) -> None:
    request("POST", shop.frontend.url + "/api/cart/items", {"sku": "plush-12"}, {"x-user": "eve"})

    page = request("GET", shop.frontend.url + "/", headers={"cookie": "user=eve"})

    assert page.status == 200
    assert page.headers["content-type"].startswith("text/html")
    assert int(page.headers["content-length"]) == len(page.body)
    for name in ("Sidecar Mug", "Canary T-Shirt", "Mesh Octopus Plush"):
        assert name in page.text
    assert "cart v1" in page.text
    assert "Check out" in page.text
    assert "Canary deal" not in page.text
    assert "<link" not in page.text and "<script src" not in page.text


def test_frontend_page_shows_the_discount_banner_for_cart_v2(launcher: Launcher) -> None:
    shop = start_shop(launcher, cart_env={"CART_FLAVOR": "discount", "MESH_VERSION": "v2"})

    page = request("GET", shop.frontend.url + "/")

    assert "Canary deal" in page.text and "cart v2" in page.text


def test_frontend_forms_add_and_check_out_then_redirect(shop: Shop) -> None:
    form = {"content-type": "application/x-www-form-urlencoded", "cookie": "user=fay"}

    added = request("POST", shop.frontend.url + "/cart/add", headers=form, body=b"sku=bottle-07&qty=1")
    page = request("GET", shop.frontend.url + added.headers["location"], headers=form)
    paid = request("POST", shop.frontend.url + "/checkout", headers=form, body=b"")

    assert added.status == 303 and added.headers["location"].startswith("/?notice=")
    assert "Added to cart" in page.text and "Load Balancer Bottle ×" in page.text
    assert paid.status == 303 and "Paid" in paid.headers["location"]


def read_sse_events(sock: socket.socket, wanted: int) -> tuple[bytes, list[dict]]:
    """Read a chunked text/event-stream until `wanted` order events came: (head, their data)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, "closed before the head: %r" % buffer
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    # The events may have come in the same read as the head: count them before reading more.
    orders = complete_sse_data(body)
    while len(orders) < wanted:
        chunk = sock.recv(65536)
        assert chunk, "the feed closed after %r" % body
        body += chunk
        orders = complete_sse_data(body)
    return head, orders


def complete_sse_data(body: bytes) -> list[dict]:
    """The `data:` payloads of the events whose blank line has arrived (a read may end mid-event)."""
    complete, _, _ = body.rpartition(b"\n\n")
    return [json.loads(line[6:]) for line in complete.split(b"\n") if line.startswith(b"data: ")]


def test_frontend_order_feed_streams_each_paid_order(launcher: Launcher, shop: Shop) -> None:
    with socket.create_connection(("127.0.0.1", shop.frontend.port), timeout=15) as feed:
        feed.sendall(b"GET /api/orders/feed HTTP/1.1\r\nHost: shop\r\nAccept: text/event-stream\r\n\r\n")
        for user in ("ivy", "jo"):
            request("POST", shop.frontend.url + "/api/cart/items", {"sku": "mug-01", "qty": 2}, {"x-user": user})
            assert request("POST", shop.frontend.url + "/api/checkout", headers={"x-user": user}).status == 200
        head, orders = read_sse_events(feed, 2)
        page = request("GET", shop.frontend.url + "/")
        assert launcher.stop(shop.frontend) == 0  # an open feed does not hold up a clean stop
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-type: text/event-stream" in head.lower() and b"transfer-encoding: chunked" in head.lower()
    assert [(order["user"], order["items"]) for order in orders] == [("ivy", 2), ("jo", 2)]
    assert "Live orders" in page.text and 'new EventSource("/api/orders/feed")' in page.text


def test_order_feed_replays_kept_orders_resumes_and_keeps_alive() -> None:
    feed = orderfeed.OrderFeed(kept=2)
    for number in range(3):
        feed.publish({"order_id": "o%d" % number})
    events = feed.events(heartbeat_s=0.0)
    assert next(events).startswith(b"retry: ")
    assert [next(events), next(events)] == [orderfeed.sse_event(2, "order", {"order_id": "o1"}),
                                            orderfeed.sse_event(3, "order", {"order_id": "o2"})]
    assert next(events) == b": still here\n\n"  # nothing new: a comment keeps the stream visibly alive
    resumed = feed.events(last_event_id="2")
    next(resumed)
    assert next(resumed) == orderfeed.sse_event(3, "order", {"order_id": "o2"})


def test_frontend_switches_shopper_with_a_cookie(shop: Shop) -> None:
    page = request("GET", shop.frontend.url + "/?user=gus")
    assert page.headers["set-cookie"].startswith("user=gus;")
    assert "value='gus'" in page.text


def test_frontend_degrades_gracefully_when_an_upstream_is_down(launcher: Launcher) -> None:
    catalog = launcher.start("catalog")
    nothing_listens = "http://127.0.0.1:%d" % free_port()
    frontend = launcher.start("frontend", {"CATALOG_URL": catalog.url, "CART_URL": nothing_listens})

    page = request("GET", frontend.url + "/")
    api = request("GET", frontend.url + "/api/cart")

    assert page.status == 200
    assert "Sidecar Mug" in page.text
    assert "cart unreachable" in page.text and "The cart is unavailable" in page.text
    assert api.status == 502 and api.json()["error"] == "upstream-unavailable"


# --- trace propagation ---------------------------------------------------------------------


class RecordingUpstream:
    """Stands in for every upstream: records each request's headers, answers plausibly."""

    CANNED = {
        "/products": {"products": [{"sku": "mug-01", "name": "Sidecar Mug", "price_cents": 1200}],
                      "served_by": {"service": "catalog", "version": "v1", "replica": "0"}},
        "/cart": {"user": "guest", "items": [], "item_count": 0, "subtotal_cents": 0, "discount_cents": 0,
                  "total_cents": 0, "flavor": "standard", "version": "v1"},
        "/charge": {"status": "approved", "payment_id": "pay_test", "amount_cents": 1200},
    }

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recorder.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = json.dumps(recorder.CANNED.get(self.path, {})).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="recording-upstream", daemon=True)

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.server.server_port


@pytest.fixture
def recorder() -> Iterator[RecordingUpstream]:
    upstream = RecordingUpstream()
    upstream.thread.start()
    try:
        yield upstream
    finally:
        upstream.server.shutdown()
        upstream.server.server_close()
        upstream.thread.join()


@pytest.mark.parametrize(
    ("service", "upstream_vars", "calls"),
    [
        ("frontend", ("CATALOG_URL", "CART_URL"), [("GET", "/", None), ("POST", "/api/checkout", None)]),
        ("cart", ("CATALOG_URL", "PAYMENTS_URL"), [("POST", "/cart/items", {"sku": "mug-01"}), ("POST", "/checkout", None)]),
    ],
)
def test_trace_headers_are_forwarded_on_every_outgoing_call(
    launcher: Launcher, recorder: RecordingUpstream, service: str, upstream_vars: tuple, calls: list
) -> None:
    app = launcher.start(service, {name: recorder.url for name in upstream_vars})

    for method, path, payload in calls:
        reply = request(method, app.url + path, payload, {**TRACE, "x-user": "hal"})
        assert reply.status in (200, 303), reply.body

    assert len(recorder.seen) >= 3, recorder.seen
    for method, path, headers in recorder.seen:
        assert {name: headers.get(name) for name in TRACE} == TRACE, (method, path)
    if service == "frontend":
        assert all(headers.get("x-user") == "hal" for _, path, headers in recorder.seen if path.startswith("/c"))
    else:
        assert ("POST", "/charge") in [(method, path) for method, path, _ in recorder.seen]


# --- process behaviour ---------------------------------------------------------------------


@pytest.mark.parametrize("script", ["catalog", "payments", "cart", "frontend", "hello"])
def test_sigterm_stops_the_service_with_exit_status_zero(launcher: Launcher, script: str) -> None:
    unused = "http://127.0.0.1:%d" % free_port()
    service = launcher.start(script, {"CATALOG_URL": unused, "CART_URL": unused, "PAYMENTS_URL": unused})
    assert launcher.stop(service) == 0, service.log()


def test_a_missing_upstream_variable_is_a_clear_startup_error() -> None:
    env = {key: value for key, value in os.environ.items() if not key.endswith("_URL")}
    done = subprocess.run(
        [sys.executable, str(DEMO / "frontend.py")],
        env={**env, "PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "CATALOG_URL" in done.stderr and "CART_URL" in done.stderr


def test_hello_says_who_it_is(launcher: Launcher) -> None:
    hello = launcher.start("hello", {"MESH_SERVICE": "hello", "MESH_VERSION": "v1", "MESH_REPLICA": "0"})
    assert request("GET", hello.url + "/").text == "hello from hello@v1#0\n"
    assert request("GET", hello.url + "/healthz").text == "ok"


# --- templates and load generator ----------------------------------------------------------


def start_from_template(launcher: Launcher, template: Path) -> dict[str, RunningService]:
    """Start one instance of each service's first version, wired as the template's upstreams say."""
    manifest = yaml.safe_load(template.read_text())
    started: dict[str, RunningService] = {}
    pending = dict(manifest["services"])
    while pending:
        name, spec = next(
            (name, spec) for name, spec in pending.items() if all(up in started for up in spec.get("upstreams", []))
        )
        del pending[name]
        version = next(iter(spec["versions"].values())) if "versions" in spec else spec
        command = version["command"].split()
        assert command[0] == "python" and command[1].startswith("demo-services/"), command
        env = {key: str(value) for key, value in {**spec.get("env", {}), **version.get("env", {})}.items()}
        env.update({up.upper() + "_URL": started[up].url for up in spec.get("upstreams", [])})
        probe = "tcp" if spec.get("protocol") in ("grpc", "tcp") else "http"
        started[name] = launcher.start(Path(command[1]).stem, env, name=name, probe=probe)
    return started


@pytest.mark.parametrize("template", ["shopfast.yaml", "hello.yaml"])
def test_templates_are_valid_manifests(template: str) -> None:
    from meshctl.agent.manifest import load_manifest

    manifest = load_manifest(TEMPLATES / template)

    assert manifest.ingress is not None
    for service in manifest.services:
        for version in service.versions:
            assert (Path(version.workdir) / version.command[1]).is_file()


def test_loadgen_drives_the_template_graph_and_prints_a_summary(launcher: Launcher) -> None:
    services = start_from_template(launcher, TEMPLATES / "shopfast.yaml")

    done = subprocess.run(
        [
            sys.executable, str(DEMO / "loadgen.py"),
            "--url", services["frontend"].url,
            "--requests", "60", "--rps", "0", "--concurrency", "3", "--report-every", "0", "--seed", "7",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "ShopFast loadgen summary" in done.stdout
    assert "requests    60 in" in done.stdout
    assert "200: " in done.stdout
    assert "p50" in done.stdout and "p95" in done.stdout and "p99" in done.stdout
    wait_for_log(services["catalog"], "GET /products 200")


# --- pure units ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantities", "discount_percent", "subtotal", "discount", "total"),
    [
        ({}, 0, 0, 0, 0),
        ({"a": 2}, 0, 2000, 0, 2000),
        ({"a": 1, "b": 3}, 10, 1000 + 3 * 250, 175, 1575),
        ({"b": 1}, 10, 250, 25, 225),
        ({"c": 1}, 10, 5, 1, 4),  # half a cent rounds up
        ({"gone": 4, "a": 1}, 10, 1000, 100, 900),  # SKUs the catalog no longer has are left out
    ],
)
def test_price_cart(quantities, discount_percent, subtotal, discount, total) -> None:
    products = {
        "a": {"name": "A", "price_cents": 1000},
        "b": {"name": "B", "price_cents": 250},
        "c": {"name": "C", "price_cents": 5},
    }
    priced = cart_module.price_cart(quantities, products, discount_percent)
    assert (priced["subtotal_cents"], priced["discount_cents"], priced["total_cents"]) == (subtotal, discount, total)


def test_cart_store_keeps_items_added_during_a_payment() -> None:
    store = cart_module.CartStore()
    store.add("ada", "a", 2)
    paid = store.contents("ada")
    store.add("ada", "a", 1)
    store.add("ada", "b", 1)

    store.remove("ada", paid)

    assert store.contents("ada") == {"a": 1, "b": 1}


@pytest.mark.parametrize(
    ("samples", "fraction", "expected"),
    [
        ([], 0.5, 0.0),
        ([7.0], 0.99, 7.0),
        ([4.0, 1.0, 3.0, 2.0], 0.5, 2.0),
        (list(range(1, 101)), 0.95, 95),
        (list(range(1, 101)), 0.99, 99),
        (list(range(1, 11)), 0.99, 10),
    ],
)
def test_percentile_is_nearest_rank(samples, fraction, expected) -> None:
    assert loadgen.percentile(samples, fraction) == expected


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("rps", "duration", "max_requests", "expected_slots"),
    [
        (10.0, None, 3, [100.0, 100.1, 100.2]),
        (2.0, 1.5, None, [100.0, 100.5, 101.0]),
        (0.0, None, 2, [100.0, 100.0]),
        (5.0, None, 0, []),
    ],
)
def test_pacer_spaces_requests_and_stops_at_the_bound(rps, duration, max_requests, expected_slots) -> None:
    pacer = loadgen.Pacer(rps, duration, max_requests, clock=FakeClock())
    slots = []
    while (slot := pacer.next_slot()) is not None and len(slots) < 10:
        slots.append(slot)
    assert slots == pytest.approx(expected_slots)


@pytest.mark.parametrize(
    ("headers", "label"),
    [
        (TRACE, "trace=4bf92f35"),
        ({"x-b3-traceid": "80f198ee56343ba8", "x-request-id": "r1"}, "trace=80f198ee"),
        ({"b3": TRACE["b3"]}, "trace=80f198ee"),
        ({"x-request-id": "9f2c41d0aa17000000000001"}, "rid=9f2c41d0aa17000000000001"),
        ({"traceparent": "garbage"}, ""),
        ({}, ""),
    ],
)
def test_trace_label(headers, label) -> None:
    assert shopkit.trace_label(headers) == label


def test_propagated_headers_keeps_only_trace_headers() -> None:
    incoming = {**TRACE, "x-user": "ada", "cookie": "user=ada", "content-length": "0"}
    assert shopkit.propagated_headers(incoming) == TRACE


def test_shoppers_check_out_only_carts_they_filled() -> None:
    shoppers = loadgen.Shoppers(["u1", "u2"])
    rng = random.Random(3)
    plans: list = [shoppers.plan(rng, ["mug-01"]) for _ in range(200)]
    assert "checkout" not in {plan.action for plan in plans}

    add = next(plan for plan in plans if plan.action == "add")
    shoppers.observe(add, 200)
    checkouts = [plan for plan in (shoppers.plan(rng, ["mug-01"]) for _ in range(200)) if plan.action == "checkout"]
    assert checkouts and {plan.user for plan in checkouts} == {add.user}


def test_upstreams_from_env_maps_names_to_variables() -> None:
    upstreams = shopkit.upstreams_from_env(("catalog", "order-history"), {
        "CATALOG_URL": "http://127.0.0.1:4100", "ORDER_HISTORY_URL": "http://127.0.0.1:4200/base/",
    })
    assert (upstreams["catalog"].host, upstreams["catalog"].port) == ("127.0.0.1", 4100)
    assert upstreams["order-history"].base_path == "/base"

