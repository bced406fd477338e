"""The demo shop's gRPC call: frontend -> recommend.Recommend/ForItem (demo-services/).

Real processes on 127.0.0.1 started by the demo tests' Launcher; the mesh path (the
frontend's sidecar speaking h2c for `protocol: grpc`) is covered by test_protocols_mesh.py
and the template by test_demo_services.py.
"""

from __future__ import annotations

import pytest

from tests.test_demo_services import Launcher, free_port, launcher, request  # noqa: F401  (launcher: fixture)

pytest.importorskip("grpc")


def recommended_section(page: str) -> str:
    start = page.index("Recommended for you")
    return page[start : page.index("</section>", start)]


def start_frontend(launcher: Launcher, recommend_url: str):
    catalog = launcher.start("catalog")
    cart = launcher.start("cart", {"CATALOG_URL": catalog.url, "PAYMENTS_URL": "http://127.0.0.1:%d" % free_port()})
    return launcher.start("frontend", {"CATALOG_URL": catalog.url, "CART_URL": cart.url, "RECOMMEND_URL": recommend_url})


def test_frontend_shows_recommendations_from_the_grpc_service(launcher: Launcher) -> None:
    recommend = launcher.start("recommend", probe="tcp")
    frontend = start_frontend(launcher, recommend.url)

    empty_cart = request("GET", frontend.url + "/", headers={"x-user": "ida"})
    request("POST", frontend.url + "/api/cart/items", {"sku": "plush-12"}, {"x-user": "ida"})
    with_plush = request("GET", frontend.url + "/", headers={"x-user": "ida"})

    assert empty_cart.status == 200 and with_plush.status == 200
    assert "recommend recommend@v1#0 (gRPC)" in empty_cart.text
    # Seeded by the first product (mug-01) on an empty cart, by the cart's first item after.
    assert [name in recommended_section(empty_cart.text) for name in ("Canary T-Shirt", "mTLS Sticker Pack", "Trace Notebook")] == [True] * 3
    assert [name in recommended_section(with_plush.text) for name in ("Sidecar Mug", "Retry Socks", "Load Balancer Bottle")] == [True] * 3


@pytest.mark.parametrize("recommend", ["down", "not configured"])
def test_the_page_renders_without_the_box_when_recommend_is_down_or_absent(launcher: Launcher, recommend: str) -> None:
    if recommend == "not configured":
        catalog = launcher.start("catalog")
        frontend = launcher.start("frontend", {"CATALOG_URL": catalog.url, "CART_URL": "http://127.0.0.1:%d" % free_port()})
    else:
        frontend = start_frontend(launcher, "http://127.0.0.1:%d" % free_port())

    page = request("GET", frontend.url + "/")

    assert page.status == 200
    assert "Sidecar Mug" in page.text
    assert "Recommended for you" not in page.text and "(gRPC)" not in page.text
