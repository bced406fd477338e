"""`meshctl dashboard` end to end: a real mesh, the agent's web server, a real headless Chromium.

Access rules are also checked without a browser (urllib, no redirects followed), so they hold
for any client. The ShopFast test is what `make screenshots` runs: with MESHCTL_SCREENSHOTS set
to a directory it writes dashboard-topology.png there (docs/ for the README).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from meshctl.agent.dashboard_http import Request, Verdict, check_access, clean_location, parse_head
from meshctl.agent.dashboard_views import History, promotion_view
from meshctl.agent.promote import Promotion, Thresholds
from tests.meshharness import APPS, REPO, Mesh, free_port, http_get, wait_for
from tests.test_observability import MESH as OBS_MESH

CHROMIUM_FLAGS = ("--headless", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1440,900")

def dash_manifest(port: int) -> str:
    """test_observability's two-tier mesh (ingress -> front -> back), back with two versions."""
    doc = yaml.safe_load(OBS_MESH.format(port=port, PY=sys.executable, APPS=APPS))
    doc["mesh"] = "dash"
    back = doc["services"]["back"]
    back["versions"]["v2"] = dict(back["versions"]["v1"])
    back["split"] = {"v1": 50, "v2": 50}
    return yaml.safe_dump(doc, sort_keys=False)


# -- pure: who gets in --------------------------------------------------------------------------


def _request(method="GET", path="/", query=None, **headers) -> Request:
    base = {"host": "127.0.0.1:8000"}
    base.update({name.replace("_", "-"): value for name, value in headers.items()})
    return Request(method, path, query or {}, base)


@pytest.mark.parametrize(
    "request_, verdict",
    [
        (_request(query={"token": "T"}), Verdict.LOGIN),
        (_request(query={"token": "wrong"}), Verdict.UNAUTHORIZED),
        (_request(), Verdict.UNAUTHORIZED),
        (_request(cookie="meshctl-dashboard-8000=wrong"), Verdict.UNAUTHORIZED),
        (_request(cookie="meshctl-dashboard-9999=T"), Verdict.UNAUTHORIZED),  # another dashboard's cookie
        (_request(cookie="meshctl-dashboard-8000=T"), Verdict.ADMIT),
        (_request(path="/api/events", cookie="meshctl-dashboard-8000=T"), Verdict.ADMIT),
        (_request(host="evil.example:8000", cookie="meshctl-dashboard-8000=T"), Verdict.FORBIDDEN),  # DNS rebinding
        (_request("POST", cookie="meshctl-dashboard-8000=T", origin="http://127.0.0.1:8000"), Verdict.ADMIT),
        (_request("POST", cookie="meshctl-dashboard-8000=T", origin="http://localhost:8000"), Verdict.ADMIT),
        (_request("POST", cookie="meshctl-dashboard-8000=T", origin="http://evil.example"), Verdict.FORBIDDEN),
        (_request("POST", cookie="meshctl-dashboard-8000=T"), Verdict.FORBIDDEN),
        (_request("POST", origin="http://127.0.0.1:8000"), Verdict.UNAUTHORIZED),
    ],
)
def test_access_rules(request_, verdict):
    assert check_access(request_, "T", 8000).verdict is verdict


def test_parse_head_and_clean_location():
    request = parse_head(b"GET /a/b?token=x&keep=1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\nCookie: a=b\r\n\r\n")
    assert (request.method, request.path, request.query) == ("GET", "/a/b", {"token": "x", "keep": "1"})
    assert request.headers["cookie"] == "a=b"
    assert clean_location(request) == "/a/b?keep=1"


def test_history_keeps_five_minutes_per_version():
    history = History(seconds=3)
    for second in range(5):
        history.record(float(second), [{"service": "a", "version": "v1", "rps": second, "success_rate": 1.0, "p99_ms": 2.0}])
    assert [point[0] for point in history.to_json()["a@v1"]] == [2.0, 3.0, 4.0]
    history.forget_except(set())
    assert history.to_json() == {}


def test_promotion_view_shows_the_ladder_it_climbs():
    promotion = Promotion("cart", "v2", "v1", 50, Thresholds(step=30, interval_s=5.0), source=None, apply_split=None)  # type: ignore[arg-type]
    view = promotion_view(promotion)
    assert [(s["weight"], s["reached"]) for s in view["steps"]] == [(0, True), (30, True), (60, False), (90, False), (100, False)]
    assert (view["canary"], view["baseline"], view["weight"], view["running"]) == ("v2", "v1", 50, False)


# -- a real mesh and a real browser ---------------------------------------------------------------


