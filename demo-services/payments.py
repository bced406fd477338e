"""ShopFast payments: a pretend card processor that is slow and sometimes down. No upstreams.

    POST /charge   {"user": "ada", "order_id": "...", "amount_cents": 4410}
                   -> 200 {"status": "approved", "payment_id": ...}
                   -> 503 payments-unavailable, for a PAYMENTS_FAILURE_RATE share of charges

PAYMENTS_FAILURE_RATE (0..1, default 0) and PAYMENTS_LATENCY_MS (default 20) are the knobs
the mesh demo turns to show retries, timeouts and outlier detection at work.
Run by hand: PORT=8003 python demo-services/payments.py
"""

from __future__ import annotations

import os
import random
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from shopkit import BadRequest, Identity, Request, Response, Router, error_response, json_response, serve


@dataclass(frozen=True)
class Behaviour:
    failure_rate: float
    latency_s: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Behaviour:
        try:
            failure_rate = float(environ.get("PAYMENTS_FAILURE_RATE") or 0)
            latency_ms = float(environ.get("PAYMENTS_LATENCY_MS") or 20)
        except ValueError as exc:
            sys.exit("PAYMENTS_FAILURE_RATE and PAYMENTS_LATENCY_MS must be numbers: %s" % exc)
        if not 0 <= failure_rate <= 1 or latency_ms < 0:
            sys.exit("PAYMENTS_FAILURE_RATE must be in 0..1 and PAYMENTS_LATENCY_MS >= 0")
        return cls(failure_rate, latency_ms / 1000)


def parse_charge(payload: object) -> int:
    """The amount to charge, in cents."""
    amount = payload.get("amount_cents") if isinstance(payload, dict) else None
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise BadRequest('expected {"amount_cents": <non-negative integer>, ...}')
    return amount


def build_router(identity: Identity, behaviour: Behaviour) -> Router:
    router = Router()

    @router.route("POST", "/charge")
    def charge(request: Request) -> Response:
        amount = parse_charge(request.json())
        time.sleep(behaviour.latency_s)  # the processor's own latency, part of the demo
        if random.random() < behaviour.failure_rate:
            return error_response(503, "payments-unavailable", "the card processor is not answering, try again")
        return json_response(200, {
            "status": "approved",
            "payment_id": "pay_" + uuid.uuid4().hex[:16],
            "amount_cents": amount,
            "served_by": identity.as_dict(),
        })

    return router


if __name__ == "__main__":
    identity = Identity.from_env("payments")
    sys.exit(serve(build_router(identity, Behaviour.from_env()), identity))
