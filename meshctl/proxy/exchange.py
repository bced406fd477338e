"""One request and its response, from the client connection to an upstream and back.

An `Exchange` is created per request head by `proxy.server.ClientConnection`. It
decides (route, endpoint, retry) with the pure policy modules, then moves raw bytes:

* request bytes queue in `pending` until an upstream connection is attached, then go
  out in one write; after that body bytes are written straight through;
* the response is parsed by the upstream connection's `Parser` and its raw bytes are
  written to the client, batched per `data_received`;
* backpressure both ways: a full write buffer on one side pauses reading on the other;
* a copy of the request (`replay`) is kept while it is at most 64 KiB, so a failed try
  can be sent again: after a retriable outcome (proxy.retry), and always once when a
  reused keep-alive connection turns out to have been closed by the peer;
* a request that finds no idle connection waits in the pool's line for the next one
  (proxy.pool), within its deadline; a failed connect sent nothing, so it is retried (the
  route's retries, or `CONNECT_RETRIES` when the route has none, as for the app) on another
  endpoint or after a backoff, within the service's retry budget.

Every error the exchange generates goes through proxy.errors; once response bytes have
been sent to the client, a failure can only abort the client connection.

Its response side is a `Phase`, changed only by `transition()` along the `_ALLOWED` table
(as agent/lifecycle does for instances); the request side is `request_done`, since a
response may end before its request does. What happens after a failed try is decided by
proxy.retry's `after_failure()`, whether the client connection outlives the response by
proxy.http1's `client_keep_alive()`; the exchange acts on the answers. It reaches its client
connection and the process through the narrow interfaces of proxy.interfaces.
"""

from __future__ import annotations

import enum
import logging
import random
from typing import TYPE_CHECKING, Any

from meshctl.proxy import decisions
from meshctl.proxy.errors import ProtocolError, error_response, http_status
from meshctl.proxy.http1 import END, Data, Head, client_keep_alive, client_response_head, length_unknown
from meshctl.proxy.idle import STREAM_IDLE_TIMEOUT_CODE, IdleCheck, first_check
from meshctl.proxy.limits import ADMITTED, QUEUED
from meshctl.proxy.mirror import send_mirror
from meshctl.proxy.pool import DEFAULT_HANDSHAKE_TIMEOUT, Pool, UpstreamConnection
from meshctl.proxy.retry import ABORT, CONNECT_RETRIES, MAX_REPLAY_BODY_BYTES, RETRY, RETRY_STALE, after_failure
from meshctl.proxy.shadow import begin as begin_comparison
from meshctl.proxy.upgrade import UpgradeError, check_switch

if TYPE_CHECKING:
    from meshctl.proxy.balance import Endpoint
    from meshctl.proxy.interfaces import Downstream, Engine
    from meshctl.proxy.listeners import Target
    from meshctl.proxy.retry import RetryPolicy
    from meshctl.proxy.routing import RouteAction
    from meshctl.proxy.shadow import Comparison, ResponseTap
    from meshctl.proxy.snapshot import Service

log = logging.getLogger("proxy.exchange")

MAX_PENDING_BYTES = 256 * 1024  # queued while connecting; above it the client is paused
MAX_REPLAY_BYTES = MAX_REPLAY_BODY_BYTES + 16 * 1024  # body limit plus room for the head
_CONNECT_FAILURE_CODE = {
    "connect-failure": "upstream-connect-failed", "refused": "upstream-connect-failed", "reset": "upstream-reset", "timeout": "timeout",
    STREAM_IDLE_TIMEOUT_CODE: STREAM_IDLE_TIMEOUT_CODE,
}


class Phase(enum.IntEnum):
    """Where an exchange's response side stands; ordered, so `phase >= ANSWERED` means it ended."""

    ADMITTING = 0  # routed; waiting for a slot in the service's limits or a delay fault, before the first try
    TRYING = 1  # a try is under way: in the pool's line, or sent and waiting for the final response head
    BACKOFF = 2  # a try failed; the next one is scheduled after a backoff
    DISCARDING = 3  # a retriable response is read to its end and dropped; the next try follows it
    RESPONDING = 4  # the response head, or a generated error, went to the client; the body follows
    ANSWERED = 5  # the response is complete, or was cut by aborting the client connection
    CLIENT_LOST = 6  # the client went away before the response was complete


