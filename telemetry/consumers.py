"""The live feed: `ws/telemetry/{device_id}` streams a device's points as they are stored.

Authentication is done by `iot.websocket.WebSocketAuthMiddleware` (`scope["principal"]`).
Operators may watch any device, a device only itself. A refused connection is
accepted and then closed with an application code, so the client learns why
(a close before accepting would only show up as an HTTP 403 on the handshake):
4401 not authenticated, 4403 not allowed, 4404 no such device.

Each message is one accepted request's points:
`{"type": "telemetry.points", "event_id": ..., "device_id": ..., "points": [{"metric", "timestamp", "value"}, ...]}`.
Channels bounds what a slow client can hold (the layer's per-channel capacity);
beyond that, messages to it are dropped rather than buffered without limit.

A failing channel layer (Redis unreachable, a connection reset under the blocking
receive) ends the consumer's receive loop. The socket is then closed with 1013
("try again later", a temporary server condition) instead of being dropped without
a close frame (1006) or left open and deaf: the client reconnects with backoff,
joins the group again on a working connection, and reads what it missed from
`GET /telemetry/{device_id}` (the feed has no replay). The same code answers a
connection whose group join fails.
"""

import logging
import uuid

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from redis.exceptions import RedisError

from devices.selectors import device_get
from iot.api.permissions import is_device
from telemetry.redis_keys import live_group_name

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_TRY_AGAIN_LATER = 1013

logger = logging.getLogger(__name__)


@database_sync_to_async
def _device_exists(device_id: uuid.UUID) -> bool:
    return device_get(device_id=device_id) is not None


class TelemetryLiveConsumer(AsyncJsonWebsocketConsumer):
    group: str | None = None
    accepted: bool = False

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except RedisError:
            logger.warning(
                "live feed %s: the channel layer failed; closing with %d so the client reconnects",
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
            await self.close(code=CLOSE_TRY_AGAIN_LATER, reason="live feed unavailable, reconnect")
        except OSError:
            pass  # the client is gone already
        await self.disconnect(CLOSE_TRY_AGAIN_LATER)

    async def accept(self, subprotocol=None, headers=None):
        await super().accept(subprotocol, headers)
        self.accepted = True

    async def connect(self):
        refusal = await self._refusal()
        if refusal is not None:
            await self.accept()
            await self.close(code=refusal)
            return
        # Join before accepting, so no point stored after the client sees the open is missed.
        # A failed join raises out of here and is answered with 1013 by __call__.
        self.group = live_group_name(self.device_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def _refusal(self) -> int | None:
        principal = self.scope.get("principal")
        if principal is None:
            return CLOSE_UNAUTHENTICATED
        try:
            self.device_id = uuid.UUID(self.scope["url_route"]["kwargs"]["device_id"])
        except ValueError:
            return CLOSE_NOT_FOUND
        if is_device(principal):
            return None if principal.device_id == self.device_id else CLOSE_FORBIDDEN
        return None if await _device_exists(self.device_id) else CLOSE_NOT_FOUND

    async def disconnect(self, code):
        if self.group is None:
            return
        group, self.group = self.group, None
        try:
            await self.channel_layer.group_discard(group, self.channel_name)
        except RedisError:
            # Harmless if it fails: the membership lapses after the layer's group expiry, and what
            # is sent to this channel meanwhile expires unread.
            logger.warning("live feed: could not leave %s", group, exc_info=True)

    async def receive_json(self, content, **kwargs):
        """The feed is one-way; anything a client sends is ignored."""

    async def telemetry_points(self, event):
        """Group messages of type LIVE_MESSAGE_TYPE ("telemetry.points") land here; forwarded as they are."""
        await self.send_json(dict(event))
