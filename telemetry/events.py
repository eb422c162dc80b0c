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

The handler takes all the "telemetry.points" events of one read at once
(`iot.event_queue.event_batch_handler`, up to `run_event_consumers --batch`, 100): the pushes go
out together (one hop to the Channels layer's loop, the sends concurrent), the counters of every
event pushed go in one MULTI/EXEC per minute (one round trip; a read rarely spans two minutes),
and the consumer acknowledges all of them in one script call. Issue 12 measured one event at a
time at about four Redis round trips per event (`bench/ingest_round_trips.py --consumer`).
An event whose push failed, or whose payload is malformed, fails alone (it stays pending and is
retried, or ends as a dead letter); a failed counters write fails every event it held (their
pushes are repeated on the retry, harmlessly).
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from iot.channel_layer import channel_group_send, channel_group_send_many
from iot.event_queue import event_batch_handler
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


@dataclass(frozen=True)
class Received:
    """One event's points as the counters need them."""

    device_id: str
    group_id: str | None
    received_at: datetime
    latencies_ms: list[float]


def counters_add(*, device_id: str, group_id: str | None, received_at: datetime, latencies_ms: list[float]) -> None:
    """The event's points into its minute's counters and its second's, in one MULTI/EXEC."""
    counters_add_many(
        received=[Received(device_id=device_id, group_id=group_id, received_at=received_at, latencies_ms=latencies_ms)]
    )


def counters_add_many(*, received: Sequence[Received]) -> None:
    """Many events' points into their minutes' and seconds' counters: one MULTI/EXEC per minute
    (a minute's keys share one Redis Cluster slot), all in one round trip when they fall in one
    minute, as a read of the queue nearly always does. Sums per device and group first, so a
    batch of n events of one device is one HINCRBY per field, not n."""
    minutes: dict[int, dict] = {}
    for event in received:
        epoch = event.received_at.timestamp()
        window = minutes.setdefault(
            count_window_start(epoch), {"total": 0, "latency": 0.0, "d": {}, "l": {}, "g": {}, "seconds": {}}
        )
        points = len(event.latencies_ms)
        latency = float(sum(event.latencies_ms))
        window["total"] += points
        window["latency"] += latency
        window["d"][event.device_id] = window["d"].get(event.device_id, 0) + points
        window["l"][event.device_id] = window["l"].get(event.device_id, 0.0) + latency
        if event.group_id is not None:
            window["g"][event.group_id] = window["g"].get(event.group_id, 0) + points
        second = int(epoch)
        window["seconds"][second] = window["seconds"].get(second, 0) + points
    for start, window in minutes.items():
        pipe = get_redis().pipeline(transaction=True)
        window_key = count_window_key(start)
        pipe.hincrby(window_key, "total", window["total"])
        pipe.hincrbyfloat(window_key, "latency_ms", window["latency"])
        for device_id, points in window["d"].items():
            pipe.hincrby(window_key, f"d:{device_id}", points)
            pipe.hincrbyfloat(window_key, f"l:{device_id}", window["l"][device_id])
        for group_id, points in window["g"].items():
            pipe.hincrby(window_key, f"g:{group_id}", points)
        pipe.expire(window_key, COUNT_WINDOW_TTL_SECONDS)
        for second, points in window["seconds"].items():
            second_key = messages_per_second_key(second)
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


def _parse(payload: dict) -> tuple[Received, dict]:
    """The event's counters and its live message; ValueError for a malformed payload."""
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
    received = Received(
        device_id=device_id,
        group_id=None if group_id is None else str(group_id),
        received_at=received_at,
        latencies_ms=latencies_ms,
    )
    message = {"type": LIVE_MESSAGE_TYPE, "event_id": payload.get("event_id"), "device_id": device_id, "points": points}
    return received, message


@event_batch_handler(EVENT_TYPE)
def telemetry_points_received_many(payloads: list[dict]) -> list[BaseException | None]:
    """Live pushes, then fleet counters, for the events of one read; per event None or why it failed."""
    outcomes: list[BaseException | None] = [None] * len(payloads)
    parsed: list[tuple[int, Received, dict]] = []
    for index, payload in enumerate(payloads):
        try:
            parsed.append((index, *_parse(payload)))
        except ValueError as exc:
            outcomes[index] = exc
    pushed = channel_group_send_many(
        sends=[(live_group_name(received.device_id), message) for _, received, message in parsed]
    )
    counted = [
        (index, received) for (index, received, _), failure in zip(parsed, pushed, strict=True) if failure is None
    ]
    for (index, _, _), failure in zip(parsed, pushed, strict=True):
        if failure is not None:
            outcomes[index] = failure
    try:
        counters_add_many(received=[received for _, received in counted])
    except Exception as exc:  # noqa: BLE001 - every event it held fails (and is retried), whatever the cause
        for index, _ in counted:
            outcomes[index] = exc
    return outcomes


def telemetry_points_received(payload: dict) -> None:
    """One event: live push, then fleet counters. A malformed payload raises ValueError."""
    (outcome,) = telemetry_points_received_many([payload])
    if outcome is not None:
        raise outcome
