"""The smallest service meshctl can run: copy it to start your own.

What the mesh needs from an app, and nothing more:
* listen on 127.0.0.1:$PORT (the agent picks the port and hands it over);
* answer GET /healthz with 200 once ready, so that traffic is sent only then;
* stop cleanly on SIGTERM.
MESH_SERVICE, MESH_VERSION and MESH_REPLICA say which instance this is.
Run by hand: PORT=8000 python demo-services/hello.py
"""

import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTANCE = "%s@%s#%s" % (
    os.environ.get("MESH_SERVICE", "hello"),
    os.environ.get("MESH_VERSION", "v1"),
    os.environ.get("MESH_REPLICA", "0"),
)


class HelloHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every reply carries Content-Length
    disable_nagle_algorithm = True  # else a keep-alive client's delayed ACK stalls each reply

    def do_GET(self):
        body = b"ok" if self.path == "/healthz" else ("hello from %s\n" % INSTANCE).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        print("%s %s" % (INSTANCE, format % args), flush=True)


class HelloServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 2048  # gunicorn's and uvicorn's listen backlog, not socketserver's 5


def main():
    server = HelloServer(("127.0.0.1", int(os.environ.get("PORT", "8000"))), HelloHandler)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()  # 0.1 s: quick SIGTERM
    print("%s listening on http://127.0.0.1:%d" % (INSTANCE, server.server_port), flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
