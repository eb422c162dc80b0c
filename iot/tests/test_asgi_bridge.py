"""The HTTP bridge (`iot.asgi_bridge`) driven directly through ASGI: pools, 413, 400, the environ, streaming.

The live suite covers it behind the real server (iot/tests/test_ops_live.py,
firmware/tests/test_artifact_transfer_live.py); these pin what is easier to see from inside:
which pool runs what, what the WSGI app is given, how much memory a streamed body costs, and
that a client gone mid-download stops the reading and gets the iterable closed.
"""

import asyncio
import hashlib
import threading
import tracemalloc
from unittest import mock

import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished
from django.http import FileResponse, HttpResponse
from django.test import override_settings
from django.urls import path, reverse

from iot.asgi_bridge import STREAM_BLOCK_BYTES, FileWrapper, pooled_http_application, wsgi_environ


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


async def _call(bridge, scope: dict, body_messages=None, *, send=None, gone: asyncio.Event | None = None) -> list:
    """One request through `bridge`; returns the ASGI messages it sent (to `send` if given).

    After the body, `receive` waits as a server's does: until the client is `gone` (never, if not given).
    """
    messages = list(body_messages or [{"type": "http.request", "body": b""}])
    gone = gone or asyncio.Event()
    sent: list[dict] = []

    async def receive():
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def record(message):
        sent.append(message)

    await bridge(scope, receive, send or record)
    return sent


def _bridge(app, *, threads: int = 2, ops_threads: int = 1, max_body_bytes: int = 1000, **upload):
    with override_settings(
        WEB_THREADS=threads, WEB_OPS_THREADS=ops_threads, MAX_REQUEST_BODY_BYTES=max_body_bytes, **upload
    ):
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


def test_a_chunked_body_is_given_its_length():
    """Django reads CONTENT_LENGTH bytes of the body: without it a chunked upload would arrive empty."""
    app = RecordingApp()
    chunks = [{"type": "http.request", "body": b"x" * 400, "more_body": True}, {"type": "http.request", "body": b"y"}]
    asyncio.run(_call(_bridge(app), _scope(method="POST"), chunks))
    assert app.calls[0][0]["CONTENT_LENGTH"] == "401" and app.calls[0][2] == b"x" * 400 + b"y"
    asyncio.run(_call(_bridge(app), _scope()))
    assert "CONTENT_LENGTH" not in app.calls[1][0]  # no body, no length


# --- Upload paths ---------------------------------------------------------------------------------

UPLOAD = "/firmware/versions/2.0.1/artifact"


def _upload_bridge(app):
    return _bridge(
        app,
        max_body_bytes=1000,
        MAX_UPLOAD_BODY_BYTES=5000,
        UPLOAD_PATH_PATTERNS=[r"/firmware/versions/[^/]+/artifact/?"],
    )


@pytest.mark.parametrize(
    ("path", "size", "status"),
    [
        (UPLOAD, 3000, 200),
        (UPLOAD + "/", 5000, 200),
        (UPLOAD, 5001, 413),
        ("/devices", 3000, 413),
        (UPLOAD + "/extra", 3000, 413),  # the whole path must match
        ("/x" + UPLOAD, 3000, 413),
    ],
)
def test_upload_paths_have_a_limit_of_their_own_declared_or_chunked(path, size, status):
    app = RecordingApp()
    bridge = _upload_bridge(app)
    declared = asyncio.run(
        _call(
            bridge,
            _scope(path, method="PUT", headers=[(b"content-length", str(size).encode())]),
            [{"type": "http.request", "body": b"x" * size}],
        )
    )
    half = size // 2
    chunked = asyncio.run(
        _call(
            bridge,
            _scope(path, method="PUT"),
            [
                {"type": "http.request", "body": b"x" * half, "more_body": True},
                {"type": "http.request", "body": b"x" * (size - half)},
            ],
        )
    )
    assert (declared[0]["status"], chunked[0]["status"]) == (status, status)
    assert [len(body) for _, _, body in app.calls] == ([size, size] if status == 200 else [])


