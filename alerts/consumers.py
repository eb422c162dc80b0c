"""The operators' alert feed: `ws/alerts` streams alerts as they open, are acknowledged and resolved.

Authentication, refusal codes and the behaviour when the channel layer fails are the
feeds' common ones (`iot.websocket.FeedConsumer`). Operators only: 4401 not authenticated,
4403 a device credential, 4400 a bad filter. Optional filters in the query string:
`?severity=critical&device_id=<uuid>&group_id=<g>` (repeat `severity` for several).
After a 1013 close the client reconnects and re-reads `GET /alerts?status=open` (no replay).

Each message: `{"type": "alerts.event", "event": "alert.opened" | "alert.acknowledged" |
"alert.resolved", "event_id": ..., "alerts": [<alert as GET /alerts/{id} shows it, plus the
device's "group_id">, ...]}`, pushed by `alerts.events` after the commit that changed them.
"""

import uuid
from urllib.parse import parse_qs

from alerts.feed import alerts_feed_group
from alerts.models import AlertSeverity
from iot.api.permissions import is_device
from iot.websocket import CLOSE_BAD_REQUEST, CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED, FeedConsumer


class AlertsFeedConsumer(FeedConsumer):
    severities: set[str] | None = None
    device_filter: str | None = None
    group_filter: str | None = None

    async def refusal(self) -> int | None:
        principal = self.scope.get("principal")
        if principal is None:
            return CLOSE_UNAUTHENTICATED
        if is_device(principal):
            return CLOSE_FORBIDDEN
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        if "severity" in query:
            if not set(query["severity"]) <= set(AlertSeverity.values):
                return CLOSE_BAD_REQUEST
            self.severities = set(query["severity"])
        if "device_id" in query:
            try:
                self.device_filter = str(uuid.UUID(query["device_id"][0]))
            except ValueError:
                return CLOSE_BAD_REQUEST
        if "group_id" in query:
            self.group_filter = query["group_id"][0]
        return None

    async def feed_group(self) -> str:
        return alerts_feed_group()

    async def alerts_event(self, event):
        """Group messages of type FEED_MESSAGE_TYPE land here; forwarded with the alerts this client asked for."""
        alerts = [alert for alert in event["alerts"] if self._wanted(alert)]
        if alerts:
            await self.send_json({**event, "alerts": alerts})

    def _wanted(self, alert: dict) -> bool:
        if self.severities is not None and alert["severity"] not in self.severities:
            return False
        if self.device_filter is not None and alert["device_id"] != self.device_filter:
            return False
        return self.group_filter is None or alert.get("group_id") == self.group_filter
