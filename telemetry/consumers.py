"""The live feed: `ws/telemetry/{device_id}` streams a device's points as they are stored.

Authentication, refusal codes and the behaviour when the channel layer fails are the
feeds' common ones (`iot.websocket.FeedConsumer`). Operators may watch any device, a
device only itself: 4401 not authenticated, 4403 not allowed, 4404 no such device.

Each message is one accepted request's points:
`{"type": "telemetry.points", "event_id": ..., "device_id": ..., "points": [{"metric", "timestamp", "value"}, ...]}`.
After a 1013 close the client reconnects and reads what it missed from
`GET /telemetry/{device_id}` (the feed has no replay).
"""

import uuid

from channels.db import database_sync_to_async

from devices.selectors import device_get
from iot.api.permissions import is_device
from iot.websocket import CLOSE_FORBIDDEN, CLOSE_NOT_FOUND, CLOSE_UNAUTHENTICATED, FeedConsumer
from telemetry.redis_keys import live_group_name


@database_sync_to_async
def _device_exists(device_id: uuid.UUID) -> bool:
    return device_get(device_id=device_id) is not None


class TelemetryLiveConsumer(FeedConsumer):
    device_id: uuid.UUID

    async def refusal(self) -> int | None:
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

    async def feed_group(self) -> str:
        return live_group_name(self.device_id)

    async def telemetry_points(self, event):
        """Group messages of type LIVE_MESSAGE_TYPE ("telemetry.points") land here; forwarded as they are."""
        await self.send_json(dict(event))