def chromium(profile: Path):
    """A headless Chromium driven by chromium-driver, or a skip saying what is missing."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("chromium and chromium-driver are not installed (`make test-deps` installs them as root)")
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS + (("--no-sandbox",) if os.getuid() == 0 else ()):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


class Dash:
    """A running mesh with its dashboard: URL, token, and a logged-in browser when asked."""

    def __init__(self, mesh: Mesh, ingress_port: int) -> None:
        self.mesh = mesh
        self.ingress = f"http://127.0.0.1:{ingress_port}"
        self.url = mesh.cli("dashboard", "--print-url", check=True).stdout.strip()
        parts = urlsplit(self.url)
        self.port = parts.port
        self.token = parts.query.removeprefix("token=")
        self.base = f"http://127.0.0.1:{self.port}"
        self.cookie = f"meshctl-dashboard-{self.port}={self.token}"
        self.browser = None

    def open_browser(self, profile: Path):
        self.browser = chromium(profile)
        self.browser.get(self.url)
        return self.browser

    def raw(self, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
            read: bool = True) -> tuple[int, dict, bytes]:
        """One request, redirects not followed, so the login's own answer can be seen."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read() if read else resp.read(0)
        finally:
            conn.close()

    def traffic(self, count: int, path: str = "/call/back/whoami") -> None:
        for _ in range(count):
            http_get(self.ingress + path)

    def json(self, *args: str):
        return json.loads(self.mesh.cli(*args, "-o", "json", check=True).stdout)


@pytest.fixture(scope="module")
def dash(tmp_path_factory):
    mesh = Mesh(tmp_path_factory.mktemp("dash"))
    try:
        port = free_port()
        mesh.write_manifest(dash_manifest(port))
        mesh.up()
        yield Dash(mesh, port)
    finally:
        mesh.cleanup()


@pytest.fixture
def browser(dash, tmp_path):
    driver = dash.open_browser(tmp_path / "chromium")
    try:
        yield driver
    finally:
        driver.quit()


def wait_css(driver, selector: str, what: str, timeout: float = 30.0):
    from selenium.webdriver.common.by import By

    return wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, selector), timeout=timeout, interval=0.2, what=what)


def test_token_file_is_private_and_matches_the_url(dash):
    path = dash.mesh.home / "dashboard.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == dash.token
    again = dash.mesh.cli("dashboard", "--no-open", check=True).stdout
    assert "already running" in again and dash.url in again
    other = dash.mesh.cli("dashboard", "--port", str(free_port()))
    assert other.returncode == 1 and f"already serves on port {dash.port}" in other.stderr


def test_without_the_token_everything_is_401(dash):
    for path in ("/", "/static/app.js", "/api/state", "/api/events", "/api/requests?service=back", "/api/read/trace?id=x"):
        status, _, body = dash.raw("GET", path, {"Host": f"127.0.0.1:{dash.port}"})
        assert status == 401, (path, body)
        assert json.loads(body)["error"]["code"] == "unauthorized"
    status, _, _ = dash.raw("GET", "/?token=not-the-token")
    assert status == 401
    status, headers, _ = dash.raw("GET", f"/?token={dash.token}")
    assert status == 303 and headers["location"] == "/"
    assert headers["set-cookie"] == f"{dash.cookie}; HttpOnly; SameSite=Strict; Path=/"
    status, headers, _ = dash.raw("GET", "/api/events", {"Cookie": dash.cookie}, read=False)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")


def test_a_change_with_a_wrong_origin_is_refused(dash):
    before = dash.json("route", "show", "back")["services"]["back"]["live"]["split"]
    body = json.dumps({"service": "back", "split": {"v1": 10, "v2": 90}}).encode()
    base = {"Cookie": dash.cookie, "Content-Type": "application/json"}
    for origin in ("http://evil.example", "null", None):
        headers = {**base, **({"Origin": origin} if origin else {})}
        status, _, answer = dash.raw("POST", "/api/do/route-split", headers, body)
        assert status == 403 and json.loads(answer)["error"]["code"] == "forbidden", origin
    status, _, _ = dash.raw("POST", "/api/do/route-split", {"Origin": f"http://127.0.0.1:{dash.port}",
                                                            "Content-Type": "application/json"}, body)
    assert status == 401  # the right Origin without the cookie is not enough either
    status, _, answer = dash.raw("POST", "/api/do/down", {**base, "Origin": f"http://127.0.0.1:{dash.port}"}, b"{}")
    assert status == 404  # only the listed changes: not `down`, `apply` or `import-ca`
    assert dash.json("route", "show", "back")["services"]["back"]["live"]["split"] == before


