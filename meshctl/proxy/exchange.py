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
  reused keep-alive connection turns out to have been closed by the peer.

Every error the exchange generates goes through proxy.errors; once response bytes have
been sent to the client, a failure can only abort the client connection.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from meshctl.proxy.errors import STATUS_BY_CODE, ProtocolError, error_response
from meshctl.proxy.http1 import END, Data, Head, rebuild_head
from meshctl.proxy.limits import ADMITTED, QUEUED
from meshctl.proxy.mirror import send_mirror
from meshctl.proxy.retry import MAX_REPLAY_BODY_BYTES
from meshctl.proxy.upgrade import UpgradeError, check_switch

if TYPE_CHECKING:
    from meshctl.proxy.balance import Endpoint
    from meshctl.proxy.listeners import Target
    from meshctl.proxy.pool import UpstreamConnection
    from meshctl.proxy.routing import RouteAction
    from meshctl.proxy.server import ClientConnection

log = logging.getLogger("proxy.exchange")

MAX_PENDING_BYTES = 256 * 1024  # queued while connecting; above it the client is paused
MAX_REPLAY_BYTES = MAX_REPLAY_BODY_BYTES + 16 * 1024  # body limit plus room for the head
_CONNECTION_CLOSE = b"connection: close"
_CONNECTION_KEEP_ALIVE = b"connection: keep-alive"
_CONNECT_FAILURE_CODE = {"connect-failure": "upstream-connect-failed", "refused": "upstream-connect-failed", "reset": "upstream-reset", "timeout": "timeout"}


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
        "interim",
        "discarding",
        "connect_task",
        "hash_key",
        "counted",
        "reused",
        "upstream_keep_alive",
        "started",
        "status",
        "mirror_version",
    )

    def __init__(self, client: ClientConnection, target: Target, head: Head, out_head: bytes) -> None:
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
        self.interim = False
        self.discarding = False
        self.connect_task: asyncio.Task | None = None
        self.hash_key: str | None = None
        self.counted = False
        self.reused = False
        self.upstream_keep_alive = False
        self.started = 0.0
        self.status = 0
        self.mirror_version: str | None = None

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
        self.deadline = now + action.timeout
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
                self.counted = True
                self.client.deadline = self.deadline
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
        action = self.action
        service = self.target.service
        service.budget.record_request(self.client.state.loop.time())  # type: ignore[union-attr]
        mirror = action.mirror  # type: ignore[union-attr]
        if mirror is not None and random.random() * 100 < mirror["percent"]:
            self.mirror_version = mirror["version"]
            if self.request_done:
                self._send_mirror()
        fault = action.fault  # type: ignore[union-attr]
        if fault is not None:
            delay = fault["delay"]
            if delay is not None and random.random() * 100 < delay["percent"]:
                self.client.deadline = self.deadline
                self.client.state.loop.call_later(delay["fixed"], self._try)
                return
        self._try()

    def _send_mirror(self) -> None:
        version, self.mirror_version = self.mirror_version, None
        replay = self.replay
        if replay is None or self.replay_size - len(replay[0]) > MAX_REPLAY_BODY_BYTES:
            return
        service = self.target.service
        state = self.client.state
        send_mirror(state.pool, service, version, replay, self.action.timeout, service.connect_timeout, state.loop.time())  # type: ignore[arg-type, union-attr]

    def _try(self) -> None:
        if self.answered:
            return
        service = self.target.service
        state = self.client.state
        if service is not None:
            action = self.action
            endpoint = service.balancer.pick(action.version, self.hash_key, self.tried, state.loop.time())  # type: ignore[union-attr]
            if endpoint is None:
                self.fail("no-healthy-endpoints", "%s@%s: no endpoints" % (service.name, action.version))  # type: ignore[union-attr]
                return
            endpoint.active += 1
            self.endpoint = endpoint
            self.address = endpoint.address
            self.last_endpoint = endpoint
            policy = action.retry_policy  # type: ignore[union-attr]
            if policy is not None and policy.per_try_timeout:
                self.try_deadline = state.loop.time() + policy.per_try_timeout
        self.client.deadline = self._next_deadline()
        conn = state.pool.take(self.address)  # type: ignore[arg-type]
        if conn is not None:
            self._attach(conn, reused=True)
            if not self.client.processing:
                self.flush()
            return
        connect_timeout = service.connect_timeout if service is not None else 1.0
        self.connect_task = state.loop.create_task(self._connect(self.address, connect_timeout))  # type: ignore[arg-type]

    def _next_deadline(self) -> float:
        if self.try_deadline and (not self.deadline or self.try_deadline < self.deadline):
            return self.try_deadline
        return self.deadline

    async def _connect(self, address: tuple[str, int], timeout: float) -> None:
        pool = self.client.state.pool
        try:
            service = self.target.service
            if service is not None:
                conn = await pool.connect(address, timeout, service.tls, service.name)
            else:
                conn = await pool.connect(address, timeout, None, "app" if self.client.listener.kind == "inbound" else self.target.label)
        except TimeoutError:
            self.connect_task = None
            self._try_failed("connect-failure", "connect timed out after %gs" % timeout, None)
        except ConnectionRefusedError:
            self.connect_task = None
            self._try_failed("refused", "connection refused", None)
        except OSError as exc:
            self.connect_task = None
            self._try_failed("connect-failure", exc.strerror or str(exc), None)
        else:
            self.connect_task = None
            if self.answered:
                pool.add_idle(conn)
                return
            self._attach(conn, reused=False)
            self.flush()

    def _attach(self, conn: UpstreamConnection, reused: bool) -> None:
        conn.owner = self
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
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
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
            self._try_failed("timeout", "no response within %gs" % self.action.timeout, None, final=True)  # type: ignore[union-attr]
        elif self.try_deadline and now >= self.try_deadline:
            self._try_failed("timeout", "no response within the per-try timeout of %gs" % self.action.retry_policy.per_try_timeout, None)  # type: ignore[union-attr]

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
                self.upstream_keep_alive = head.keep_alive
                self.discarding = True
                return True
        self.response_started = True
        self.status = status
        self.client.deadline = self.deadline
        self.upstream_keep_alive = head.keep_alive
        keep = self.client_keep_alive
        if not (head.content_length is not None or head.chunked or status in (204, 304) or self.method == b"HEAD"):
            keep = False  # the body runs until the upstream closes, so the client must see a close too
        if self.client.state.draining:
            keep = False
        self.client_keep_alive = keep
        if self.head.version != b"1.1":
            if head.chunked:
                keep = self.client_keep_alive = False  # a 1.0 client cannot find the end of a chunked body
            # HTTP/1.0 clients keep a connection only when the response says so (RFC 9112 9.3).
            out.append(rebuild_head(head, [_CONNECTION_KEEP_ALIVE] if keep else [_CONNECTION_CLOSE]))
        elif (head.has_hop_by_hop and not head.only_keep_alive) or not keep:
            out.append(rebuild_head(head, [] if keep else [_CONNECTION_CLOSE]))
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
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
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
        if not final and self.replay is not None:
            if stale_connection:
                # The peer closed a pooled connection as we reused it: not the endpoint's fault.
                self._retry(0.0, count_attempt=False)
                return
            if self._may_retry(outcome):
                self._retry(self.action.retry_policy.backoff(self.attempt), count_attempt=True)  # type: ignore[union-attr]
                return
        self.fail(_CONNECT_FAILURE_CODE[outcome], "%s: %s" % (self.label, detail))

    def _may_retry(self, outcome: str) -> bool:
        action = self.action
        if action is None or action.retry_policy is None:
            return False
        body_size = self.replay_size - len(self.replay[0]) if self.request_done and self.replay else None  # type: ignore[index]
        if not action.retry_policy.should_retry(self.attempt, self.method.decode("latin-1"), outcome, None, body_size):
            return False
        return self.target.service.budget.try_spend(self.client.state.loop.time())  # type: ignore[union-attr]

    def _retry(self, delay: float, count_attempt: bool) -> None:
        """Send the replay copy again, to another endpoint when there is one."""
        if count_attempt:
            self.attempt += 1
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
        self.status = status if status is not None else STATUS_BY_CODE.get(code, 500)
        if self.client.state.draining or self.head.version != b"1.1":
            self.client_keep_alive = False
        if code == "upstream-connect-failed" or code == "timeout" or code == "upstream-reset":
            log.info("%s %s", code, detail)
        response = error_response(code, detail, status, close=not self.client_keep_alive)
        self.client.bytes_out += len(response)
        self.client.transport.write(response)
        self._answered(code)
