"""Event handlers of the telemetry pipeline (autodiscovered by the event-queue consumers).

"telemetry.points" (published once per accepted request, after commit) does two things:

1. pushes the points to the device's live WebSocket group (Channels layer);
2. adds them to the counters of the minute they were received in (total, per device,
   per group, latency sums) and of their second, in Redis.

Delivery is at least once (a handler that raises, or whose process dies before
the ack, sees the event again). The push runs first and the counters last, in
one MULTI/EXEC, so a failed push is retried without double counting and the
counters are either fully applied or not at all; a crash between the EXEC and
the queue's ack counts an event twice, and an event lost between the commit and
the publish is never counted here. Neither lasts: these minute counters are only
read for the minutes after the reconciliation's watermark, and
`telemetry.services.telemetry_message_counts_reconcile` replaces every closed
minute by the exact count from Postgres (`DeviceMessageCount`). A repeated push is
harmless: each message carries the event's `event_id`.
"""

import logging
from datetime import datetime

from iot.channel_layer import channel_group_send
from iot.event_queue import event_handler
from iot.redis import get_redis
from telemetry.redis_keys import (
    COUNT_WINDOW_TTL_SECONDS,
    PER_SECOND_TTL_SECONDS,
    count_window_key,
    count_window_start,
    live_group_name,
    messages_per_second_key,
)
from telemetry.services import EVENT_TYPE

logger = logging.getLogger(__name__)

LIVE_MESSAGE_TYPE = "telemetry.points"  # dispatched to TelemetryLiveConsumer.telemetry_points


def live_push(*, device_id: str, message: dict) -> None:
    channel_group_send(group=live_group_name(device_id), message={"type": LIVE_MESSAGE_TYPE, **message})


def counters_add(*, device_id: str, group_id: str | None, received_at: datetime, latencies_ms: list[float]) -> None:
    """The event's points into its minute's counters and its second's, in one MULTI/EXEC."""
    points = len(latencies_ms)
    latency = float(sum(latencies_ms))
    pipe = get_redis().pipeline(transaction=True)
    window_key = count_window_key(count_window_start(received_at.timestamp()))
    pipe.hincrby(window_key, "total", points)
    pipe.hincrbyfloat(window_key, "latency_ms", latency)
    pipe.hincrby(window_key, f"d:{device_id}", points)
    pipe.hincrbyfloat(window_key, f"l:{device_id}", latency)
    if group_id is not None:
        pipe.hincrby(window_key, f"g:{group_id}", points)
    pipe.expire(window_key, COUNT_WINDOW_TTL_SECONDS)
    second_key = messages_per_second_key(int(received_at.timestamp()))
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
        group_id = payload.get("group_id")
        points = _points(payload)
        received_at = datetime.fromisoformat(payload["received_at"])
        latencies_ms = [
            (received_at - datetime.fromisoformat(point["timestamp"])).total_seconds() * 1000 for point in points
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed {EVENT_TYPE} payload: {exc!r}") from exc
    live_push(
        device_id=device_id,
        message={"event_id": payload.get("event_id"), "device_id": device_id, "points": points},
    )
    counters_add(
        device_id=device_id,
        group_id=None if group_id is None else str(group_id),
        received_at=received_at,
        latencies_ms=latencies_ms,
    )
