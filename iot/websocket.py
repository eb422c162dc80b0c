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

`FeedConsumer` is the base of the server-push feeds (`ws/telemetry/{device_id}`,
`ws/alerts`): a one-way stream of a Channels group's messages. A refused connection
is accepted and then closed with an application code, so the client learns why (a
close before accepting would only show up as an HTTP 403 on the handshake): 4401 not
authenticated, 4403 not allowed, 4404 no such thing, 4400 a bad query.

A failing channel layer (Redis unreachable, a connection reset under the blocking
receive) ends the consumer's receive loop. The socket is then closed with 1013
("try again later", a temporary server condition) instead of being dropped without
a close frame (1006) or left open and deaf: the client reconnects with backoff,
joins the group again on a working connection, and reads what it missed from the
HTTP API (the feeds have no replay). The same code answers a connection whose group
join fails. Channels bounds what a slow client can hold (the layer's per-channel
capacity); beyond that, messages to it are dropped rather than buffered without limit.
"""

import logging
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.middleware import BaseMiddleware
from django.http import HttpRequest
from redis.exceptions import RedisError
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request
from rest_framework.settings import api_settings

logger = logging.getLogger(__name__)

CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_TRY_AGAIN_LATER = 1013

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


class FeedConsumer(AsyncJsonWebsocketConsumer):
    """A one-way feed of one Channels group. Subclasses say who may connect and to which group:
    `refusal()` returns a close code or None (it may read the route and the query and keep what
    it parsed), `feed_group()` the group to join; handlers of the group's message types send."""

    group: str | None = None
    accepted: bool = False

    async def refusal(self) -> int | None:
        raise NotImplementedError

    async def feed_group(self) -> str:
        raise NotImplementedError

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except RedisError:
            logger.warning(
                "feed %s: the channel layer failed; closing with %d so the client reconnects",
                self.scope.get("path"),
                CLOSE_TRY_AGAIN_LATER,
                exc_info=True,
            )
            await self._close_for_retry()

    async def _close_for_retry(self):
        try:
            if not self.accepted:
                # Closing before the accept would only show as an HTTP 403 on the handshake.
                await self.accept()
            await self.close(code=CLOSE_TRY_AGAIN_LATER, reason="feed unavailable, reconnect")
        except OSError:
            pass  # the client is gone already
        await self.disconnect(CLOSE_TRY_AGAIN_LATER)

    async def accept(self, subprotocol=None, headers=None):
        await super().accept(subprotocol, headers)
        self.accepted = True

    async def connect(self):
        refusal = await self.refusal()
        if refusal is not None:
            await self.accept()
            await self.close(code=refusal)
            return
        # Join before accepting, so nothing sent after the client sees the open is missed.
        # A failed join raises out of here and is answered with 1013 by __call__.
        self.group = await self.feed_group()
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        if self.group is None:
            return
        group, self.group = self.group, None
        try:
            await self.channel_layer.group_discard(group, self.channel_name)
        except RedisError:
            # Harmless if it fails: the membership lapses after the layer's group expiry, and what
            # is sent to this channel meanwhile expires unread.
            logger.warning("feed: could not leave %s", group, exc_info=True)

    async def receive_json(self, content, **kwargs):
        """The feeds are one-way; anything a client sends is ignored."""
