"""Serve Django's HTTP side as WSGI inside the ASGI server, on a real thread pool.

Measured on this platform (2 cores, uvicorn + uvloop): Django's own ASGI
handler runs a sync DRF view through several sync/async thread hops and costs
~6 ms per trivial request, against ~2 ms for the same view through one hop into
the WSGI handler. asgiref's `WsgiToAsgi` does that single hop, but with
`thread_sensitive=True`, i.e. on ONE shared thread per process, so a request
waiting on Postgres (an idempotency key in flight, a lock) would stall every
other request of that process. This bridge runs each request on the event
loop's default executor instead (`WEB_THREADS` threads), buffers the response
so the thread hands it back in one step, and refuses bodies over
`MAX_REQUEST_BODY_BYTES` with 413 before buffering them.

Operations endpoints (`/health/live`, `/health/ready`, `/metrics`) run on a
pool of their own (`WEB_OPS_THREADS`): with Postgres down and more requests in
flight than request threads, liveness queued behind them took 9.7 s; on its own
threads it answers in milliseconds whatever the request pool is doing.

WebSockets stay on Channels (see `iot.asgi`); only `http` scopes come here.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from tempfile import SpooledTemporaryFile

from asgiref.sync import sync_to_async
from asgiref.wsgi import WsgiToAsgi, WsgiToAsgiInstance
from django.conf import settings

OPS_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})


class _PooledInstance(WsgiToAsgiInstance):
    max_body_bytes: int = 0
    executor: ThreadPoolExecutor | None = None

    async def __call__(self, scope, receive, send):
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reply(send, 413, b'{"detail": "Request body too large."}')
            return
        self.scope = scope
        self._send = send
        # Read the body ourselves so a chunked body (no Content-Length) is bounded too.
        with SpooledTemporaryFile(max_size=65536) as body:
            received = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away before sending its body
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.max_body_bytes:
                    await _reply(send, 413, b'{"detail": "Request body too large."}')
                    return
                body.write(chunk)
                if not message.get("more_body"):
                    break
            body.seek(0)
            await self.run_wsgi_app(body)

    async def run_wsgi_app(self, body):
        run = sync_to_async(self._run_buffered, thread_sensitive=False, executor=self.executor)
        status, headers, content = await run(body)
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": content})

    def _run_buffered(self, body) -> tuple[int, list, bytes]:
        """Run the WSGI app to completion on this pool thread and hand back the whole response.

        One hop back to the event loop per request instead of one per response
        message (the API sends small JSON bodies; nothing here streams), and the
        app's `close()` (Django's request_finished: the DB connection goes back
        to the pool) runs on the same thread as the request.
        """
        try:
            environ = self.build_environ(self.scope, body)
        except ValueError:  # too many duplicate headers
            return 400, [(b"content-type", b"application/json")], b'{"detail": "Too many duplicate headers."}'
        chunks: list[bytes] = []
        result = self.wsgi_application(environ, self.start_response)
        try:
            chunks.extend(chunk for chunk in result if chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        start = self.response_start
        return start["status"], start["headers"], b"".join(chunks)


async def _reply(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class PooledWsgiToAsgi(WsgiToAsgi):
    def __init__(self, wsgi_application, *, threads: int, ops_threads: int, max_body_bytes: int):
        super().__init__(wsgi_application)
        self.threads = threads
        self.max_body_bytes = max_body_bytes
        self.ops_executor = ThreadPoolExecutor(ops_threads, thread_name_prefix="http-ops")
        self._executor_loop = None

    async def __call__(self, scope, receive, send):
        loop = asyncio.get_running_loop()
        if self._executor_loop is not loop:
            loop.set_default_executor(ThreadPoolExecutor(self.threads, thread_name_prefix="http"))
            self._executor_loop = loop
        instance = _PooledInstance(self.wsgi_application, self.duplicate_header_limit)
        instance.max_body_bytes = self.max_body_bytes
        if scope.get("path") in OPS_PATHS:
            instance.executor = self.ops_executor
        await instance(scope, receive, send)


def pooled_http_application(wsgi_application):
    return PooledWsgiToAsgi(
        wsgi_application,
        threads=settings.WEB_THREADS,
        ops_threads=settings.WEB_OPS_THREADS,
        max_body_bytes=settings.MAX_REQUEST_BODY_BYTES,
    )