def test_the_page_shows_services_and_edges(dash, browser):
    dash.traffic(20)
    assert "token" not in browser.current_url  # swapped for the cookie and redirected away
    cookie = browser.get_cookie(f"meshctl-dashboard-{dash.port}")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    for node in ("front@v1", "back@v1", "back@v2"):
        wait_css(browser, f'svg.topology [data-node="{node}"]', f"the node {node}")
    wait_css(browser, 'svg.topology path[data-edge="front>back"]:not(.idle)', "a live edge front -> back")
    wait_css(browser, 'svg.topology path[data-edge="ingress>front"]:not(.idle)', "a live edge ingress -> front")
    wait_css(browser, "svg.topology .edge-label", "edge labels")
    labels = browser.execute_script(  # read in one go: the picture is redrawn every second
        "return [...document.querySelectorAll('svg.topology .edge-label')].map((t) => t.textContent).join(' ')")
    assert "rps" in labels
    assert wait_css(browser, "svg.topology .lock", "mTLS locks on the edges")
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_a_split_applied_from_the_service_page_reaches_every_sidecar(dash, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{dash.base}/#/service/back")
    field = wait_css(browser, "#split-input-v2", "the split inputs")[0]
    field.clear()
    field.send_keys("30")
    v1 = browser.find_element(By.CSS_SELECTOR, "#split-input-v1")
    assert v1.get_attribute("value") == "70"  # the others follow: always 100 in total
    assert browser.find_element(By.CSS_SELECTOR, "#split-sum").text == "total 100%"
    shares = browser.execute_script('return M.rebalance({v1: 50, v2: 30, v3: 20}, "v1", 80)')
    assert shares == {"v1": 80, "v2": 12, "v3": 8}  # the others keep their proportions
    browser.find_element(By.CSS_SELECTOR, "#split-apply").click()
    acks = wait_css(browser, "#split-result li[data-ack]", "each sidecar's ACK", timeout=60)
    assert {li.get_attribute("data-ack") for li in acks} == {"ACK"}
    shown = {li.get_attribute("data-sidecar") for li in acks}
    assert {"front@v1#0", "ingress"} & shown  # the callers of back
    live = dash.json("route", "show", "back")["services"]["back"]["live"]["split"]
    assert live == {"v1": 70, "v2": 30}
    for sidecar in shown:
        config = dash.json("proxy-config", sidecar)
        assert config["acked"] >= config["pushed"]
    dash.mesh.cli("route", "reset", "back", check=True)


def test_a_promotion_started_from_the_service_page_shows_its_steps_and_cancels(dash, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{dash.base}/#/service/back")
    form = wait_css(browser, "#promote-form", "the promotion form")[0]
    Select(form.find_element(By.CSS_SELECTOR, "select")).select_by_value("v2")
    for name, value in (("step", "25"), ("interval", "3600")):  # no step is taken while the test runs
        field = form.find_element(By.CSS_SELECTOR, f"input[name={name}]")
        field.clear()
        field.send_keys(value)
    form.find_element(By.CSS_SELECTOR, "button").click()
    ladder = wait_for(lambda: browser.execute_script(
        "return [...document.querySelectorAll('.ladder span')].map((s) => s.textContent + (s.matches('.current') ? '*' : ''))"),
        timeout=30, interval=0.2, what="the promotion's steps")
    assert ladder == ["0%", "25%", "50%*", "75%", "100%"]  # back starts at 50/50
    assert dash.json("route", "show", "back")["services"]["back"]["promotion"]["canary"] == "v2"
    wait_css(browser, "#promote-cancel", "the cancel button")[0].click()
    wait_for(lambda: dash.json("route", "show", "back")["services"]["back"]["promotion"] is None, timeout=30,
             what="the promotion cancelled")
    wait_css(browser, "#promote-form:not([hidden])", "the form again once the promotion is gone")


def test_the_live_requests_page_shows_a_request_sent_now(dash, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{dash.base}/#/requests")
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, ".row .note").text == "listening", timeout=30,
             interval=0.2, what="the tap stream to open")
    request_id = "dash-" + uuid.uuid4().hex[:12]
    http_get(dash.ingress + "/call/back/whoami", headers={"x-request-id": request_id})
    rows = wait_css(browser, f'#requests-body tr[data-request-id="{request_id}"]', "the request in the list")
    rows[0].click()
    wait_css(browser, "#trace-box .waterfall .wf-row", "the request's trace as a waterfall")
    detail = browser.find_element(By.CSS_SELECTOR, "#request-detail").text
    assert request_id in detail and "/call/back/whoami" in detail


def test_the_live_requests_filters_reach_the_tap(dash, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{dash.base}/#/requests")
    path = browser.find_element(By.CSS_SELECTOR, "#filter-path")
    path.send_keys("/call/back/status")
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", path)  # reopens the stream, filtered
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, ".row .note").text == "listening", timeout=30,
             interval=0.2, what="the filtered tap stream to open")
    other, wanted = "dash-" + uuid.uuid4().hex[:12], "dash-" + uuid.uuid4().hex[:12]
    http_get(dash.ingress + "/call/back/whoami", headers={"x-request-id": other})
    http_get(dash.ingress + "/call/back/status/503", headers={"x-request-id": wanted})
    wait_css(browser, f'#requests-body tr[data-request-id="{wanted}"]', "the 503 in the filtered list")
    rows = browser.find_elements(By.CSS_SELECTOR, "#requests-body tr")
    assert all(row.get_attribute("data-path").startswith("/call/back/status") for row in rows)
    assert not browser.find_elements(By.CSS_SELECTOR, f'#requests-body tr[data-request-id="{other}"]')


