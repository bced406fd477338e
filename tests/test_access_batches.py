"""Access lines travel to the agent in batches (meshctl/proxy/observe.py), and none is lost at exit."""

from __future__ import annotations

import http.client
import json
import socket
import time

from meshctl.proxy.observe import ACCESS_BATCH_MAX

DEADLINE_S = 10.0


def control_messages(sidecar, until, deadline_s: float = DEADLINE_S) -> list[dict]:
    """Messages from the sidecar's control channel until `until(messages)` or EOF."""
    messages: list[dict] = []
    buffered = sidecar._replies
    deadline = time.monotonic() + deadline_s
    while not until(messages):
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            messages.append(json.loads(line))
        if until(messages):
            break
        remaining = deadline - time.monotonic()
        assert remaining > 0, "timed out; got %d messages" % len(messages)
        sidecar.channel.settimeout(remaining)
        try:
            chunk = sidecar.channel.recv(1 << 20)
        except socket.timeout:
            continue
        if not chunk:
            break
        buffered += chunk
    sidecar._replies = buffered
    return messages


def access_events(messages: list[dict]) -> list[dict]:
    return [event for message in messages if message["type"] == "access" for event in message["events"]]


def get_many(port: int, count: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    try:
        for index in range(count):
            conn.request("GET", "/n/%d" % index)
            response = conn.getresponse()
            response.read()
            assert response.status == 200
    finally:
        conn.close()


def test_access_lines_arrive_batched_and_complete_also_at_exit(sidecars, upstream):
    inner = sidecars([{"name": "inbound", "kind": "inbound", "app": upstream.address}]).start(access_log="on")
    requests = ACCESS_BATCH_MAX + 100
    get_many(inner.ports["inbound"], requests)
    messages = control_messages(inner, lambda got: len(access_events(got)) >= requests)
    batches = [message["events"] for message in messages if message["type"] == "access"]
    assert sorted(event["path"] for event in access_events(messages)) == sorted("/n/%d" % i for i in range(requests))
    assert len(batches) < requests and max(len(batch) for batch in batches) <= ACCESS_BATCH_MAX

    get_many(inner.ports["inbound"], 3)
    inner.terminate()  # the lines still waiting for their batch go out before the process exits
    messages = control_messages(inner, lambda got: False)
    assert sorted(event["path"] for event in access_events(messages)) == ["/n/0", "/n/1", "/n/2"]
    assert inner.wait(DEADLINE_S) == 0