def test_the_default_upload_pattern_is_the_artifact_route_and_its_limit_follows_the_artifact_limit(settings):
    assert settings.MAX_UPLOAD_BODY_BYTES == settings.FIRMWARE_ARTIFACT_MAX_BYTES + 64 * 1024
    bridge = pooled_http_application(RecordingApp())
    route = reverse("firmware-artifact", kwargs={"version": "2.0.1-rc.1+build5"})
    assert bridge.upload_path(route) and bridge.upload_path(route + "/")
    assert not bridge.upload_path("/firmware/versions/2.0.1") and not bridge.upload_path("/telemetry/batch")
    assert bridge.max_upload_body_bytes == settings.MAX_UPLOAD_BODY_BYTES
    assert bridge.max_body_bytes == settings.MAX_REQUEST_BODY_BYTES == 4 * 1024 * 1024


def test_a_20_mb_upload_is_spooled_not_held_in_memory():
    block = b"u" * 65536
    digest = hashlib.sha256()

    def app(environ, start_response):
        while data := environ["wsgi.input"].read(65536):
            digest.update(data)
        start_response("201 Created", [])
        return [b"{}"]

    bridge = _bridge(app, MAX_UPLOAD_BODY_BYTES=21 * 1024 * 1024, UPLOAD_PATH_PATTERNS=[UPLOAD])
    messages = [{"type": "http.request", "body": block, "more_body": True}] * 320 + [{"type": "http.request"}]
    tracemalloc.start()
    try:
        sent = asyncio.run(_call(bridge, _scope(UPLOAD, method="PUT"), messages))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sent[0]["status"] == 201
    assert digest.hexdigest() == hashlib.sha256(block * 320).hexdigest()
    print(f"20 MiB upload: peak traced memory {peak / 1024:.0f} KiB")
    assert peak < 2 * 1024 * 1024, f"peak {peak} bytes for a 20 MiB body"


# --- Streamed responses ---------------------------------------------------------------------------

opened_files = []  # the file each download view opened, to see how far the server read it


def download_view(request):
    opened_files.append(open(request.GET["path"], "rb"))  # noqa: SIM115 - FileResponse closes it
    return FileResponse(opened_files[-1], as_attachment=True, filename="image.bin")


def plain_view(request):
    return HttpResponse(b"plain", content_type="text/plain")


urlpatterns = [path("download", download_view), path("plain", plain_view)]


def _download_scope(file, method="GET"):
    return _scope("/download", method=method, query_string=f"path={file}".encode())


