"""Serve Django's HTTP side as WSGI inside the ASGI server, on real thread pools.

Why WSGI at all: Django's own ASGI handler runs a sync DRF view through several
sync/async thread hops and cost ~6 ms per trivial request here, against ~2 ms
for the same view through one hop into the WSGI handler.

Why this bridge and not a library. asgiref's `WsgiToAsgi` runs every request on
ONE shared thread per process (`thread_sensitive=True`), so a request waiting on
Postgres would stall every other one. `a2wsgi` (1.10.10) uses a real pool but
hands each response message back to the event loop separately, the thread
blocked until the loop has taken it (response start, each body chunk, the end,
and the request body when Django reads it): three or four thread/loop round
trips per request. This bridge buffers the body first, runs the app to
completion on a pool thread and sends the whole response from the loop: one hop.
Only a response whose body is an iterator (Django's `StreamingHttpResponse` and
`FileResponse`, a WSGI generator) is streamed instead: see "Streamed responses".
Measured with `bench/http_adapter.py` (wrk against uvicorn as `make web` runs it,
2 cores shared with other work, the adapters alternating, medians of 6 rounds;
cpu = the server processes' CPU time per request, the figure the machine's other
load moves least; ratios a2wsgi/bridge paired by round, median (min-max)):

    64 connections          bridge (cpu/request)  a2wsgi (cpu/request)  a2wsgi/bridge
    WEB_CONCURRENCY=2
    GET /health/live        5,335 req/s, 0.27 ms  3,128 req/s, 0.53 ms  req/s 0.52, cpu 1.98 (1.75-2.19)
    POST /telemetry/point     418 req/s, 2.30 ms    351 req/s, 3.05 ms  req/s 0.84, cpu 1.24 (1.17-1.45)
    WEB_CONCURRENCY=4
    GET /health/live        2,881 req/s, 0.39 ms  1,694 req/s, 0.72 ms  req/s 0.65, cpu 1.90 (1.53-2.17)
    POST /telemetry/point     379 req/s, 3.01 ms    307 req/s, 3.52 ms  req/s 0.76, cpu 1.25 (1.10-1.51)

With 4 connections: cpu 1.53 and 1.65 on the trivial view, 1.29 (1.14-1.39) and
1.04 (0.92-1.45) on the point; p50 of the trivial view 0.88 ms against 1.35 ms.
So ours stays: a2wsgi would cost 0.1-0.75 ms more CPU per request and 16-24 % of
saturated point throughput. It uses no asgiref internals (the bridge before
this one subclassed `WsgiToAsgiInstance`; in the same runs the two measured
alike, cpu ratios 0.83-1.30): the environ is built here from the ASGI scope by
PEP 3333.

Bodies over `MAX_REQUEST_BODY_BYTES` get 413 before they are buffered, chunked
ones (no Content-Length) included; paths matching `UPLOAD_PATH_PATTERNS` (the
firmware artifact upload) have `MAX_UPLOAD_BODY_BYTES` instead. A body is
buffered in a `SpooledTemporaryFile`: in memory up to 64 KiB (every JSON
request), on disk past that, so a 256 MiB upload costs disk, not RAM, and holds
no thread while it arrives (a thread is taken once the body is complete).
Operations endpoints (`/health/live`, `/health/ready`, `/metrics`) run on a
pool of their own (`WEB_OPS_THREADS`):
with Postgres down and more requests in flight than request threads, liveness
queued behind them took 9.7 s; on its own threads it answers in milliseconds
whatever the request pool is doing.

Streamed responses. A body held whole costs its size in RAM per concurrent
request, twice over while it is joined: a 50 MiB firmware download grew the
serving process's peak RSS by 101 MiB. So an iterator body goes from the pool
thread to the event loop a chunk at a time, the thread waiting until the server
has taken each (`run_coroutine_threadsafe(...).result()`; uvicorn's `send` waits
while the socket's write buffer is past its high-water mark): a download costs
a chunk plus that buffer whatever its size (the same download: +1.0 MiB, in a
third of the time). Files (Django hands `FileResponse` to `wsgi.file_wrapper`)
are read in `STREAM_BLOCK_BYTES` blocks, not Django's 4 KiB: one thread/loop
round trip per block, so 50 MiB cost 508 ms of CPU in 4 KiB blocks, 36 ms in
64 KiB, 9 ms in 256 KiB, 5 ms in 1 MiB (in-process, the client side free). A
client that goes away (`http.disconnect` from `receive`, watched while
streaming) stops the reading at the next chunk; the iterable's `close()`
(Django's request_finished: the DB connection goes back to the pool) runs on
the request's own thread in every case. The price: a download holds a request
thread, and its DB connection, until the client has read it all.

WebSockets stay on Channels (see `iot.asgi`); only `http` scopes come here.
"""

import asyncio
import contextvars
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from tempfile import SpooledTemporaryFile

from django.conf import settings

