"""Serve Django's HTTP side as WSGI inside the ASGI server, on a real thread pool.

Measured on this platform (2 cores, uvicorn + uvloop): Django's own ASGI
handler runs a sync DRF view through several sync/async thread hops and costs
~6 ms per trivial request, against ~2 ms for the same view through one hop into
the WSGI handler. asgiref's `WsgiToAsgi` does that single hop, but with
`thread_sensitive=True`, i.e. on ONE shared thread per process, so a request
waiting on Postgres (an idempotency key in flight, a lock) would stall every
other request of that process. This bridge runs each request on the event
loop's default executor instead (`WEB_THREADS` threads), and refuses bodies
over `MAX_REQUEST_BODY_BYTES` with 413 before buffering them.

WebSockets stay on Channels (see `iot.asgi`); only `http` scopes come here.
"""

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from asgiref.wsgi import WsgiToAsgi, WsgiToAsgiInstance

_run_in_thread = WsgiToAsgiInstance.__dict__["run_wsgi_app"].func


class _PooledInstance(WsgiToAsgiInstance):
    max_body_bytes: int = 0

    async def __call__(self, scope, receive, send):
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reply(send, 413, b'{"detail": "Request body too large."}')
            return
        await super().__call__(scope, receive, send)

    async def run_wsgi_app(self, body):
        await sync_to_async(_run_in_thread, thread_sensitive=False)(self, body)


async def _reply(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class PooledWsgiToAsgi(WsgiToAsgi):
    def __init__(self, wsgi_application, *, threads: int, max_body_bytes: int):
        super().__init__(wsgi_application)
        self.threads = threads
        self.max_body_bytes = max_body_bytes
        self._executor_loop = None

    async def __call__(self, scope, receive, send):
        loop = asyncio.get_running_loop()
        if self._executor_loop is not loop:
            loop.set_default_executor(ThreadPoolExecutor(self.threads, thread_name_prefix="http"))
            self._executor_loop = loop
        instance = _PooledInstance(self.wsgi_application, self.duplicate_header_limit)
        instance.max_body_bytes = self.max_body_bytes
        await instance(scope, receive, send)


def pooled_http_application(wsgi_application):
    return PooledWsgiToAsgi(
        wsgi_application,
        threads=int(os.environ.get("WEB_THREADS", "16")),
        max_body_bytes=int(os.environ.get("MAX_REQUEST_BODY_BYTES", str(4 * 1024 * 1024))),
    )
