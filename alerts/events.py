"""Event handlers of the alerts app (autodiscovered by the event-queue consumers).

"alerts.changed" (published after the commit that opened, acknowledged or resolved
alerts, `alerts.services.alert_events_publish`) pushes those alerts, as the API shows
them, to the operators' feed (`ws/alerts`, `alerts.consumers`). The alerts are read
when the event is handled, so the feed shows their state at that moment (an alert
opened and already acknowledged arrives as `alert.opened` with status `acknowledged`).
Delivery is at least once: a repeated push carries the same `event_id`.
"""

from alerts.api.serializers import AlertSerializer
from alerts.feed import FEED_MESSAGE_TYPE, alerts_feed_group
from alerts.selectors import alert_list_by_ids
from alerts.services import ALERT_EVENT_TYPE
from iot.channel_layer import channel_group_send
from iot.event_queue import event_handler


@event_handler(ALERT_EVENT_TYPE)
def alerts_changed(payload: dict) -> None:
    """Push the changed alerts to the feed. A malformed payload raises (and ends as a dead letter)."""
    try:
        event, ids = str(payload["event"]), [str(alert_id) for alert_id in payload["alert_ids"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed {ALERT_EVENT_TYPE} payload: {exc!r}") from exc
    rows = list(alert_list_by_ids(alert_ids=ids))
    if not rows:
        return  # deleted with their device meanwhile
    # The device's group too, so a client can follow one group (`?group_id=`) without a lookup.
    alerts = [
        {**data, "group_id": row.device.group_id}
        for row, data in zip(rows, AlertSerializer(rows, many=True).data, strict=True)
    ]
    channel_group_send(
        group=alerts_feed_group(),
        message={"type": FEED_MESSAGE_TYPE, "event": event, "event_id": payload.get("event_id"), "alerts": alerts},
    )