@override_settings(ROOT_URLCONF=__name__)
def test_a_50_mb_file_response_streams_in_blocks_with_backpressure_and_a_few_blocks_of_memory(tmp_path):
    """Django's FileResponse through the real WSGIHandler: received whole, read no further ahead than
    sent, in STREAM_BLOCK_BYTES blocks; peak traced memory a few blocks (held whole, 100+ MB)."""
    size = 50 * 1024 * 1024
    image = tmp_path / "image.bin"
    with open(image, "wb") as out:
        for n in range(size // (1024 * 1024)):
            out.write(hashlib.sha256(str(n).encode()).digest() * 32768)
    expected = hashlib.sha256(image.read_bytes()).hexdigest()
    small = tmp_path / "small.bin"
    small.write_bytes(b"warm-up")
    django = WSGIHandler()
    bridge = _bridge(django)
    finished_on = []

    def on_finished(**kwargs):
        finished_on.append(threading.current_thread().name)

    request_finished.connect(on_finished)
    digest, lengths, read_ahead, ends = hashlib.sha256(), [], [], []

    async def send(message):
        if message["type"] == "http.response.start":
            ends.append(message["status"])
            return
        body = message.get("body", b"")
        digest.update(body)
        lengths.append(len(body))
        if body:  # the server read exactly what it sent so far: it never ran ahead of the client
            read_ahead.append(opened_files[-1].tell() - sum(lengths))
        await asyncio.sleep(0)
        if not message.get("more_body"):
            ends.append("end")

    try:
        plain = asyncio.run(_call(bridge, _scope("/plain")))  # warm-up, and plain responses stay one step
        assert [m.get("more_body", False) for m in plain] == [False, False] and plain[1]["body"] == b"plain"
        asyncio.run(_call(bridge, _download_scope(small)))
        finished_on.clear()
        tracemalloc.start()
        try:
            asyncio.run(_call(bridge, _download_scope(image), send=send))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        request_finished.disconnect(on_finished)
    assert ends == [200, "end"]
    assert digest.hexdigest() == expected and sum(lengths) == size
    assert max(lengths) == STREAM_BLOCK_BYTES and len(lengths) == size // STREAM_BLOCK_BYTES + 1  # + the end
    assert set(read_ahead) == {0}
    assert opened_files[-1].closed and len(finished_on) == 1 and finished_on[0].startswith("http_")
    print(f"50 MiB streamed: peak traced memory {peak / 1024:.0f} KiB")
    assert peak < 4 * STREAM_BLOCK_BYTES + 512 * 1024, f"peak {peak} bytes for a 50 MiB download"


@override_settings(ROOT_URLCONF=__name__)
def test_a_head_request_for_a_file_reads_nothing_and_closes_it(tmp_path):
    image = tmp_path / "image.bin"
    image.write_bytes(b"z" * 100_000)
    read_from = []
    blocks = FileWrapper.__iter__

    def recording_blocks(wrapper):
        for block in blocks(wrapper):
            read_from.append(len(block))
            yield block

    with mock.patch.object(FileWrapper, "__iter__", recording_blocks):
        sent = asyncio.run(_call(_bridge(WSGIHandler()), _download_scope(image, method="HEAD")))
    assert sent[0]["status"] == 200 and (b"content-length", b"100000") in sent[0]["headers"]
    assert sent[1:] == [{"type": "http.response.body", "body": b"", "more_body": False}]
    assert opened_files[-1].closed and not read_from


class EndlessBody:
    """A streamed body that never ends: counts what was produced, records where close() ran."""

    def __init__(self, block: int = 65536) -> None:
        self.block = b"e" * block
        self.produced = 0
        self.closed_on: str | None = None

    def __iter__(self):
        while True:
            self.produced += len(self.block)
            yield self.block

    def close(self):
        self.closed_on = threading.current_thread().name


def test_a_client_gone_mid_download_stops_the_reading_closes_the_iterable_and_frees_the_thread():
    """The client stops reading after 1 MB (the server's send waits), then hangs up."""
    body = EndlessBody()
    app_threads = []

    def app(environ, start_response):
        app_threads.append(threading.current_thread().name)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return body if environ["PATH_INFO"] == "/download" else [b"{}"]

    async def scenario():
        gone = asyncio.Event()
        received = 0

        async def send(message):
            nonlocal received
            received += len(message.get("body", b""))
            if received >= 1024 * 1024 and not gone.is_set():
                asyncio.get_running_loop().call_later(0.05, gone.set)  # hangs up while the send waits
                await gone.wait()

        bridge = _bridge(app, threads=1)  # one request thread: the next request needs it back
        await asyncio.wait_for(_call(bridge, _scope("/download"), send=send, gone=gone), timeout=10)
        return received, await asyncio.wait_for(_call(bridge, _scope("/devices")), timeout=10)

    received, after = asyncio.run(scenario())
    assert body.closed_on == app_threads[0] and body.closed_on.startswith("http_")
    assert 1024 * 1024 <= received == body.produced <= 1024 * 1024 + 65536  # stopped at the next chunk
    assert after[0]["status"] == 200


def test_a_generator_app_streams_with_the_status_it_started_late_and_writes_in_order():
    """PEP 3333: start_response may come with the first chunk, and the headers wait for a non-empty one."""
    closed = []

    class Body:
        def __init__(self, start_response):
            self.start_response = start_response

        def __iter__(self):
            write = self.start_response("201 Created", [("Content-Type", "text/plain")])
            yield b""
            write(b"w")
            yield b"a"
            yield b"b"

        def close(self):
            closed.append(True)

    sent = asyncio.run(_call(_bridge(lambda environ, start_response: Body(start_response)), _scope()))
    assert sent[0]["status"] == 201 and sent[0]["headers"] == [(b"content-type", b"text/plain")]
    assert [(m["body"], m["more_body"]) for m in sent[1:]] == [(b"wa", True), (b"b", True), (b"", False)]
    assert closed == [True]


def test_an_error_mid_stream_ends_the_response_abnormally_and_still_closes():
    """Past the headers no error page can replace the response: the exception reaches the server,
    which drops the connection (the client sees a short body)."""
    closed = []

    class Body:
        def __iter__(self):
            yield b"first"
            raise OSError("storage went away")

        def close(self):
            closed.append(True)

    def app(environ, start_response):
        start_response("200 OK", [])
        return Body()

    with pytest.raises(OSError, match="storage went away"):
        asyncio.run(_call(_bridge(app), _scope()))
    assert closed == [True]
