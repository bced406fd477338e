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
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

from meshctl.proxy import decisions
from meshctl.proxy.errors import ProtocolError, error_response, http_status
from meshctl.proxy.http1 import END, Data, Head, rebuild_head
from meshctl.proxy.idle import STREAM_IDLE_TIMEOUT_CODE, IdleCheck, first_check
from meshctl.proxy.limits import ADMITTED, QUEUED
from meshctl.proxy.mirror import send_mirror
from meshctl.proxy.pool import DEFAULT_HANDSHAKE_TIMEOUT
from meshctl.proxy.retry import CONNECT_RETRIES, MAX_REPLAY_BODY_BYTES
from meshctl.proxy.shadow import begin as begin_comparison
from meshctl.proxy.upgrade import UpgradeError, check_switch

if TYPE_CHECKING:
    from meshctl.proxy.balance import Endpoint
    from meshctl.proxy.listeners import Target
    from meshctl.proxy.pool import UpstreamConnection
    from meshctl.proxy.retry import RetryPolicy
    from meshctl.proxy.routing import RouteAction
    from meshctl.proxy.seams import Client
    from meshctl.proxy.shadow import Comparison

log = logging.getLogger("proxy.exchange")

MAX_PENDING_BYTES = 256 * 1024  # queued while connecting; above it the client is paused
MAX_REPLAY_BYTES = MAX_REPLAY_BODY_BYTES + 16 * 1024  # body limit plus room for the head
_CONNECTION_CLOSE = b"connection: close"
_CONNECTION_KEEP_ALIVE = b"connection: keep-alive"
_CONNECT_FAILURE_CODE = {
    "connect-failure": "upstream-connect-failed", "refused": "upstream-connect-failed", "reset": "upstream-reset", "timeout": "timeout",
    STREAM_IDLE_TIMEOUT_CODE: STREAM_IDLE_TIMEOUT_CODE,
}


