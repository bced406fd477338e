"""A TCP app for tests: to each connection it sends its MESH_INSTANCE and a newline, then closes."""

import os
import socket

with socket.create_server(("127.0.0.1", int(os.environ["PORT"]))) as server:
    print("listening on", os.environ["PORT"], flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            conn.sendall(os.environ.get("MESH_INSTANCE", "?").encode() + b"\n")
