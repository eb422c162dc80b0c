"""The HTTP bridge (`iot.asgi_bridge`) driven directly through ASGI: pools, 413, 400, the environ.

The live suite covers it behind the real server (iot/tests/test_ops_live.py); these pin what
is easier to see from inside: which pool runs what, and what the WSGI app is given.
"""

import asyncio
import threading

import pytest
from django.test import override_settings

from iot.asgi_bridge import pooled_http_application, wsgi_environ


def _scope(path: str = "/devices", *, method: str = "GET", headers=(), **extra) -> dict:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": list(headers),
        "server": ("testserver", 8000),
        "client": ("10.1.2.3", 50000),
        **extra,
    }


async def _call(bridge, scope: dict, body_messages=None) -> list[dict]:
    """One request through `bridge`; returns the ASGI messages it sent."""
    messages = list(body_messages or [{"type": "http.request", "body": b""}])
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await bridge(scope, receive, send)
    return sent


def _bridge(app, *, threads: int = 2, ops_threads: int = 1, max_body_bytes: int = 1000):
    with override_settings(WEB_THREADS=threads, WEB_OPS_THREADS=ops_threads, MAX_REQUEST_BODY_BYTES=max_body_bytes):
        return pooled_http_application(app)


class RecordingApp:
    """A WSGI app that answers 200 and remembers the environ, the thread and the body it got."""

    def __init__(self, headers=(("Content-Type", "application/json"),)):
        self.calls: list[tuple[dict, str, bytes]] = []
        self.headers = list(headers)

    def __call__(self, environ, start_response):
        self.calls.append((environ, threading.current_thread().name, environ["wsgi.input"].read()))
        start_response("200 OK", self.headers)
        return [b'{"ok": ', b"true}"]


def test_a_request_is_answered_in_one_piece_from_the_request_pool():
    app = RecordingApp()
    sent = asyncio.run(_call(_bridge(app), _scope()))
    assert sent == [
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]},
        {"type": "http.response.body", "body": b'{"ok": true}'},
    ]
    assert app.calls[0][1].startswith("http_")


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/metrics", "/health/live/", "/metrics/"])
def test_ops_endpoints_answer_while_every_request_thread_is_busy(path):
    """Liveness must not queue behind request threads stuck on, e.g., a dead database."""
    release = threading.Event()
    ops_threads = []

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/devices":
            release.wait(30)  # the only request thread, held
        else:
            ops_threads.append(threading.current_thread().name)
        start_response("200 OK", [])
        return [b"{}"]

    async def scenario():
        bridge = _bridge(app, threads=1, ops_threads=1)
        stuck = asyncio.ensure_future(_call(bridge, _scope("/devices")))
        try:
            ops = await asyncio.wait_for(_call(bridge, _scope(path)), timeout=10)
        finally:
            release.set()
        return ops, await stuck

    ops, stuck = asyncio.run(scenario())
    assert ops[0]["status"] == 200 and stuck[0]["status"] == 200
    assert ops_threads[0].startswith("http-ops_")


def test_a_declared_oversized_body_is_413_and_never_reaches_the_app():
    app = RecordingApp()
    sent = asyncio.run(_call(_bridge(app), _scope(method="POST", headers=[(b"content-length", b"1001")])))
    assert sent[0]["status"] == 413 and b"too large" in sent[1]["body"]
    assert app.calls == []


def test_a_chunked_body_is_counted_413_past_the_limit_and_taken_whole_below_it():
    app = RecordingApp()
    bridge = _bridge(app, max_body_bytes=1000)
    chunks = [{"type": "http.request", "body": b"x" * 400, "more_body": True} for _ in range(3)]
    sent = asyncio.run(_call(bridge, _scope(method="POST"), chunks))
    assert sent[0]["status"] == 413
    assert app.calls == []

    chunks = [{"type": "http.request", "body": b"x" * 400, "more_body": True}, {"type": "http.request", "body": b"y"}]
    sent = asyncio.run(_call(bridge, _scope(method="POST"), chunks))
    assert sent[0]["status"] == 200
    assert app.calls[0][2] == b"x" * 400 + b"y"


def test_a_client_gone_before_its_body_gets_nothing_and_runs_nothing():
    app = RecordingApp()
    sent = asyncio.run(_call(_bridge(app), _scope(method="POST"), [{"type": "http.disconnect"}]))
    assert sent == [] and app.calls == []


def test_too_many_duplicate_headers_is_400():
    app = RecordingApp()
    sent = asyncio.run(_call(_bridge(app), _scope(headers=[(b"x-a", b"1")] * 101)))
    assert sent[0]["status"] == 400 and b"duplicate headers" in sent[1]["body"]
    assert app.calls == []


def test_a_latin_1_response_header_is_sent_as_latin_1():
    """PEP 3333 header values are latin-1 strings (Django keeps e.g. a filename with "é" as is);
    the asgiref-based bridge encoded them as ASCII and the request died with a 500."""
    app = RecordingApp(headers=[("Content-Disposition", 'attachment; filename="café.csv"')])
    sent = asyncio.run(_call(_bridge(app), _scope()))
    assert sent[0]["status"] == 200
    assert sent[0]["headers"] == [(b"content-disposition", b'attachment; filename="caf\xe9.csv"')]


def test_the_environ_follows_pep_3333():
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
        (b"accept", b"a/b"),
        (b"accept", b"c/d"),
        (b"x-note", "café".encode("latin-1")),
    ]
    scope = _scope("/api/devices/é", method="POST", headers=headers, root_path="/api", query_string=b"limit=5&x=%C3%A9")
    environ = wsgi_environ(scope, body="BODY")
    assert {k: v for k, v in environ.items() if not k.startswith("wsgi.")} == {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "/api",
        "PATH_INFO": "/devices/é".encode().decode("latin-1"),
        "QUERY_STRING": "limit=5&x=%C3%A9",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "8000",
        "REMOTE_ADDR": "10.1.2.3",
        "REMOTE_PORT": "50000",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "2",
        "HTTP_ACCEPT": "a/b,c/d",
        "HTTP_X_NOTE": "café",
    }
    assert environ["wsgi.input"] == "BODY"
    assert (environ["wsgi.url_scheme"], environ["wsgi.multithread"], environ["wsgi.run_once"]) == ("http", True, False)


def test_a_unix_socket_server_has_port_0():
    environ = wsgi_environ(_scope(server=("/run/iot.sock", None)), body=None)
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("/run/iot.sock", "0")
