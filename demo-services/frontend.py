"""ShopFast frontend: the HTML shop and its JSON API. Upstreams: catalog, cart, recommend.

    GET  /                     the shop page; ?user=ada switches shopper (a cookie)
    POST /cart/add             form sku, qty -> 303 back to the page
    POST /checkout             form -> 303 back to the page with the outcome
    GET  /api/products         the catalog
    GET  /api/cart             the shopper's cart
    POST /api/cart/items       {"sku": "mug-01", "qty": 1}
    POST /api/checkout
    GET  /api/orders/feed      the live order feed: server-sent events, one per order paid
                               here (demo-services/orderfeed.py); the page shows it live

The shopper is the `x-user` header, else the `user` cookie, else "guest"; it is passed to
cart as `x-user`, which is also what a consistent-hash load balancer can key on.
An upstream failure never breaks the page: the failing part shows a note instead. The JSON
API answers 502 with the upstream's error when an upstream fails.
"Recommended for you" comes from the gRPC service recommend (ForItem of the first item in
the cart, else of the first product; demo-services/recommend_client.py). RECOMMEND_URL is
optional: without it, without grpcio, or when recommend fails, the page has no such box.
Run by hand: PORT=8080 CATALOG_URL=http://127.0.0.1:8001 CART_URL=http://127.0.0.1:8002 \
    [RECOMMEND_URL=http://127.0.0.1:50051] python demo-services/frontend.py
"""

from __future__ import annotations

import os
import re
import sys
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from orderfeed import OrderFeed
from recommend_client import RecommendClient, Recommendations
from shopkit import (
    Identity,
    Request,
    Response,
    Router,
    Upstream,
    UpstreamReply,
    UpstreamUnavailable,
    event_stream,
    html_response,
    redirect,
    serve,
    upstreams_from_env,
)

USER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")
DEFAULT_USER = "guest"


def shopper_of(request: Request) -> str:
    for candidate in (request.query.get("user"), request.headers.get("x-user"), request.cookie("user")):
        if candidate and USER_NAME.fullmatch(candidate):
            return candidate
    return DEFAULT_USER


def money(cents: int) -> str:
    return "$%d.%02d" % divmod(cents, 100)


@dataclass(frozen=True)
class ShopPage:
    """Everything the page shows; `None` data means that upstream failed and `notes` say why."""

    frontend: Identity
    user: str
    products: Sequence[Mapping[str, Any]] | None
    catalog_served_by: Mapping[str, str] | None
    cart: Mapping[str, Any] | None
    notes: Sequence[str] = ()
    notice: str | None = None
    alert: str | None = None
    recommended: Sequence[Mapping[str, Any]] = ()  # products; empty: no "recommended for you" box
    recommend_served_by: str | None = None


