"""ShopFast cart: one in-memory cart per user, priced from the catalog, paid through payments.

Upstreams: catalog (names and prices, $CATALOG_URL) and payments ($PAYMENTS_URL).

    GET  /cart           the caller's cart, priced
    POST /cart/items     {"sku": "mug-01", "qty": 1} -> the cart; 404 unknown-sku
    POST /checkout       charge the total through payments, then empty the cart;
                         400 cart-empty, 502 payment-failed (the cart is kept)

The user is the `x-user` header, else the `user` cookie, else "guest". A checkout that
is a mesh copy (`x-mesh-mirror: 1`, from `meshctl shadow --unsafe`) charges nothing: the
copy answers as if paid, so shadowing a version never charges a shopper twice.
CART_FLAVOR=discount (the v2 canary) takes 10 % off every cart; its replies say
"flavor": "discount" so that the frontend and the demo can tell the versions apart.
Run by hand: PORT=8002 CATALOG_URL=http://127.0.0.1:8001 PAYMENTS_URL=http://127.0.0.1:8003 \
    python demo-services/cart.py
"""

from __future__ import annotations

import os
import re
import sys
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from shopkit import (
    BadRequest,
    Identity,
    Request,
    Response,
    Router,
    UpstreamUnavailable,
    error_response,
    json_response,
    serve,
    upstreams_from_env,
)

DISCOUNT_PERCENT_BY_FLAVOR = {"standard": 0, "discount": 10}
MAX_LINE_QTY = 99
USER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")
DEFAULT_USER = "guest"


def user_of(request: Request) -> str:
    """The shopper a request is for; anything unusable falls back to the guest cart."""
    candidate = request.headers.get("x-user") or request.cookie("user") or DEFAULT_USER
    return candidate if USER_NAME.fullmatch(candidate) else DEFAULT_USER


def price_cart(
    quantities: Mapping[str, int], products: Mapping[str, Mapping[str, Any]], discount_percent: int
) -> dict[str, Any]:
    """Lines and totals in cents; the discount rounds half up. Unknown SKUs are left out."""
    lines = []
    for sku, qty in sorted(quantities.items()):
        product = products.get(sku)
        if product is None:
            continue
        unit = int(product["price_cents"])
        lines.append({
            "sku": sku,
            "name": product["name"],
            "emoji": product.get("emoji", ""),
            "qty": qty,
            "unit_price_cents": unit,
            "line_total_cents": unit * qty,
        })
    subtotal = sum(line["line_total_cents"] for line in lines)
    discount = (subtotal * discount_percent + 50) // 100
    return {
        "items": lines,
        "item_count": sum(line["qty"] for line in lines),
        "subtotal_cents": subtotal,
        "discount_percent": discount_percent,
        "discount_cents": discount,
        "total_cents": subtotal - discount,
    }


def parse_item(payload: Any) -> tuple[str, int]:
    if not isinstance(payload, dict):
        raise BadRequest('expected a JSON object like {"sku": "mug-01", "qty": 1}')
    sku = payload.get("sku")
    qty = payload.get("qty", 1)
    if not isinstance(sku, str) or not sku:
        raise BadRequest("sku must be a non-empty string")
    if isinstance(qty, bool) or not isinstance(qty, int) or not 1 <= qty <= MAX_LINE_QTY:
        raise BadRequest("qty must be an integer from 1 to %d" % MAX_LINE_QTY)
    return sku, qty


class CartStore:
    """Quantities per user and SKU, safe to use from the server's threads."""

    def __init__(self) -> None:
        self._carts: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def contents(self, user: str) -> dict[str, int]:
        with self._lock:
            return dict(self._carts.get(user, {}))

    def add(self, user: str, sku: str, qty: int) -> dict[str, int]:
        with self._lock:
            cart = self._carts.setdefault(user, {})
            cart[sku] = min(cart.get(sku, 0) + qty, MAX_LINE_QTY)
            return dict(cart)

    def remove(self, user: str, paid: Mapping[str, int]) -> None:
        """Take out what was paid for; items added during the payment stay in the cart."""
        with self._lock:
            cart = self._carts.get(user, {})
            for sku, qty in paid.items():
                left = cart.get(sku, 0) - qty
                if left > 0:
                    cart[sku] = left
                else:
                    cart.pop(sku, None)
            if not cart:
                self._carts.pop(user, None)


