"""A real HTTP webhook target for live tests and benches: answers, hangs, or is not there at all.

`WebhookTarget(mode)` listens on a free loopback port in a thread of the test process:
`"ok"` answers 200 and records each request's `Idempotency-Key` in `acknowledged`;
`"hang"` accepts the request and never answers (the caller's read timeout ends the call;
`hung` counts them, `in_flight` are those still held). `set_mode` switches at any time;
`close()` releases every held request. `refused_url()` is a URL on which nothing listens
(connection refused), the "service down" case.
"""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookTarget:
    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.hung = 0
        self.in_flight = 0
        self.acknowledged: list[str] = []
        self.bodies: list[dict] = []
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if target.mode == "hang":
                    with target.lock:
                        target.hung += 1
                        target.in_flight += 1
                    target.released.wait(120)  # never answers; the caller's read timeout ends the call
                    with target.lock:
                        target.in_flight -= 1
                    self.close_connection = True
                    return
                with target.lock:
                    target.acknowledged.append(self.headers.get("Idempotency-Key", ""))
                    target.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode != "hang":
            self.released.set()  # held requests end without an answer: never acknowledged

    def hits(self) -> int:
        with self.lock:
            return self.hung

    def held(self) -> int:
        with self.lock:
            return self.in_flight

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def refused_url() -> str:
    """A loopback URL where nothing listens: every connection is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"
