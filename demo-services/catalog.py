"""ShopFast catalog: the product list, in memory. No upstreams.

    GET /products          {"products": [...], "served_by": {...}}
    GET /products/<sku>    one product, or 404 unknown-sku

Prices are integer cents so that totals never pick up float rounding.
Run by hand: PORT=8001 python demo-services/catalog.py
"""

from __future__ import annotations

import sys

from shopkit import Identity, Request, Response, Router, error_response, json_response, serve

PRODUCTS = (
    {"sku": "mug-01", "name": "Sidecar Mug", "emoji": "☕", "price_cents": 1200,
     "description": "Holds 350 ml of coffee and one proxy per process."},
    {"sku": "tee-02", "name": "Canary T-Shirt", "emoji": "🐤", "price_cents": 2200,
     "description": "Ships to 10 % of customers first."},
    {"sku": "hoodie-03", "name": "Circuit Breaker Hoodie", "emoji": "🧥", "price_cents": 4900,
     "description": "Trips before you get cold."},
    {"sku": "socks-04", "name": "Retry Socks", "emoji": "🧦", "price_cents": 900,
     "description": "Three attempts, jittered backoff, never lost in the wash."},
    {"sku": "sticker-05", "name": "mTLS Sticker Pack", "emoji": "🔐", "price_cents": 500,
     "description": "Mutually authenticated laptop decoration."},
    {"sku": "cap-06", "name": "Timeout Cap", "emoji": "🧢", "price_cents": 1800,
     "description": "Gives up gracefully after 15 seconds of sun."},
    {"sku": "bottle-07", "name": "Load Balancer Bottle", "emoji": "🍶", "price_cents": 2500,
     "description": "Least-request pouring, power of two choices."},
    {"sku": "notebook-08", "name": "Trace Notebook", "emoji": "📓", "price_cents": 1100,
     "description": "Every page carries the traceparent of the last."},
    {"sku": "tote-09", "name": "Ingress Tote", "emoji": "👜", "price_cents": 1600,
     "description": "One way in, longest prefix wins."},
    {"sku": "pins-10", "name": "Outlier Pins", "emoji": "📌", "price_cents": 700,
     "description": "Ejected after five consecutive errors."},
    {"sku": "lamp-11", "name": "Health Probe Lamp", "emoji": "💡", "price_cents": 3900,
     "description": "Turns green when /healthz says ok."},
    {"sku": "plush-12", "name": "Mesh Octopus Plush", "emoji": "🐙", "price_cents": 2900,
     "description": "Eight arms, one per sidecar."},
)
PRODUCTS_BY_SKU = {product["sku"]: product for product in PRODUCTS}

identity = Identity.from_env("catalog")
router = Router()


@router.route("GET", "/products")
def list_products(request: Request) -> Response:
    return json_response(200, {"products": list(PRODUCTS), "served_by": identity.as_dict()})


@router.route("GET", r"/products/(?P<sku>[A-Za-z0-9_.-]+)")
def get_product(request: Request, sku: str) -> Response:
    product = PRODUCTS_BY_SKU.get(sku)
    if product is None:
        return error_response(404, "unknown-sku", "no product %r" % sku)
    return json_response(200, {**product, "served_by": identity.as_dict()})


if __name__ == "__main__":
    sys.exit(serve(router, identity))
