"""The ASGI applications bench/http_adapter.py compares; uvicorn imports them as `_http_apps:<name>`.

* `bridge`: the platform's own entry point (`iot.asgi`, HTTP through `iot.asgi_bridge`);
* `a2wsgi`: the same Django WSGI app behind a2wsgi's `WSGIMiddleware` (pip install a2wsgi==1.10.10),
  with what the platform needs in front of it: 413 for oversized bodies (chunked too) and the
  operations endpoints on an executor of their own;
* `hello`: no Django at all, what uvicorn itself (and wrk, on the same cores) can do.
"""

from django.conf import settings
from django.contrib.staticfiles.handlers import StaticFilesHandler

from iot.asgi import application as bridge  # noqa: F401 - served by name
from iot.asgi import django_wsgi_app
from iot.asgi_bridge import OPS_PATHS

TOO_LARGE = b'{"detail": "Request body too large."}'


async def _reply(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class A2wsgiFront:
    def __init__(self, wsgi_application, *, threads: int, ops_threads: int, max_body_bytes: int):
        from a2wsgi import WSGIMiddleware

        self.requests = WSGIMiddleware(wsgi_application, workers=threads)
        self.ops = WSGIMiddleware(wsgi_application, workers=ops_threads)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reply(send, 413, TOO_LARGE)
            return
        # Buffered first, so that a chunked body is bounded before a thread is taken.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await _reply(send, 413, TOO_LARGE)
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        app = self.ops if scope["path"] in OPS_PATHS else self.requests
        await app(scope, replay, send)


def __getattr__(name: str):
    """`a2wsgi` is built only when asked for: the other applications don't need the package."""
    if name == "a2wsgi":
        return A2wsgiFront(
            StaticFilesHandler(django_wsgi_app),
            threads=settings.WEB_THREADS,
            ops_threads=settings.WEB_OPS_THREADS,
            max_body_bytes=settings.MAX_REQUEST_BODY_BYTES,
        )
    raise AttributeError(name)


_HELLO = b'{"status": "ok"}'


async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(_HELLO)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": _HELLO})
