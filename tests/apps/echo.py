"""A scripted app for integration tests: stdlib only, behaviour set by environment.

GET /healthz          200 once ready
GET /whoami           JSON: service, version, replica, pid
GET /call/<upstream>/<path>   calls <UPSTREAM>_URL/<path> and returns its body and status
GET /crash            exits with EXIT_CODE (default 1) right away
GET /spawn            starts a grandchild `sleep` in the same process group; returns its pid
GET /status/<code>    answers with that status code
GET /sleep?ms=N       answers 200 after N milliseconds (known latency for metrics tests)
GET /events?n=N&every_ms=M[&pause_after=K&pause_ms=P]
                      server-sent events, chunked: N events M ms apart (silent for P ms after
                      the K-th), then the last chunk; `data: event <i>` each
GET /proxied/<service>/<path>   GETs http://<service>/<path> with urllib, which honours HTTP_PROXY

/call/ forwards the trace headers (traceparent, tracestate, b3, x-b3-*), x-request-id and
x-mesh-debug it received, as an app in a mesh should (`meshctl why` stitches hops by id),
and the headers named in FORWARD_HEADERS (comma-separated).

It listens on 127.0.0.1:$PORT, or on the Unix socket $MESH_SOCKET when given (`listen: unix`).
READY_DELAY (seconds) delays listening; EXIT_AT_START=N exits at once with code N;
FAIL_AFTER=N makes /whoami answer 500 after N successful answers (a canary going bad).
REQUIRE_UPSTREAMS=1 checks every *_URL answers /healthz at start and exits 7 otherwise,
which makes a start before the upstreams were ready visible as a restart.
TERM_LOG=FILE appends "<MESH_INSTANCE>\n" to FILE on SIGTERM; IGNORE_TERM=1 then keeps running
(so only a SIGKILL stops it), otherwise it exits 0.
"""

import json
import os
import signal
import socketserver
import urllib.parse
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

children = []
served = [0]  # /whoami requests so far, for FAIL_AFTER
TRACE_HEADERS = ("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",
                 "x-request-id", "x-mesh-debug")


def upstream_urls():
    return {k[:-4].lower(): v for k, v in os.environ.items() if k.endswith("_URL")}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        print("%s %s" % (self.command, self.path), flush=True)

    def reply(self, status, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/healthz":
            return self.reply(200, b"ok", "text/plain")
        if self.path == "/whoami":
            served[0] += 1
            fail_after = os.environ.get("FAIL_AFTER")
            if fail_after is not None and served[0] > int(fail_after):
                return self.reply(500, {"error": "failing as told (FAIL_AFTER)"})
            return self.reply(200, {
                "service": os.environ.get("MESH_SERVICE"), "version": os.environ.get("MESH_VERSION"),
                "replica": os.environ.get("MESH_REPLICA"), "pid": os.getpid(),
            })
        if self.path == "/crash":
            self.reply(200, b"bye", "text/plain")
            self.wfile.flush()
            os._exit(int(os.environ.get("EXIT_CODE", "1")))
        if self.path == "/spawn":
            child = subprocess.Popen(["sleep", "600"])
            children.append(child)
            return self.reply(200, {"pid": child.pid})
        if self.path.startswith("/status/"):
            return self.reply(int(self.path.split("/")[2]), {"status": int(self.path.split("/")[2])})
        if self.path.startswith("/sleep"):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            time.sleep(int(query.get("ms", ["0"])[0]) / 1000)  # the latency under test
            return self.reply(200, {"slept_ms": int(query.get("ms", ["0"])[0])})
        if self.path.startswith("/events"):
            return self.events(urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query))
        if self.path.startswith("/call/"):
            _, _, upstream, rest = self.path.split("/", 3)
            url = upstream_urls().get(upstream)
            if url is None:
                return self.reply(500, {"error": f"no {upstream.upper()}_URL"})
            names = TRACE_HEADERS + tuple(n for n in os.environ.get("FORWARD_HEADERS", "").split(",") if n)
            forwarded = {name: self.headers[name] for name in names if self.headers.get(name)}
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{url}/{rest}", headers=forwarded), timeout=10) as resp:
                    return self.reply(resp.status, resp.read(), resp.headers.get("Content-Type", "text/plain"))
            except urllib.error.HTTPError as exc:
                return self.reply(exc.code, exc.read(), "text/plain")
            except OSError as exc:
                return self.reply(502, {"error": str(exc)})
        if self.path.startswith("/proxied/"):
            _, _, service, rest = self.path.split("/", 3)
            try:
                with urllib.request.urlopen(f"http://{service}/{rest}", timeout=10) as resp:
                    return self.reply(resp.status, resp.read(), resp.headers.get("Content-Type", "text/plain"))
            except urllib.error.HTTPError as exc:
                return self.reply(exc.code, exc.read(), "text/plain")
            except OSError as exc:
                return self.reply(502, {"error": str(exc)})
        self.reply(404, {"error": "no such path"})

    def events(self, query):
        def number(name, default):
            return int(query.get(name, [str(default)])[0])

        count, every, pause_after, pause = number("n", 40), number("every_ms", 500), number("pause_after", -1), number("pause_ms", 0)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for index in range(count):
                event = b"data: event %d\n\n" % index
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                if index == pause_after:
                    time.sleep(pause / 1000)  # the silence under test
                elif index < count - 1:
                    time.sleep(every / 1000)  # the stream's pace
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the mesh or the client cut the stream


def on_sigterm(signum, frame):
    with open(os.environ["TERM_LOG"], "a") as fh:
        fh.write(os.environ.get("MESH_INSTANCE", "?") + "\n")
    if not os.environ.get("IGNORE_TERM"):
        os._exit(0)


def main():
    if "EXIT_AT_START" in os.environ:
        print("exiting at start as told", flush=True)
        sys.exit(int(os.environ["EXIT_AT_START"]))
    if os.environ.get("REQUIRE_UPSTREAMS"):
        for name, url in upstream_urls().items():
            try:
                urllib.request.urlopen(f"{url}/healthz", timeout=5).read()
            except OSError as exc:
                print(f"upstream {name} not reachable at start: {exc}", flush=True)
                sys.exit(7)
    if os.environ.get("TERM_LOG"):
        signal.signal(signal.SIGTERM, on_sigterm)
    time.sleep(float(os.environ.get("READY_DELAY", "0")))  # simulates a slow start, not a sync
    if "MESH_SOCKET" in os.environ:  # `listen: unix`
        server = UnixHTTPServer(os.environ["MESH_SOCKET"], Handler)
    else:
        server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    print(f"listening on {os.environ.get('MESH_SOCKET') or os.environ['PORT']}", flush=True)
    server.serve_forever()


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


if __name__ == "__main__":
    main()