# With their one-trailing-slash forms, which iot/urls.py serves in place too.
OPS_PATHS = frozenset(path + suffix for path in ("/health/live", "/health/ready", "/metrics") for suffix in ("", "/"))
# One header name repeated this often is an attack or a broken client, never a real request.
MAX_DUPLICATE_HEADERS = 100
# Request bodies up to this size stay in memory; larger ones are spooled to a temporary file.
BODY_SPOOL_MEMORY_BYTES = 64 * 1024
# Blocks a streamed file is read in (wsgi.file_wrapper): one thread/loop round trip each.
STREAM_BLOCK_BYTES = 256 * 1024
_JSON = [(b"content-type", b"application/json")]
_TOO_LARGE = b'{"detail": "Request body too large."}'
_TOO_MANY_DUPLICATES = b'{"detail": "Too many duplicate headers."}'


class BadRequest(Exception):
    """The request cannot be expressed as a WSGI environ (answered 400)."""


class FileWrapper:
    """`wsgi.file_wrapper` (PEP 3333): a file streamed in `STREAM_BLOCK_BYTES` blocks.

    Django passes `FileResponse`'s file here with its 4 KiB block size; a block is a
    thread/loop round trip, so blocks are at least `STREAM_BLOCK_BYTES`. `close()` is
    the file's, which Django has pointed at the response's close (request_finished).
    """

    def __init__(self, filelike, block_size: int = STREAM_BLOCK_BYTES) -> None:
        self.filelike = filelike
        self.block_size = max(block_size, STREAM_BLOCK_BYTES)
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        read, size = self.filelike.read, self.block_size
        while block := read(size):
            yield block


def wsgi_environ(scope: dict, body, body_size: int = 0) -> dict:
    """The PEP 3333 environ for an ASGI `http` scope, `body` being the buffered request body
    (`body_size` bytes: the CONTENT_LENGTH of a chunked body, which has none of its own)."""
    root_path = scope.get("root_path", "")
    path = scope["path"]
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    server_name, server_port = scope.get("server") or ("localhost", 80)
    environ = {
        "REQUEST_METHOD": scope["method"],
        # WSGI strings carry bytes as latin-1; ASGI paths are decoded UTF-8 text.
        "SCRIPT_NAME": root_path.encode().decode("latin-1"),
        "PATH_INFO": path.encode().decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "SERVER_NAME": server_name,
        "SERVER_PORT": str(server_port or 0),  # None for a unix socket
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
    }
    if scope.get("client"):
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = scope["client"][0], str(scope["client"][1])
    headers: dict[str, list[str]] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        if name not in ("CONTENT_LENGTH", "CONTENT_TYPE"):
            name = f"HTTP_{name}"
        values = headers.setdefault(name, [])
        if len(values) >= MAX_DUPLICATE_HEADERS:
            raise BadRequest(name)
        values.append(raw_value.decode("latin-1"))
    environ.update((name, ",".join(values)) for name, values in headers.items())
    if body_size and "CONTENT_LENGTH" not in headers:
        environ["CONTENT_LENGTH"] = str(body_size)  # else Django reads a chunked body as empty
    return environ


class _Response:
    """start_response and the buffered body of one request (PEP 3333, run on the pool thread)."""

    def __init__(self) -> None:
        self.status = 500
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.started = False
        self.headers_sent = False  # only ever true for a streamed response

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info=None):
        # Until the headers are sent an error page may replace what was started; only a second
        # call without exc_info is a bug in the app, and one after they were sent re-raises.
        if exc_info is not None and self.headers_sent:
            raise exc_info[1].with_traceback(exc_info[2])
        if self.started and exc_info is None:
            raise RuntimeError("start_response called a second time without exc_info")
        self.started = True
        self.status = int(status.split(" ", 1)[0])
        self.headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        return self.chunks.append  # the legacy write() callable


class _StreamSender:
    """Hands a streamed response's messages from the pool thread to the event loop, one step at a time.

    `send` (on the pool thread) returns once the server has taken the messages, so the thread
    reads no further ahead than the client reads (backpressure), and returns False once the
    client is gone: a task started with the first step waits for `http.disconnect`.
    """

    __slots__ = ("loop", "receive", "asgi_send", "gone")

    def __init__(self, loop, receive, send) -> None:
        self.loop, self.receive, self.asgi_send = loop, receive, send
        self.gone: asyncio.Future | None = None

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def _send(self, messages: list[dict]) -> bool:
        if self.gone is None:
            self.gone = asyncio.ensure_future(self._watch())
        for message in messages:
            if self.gone.done():
                return False
            await self.asgi_send(message)
        return not self.gone.done()

    def send(self, *messages: dict) -> bool:
        return asyncio.run_coroutine_threadsafe(self._send(list(messages)), self.loop).result()

    def stop(self) -> None:
        if self.gone is not None:
            self.gone.cancel()


