"""Reads of telemetry: points from Postgres, fleet counters from Redis."""

import time
import uuid
from collections.abc import Iterable
from datetime import datetime

from iot.redis import get_redis
from telemetry.models import TABLE, TelemetryPoint
from telemetry.redis_keys import device_messages_key, messages_per_second_key, messages_total_key


def telemetry_points_latest(*, device_id: uuid.UUID, metric: str) -> TelemetryPoint | None:
    """The newest point of a device's metric: one backward scan of `(device_id, metric, ts DESC)` per partition."""
    return TelemetryPoint.objects.filter(device_id=device_id, metric=metric).order_by("-ts").first()


# Without a metric, "newest points of a device" cannot be read from the
# (device_id, metric, ts DESC) index in ts order directly, and sorting all of a
# device's points would be O(its history). Instead: walk the device's distinct
# metrics with a recursive "skip scan" (one index probe per metric), take the
# newest `limit` of each from the index, and merge. Cost grows with the number
# of metrics a device has (a handful), not with how many points it sent.
_ALL_METRICS_SQL = f"""
WITH RECURSIVE metrics AS (
    (SELECT metric FROM {TABLE} WHERE device_id = %(device)s {{window}} ORDER BY metric LIMIT 1)
    UNION ALL
    SELECT (SELECT t.metric FROM {TABLE} AS t
            WHERE t.device_id = %(device)s AND t.metric > metrics.metric {{window_t}}
            ORDER BY t.metric LIMIT 1)
    FROM metrics WHERE metrics.metric IS NOT NULL
)
SELECT p.id, p.device_id, p.metric, p.ts, p.value, p.received_at
FROM metrics
CROSS JOIN LATERAL (
    SELECT * FROM {TABLE} AS t
    WHERE t.device_id = %(device)s AND t.metric = metrics.metric {{window_t}}
    ORDER BY t.ts DESC LIMIT %(limit)s
) AS p
WHERE metrics.metric IS NOT NULL
ORDER BY p.ts DESC
LIMIT %(limit)s
"""


def _window_sql(alias: str, start_time: datetime | None, end_time: datetime | None) -> str:
    column = f"{alias}ts"
    clauses = []
    if start_time is not None:
        clauses.append(f"AND {column} >= %(start)s")
    if end_time is not None:
        clauses.append(f"AND {column} <= %(end)s")
    return " ".join(clauses)


def telemetry_points_query(
    *,
    device_id: uuid.UUID,
    metric: str | None = None,
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    limit: int = 100,
) -> list[TelemetryPoint]:
    """A device's points, newest first, optionally of one metric and within [start_time, end_time].

    A time window also prunes partitions, so only the days asked for are read.
    """
    if metric is not None:
        points = TelemetryPoint.objects.filter(device_id=device_id, metric=metric)
        if start_time is not None:
            points = points.filter(ts__gte=start_time)
        if end_time is not None:
            points = points.filter(ts__lte=end_time)
        return list(points.order_by("-ts")[:limit])
    sql = _ALL_METRICS_SQL.format(
        window=_window_sql("", start_time, end_time), window_t=_window_sql("t.", start_time, end_time)
    )
    params = {"device": device_id, "limit": limit, "start": start_time, "end": end_time}
    return list(TelemetryPoint.objects.raw(sql, params))


# --- fleet counters (maintained by telemetry.events) ------------------------------


def telemetry_messages_total() -> int:
    """Points the platform has processed since the counters were created (all devices)."""
    value = get_redis().get(messages_total_key())
    return int(value) if value is not None else 0


def telemetry_messages_per_second(*, window_seconds: int = 10) -> float:
    """Average points per second received over the last `window_seconds` complete seconds (one MGET)."""
    now = int(time.time())
    keys = [messages_per_second_key(second) for second in range(now - window_seconds, now)]
    return sum(int(value) for value in get_redis().mget(keys) if value is not None) / window_seconds


def telemetry_device_message_counts(*, device_ids: Iterable[uuid.UUID | str]) -> dict[str, int]:
    """Points processed per device, for many devices in one round trip (HMGET)."""
    ids = [str(device_id) for device_id in device_ids]
    if not ids:
        return {}
    values = get_redis().hmget(device_messages_key(), ids)
    return {device_id: int(value) if value is not None else 0 for device_id, value in zip(ids, values, strict=True)}