def test_topology_layout_stays_usable_at_30_services(dash, browser):
    """The layout of a synthetic 30-service mesh: no two boxes overlap, every box is drawn."""
    wait_css(browser, "svg.topology", "the topology")
    boxes = browser.execute_script("""
        const services = [];
        for (let i = 0; i < 30; i++) services.push({name: "svc" + i, protocol: "http", overridden: false, promotion: null,
          upstreams: i < 5 ? ["svc" + (i + 5), "svc" + (i + 10)] : i < 20 ? ["svc" + (20 + (i % 10))] : [],
          split: {v1: 90, v2: 10}, versions: [{name: "v1", instances: [], stats: null}, {name: "v2", instances: [], stats: null}]});
        const state = {services, edges: [], ingress: {routes: services.slice(0, 5).map((s) => ({path: "/", service: s.name}))}};
        const svg = M.renderTopology(state);
        document.body.append(svg);
        const out = [...svg.querySelectorAll(".svc-box")].map((r) => r.getBBox()).map((b) => [b.x, b.y, b.width, b.height]);
        svg.remove();
        return out;
    """)
    assert len(boxes) == 31  # the ingress and 30 services
    for i, (x1, y1, w1, h1) in enumerate(boxes):
        for x2, y2, w2, h2 in boxes[i + 1:]:
            assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1, "boxes overlap"


# -- ShopFast under load: the README's screenshot --------------------------------------------------


def shopfast_manifest(directory: Path, port: int) -> Path:
    manifest = yaml.safe_load((REPO / "templates" / "shopfast.yaml").read_text())
    manifest["workdir"] = str(REPO)
    manifest["ingress"]["port"] = port
    manifest["observability"] = {"tracing": {"sampling": 0.1}}
    path = directory / "shopfast.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


@pytest.mark.slow
def test_shopfast_under_load_in_the_topology(tmp_path):
    mesh = Mesh(tmp_path)
    loadgen = None
    driver = None
    try:
        port = free_port()
        mesh.manifest = shopfast_manifest(tmp_path, port)
        mesh.up()
        loadgen = subprocess.Popen(
            [sys.executable, str(REPO / "demo-services" / "loadgen.py"), "--url", f"http://127.0.0.1:{port}",
             "--rps", "40", "--duration", "300", "--report-every", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        dash = Dash(mesh, port)
        driver = chromium(tmp_path / "chromium")
        driver.set_window_size(1440, 700)
        driver.get(dash.url)
        shop = ("frontend", "catalog", "cart", "payments", "recommend")
        for service in shop:
            wait_css(driver, f'svg.topology [data-service="{service}"]', f"the service {service}")
        for edge in ("ingress>frontend", "frontend>catalog", "frontend>cart", "frontend>recommend", "cart>payments"):
            wait_css(driver, f'svg.topology path[data-edge="{edge}"]:not(.idle)', f"traffic on {edge}", timeout=60)
        wait_css(driver, 'svg.topology [data-node="cart@v2"] .ver:not(.idle)', "traffic at the canary", timeout=60)
        # A few seconds of load fill the 10 s windows the numbers are read over.
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started > 10, timeout=15, interval=0.5, what="ten seconds of load")
        folder = Path(os.environ.get("MESHCTL_SCREENSHOTS") or tmp_path)
        driver.save_screenshot(str(folder / "dashboard-topology.png"))
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                               {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        dark = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert dark == "rgb(15, 19, 25)"  # the dark scheme follows the system's preference
        driver.save_screenshot(str(folder / "dashboard-topology-dark.png"))
        for name in ("dashboard-topology.png", "dashboard-topology-dark.png"):
            assert (folder / name).stat().st_size > 10_000
    finally:
        if driver is not None:
            driver.quit()
        if loadgen is not None:
            loadgen.kill()
            loadgen.wait()
        mesh.cleanup()
