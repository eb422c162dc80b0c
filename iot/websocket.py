"""WebSocket authentication (Channels): the HTTP API's own login, run on the handshake.

Clients authenticate as they do over HTTP: `Authorization: Token <key>` /
`Device <token>`, or `?token=<key>` (an operator token) for browsers, whose
WebSocket API cannot set headers. The handshake's headers go through the
authentication classes in `REST_FRAMEWORK["DEFAULT_AUTHENTICATION_CLASSES"]`,
inside a DRF `Request` as for an HTTP call, so a credential means the same on
both paths (a revoked token, an inactive user or a decommissioned device is
refused alike) and the shared package needs to know no app's credentials.
`scope["principal"]` is the authenticated operator user or device principal, or
None; the consumer decides what that principal may watch.

There is no session here: a browser sends its cookies with a cross-site
handshake too (no CORS check applies to WebSockets), so honouring the session
would let any page a logged-in operator visits open the feed in their name.
`SessionAuthentication` finds no user on the request built below.

The routes themselves are wired in `iot.asgi`, the composition root: this
module imports no domain app (an import-linter contract in pyproject.toml).
"""

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from django.http import HttpRequest
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request
from rest_framework.settings import api_settings

# HTTP header values are bytes; WSGI/ASGI and DRF read them as Latin-1 (PEP 3333).
_HEADER_ENCODING = "latin-1"


def handshake_request(scope: dict) -> Request:
    """A DRF request carrying the handshake's headers, `?token=` as `Authorization: Token`."""
    http_request = HttpRequest()
    http_request.method = "GET"
    http_request.path = scope.get("path", "")
    for name, value in scope.get("headers", []):
        key = "HTTP_" + name.decode(_HEADER_ENCODING).upper().replace("-", "_")
        value = value.decode(_HEADER_ENCODING)
        http_request.META[key] = f"{http_request.META[key]},{value}" if key in http_request.META else value
    if "HTTP_AUTHORIZATION" not in http_request.META:
        token = parse_qs(scope.get("query_string", b"").decode(_HEADER_ENCODING)).get("token")
        if token:
            http_request.META["HTTP_AUTHORIZATION"] = f"Token {token[0]}"
    return Request(http_request, authenticators=[auth() for auth in api_settings.DEFAULT_AUTHENTICATION_CLASSES])


@database_sync_to_async
def _authenticate(scope: dict):
    try:
        user = handshake_request(scope).user
    except AuthenticationFailed:
        return None
    # With DRF's default UNAUTHENTICATED_USER an anonymous user, not None, comes back.
    return user if user is not None and user.is_authenticated else None


class WebSocketAuthMiddleware(BaseMiddleware):
    """Sets `scope["principal"]` from the handshake's credential (None when absent or refused)."""

    async def __call__(self, scope, receive, send):
        scope = dict(scope, principal=await _authenticate(scope))
        return await super().__call__(scope, receive, send)