STYLE = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:#f4f5fb;color:#1d2033}
header{background:#1d2033;color:#fff;padding:14px 28px;display:flex;align-items:center;gap:18px;flex-wrap:wrap}
header h1{margin:0;font-size:22px;letter-spacing:.5px}
header form{margin-left:auto;display:flex;gap:6px;align-items:center}
header input{border:0;border-radius:6px;padding:5px 8px;width:110px}
.badges{display:flex;gap:6px;flex-wrap:wrap}
.badge{font:12px ui-monospace,Menlo,monospace;background:#343856;border-radius:20px;padding:3px 10px}
.badge.v2{background:#e8590c}
.banner{background:linear-gradient(90deg,#ff922b,#e8590c);color:#fff;padding:12px 28px;font-weight:600}
.flash{margin:16px 28px 0;padding:10px 14px;border-radius:8px}
.flash.ok{background:#d3f9d8;color:#2b8a3e}.flash.bad{background:#ffe3e3;color:#c92a2a}
.note{background:#fff4e6;color:#a64200;border-left:4px solid #fd7e14;padding:8px 12px;margin:8px 0;border-radius:4px}
main{display:grid;grid-template-columns:1fr 320px;gap:24px;padding:20px 28px}
@media(max-width:820px){main{grid-template-columns:1fr}}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:16px}
.card{background:#fff;border-radius:12px;padding:16px;box-shadow:0 1px 3px #0001,0 4px 14px #0000000d;display:flex;flex-direction:column}
.emoji{font-size:40px}
.card h3{margin:6px 0 2px;font-size:16px}
.card p{margin:0 0 10px;color:#5c607a;font-size:13px;flex:1}
.card form{display:flex;justify-content:space-between;align-items:center}
.price{font-weight:700}
button{background:#4c6ef5;color:#fff;border:0;border-radius:8px;padding:7px 14px;font-weight:600;cursor:pointer}
button:hover{background:#3b5bdb}
aside{background:#fff;border-radius:12px;padding:18px;box-shadow:0 1px 3px #0001;align-self:start}
aside.discount{outline:3px solid #e8590c}
aside h2{margin-top:0}
table{width:100%;border-collapse:collapse;font-size:14px}
td{padding:4px 0}td.num{text-align:right}
tr.total td{border-top:1px solid #dee2e6;font-weight:700;padding-top:8px}
tr.off td{color:#e8590c}
.checkout{width:100%;margin-top:14px;padding:10px}
.muted{color:#868e96}
.recs{margin-top:22px}.recs h2{font-size:17px;margin:0 0 10px}.recs .card{padding:12px}
footer{padding:8px 28px 24px;color:#868e96;font-size:12px}
.feed{margin-top:18px}.feed h2{font-size:17px;margin:0 0 6px}.feed ol{margin:0;padding-left:20px;font-size:13px}
.feed .live{font-size:12px;color:#2b8a3e}
"""


def render_page(page: ShopPage) -> str:
    """The whole shop as one self-contained HTML document (no external assets)."""
    cart = page.cart
    discounted = bool(cart) and cart.get("flavor") == "discount"
    badges = [("frontend " + str(page.frontend), "")]
    if page.catalog_served_by:
        served = page.catalog_served_by
        badges.append(("catalog %s@%s#%s" % (served["service"], served["version"], served["replica"]), ""))
    if cart:
        badges.append(("cart %s" % cart.get("version", "?"), "v2" if discounted else ""))
    if page.recommend_served_by:
        badges.append(("recommend %s (gRPC)" % page.recommend_served_by, ""))
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        "<title>ShopFast</title><style>%s</style></head><body>" % STYLE,
        "<header><h1>⚡ ShopFast</h1><div class=badges>",
        "".join("<span class='badge %s'>%s</span>" % (cls, escape(text)) for text, cls in badges),
        "</div><form method=get action='/'><label>shopping as</label>",
        "<input name=user value='%s' aria-label=user><button>switch</button></form></header>" % escape(page.user),
    ]
    if discounted:
        parts.append(
            "<div class=banner>🎉 Canary deal: %d %% off your whole cart, served by cart %s</div>"
            % (cart.get("discount_percent", 10), escape(str(cart.get("version", ""))))
        )
    if page.notice:
        parts.append("<div class='flash ok'>%s</div>" % escape(page.notice))
    if page.alert:
        parts.append("<div class='flash bad'>%s</div>" % escape(page.alert))
    parts.append("<main><section>")
    parts.extend("<div class=note>%s</div>" % escape(note) for note in page.notes)
    parts.append(_render_products(page.products))
    if page.recommended:
        parts.append("<div class=recs><h2>✨ Recommended for you</h2>%s</div>" % _render_products(page.recommended))
    parts.append("</section>")
    parts.append("<div>%s%s</div>" % (_render_cart(cart, discounted), ORDER_FEED_BOX))
    parts.append("</main><footer>ShopFast is a meshctl demo. Every request crossed a sidecar.</footer>")
    parts.append("</body></html>")
    return "".join(parts)


# The live order feed: an EventSource on /api/orders/feed, a stream through the ingress
# and the frontend's sidecar that stays open as long as the page does.
ORDER_FEED_BOX = """<aside class=feed><h2>📦 Live orders <span class=live id=feed-state>connecting…</span></h2>
<ol id=orders reversed></ol><p class=muted id=no-orders>No orders yet: check out, or run the load generator.</p></aside>
<script>
(function(){var list=document.getElementById("orders"),state=document.getElementById("feed-state");
var feed=new EventSource("/api/orders/feed");
feed.onopen=function(){state.textContent="● live"};
feed.onerror=function(){state.textContent="reconnecting…"};
feed.addEventListener("order",function(e){var o=JSON.parse(e.data),li=document.createElement("li");
document.getElementById("no-orders").style.display="none";
li.textContent=o.order_id+" · "+o.user+" · "+o.items+" item(s) · "+o.total;
list.insertBefore(li,list.firstChild);while(list.children.length>8){list.removeChild(list.lastChild)}});})();
</script>"""


def _render_products(products: Sequence[Mapping[str, Any]] | None) -> str:
    if products is None:
        return "<p class=muted>The catalog is unavailable right now.</p>"
    cards = []
    for product in products:
        cards.append(
            "<div class=card><div class=emoji>%s</div><h3>%s</h3><p>%s</p>"
            "<form method=post action='/cart/add'><span class=price>%s</span>"
            "<input type=hidden name=sku value='%s'><input type=hidden name=qty value=1>"
            "<button>Add to cart</button></form></div>"
            % (
                escape(product.get("emoji", "")),
                escape(product["name"]),
                escape(product.get("description", "")),
                money(product["price_cents"]),
                escape(product["sku"]),
            )
        )
    return "<div class=grid>%s</div>" % "".join(cards)


def _render_cart(cart: Mapping[str, Any] | None, discounted: bool) -> str:
    if cart is None:
        return "<aside><h2>🛒 Cart</h2><p class=muted>The cart is unavailable right now.</p></aside>"
    rows = [
        "<tr><td>%s %s × %d</td><td class=num>%s</td></tr>"
        % (escape(item.get("emoji", "")), escape(item["name"]), item["qty"], money(item["line_total_cents"]))
        for item in cart.get("items", [])
    ]
    if not rows:
        return "<aside class='%s'><h2>🛒 Cart</h2><p class=muted>Your cart is empty.</p></aside>" % (
            "discount" if discounted else ""
        )
    rows.append("<tr><td>Subtotal</td><td class=num>%s</td></tr>" % money(cart["subtotal_cents"]))
    if cart.get("discount_cents"):
        rows.append(
            "<tr class=off><td>Discount %d %%</td><td class=num>−%s</td></tr>"
            % (cart.get("discount_percent", 0), money(cart["discount_cents"]))
        )
    rows.append("<tr class=total><td>Total</td><td class=num>%s</td></tr>" % money(cart["total_cents"]))
    return (
        "<aside class='%s'><h2>🛒 Cart</h2><table>%s</table>"
        "<form method=post action='/checkout'><button class=checkout>Check out</button></form></aside>"
        % ("discount" if discounted else "", "".join(rows))
    )


def describe_failure(reply: UpstreamReply) -> str:
    """One readable line from an error reply, naming the mesh's error code if there is one."""
    error = reply.data if isinstance(reply.data, dict) else {}
    message = error.get("message") or error.get("error") or "status %d" % reply.status
    mesh_error = reply.headers.get("x-mesh-error") or error.get("mesh_error")
    if mesh_error:
        return "%s: %s (%s)" % (reply.upstream, message, mesh_error)
    return "%s: %s" % (reply.upstream, message)


def recommended_products(
    recommendations: Recommendations | None, products: Sequence[Mapping[str, Any]] | None
) -> list[Mapping[str, Any]]:
    """The catalog's products for the recommended SKUs, in order; unknown SKUs are left out."""
    if recommendations is None or not products:
        return []
    by_sku = {product["sku"]: product for product in products}
    return [by_sku[sku] for sku in recommendations.skus if sku in by_sku]


def recommendation_seed(cart: Mapping[str, Any] | None, products: Sequence[Mapping[str, Any]] | None) -> str | None:
    """The SKU to ask recommendations for: the cart's first item, else the first product."""
    items = cart.get("items") if cart else None
    if items:
        return items[0].get("sku")
    return products[0]["sku"] if products else None


class Frontend:
    def __init__(self, identity: Identity, upstreams: Mapping[str, Upstream], recommend: RecommendClient | None = None) -> None:
        self.identity = identity
        self.catalog = upstreams["catalog"]
        self.cart = upstreams["cart"]
        self.recommend = recommend or RecommendClient(None)
        self.orders = OrderFeed()
        self.router = Router()
        self.router.add("GET", "/", self.page)
        self.router.add("POST", "/cart/add", self.form_add)
        self.router.add("POST", "/checkout", self.form_checkout)
        self.router.add("GET", "/api/products", self.api_products)
        self.router.add("GET", "/api/cart", self.api_cart)
        self.router.add("POST", "/api/cart/items", self.api_add_item)
        self.router.add("POST", "/api/checkout", self.api_checkout)
        self.router.add("GET", "/api/orders/feed", self.api_order_feed)

    def _cart_call(self, method: str, path: str, request: Request, payload: Any = None) -> UpstreamReply:
        return self.cart.call(method, path, cause=request, payload=payload, headers={"x-user": shopper_of(request)})

    def _fetch(self, upstream_call: Callable[[], UpstreamReply]) -> tuple[Any, str | None]:
        """(data, None) on success, (None, note) when the upstream failed."""
        try:
            reply = upstream_call()
        except UpstreamUnavailable as exc:
            return None, str(exc)
        if not reply.ok:
            return None, describe_failure(reply)
        return reply.data, None

    def page(self, request: Request) -> Response:
        user = shopper_of(request)
        catalog, catalog_note = self._fetch(lambda: self.catalog.call("GET", "/products", cause=request))
        cart, cart_note = self._fetch(lambda: self._cart_call("GET", "/cart", request))
        products = catalog["products"] if catalog else None
        seed = recommendation_seed(cart, products)
        recommendations = self.recommend.for_item(seed, request.trace_headers()) if seed else None
        page = ShopPage(
            frontend=self.identity,
            user=user,
            products=products,
            catalog_served_by=catalog.get("served_by") if catalog else None,
            cart=cart,
            notes=[note for note in (catalog_note, cart_note) if note],
            notice=request.query.get("notice"),
            alert=request.query.get("alert"),
            recommended=recommended_products(recommendations, products),
            recommend_served_by=recommendations.served_by if recommendations else None,
        )
        headers: tuple[tuple[str, str], ...] = ()
        if request.query.get("user") == user:
            headers = (("Set-Cookie", "user=%s; Path=/; SameSite=Lax" % user),)
        return html_response(200, render_page(page), headers)

    def form_add(self, request: Request) -> Response:
        form = request.form()
        try:
            qty = int(form.get("qty", "1"))
        except ValueError:
            qty = 1
        data, note = self._fetch(lambda: self._cart_call("POST", "/cart/items", request, {"sku": form.get("sku"), "qty": qty}))
        if note:
            return _back_to_shop(alert="Could not add to cart: " + note)
        return _back_to_shop(notice="Added to cart. %d item(s), total %s." % (data["item_count"], money(data["total_cents"])))

    def form_checkout(self, request: Request) -> Response:
        data, note = self._fetch(lambda: self._cart_call("POST", "/checkout", request))
        if note:
            return _back_to_shop(alert="Checkout failed: " + note)
        self._paid(request, data)
        return _back_to_shop(notice="Paid %s, order %s. Thank you!" % (money(data["total_cents"]), data["order_id"]))

    def api_products(self, request: Request) -> Response:
        return self.catalog.call("GET", "/products", cause=request).relay()

    def api_cart(self, request: Request) -> Response:
        return self._cart_call("GET", "/cart", request).relay()

    def api_add_item(self, request: Request) -> Response:
        return self._cart_call("POST", "/cart/items", request, request.json()).relay()

    def api_checkout(self, request: Request) -> Response:
        reply = self._cart_call("POST", "/checkout", request)
        if reply.ok:
            self._paid(request, reply.data)
        return reply.relay()

    def api_order_feed(self, request: Request) -> Response:
        return event_stream(self.orders.events(request.headers.get("last-event-id")))

    def _paid(self, request: Request, order: Mapping[str, Any]) -> None:
        self.orders.publish({
            "order_id": order.get("order_id"), "user": shopper_of(request),
            "items": order.get("item_count", 0), "total": money(order.get("total_cents", 0)),
        })


def _back_to_shop(**flash: str) -> Response:
    return redirect("/?" + urllib.parse.urlencode(flash))


def main() -> int:
    recommend = RecommendClient(os.environ.get("RECOMMEND_URL"))
    frontend = Frontend(Identity.from_env("frontend"), upstreams_from_env(("catalog", "cart")), recommend)
    try:
        return serve(frontend.router, frontend.identity)
    finally:
        recommend.close()


if __name__ == "__main__":
    sys.exit(main())
