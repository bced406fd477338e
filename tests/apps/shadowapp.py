"""A test app whose versions answer alike except in known places, for shadow comparison.

GET /healthz          200
GET /item/<n>         JSON {"id", "name", "price", "started"}; header x-api-version
POST /orders          201 JSON {"ok": true}; counted
GET /orders/count     JSON {"posts": how many POST /orders this process took}

Behaviour by environment:
PRICE (default 10)    the item's price: v2 sets 12, so `body:$.price` differs
API_VERSION (1)       the x-api-version header: v2 sets 2, so `header:x-api-version` differs
STATUS=N              every /item answer has status N (a failing version)
BLOCK=1               every request but /healthz and /orders/count hangs for BLOCK_S seconds (default 60)
"started" is the time this replica started: two replicas of one version differ in it,
which makes it noise.
"""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED = "%.6f" % time.time()
posts = [0]
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        print("%s %s" % (self.command, self.path), flush=True)

    def reply(self, status, body, extra=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Api-Version", os.environ.get("API_VERSION", "1"))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def blocked(self):
        if os.environ.get("BLOCK") == "1" and self.path not in ("/healthz", "/orders/count"):
            time.sleep(float(os.environ.get("BLOCK_S", "60")))  # the slow shadow under test
            return True
        return False

    def do_GET(self):
        if self.blocked():
            return self.reply(200, {"late": True})
        if self.path == "/healthz":
            return self.reply(200, {"ok": True})
        if self.path == "/orders/count":
            return self.reply(200, {"posts": posts[0]})
        if self.path.startswith("/item/"):
            number = int(self.path.rsplit("/", 1)[1])
            return self.reply(int(os.environ.get("STATUS", "200")), {"id": number, "name": "item %d" % number,
                                    "price": int(os.environ.get("PRICE", "10")), "started": STARTED})
        self.reply(404, {"error": "no such path"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.blocked():
            return self.reply(200, {"late": True})
        if self.path == "/orders":
            with lock:
                posts[0] += 1
            return self.reply(201, {"ok": True})
        self.reply(404, {"error": "no such path"})


def main():
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    server.daemon_threads = True
    print("listening on %s" % os.environ["PORT"], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