def _body_message(body: bytes, more_body: bool) -> dict:
    return {"type": "http.response.body", "body": body, "more_body": more_body}


def _written(response: _Response) -> bytes:
    """What the app passed to the legacy write() callable since last asked (PEP 3333; Django never calls it)."""
    written = b"".join(response.chunks)
    response.chunks.clear()
    return written


def _stream(response: _Response, result, sender: _StreamSender, *, head: bool) -> None:
    """Send an iterator body chunk by chunk; stops at the first step the client is gone for."""
    chunks = iter(result)
    # PEP 3333: the headers go with the first non-empty chunk (a generator may call start_response late;
    # a HEAD reads nothing unless it has to).
    first = next((chunk for chunk in chunks if chunk), b"") if not head or not response.started else b""
    first = _written(response) + first if response.chunks else first
    response.headers_sent = True
    more = bool(first) and not head
    start = {"type": "http.response.start", "status": response.status, "headers": response.headers}
    if not sender.send(start, _body_message(b"" if head else first, more)) or not more:
        return
    for chunk in chunks:
        if response.chunks:
            chunk = _written(response) + chunk
        if chunk and not sender.send(_body_message(chunk, True)):
            return
    sender.send(_body_message(_written(response), False))


def _run(app, scope: dict, body, body_size: int, sender: _StreamSender) -> tuple[int, list, bytes] | None:
    """Run the WSGI app on this pool thread; hand back the whole response, or None once it streamed it.

    A plain response (a list of chunks, Django's non-streaming `HttpResponse`) is one hop back
    to the event loop; an iterator body is streamed from here through `sender`. Either way the
    app's `close()` (Django's request_finished: the DB connection goes back to the pool) runs on
    the same thread as the request, also when the client went away mid-stream.
    """
    try:
        environ = wsgi_environ(scope, body, body_size)
    except BadRequest:
        return 400, _JSON, _TOO_MANY_DUPLICATES
    response = _Response()
    result = app(environ, response.start_response)
    try:
        if isinstance(result, (list, tuple)) or getattr(result, "streaming", None) is False:
            response.chunks.extend(chunk for chunk in result if chunk)
        else:
            _stream(response, result, sender, head=scope["method"] == "HEAD")
            return None
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return response.status, response.headers, b"".join(response.chunks)


async def _reply(send, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class PooledWsgiBridge:
    """ASGI `http` application running a WSGI app on `threads` threads (`ops_threads` for OPS_PATHS).

    Request bodies are limited to `max_body_bytes`, those to paths fully matching one of
    `upload_path_patterns` (regular expressions) to `max_upload_body_bytes`.
    """

    def __init__(
        self,
        wsgi_application,
        *,
        threads: int,
        ops_threads: int,
        max_body_bytes: int,
        max_upload_body_bytes: int = 0,
        upload_path_patterns: list[str] | tuple[str, ...] = (),
    ):
        self.app = wsgi_application
        self.max_body_bytes = max_body_bytes
        self.max_upload_body_bytes = max_upload_body_bytes
        self.upload_path = (
            re.compile("|".join(f"(?:{pattern})" for pattern in upload_path_patterns)).fullmatch
            if upload_path_patterns
            else None
        )
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="http")
        self.ops_executor = ThreadPoolExecutor(ops_threads, thread_name_prefix="http-ops")

    async def __call__(self, scope, receive, send):
        limit = self.max_body_bytes
        if self.upload_path is not None and self.upload_path(scope["path"]):
            limit = self.max_upload_body_bytes
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reply(send, 413, _JSON, _TOO_LARGE)
            return
        with SpooledTemporaryFile(max_size=BODY_SPOOL_MEMORY_BYTES) as body:
            # Read the body here so a chunked body (no Content-Length) is bounded too.
            received = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away before sending its body
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    await _reply(send, 413, _JSON, _TOO_LARGE)
                    return
                body.write(chunk)
                if not message.get("more_body"):
                    break
            body.seek(0)
            executor = self.ops_executor if scope["path"] in OPS_PATHS else self.executor
            loop = asyncio.get_running_loop()
            sender = _StreamSender(loop, receive, send)
            # A copy of this request's context, as any ASGI-to-sync hop gives the code it runs.
            run = contextvars.copy_context().run
            try:
                reply = await loop.run_in_executor(executor, run, _run, self.app, scope, body, received, sender)
            finally:
                sender.stop()
        if reply is not None:
            await _reply(send, *reply)


def pooled_http_application(wsgi_application):
    return PooledWsgiBridge(
        wsgi_application,
        threads=settings.WEB_THREADS,
        ops_threads=settings.WEB_OPS_THREADS,
        max_body_bytes=settings.MAX_REQUEST_BODY_BYTES,
        max_upload_body_bytes=settings.MAX_UPLOAD_BODY_BYTES,
        upload_path_patterns=settings.UPLOAD_PATH_PATTERNS,
    )
