"""Continuous background traffic for zero-failure tests: counts every request and failure."""

from __future__ import annotations

import http.client
import threading


class ContinuousLoad:
    """GETs `path` on 127.0.0.1:`port` in a loop until stopped.

    A fresh connection every `reconnect_every` requests (1 = always) makes new handshakes
    and new pooled connections part of what is tested, not only long-lived ones.
    """

    def __init__(self, port: int, path: str = "/", reconnect_every: int = 20) -> None:
        self.port = port
        self.path = path
        self.reconnect_every = reconnect_every
        self.sent = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            if conn is None or self.sent % self.reconnect_every == 0:
                if conn is not None:
                    conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
                if not ok:
                    self.errors.append(f"status {resp.status} {resp.getheader('x-mesh-error')}")
            except (OSError, http.client.HTTPException) as exc:
                ok = False
                self.errors.append(repr(exc))
                conn.close()
                conn = None
            self.sent += 1
            self.failed += 0 if ok else 1
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)