class CartService:
    def __init__(self, identity: Identity, flavor: str, upstreams: Mapping[str, Any]) -> None:
        self.identity = identity
        self.flavor = flavor
        self.discount_percent = DISCOUNT_PERCENT_BY_FLAVOR[flavor]
        self.catalog = upstreams["catalog"]
        self.payments = upstreams["payments"]
        self.store = CartStore()
        self.router = Router()
        self.router.add("GET", "/cart", self.get_cart)
        self.router.add("POST", "/cart/items", self.add_item)
        self.router.add("POST", "/checkout", self.checkout)

    def _products(self, request: Request) -> dict[str, Mapping[str, Any]] | Response:
        """The catalog by SKU, or the 502 to answer with when the catalog failed."""
        reply = self.catalog.call("GET", "/products", cause=request)
        if not reply.ok:
            return error_response(502, "upstream-failed", "catalog answered %d" % reply.status, **reply.failure_detail())
        return {product["sku"]: product for product in reply.data["products"]}

    def _view(self, user: str, quantities: Mapping[str, int], products: Mapping[str, Mapping[str, Any]]) -> dict:
        return {
            "user": user,
            **price_cart(quantities, products, self.discount_percent),
            "flavor": self.flavor,
            "version": self.identity.version,
            "served_by": self.identity.as_dict(),
        }

    def get_cart(self, request: Request) -> Response:
        user = user_of(request)
        quantities = self.store.contents(user)
        products: Mapping[str, Mapping[str, Any]] | Response = {}
        if quantities:
            products = self._products(request)
            if isinstance(products, Response):
                return products
        return json_response(200, self._view(user, quantities, products))

    def add_item(self, request: Request) -> Response:
        user = user_of(request)
        sku, qty = parse_item(request.json())
        products = self._products(request)
        if isinstance(products, Response):
            return products
        if sku not in products:
            return error_response(404, "unknown-sku", "no product %r" % sku)
        quantities = self.store.add(user, sku, qty)
        return json_response(200, self._view(user, quantities, products))

    def checkout(self, request: Request) -> Response:
        user = user_of(request)
        quantities = self.store.contents(user)
        if not quantities:
            return error_response(400, "cart-empty", "the cart of %s is empty" % user)
        products = self._products(request)
        if isinstance(products, Response):
            return products
        view = self._view(user, quantities, products)
        order_id = uuid.uuid4().hex[:12]
        charge = {"user": user, "order_id": order_id, "amount_cents": view["total_cents"]}
        if request.headers.get("x-mesh-mirror") == "1":
            self.store.remove(user, quantities)
            return json_response(200, {"status": "paid", "order_id": order_id, "payment": {"shadow": True}, **view})
        try:
            reply = self.payments.call("POST", "/charge", cause=request, payload=charge)
        except UpstreamUnavailable as exc:
            return error_response(502, "payment-failed", str(exc), upstream="payments")
        if not reply.ok:
            return error_response(
                502, "payment-failed", "payments answered %d; the cart was kept" % reply.status, **reply.failure_detail()
            )
        self.store.remove(user, quantities)
        return json_response(200, {"status": "paid", "order_id": order_id, "payment": reply.data, **view})


def main() -> int:
    flavor = os.environ.get("CART_FLAVOR") or "standard"
    if flavor not in DISCOUNT_PERCENT_BY_FLAVOR:
        sys.exit("CART_FLAVOR must be one of %s, got %r" % (", ".join(DISCOUNT_PERCENT_BY_FLAVOR), flavor))
    service = CartService(Identity.from_env("cart"), flavor, upstreams_from_env(("catalog", "payments")))
    return serve(service.router, service.identity)


if __name__ == "__main__":
    sys.exit(main())