ADMITTING, TRYING, BACKOFF, DISCARDING, RESPONDING, ANSWERED, CLIENT_LOST = Phase

# A 1xx head leaves an exchange TRYING (the final head is still to come); a failure while
# RESPONDING can only abort; staying in a phase (a retry at once) is always allowed.
_ALLOWED: dict[Phase, frozenset[Phase]] = {
    ADMITTING: frozenset({TRYING, RESPONDING, CLIENT_LOST}),
    TRYING: frozenset({BACKOFF, DISCARDING, RESPONDING, CLIENT_LOST}),
    BACKOFF: frozenset({TRYING, RESPONDING, CLIENT_LOST}),
    DISCARDING: frozenset({TRYING, BACKOFF, RESPONDING, CLIENT_LOST}),
    RESPONDING: frozenset({ANSWERED, CLIENT_LOST}),
    ANSWERED: frozenset(),
    CLIENT_LOST: frozenset(),
}


class ExchangeStateError(RuntimeError):
    """An exchange was driven against its own state: a bug in the engine, raised loudly."""


class IllegalTransition(ExchangeStateError):
    """A phase change the transition table does not have."""


class Exchange:
    __slots__ = (
        "client",
        "engine",
        "phase",
        "target",
        "head",
        "method",
        "action",
        "endpoint",
        "address",
        "last_endpoint",
        "upstream",
        "pending",
        "pending_size",
        "replay",
        "replay_size",
        "request_done",
        "client_keep_alive",
        "attempt",
        "tried",
        "deadline",
        "try_deadline",
        "idle_due",
        "idle",
        "head_at",
        "waiting_on",
        "hash_key",
        "counted",
        "reused",
        "upstream_keep_alive",
        "started",
        "status",
        "mirror_version",
        "comparison",
        "request_id",
        "request_id_line",
        "try_started",
        "trail",
    )

    def __init__(self, client: Downstream[UpstreamConnection], engine: Engine[Pool], target: Target, head: Head, out_head: bytes) -> None:
        self.client = client
        self.engine = engine
        self.phase = ADMITTING
        self.target = target
        self.head = head
        self.method = head.method
        self.action: RouteAction | None = None
        self.endpoint: Endpoint | None = None
        self.address = target.address
        self.last_endpoint: Endpoint | None = None
        self.upstream: UpstreamConnection | None = None
        self.pending: list[bytes] | None = [out_head]
        self.pending_size = len(out_head)
        self.replay: list[bytes] | None = [out_head]
        self.replay_size = len(out_head)
        self.request_done = False  # the request's last byte was read (its own side: a response may end first)
        self.client_keep_alive = head.keep_alive
        self.attempt = 1
        self.tried: frozenset[str] = frozenset()
        self.deadline = 0.0
        self.try_deadline = 0.0
        self.idle_due = 0.0  # next stream idle check (proxy.idle); 0: none
        self.idle: IdleCheck | None = None  # made at the first check
        self.head_at = 0.0  # when a response without a declared length (a stream) began
        self.waiting_on: tuple[str, int] | None = None  # the address whose pool line this waits in
        self.hash_key: str | None = None
        self.counted = False  # holds a place in the service's limits (proxy.limits), until _release_service
        self.reused = False  # the current try went out on a kept-alive connection
        self.upstream_keep_alive = False
        self.started = 0.0
        self.status = 0
        self.mirror_version: str | None = None
        self.comparison: Comparison | None = None  # set when the shadow's answer is compared with ours
        self.request_id: bytes | None = None  # when this sidecar generated it (else in the head)
        self.request_id_line: bytes | None = None  # the ingress adds it to responses that lack it
        self.try_started = 0.0
        self.trail: list[Any] | None = None  # rare events for `meshctl why` (proxy.decisions)

    def __repr__(self) -> str:
        return "<Exchange %s %s -> %s try %d, %s%s>" % (
            self.method.decode("ascii", "replace"),
            self.head.target[:80].decode("ascii", "replace"),
            self.label,
            self.attempt,
            self.phase.name.lower(),
            ", request done" if self.request_done else "",
        )

    def transition(self, new: Phase) -> None:
        """Move the response side to `new`; a move the table does not have raises IllegalTransition."""
        current = self.phase
        if new is not current and new not in _ALLOWED[current]:
            raise IllegalTransition("exchange cannot go from %s to %s" % (current.name, new.name))
        self.phase = new

    @property
    def response_started(self) -> bool:
        """Response bytes (or a generated error) went to the client: a failure can only abort."""
        return RESPONDING <= self.phase <= ANSWERED

    @property
    def answered(self) -> bool:
        """Nothing more goes to the client: the response ended, was aborted, or the client left."""
        return self.phase >= ANSWERED

    @property
    def label(self) -> str:
        """Names the destination in error bodies and logs (built only when needed)."""
        endpoint = self.last_endpoint
        if endpoint is None:
            return self.target.label
        host, port = endpoint.address
        return "%s@%s (%s:%d)" % (self.target.label, endpoint.version, host, port)

    # -- decisions ---------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Route, apply faults and limits, then make the first try."""
        self.started = now
        service = self.target.service
        if service is None:
            self.deadline = 0.0
            self._try()
            return
        headers = None
        if service.needs_headers:
            headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in self.head.headers}
        router = service.router
        if router.needs_request_details:
            path, _, query = self.head.target.decode("latin-1").partition("?")
            action = router.route(self.method.decode("latin-1"), path, query, headers)
        else:
            action = router.route("", "")
        self.action = action
        if action.timeout is not None:
            self.deadline = now + action.timeout
        if action.idle_timeout is not None:
            self.idle_due = first_check(action.idle_timeout, now)
        if service.balancer.needs_headers:
            self.hash_key = service.balancer.hash_key_for(headers, self.client.client_ip)
        fault = action.fault
        if fault is not None:
            abort = fault["abort"]
            if abort is not None and random.random() * 100 < abort["percent"]:
                self.fail("fault-abort", "%s: injected fault" % service.name, abort["status"])
                return
        admission = service.limits.admit(self)
        if admission is not ADMITTED:
            if admission is QUEUED:
                decisions.note(self, decisions.QUEUED, now)
                self.counted = True
                self.client.deadline = self._next_deadline()
                return
            limits = service.limits
            self.fail(
                "circuit-open",
                "%s: %d connections in use and %d requests waiting, limits reached" % (service.name, limits.connections.in_use, limits.queued),
            )
            return
        self.counted = True
        self.admitted()

    def _routed(self) -> tuple[Service, RouteAction]:
        """The service and route of an exchange to a service (the callers are only reached for one)."""
        service, action = self.target.service, self.action
        if service is None or action is None:
            raise ExchangeStateError("%r has no service route" % (self,))
        return service, action

    def admitted(self) -> None:
        """Holding a connection slot of the service: mirror decision, delay fault, first try."""
        if self.phase >= ANSWERED:
            return
        if self.trail is not None:
            decisions.woken(self)
        service, action = self.target.service, self.action
        if service is None or action is None:  # as in _routed, spared a call on the hot path
            raise ExchangeStateError("%r has no service route" % (self,))
        engine = self.engine
        service.budget.record_request(engine.clock())
        mirror = action.mirror
        compared = False
        if mirror is not None and random.random() * 100 < mirror["percent"]:
            compare = mirror["compare"]
            decisions.note(self, decisions.MIRROR, mirror["version"])
            if compare is None:
                self.mirror_version = mirror["version"]
                if self.request_done:
                    self._send_mirror()
            else:
                self.comparison = begin_comparison(self, compare, mirror["version"])
                if self.comparison is not None:
                    self.mirror_version = mirror["version"]
                    compared = True
        fault = action.fault
        if fault is not None:
            delay = fault["delay"]
            if delay is not None and random.random() * 100 < delay["percent"]:
                decisions.note(self, decisions.DELAY, delay["fixed"])
                self.client.deadline = self._next_deadline()
                engine.call_later(delay["fixed"], self._try)
                if compared and self.request_done:
                    self._send_mirror()  # the delay is the primary's, not the copies'
                return
        self._try()
        if compared and self.request_done and self.phase < ANSWERED:
            self._send_mirror()  # after the first try, so that the reference copy can avoid its endpoint

    def _send_mirror(self) -> None:
        version, self.mirror_version = self.mirror_version, None
        replay = self.replay
        if replay is None or self.replay_size - len(replay[0]) > MAX_REPLAY_BODY_BYTES:
            return
        service, action = self._routed()
        engine = self.engine
        if self.comparison is not None:
            self.comparison.send_copies(engine.pool, service, replay, action.timeout, engine.clock(), self.last_endpoint)
            return
        if version is not None:  # set whenever a plain mirror is due (request_end, admitted)
            send_mirror(engine.pool, service, version, replay, action.timeout, service.connect_timeout, engine.clock())

    def _try(self) -> None:
        if self.phase >= ANSWERED:
            return
        self.transition(TRYING)
        service = self.target.service
        engine = self.engine
        if service is not None:
            action = self.action
            if action is None:
                raise ExchangeStateError("%r tried before it was routed" % (self,))
            now = engine.clock()
            endpoint = service.balancer.pick(action.version, self.hash_key, self.tried, now)
            if endpoint is None:
                self.fail("no-healthy-endpoints", "%s@%s: no endpoints" % (service.name, action.version))
                return
            endpoint.active += 1
            self.endpoint = endpoint
            self.address = endpoint.address
            self.last_endpoint = endpoint
            self.try_started = now
            policy = action.retry_policy
            if policy is not None and policy.per_try_timeout:
                self.try_deadline = now + policy.per_try_timeout
        else:
            self.try_started = self.started if self.trail is None else engine.clock()
        address = self.address
        if address is None:
            raise ExchangeStateError("%r has no address to try" % (self,))
        client = self.client
        client.deadline = self._next_deadline()
        conn = engine.pool.take(address)
        if conn is not None:
            self._attach(conn, reused=True)
            if not client.processing:
                self.flush()
            return
        self.waiting_on = address
        if service is not None:
            engine.pool.wait(self, address, service.connect_timeout, service.tls, service.name, service.handshake_timeout)
        else:
            peer = "app" if client.listener.kind == "inbound" else self.target.label
            engine.pool.wait(self, address, 1.0, None, peer, DEFAULT_HANDSHAKE_TIMEOUT)

    def _next_deadline(self) -> float:
        due = self.deadline
        if self.try_deadline and (not due or self.try_deadline < due):
            due = self.try_deadline
        if self.idle_due and (not due or self.idle_due < due):
            due = self.idle_due
        return due

    def pooled(self, conn: UpstreamConnection, reused: bool) -> None:
        """The pool's line gave this exchange a connection (proxy.pool)."""
        self.waiting_on = None
        self._attach(conn, reused)
        if not self.client.processing:
            self.flush()

    def connect_failed(self, outcome: str, detail: str) -> None:
        self.waiting_on = None
        self._try_failed(outcome, detail, None)

    def _stop_waiting(self) -> None:
        address = self.waiting_on
        if address is not None:
            self.waiting_on = None
            self.engine.pool.cancel(self, address)

    def _attach(self, conn: UpstreamConnection, reused: bool) -> None:
        owner: Exchange | ResponseTap = self if self.comparison is None else self.comparison.tap(self, conn)
        conn.owner = owner
        conn.requests += 1
        self.upstream = conn
        self.reused = reused
        if self.method == b"HEAD":
            conn.parser.expect_no_body()
        if self.client.write_paused:
            conn.pause_reading()

    def flush(self) -> None:
        """Write the queued request bytes once an upstream connection is attached."""
        pending = self.pending
        conn = self.upstream
        if pending is None or conn is None:
            return
        self.pending = None
        conn.bytes_out += self.pending_size
        if len(pending) == 1:
            conn.transport.write(pending[0])
        else:
            conn.transport.writelines(pending)
        if self.pending_size > MAX_PENDING_BYTES:  # only then did request_data pause the client
            self.client.resume_for_pending()

    # -- request side (called by the client connection) ----------------------------------

    def request_data(self, data: bytes) -> None:
        if self.phase >= ANSWERED:
            return
        replay = self.replay
        if replay is not None:
            self.replay_size += len(data)
            if self.replay_size <= MAX_REPLAY_BYTES:
                replay.append(data)
            else:
                self.replay = None
        pending = self.pending
        if pending is None:
            conn = self.upstream
            if conn is None:
                raise ExchangeStateError("%r: request bytes with nothing queued and no connection" % (self,))
            conn.bytes_out += len(data)
            conn.transport.write(data)
            return
        pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > MAX_PENDING_BYTES:
            self.client.pause_for_pending()

    def request_end(self) -> None:
        self.request_done = True
        if self.mirror_version is not None:
            self._send_mirror()
        if self.phase >= ANSWERED:
            self.client.exchange_finished(self, self.client_keep_alive)

    def client_lost(self) -> None:
        """The client went away: nothing left to answer."""
        if self.phase < ANSWERED:
            self._completed("client-lost")
            self.transition(CLIENT_LOST)
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.abort()
        self._stop_waiting()
        self._release_endpoint()
        self._release_service()

    def client_write_paused(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def client_write_resumed(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def on_deadline(self, now: float) -> None:
        action = self.action
        if action is None:  # only a route sets deadlines
            return
        timeout = action.timeout
        if self.deadline and now >= self.deadline and timeout is not None:
            decisions.note(self, decisions.FIRED, "request", timeout)
            self._try_failed("timeout", "not finished within %gs" % timeout, None, final=True)
        elif self.try_deadline and now >= self.try_deadline and action.retry_policy is not None and action.retry_policy.per_try_timeout:
            per_try_timeout = action.retry_policy.per_try_timeout
            decisions.note(self, decisions.FIRED, "per_try", per_try_timeout)
            self._try_failed("timeout", "no response within the per-try timeout of %gs" % per_try_timeout, None)
        elif self.idle_due and now >= self.idle_due:
            self._idle_check(now, action.idle_timeout)

    def _idle_check(self, now: float, timeout: float | None) -> None:
        client = self.client
        moved = client.bytes_in + client.bytes_out
        idle = self.idle
        if self.phase >= ANSWERED or timeout is None:
            self.idle_due = 0.0  # only the rest of the request body is awaited; the keep-alive timeout follows
        elif idle is None:
            idle = self.idle = IdleCheck(timeout, moved, now)
            self.idle_due = idle.due
        elif idle.expired(moved, now):
            detail = "no byte moved either way for %gs" % idle.timeout
            decisions.note(self, decisions.FIRED, "stream_idle", idle.timeout)
            if self.phase is RESPONDING:
                log.info("%s: %s %s, cutting the response", self.label, STREAM_IDLE_TIMEOUT_CODE, detail)
            self._try_failed(STREAM_IDLE_TIMEOUT_CODE, detail, None, final=True)
            return
        else:
            self.idle_due = idle.due
        client.deadline = self._next_deadline()

    # -- response side (called by the upstream connection) -------------------------------

    def upstream_data(self, data: bytes) -> None:
        conn = self.upstream
        if conn is None:
            return
        parser = conn.parser
        parser.feed(data)
        out: list[bytes] = []
        while True:
            try:
                event = parser.next_event_whole()
            except ProtocolError as exc:
                self._write_out(out)
                self._upstream_broken(conn, str(exc))
                return
            if isinstance(event, Head):  # first: most responses come whole, as one Head
                if not self._response_head(conn, event, out):
                    return
                body = event.body
                if body is None:
                    continue
                # The whole response came with its head: no Data or END events follow.
                if body and self.phase is not DISCARDING:
                    out.append(body)
            elif isinstance(event, Data):
                if self.phase is not DISCARDING:
                    out.append(event.data)
                continue
            elif event is not END:
                break  # NEED_DATA, or PAUSED after a response that is not ours
            if self.phase is TRYING:
                # The message that ended was a 1xx: the final response follows on the same connection.
                parser.start_next_cycle()
                if self.method == b"HEAD":
                    parser.expect_no_body()
                continue
            self._write_out(out)
            self._response_end(conn)
            return
        self._write_out(out)

    def _write_out(self, out: list[bytes]) -> None:
        if out:
            client = self.client
            if len(out) == 1:
                data = out[0]
                client.bytes_out += len(data)
                client.transport.write(data)
            else:
                client.bytes_out += sum(map(len, out))
                client.transport.writelines(out)
            out.clear()

    def _response_head(self, conn: UpstreamConnection, head: Head, out: list[bytes]) -> bool:
        """Forward a response head; False when the exchange already ended."""
        status = head.status
        if status < 200:
            if status == 101:
                try:
                    check_switch(self.head, head)
                except UpgradeError as exc:
                    self._upstream_broken(conn, exc.detail)
                    return False
                # The exchange ends here: the client connection turns both into a relay.
                self.upstream = None
                self.status = status
                self.transition(RESPONDING)
                self.transition(ANSWERED)
                self._release_endpoint()
                self._release_service()
                self._completed("ok")
                self.client.switch_protocols(conn, head.raw)
                return False
            if self.head.version == b"1.1":
                out.append(head.raw)
            return True  # still TRYING: the final head is to come
        self.try_deadline = 0.0
        endpoint = self.endpoint
        if endpoint is not None:
            self._record(endpoint, status < 500)
            action = self.action
            policy = action.retry_policy if action is not None else None
            if policy is not None and self._retries_response(policy, status):
                decisions.try_ended(self, "response", status, None)
                self.upstream_keep_alive = head.keep_alive
                self.transition(DISCARDING)
                return True
        self.transition(RESPONDING)
        self.status = status
        client = self.client
        client.deadline = self._next_deadline()
        self.upstream_keep_alive = head.keep_alive
        request = self.head
        if head.content_length is None and length_unknown(self.method, head):  # the first test spares the call when sized
            self.head_at = self.engine.clock()  # a stream: its latency is the time to this head
        keep = self.client_keep_alive = client_keep_alive(request, head, self.engine.draining)
        id_line = self.request_id_line
        if id_line is not None and head.has(b"x-request-id"):
            id_line = None
        out.append(client_response_head(head, request.version, keep, id_line))
        return True

    def _retries_response(self, policy: RetryPolicy, status: int) -> bool:
        """Whether a response with `status` is dropped for another try; spends the retry from the budget."""
        service = self._routed()[0]
        replay = self.replay
        return (
            replay is not None
            and self.request_done
            and policy.should_retry(self.attempt, self.method.decode("latin-1"), "response", status, self.replay_size - len(replay[0]))
            and service.budget.try_spend(self.engine.clock())
        )

    def _response_end(self, conn: UpstreamConnection) -> None:
        self.upstream = None
        discarded = self.phase is DISCARDING
        endpoint = self.endpoint
        if endpoint is not None:
            if discarded:
                self._release_endpoint()
            else:  # answered: no later try needs to avoid it
                self.endpoint = None
                endpoint.active -= 1
        if conn.parser.buffered == 0 and self.request_done and self.upstream_keep_alive:
            self.engine.pool.release(conn)
        else:
            conn.close()
        if discarded:
            policy = self._routed()[1].retry_policy or CONNECT_RETRIES  # a response is only discarded under a route's policy
            self._retry(policy.backoff(self.attempt), count_attempt=True)
            return
        self._answered("ok")

    def _answered(self, outcome: str) -> None:
        self.transition(ANSWERED)
        if self.counted:
            self._release_service()
        hook = self.engine.on_exchange_done  # _completed's body: this is every exchange's path
        if hook is not None:
            hook(self, outcome)
        if self.request_done:
            self.client.exchange_finished(self, self.client_keep_alive)

    def _abort_client(self, outcome: str) -> None:
        """Response bytes already went out: the only way to signal a failure is to abort."""
        self._release_endpoint()
        self._release_service()
        self.transition(ANSWERED)
        self._completed(outcome)
        self.client.abort()

    def _completed(self, outcome: str) -> None:
        """Called exactly once per exchange when it ends; the hook for metrics recording.

        `outcome` is "ok", a sidecar error code (x-mesh-error), or "client-lost".
        """
        hook = self.engine.on_exchange_done
        if hook is None:
            return
        hook(self, outcome)

    def upstream_eof(self) -> None:
        conn = self.upstream
        if conn is None:
            return
        conn.parser.feed_eof()
        self.upstream_data(b"")

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        if self.upstream is not conn:
            return
        self.upstream = None
        if self.phase is RESPONDING:
            log.info("%s: upstream closed mid-response (%s), aborting the client", self.label, exc or "eof")
            self._abort_client("upstream-reset")
            return
        stale = self.reused and conn.parser.at_message_start and conn.parser.buffered == 0
        self._try_failed("reset", "connection closed before a response", exc, stale_connection=stale)

    def upstream_write_paused(self) -> None:
        self.client.pause_for_upstream()

    def upstream_write_resumed(self) -> None:
        self.client.resume_for_upstream()

    def _upstream_broken(self, conn: UpstreamConnection, detail: str) -> None:
        self.upstream = None
        conn.abort()
        self._release_endpoint()
        if self.phase is RESPONDING:
            log.info("%s: invalid response after the head (%s), aborting the client", self.label, detail)
            self._abort_client("upstream-reset")
            return
        self.fail("upstream-reset", "%s: invalid response: %s" % (self.label, detail))

    # -- failures and retries ------------------------------------------------------------

    def _try_failed(self, outcome: str, detail: str, exc: Exception | None, final: bool = False, stale_connection: bool = False) -> None:
        phase = self.phase
        if phase >= ANSWERED:
            return
        decisions.try_ended(self, outcome, None, detail)
        self._stop_waiting()
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.abort()
        action = self.action
        policy = action.retry_policy if action is not None else None
        service = self.target.service
        now = self.engine.clock()
        decision = after_failure(
            outcome, policy, self.attempt, self.method.decode("latin-1"), self._replay_body_size(),
            replayable=self.replay is not None or self.pending is not None,
            budget_left=service is None or service.budget.allows(now),
            response_started=phase is RESPONDING, final=final, stale_connection=stale_connection,
        )
        if decision is ABORT:
            self._abort_client(_CONNECT_FAILURE_CODE[outcome])
            return
        endpoint = self.endpoint
        if endpoint is not None and not stale_connection:
            self._record(endpoint, False)
        self._release_endpoint()
        if decision is RETRY_STALE:
            self._retry(0.0, count_attempt=False)
        elif decision is RETRY:
            if service is not None:
                service.budget.try_spend(now)
            self._retry((policy or CONNECT_RETRIES).backoff(self.attempt), count_attempt=True)
        else:
            self.fail(_CONNECT_FAILURE_CODE[outcome], "%s: %s" % (self.label, detail))

    def _replay_body_size(self) -> int | None:
        """The request body's size for a replay (proxy.retry), None when streamed or not kept."""
        if self.pending is not None:
            return 0  # nothing was sent: the queued bytes are the whole replay so far
        replay = self.replay
        return self.replay_size - len(replay[0]) if self.request_done and replay else None

    def _retry(self, delay: float, count_attempt: bool) -> None:
        """Send the replay copy again, to another endpoint when there is one."""
        decisions.retrying(self, delay, count_attempt)
        if count_attempt:
            self.attempt += 1
        if self.pending is None:  # else nothing was sent and the queued bytes still wait
            replay = self.replay
            if replay is None:
                raise ExchangeStateError("%r: a retry without a replay copy" % (self,))
            self.pending = list(replay)
            self.pending_size = self.replay_size
        self.try_deadline = 0.0
        if delay > 0:
            self.transition(BACKOFF)
            self.engine.call_later(delay, self._try)
        else:
            self._try()

    def _record(self, endpoint: Endpoint, ok: bool) -> None:
        service = self.target.service
        if service is not None:
            engine = self.engine
            if service.outlier.record(endpoint, ok, engine.clock(), len(service.endpoints)):
                observer = engine.observer
                if observer is not None:
                    observer.count_ejection(service.name, endpoint.version)

    def _release_endpoint(self) -> None:
        endpoint = self.endpoint
        if endpoint is not None:
            self.endpoint = None
            endpoint.active -= 1
            self.tried = self.tried | {endpoint.id}

    def _release_service(self) -> None:
        """Leave the service's limits; a queued exchange that gets the slot is woken."""
        service = self.target.service
        if self.counted and service is not None:  # only an exchange to a service is counted
            self.counted = False
            woken = service.limits.leave(self)
            if woken is not None:
                # Not synchronously: this exchange may be in the middle of writing its own response.
                self.engine.call_soon(woken.admitted)

    def fail(self, code: str, detail: str, status: int | None = None) -> None:
        """Answer the client with a sidecar-generated error (never after response bytes)."""
        phase = self.phase
        if phase >= ANSWERED:
            return
        self._stop_waiting()
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.abort()
        if phase is RESPONDING:
            self._abort_client(code)
            return
        self._release_endpoint()
        self.pending = None
        self.transition(RESPONDING)
        self.status = status if status is not None else http_status(code)
        if self.engine.draining or self.head.version != b"1.1":
            self.client_keep_alive = False
        if code == "upstream-connect-failed" or code == "timeout" or code == "upstream-reset" or code == STREAM_IDLE_TIMEOUT_CODE:
            log.info("%s %s", code, detail)
        response = error_response(code, detail, status, close=not self.client_keep_alive,
                                  request_id=self.request_id or self.head.get(b"x-request-id"))
        client = self.client
        client.bytes_out += len(response)
        client.transport.write(response)
        self._answered(code)