class Exchange:
    __slots__ = (
        "client",
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
        "response_started",
        "answered",
        "client_keep_alive",
        "attempt",
        "tried",
        "deadline",
        "try_deadline",
        "idle_due",
        "idle",
        "head_at",
        "interim",
        "discarding",
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

    def __init__(self, client: Client, target: Target, head: Head, out_head: bytes) -> None:
        self.client = client
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
        self.request_done = False
        self.response_started = False
        self.answered = False
        self.client_keep_alive = head.keep_alive
        self.attempt = 1
        self.tried: frozenset[str] = frozenset()
        self.deadline = 0.0
        self.try_deadline = 0.0
        self.idle_due = 0.0  # next stream idle check (proxy.idle); 0: none
        self.idle: IdleCheck | None = None  # made at the first check
        self.head_at = 0.0  # when a response without a declared length (a stream) began
        self.interim = False
        self.discarding = False
        self.waiting_on: tuple[str, int] | None = None  # the address whose pool line this waits in
        self.hash_key: str | None = None
        self.counted = False
        self.reused = False
        self.upstream_keep_alive = False
        self.started = 0.0
        self.status = 0
        self.mirror_version: str | None = None
        self.comparison: Comparison | None = None  # set when the shadow's answer is compared with ours
        self.request_id: bytes | None = None  # when this sidecar generated it (else in the head)
        self.request_id_line: bytes | None = None  # the ingress adds it to responses that lack it
        self.try_started = 0.0
        self.trail: list | None = None  # rare events for `meshctl why` (proxy.decisions)

    def __repr__(self) -> str:
        return "<Exchange %s %s -> %s try %d%s%s>" % (
            self.method.decode("ascii", "replace"),
            self.head.target[:80].decode("ascii", "replace"),
            self.label,
            self.attempt,
            " request-done" if self.request_done else "",
            " answered" if self.answered else "",
        )

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

    def admitted(self) -> None:
        """Holding a connection slot of the service: mirror decision, delay fault, first try."""
        if self.answered:
            return
        if self.trail is not None:
            decisions.woken(self)
        action = self.action
        service = self.target.service
        service.budget.record_request(self.client.state.loop.time())  # type: ignore[union-attr]
        mirror = action.mirror  # type: ignore[union-attr]
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
        fault = action.fault  # type: ignore[union-attr]
        if fault is not None:
            delay = fault["delay"]
            if delay is not None and random.random() * 100 < delay["percent"]:
                decisions.note(self, decisions.DELAY, delay["fixed"])
                self.client.deadline = self._next_deadline()
                self.client.state.loop.call_later(delay["fixed"], self._try)
                if compared and self.request_done:
                    self._send_mirror()  # the delay is the primary's, not the copies'
                return
        self._try()
        if compared and self.request_done and not self.answered:
            self._send_mirror()  # after the first try, so that the reference copy can avoid its endpoint

    def _send_mirror(self) -> None:
        version, self.mirror_version = self.mirror_version, None
        replay = self.replay
        if replay is None or self.replay_size - len(replay[0]) > MAX_REPLAY_BODY_BYTES:
            return
        service = self.target.service
        state = self.client.state
        if self.comparison is not None:
            self.comparison.send_copies(state.pool, service, replay, self.action.timeout, state.loop.time(), self.last_endpoint)  # type: ignore[arg-type, union-attr]
            return
        send_mirror(state.pool, service, version, replay, self.action.timeout, service.connect_timeout, state.loop.time())  # type: ignore[arg-type, union-attr]

    def _try(self) -> None:
        if self.answered:
            return
        service = self.target.service
        state = self.client.state
        if service is not None:
            action = self.action
            now = state.loop.time()
            endpoint = service.balancer.pick(action.version, self.hash_key, self.tried, now)  # type: ignore[union-attr]
            if endpoint is None:
                self.fail("no-healthy-endpoints", "%s@%s: no endpoints" % (service.name, action.version))  # type: ignore[union-attr]
                return
            endpoint.active += 1
            self.endpoint = endpoint
            self.address = endpoint.address
            self.last_endpoint = endpoint
            self.try_started = now
            policy = action.retry_policy  # type: ignore[union-attr]
            if policy is not None and policy.per_try_timeout:
                self.try_deadline = now + policy.per_try_timeout
        else:
            self.try_started = self.started if self.trail is None else state.loop.time()
        self.client.deadline = self._next_deadline()
        conn = state.pool.take(self.address)  # type: ignore[arg-type]
        if conn is not None:
            self._attach(conn, reused=True)
            if not self.client.processing:
                self.flush()
            return
        self.waiting_on = self.address
        if service is not None:
            state.pool.wait(self, self.address, service.connect_timeout, service.tls, service.name, service.handshake_timeout)  # type: ignore[arg-type]
        else:
            peer = "app" if self.client.listener.kind == "inbound" else self.target.label
            state.pool.wait(self, self.address, 1.0, None, peer, DEFAULT_HANDSHAKE_TIMEOUT)  # type: ignore[arg-type]

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
            self.client.state.pool.cancel(self, address)

    def _attach(self, conn: UpstreamConnection, reused: bool) -> None:
        conn.owner = self if self.comparison is None else self.comparison.tap(self, conn)
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
            conn.transport.write(pending[0])  # type: ignore[union-attr]
        else:
            conn.transport.writelines(pending)  # type: ignore[union-attr]
        self.client.resume_for_pending()

    # -- request side (called by the client connection) ----------------------------------

    def request_data(self, data: bytes) -> None:
        if self.answered:
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
            conn.bytes_out += len(data)  # type: ignore[union-attr]
            conn.transport.write(data)  # type: ignore[union-attr]
            return
        pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > MAX_PENDING_BYTES:
            self.client.pause_for_pending()

    def request_end(self) -> None:
        self.request_done = True
        if self.mirror_version is not None:
            self._send_mirror()
        if self.answered:
            self.client.exchange_finished(self, self.client_keep_alive)

    def client_lost(self) -> None:
        """The client went away: nothing left to answer."""
        if not self.answered:
            self._completed("client-lost")
        self.answered = True
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
        if self.deadline and now >= self.deadline:
            decisions.note(self, decisions.FIRED, "request", self.action.timeout)  # type: ignore[union-attr]
            self._try_failed("timeout", "not finished within %gs" % self.action.timeout, None, final=True)  # type: ignore[union-attr]
        elif self.try_deadline and now >= self.try_deadline:
            decisions.note(self, decisions.FIRED, "per_try", self.action.retry_policy.per_try_timeout)  # type: ignore[union-attr]
            self._try_failed("timeout", "no response within the per-try timeout of %gs" % self.action.retry_policy.per_try_timeout, None)  # type: ignore[union-attr]
        elif self.idle_due and now >= self.idle_due:
            self._idle_check(now)

    def _idle_check(self, now: float) -> None:
        client = self.client
        moved = client.bytes_in + client.bytes_out
        idle = self.idle
        if self.answered:
            self.idle_due = 0.0  # only the rest of the request body is awaited; the keep-alive timeout follows
        elif idle is None:
            idle = self.idle = IdleCheck(self.action.idle_timeout, moved, now)  # type: ignore[arg-type, union-attr]
            self.idle_due = idle.due
        elif idle.expired(moved, now):
            detail = "no byte moved either way for %gs" % idle.timeout
            decisions.note(self, decisions.FIRED, "stream_idle", idle.timeout)
            if self.response_started:
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
            kind = type(event)
            if kind is Data:
                if not self.discarding:
                    out.append(event.data)  # type: ignore[attr-defined]
                continue
            if kind is Head:
                if not self._response_head(event, out):  # type: ignore[arg-type]
                    return
                body = event.body  # type: ignore[attr-defined]
                if body is None:
                    continue
                # The whole response came with its head: no Data or END events follow.
                if body and not self.discarding:
                    out.append(body)
            elif event is not END:
                break  # NEED_DATA, or PAUSED after a response that is not ours
            if self.interim:
                self.interim = False
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

    def _response_head(self, head: Head, out: list[bytes]) -> bool:
        """Forward a response head; False when the exchange already ended."""
        status = head.status
        if status < 200:
            if status == 101:
                conn = self.upstream
                try:
                    check_switch(self.head, head)
                except UpgradeError as exc:
                    self._upstream_broken(conn, exc.detail)  # type: ignore[arg-type]
                    return False
                # The exchange ends here: the client connection turns both into a relay.
                self.upstream = None
                self.status = status
                self.response_started = self.answered = True
                self._release_endpoint()
                self._release_service()
                self._completed("ok")
                self.client.switch_protocols(conn, head.raw)
                return False
            self.interim = True
            if self.head.version == b"1.1":
                out.append(head.raw)
            return True
        self.try_deadline = 0.0
        endpoint = self.endpoint
        if endpoint is not None:
            self._record(endpoint, status < 500)
            policy = self.action.retry_policy  # type: ignore[union-attr]
            if (
                policy is not None
                and self.replay is not None
                and self.request_done
                and policy.should_retry(self.attempt, self.method.decode("latin-1"), "response", status, self.replay_size - len(self.replay[0]))
                and self.target.service.budget.try_spend(self.client.state.loop.time())  # type: ignore[union-attr]
            ):
                decisions.try_ended(self, "response", status, None)
                self.upstream_keep_alive = head.keep_alive
                self.discarding = True
                return True
        self.response_started = True
        self.status = status
        self.client.deadline = self._next_deadline()
        self.upstream_keep_alive = head.keep_alive
        keep = self.client_keep_alive
        if head.content_length is None and status not in (204, 304) and self.method != b"HEAD":
            self.head_at = self.client.state.loop.time()  # a stream: its latency is the time to this head
            if not head.chunked:
                keep = False  # the body runs until the upstream closes, so the client must see a close too
        if self.client.state.draining:
            keep = False
        self.client_keep_alive = keep
        id_line = self.request_id_line
        if id_line is not None and head.has(b"x-request-id"):
            id_line = None
        if self.head.version != b"1.1":
            if head.chunked:
                keep = self.client_keep_alive = False  # a 1.0 client cannot find the end of a chunked body
            # HTTP/1.0 clients keep a connection only when the response says so (RFC 9112 9.3).
            add = [_CONNECTION_KEEP_ALIVE] if keep else [_CONNECTION_CLOSE]
            out.append(rebuild_head(head, add if id_line is None else [id_line, *add]))
        elif (head.has_hop_by_hop and not head.only_keep_alive) or not keep:
            add = [] if keep else [_CONNECTION_CLOSE]
            out.append(rebuild_head(head, add if id_line is None else [id_line, *add]))
        elif id_line is not None:
            out.append(head.raw[:-2] + id_line + b"\r\n\r\n")  # raw ends with the blank line
        else:
            out.append(head.raw)
        return True

    def _response_end(self, conn: UpstreamConnection) -> None:
        self.upstream = None
        endpoint = self.endpoint
        if endpoint is not None:
            if self.discarding:
                self._release_endpoint()
            else:  # answered: no later try needs to avoid it
                self.endpoint = None
                endpoint.active -= 1
        if conn.parser.buffered == 0 and self.request_done and self.upstream_keep_alive:
            self.client.state.pool.release(conn)
        else:
            conn.close()
        if self.discarding:
            self.discarding = False
            self._retry(self.action.retry_policy.backoff(self.attempt), count_attempt=True)  # type: ignore[union-attr]
            return
        self._answered("ok")

    def _answered(self, outcome: str) -> None:
        self.answered = True
        self._release_service()
        self._completed(outcome)
        if self.request_done:
            self.client.exchange_finished(self, self.client_keep_alive)

    def _abort_client(self, outcome: str) -> None:
        """Response bytes already went out: the only way to signal a failure is to abort."""
        self._release_endpoint()
        self._release_service()
        self.answered = True
        self._completed(outcome)
        self.client.abort()

    def _completed(self, outcome: str) -> None:
        """Called exactly once per exchange when it ends; the hook for metrics recording.

        `outcome` is "ok", a sidecar error code (x-mesh-error), or "client-lost".
        """
        hook = self.client.state.on_exchange_done
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
        if self.response_started:
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
        if self.response_started:
            log.info("%s: invalid response after the head (%s), aborting the client", self.label, detail)
            self._abort_client("upstream-reset")
            return
        self.fail("upstream-reset", "%s: invalid response: %s" % (self.label, detail))

    # -- failures and retries ------------------------------------------------------------

    def _try_failed(self, outcome: str, detail: str, exc: Exception | None, final: bool = False, stale_connection: bool = False) -> None:
        if self.answered:
            return
        decisions.try_ended(self, outcome, None, detail)
        self._stop_waiting()
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.abort()
        if self.response_started:
            self._abort_client(_CONNECT_FAILURE_CODE[outcome])
            return
        endpoint = self.endpoint
        if endpoint is not None and not stale_connection:
            self._record(endpoint, False)
        self._release_endpoint()
        if not final and (self.replay is not None or self.pending is not None):
            if stale_connection:
                # The peer closed a pooled connection as we reused it: not the endpoint's fault.
                self._retry(0.0, count_attempt=False)
                return
            policy = self._may_retry(outcome)
            if policy is not None:
                self._retry(policy.backoff(self.attempt), count_attempt=True)
                return
        self.fail(_CONNECT_FAILURE_CODE[outcome], "%s: %s" % (self.label, detail))

    def _may_retry(self, outcome: str) -> RetryPolicy | None:
        """The policy that allows another try after `outcome`, with a retry taken from the service's budget.

        A request to the app or an egress host (no service, no route) retries failed connects only.
        """
        action = self.action
        policy = (action.retry_policy if action is not None else None) or CONNECT_RETRIES
        if self.pending is not None:
            body_size = 0  # nothing was sent: the queued bytes are the whole replay so far
        else:
            body_size = self.replay_size - len(self.replay[0]) if self.request_done and self.replay else None  # type: ignore[index]
        if not policy.should_retry(self.attempt, self.method.decode("latin-1"), outcome, None, body_size):
            return None
        service = self.target.service
        if service is not None and not service.budget.try_spend(self.client.state.loop.time()):
            return None
        return policy

    def _retry(self, delay: float, count_attempt: bool) -> None:
        """Send the replay copy again, to another endpoint when there is one."""
        decisions.retrying(self, delay, count_attempt)
        if count_attempt:
            self.attempt += 1
        if self.pending is None:  # else nothing was sent and the queued bytes still wait
            self.pending = list(self.replay)  # type: ignore[arg-type]
            self.pending_size = self.replay_size
        self.try_deadline = 0.0
        if delay > 0:
            self.client.state.loop.call_later(delay, self._try)
        else:
            self._try()

    def _record(self, endpoint: Endpoint, ok: bool) -> None:
        service = self.target.service
        if service is not None:
            state = self.client.state
            if service.outlier.record(endpoint, ok, state.loop.time(), len(service.endpoints)) and state.observer is not None:
                state.observer.count_ejection(service.name, endpoint.version)

    def _release_endpoint(self) -> None:
        endpoint = self.endpoint
        if endpoint is not None:
            self.endpoint = None
            endpoint.active -= 1
            self.tried = self.tried | {endpoint.id}

    def _release_service(self) -> None:
        """Leave the service's limits; a queued exchange that gets the slot is woken."""
        if self.counted:
            self.counted = False
            woken = self.target.service.limits.leave(self)  # type: ignore[union-attr]
            if woken is not None:
                # Not synchronously: this exchange may be in the middle of writing its own response.
                self.client.state.loop.call_soon(woken.admitted)

    def fail(self, code: str, detail: str, status: int | None = None) -> None:
        """Answer the client with a sidecar-generated error (never after response bytes)."""
        if self.answered:
            return
        self._stop_waiting()
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.abort()
        if self.response_started:
            self._abort_client(code)
            return
        self._release_endpoint()
        self.pending = None
        self.response_started = True
        self.status = status if status is not None else http_status(code)
        if self.client.state.draining or self.head.version != b"1.1":
            self.client_keep_alive = False
        if code == "upstream-connect-failed" or code == "timeout" or code == "upstream-reset" or code == STREAM_IDLE_TIMEOUT_CODE:
            log.info("%s %s", code, detail)
        response = error_response(code, detail, status, close=not self.client_keep_alive,
                                  request_id=self.request_id or self.head.get(b"x-request-id"))
        self.client.bytes_out += len(response)
        self.client.transport.write(response)
        self._answered(code)
