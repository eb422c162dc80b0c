"""Event handlers of the telemetry pipeline (autodiscovered by the event-queue consumers).

"telemetry.points" (published once per accepted request, after commit) does two things:

1. pushes the points to the device's live WebSocket group (Channels layer);
2. adds them to the fleet counters in Redis (total, per device, per second).

Delivery is at least once (a handler that raises, or whose process dies before
the ack, sees the event again). The push runs first and the counters last, in
one MULTI/EXEC, so a failed push is retried without double counting and the
counters are either fully applied or not at all; only a crash between the EXEC
and the queue's ack counts an event twice. A repeated push is harmless: each
message carries the event's `event_id`, and points are identified by
(device, metric, timestamp). Exactly-once counting would need a marker per
event kept for the whole redelivery window, i.e. Redis memory proportional to
throughput, which these approximate analytics counters do not warrant.
"""

import logging
from datetime import datetime

from iot.channel_layer import channel_group_send
from iot.event_queue import event_handler
from iot.redis import get_redis
from telemetry.redis_keys import (
    PER_SECOND_TTL_SECONDS,
    device_messages_key,
    live_group_name,
    messages_per_second_key,
    messages_total_key,
)
from telemetry.services import EVENT_TYPE

logger = logging.getLogger(__name__)

LIVE_MESSAGE_TYPE = "telemetry.points"  # dispatched to TelemetryLiveConsumer.telemetry_points


def live_push(*, device_id: str, message: dict) -> None:
    channel_group_send(group=live_group_name(device_id), message={"type": LIVE_MESSAGE_TYPE, **message})


def counters_add(*, device_id: str, points: int, received_second: int) -> None:
    pipe = get_redis().pipeline(transaction=True)
    pipe.incrby(messages_total_key(), points)
    pipe.hincrby(device_messages_key(), device_id, points)
    second_key = messages_per_second_key(received_second)
    pipe.incrby(second_key, points)
    pipe.expire(second_key, PER_SECOND_TTL_SECONDS)
    pipe.execute()


def _points(payload: dict) -> list[dict]:
    """The event's columns (see `services._event_payload`) as `[{"metric", "timestamp", "value"}, ...]`."""
    metrics, timestamps, values = payload["metrics"], payload["timestamps"], payload["values"]
    if not (isinstance(metrics, list) and isinstance(timestamps, list) and isinstance(values, list)):
        raise TypeError("metrics, timestamps and values must be lists")
    if not metrics or not len(metrics) == len(timestamps) == len(values):
        raise ValueError("metrics, timestamps and values must be non-empty and of equal length")
    return [
        {"metric": metric, "timestamp": ts, "value": value}
        for metric, ts, value in zip(metrics, timestamps, values, strict=True)
    ]


@event_handler(EVENT_TYPE)
def telemetry_points_received(payload: dict) -> None:
    """Live push, then fleet counters. A malformed payload raises (and ends as a dead letter)."""
    try:
        device_id = str(payload["device_id"])
        points = _points(payload)
        received_second = int(datetime.fromisoformat(payload["received_at"]).timestamp())
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed {EVENT_TYPE} payload: {exc!r}") from exc
    live_push(
        device_id=device_id,
        message={"event_id": payload.get("event_id"), "device_id": device_id, "points": points},
    )
    counters_add(device_id=device_id, points=len(points), received_second=received_second)
