"""Reads of telemetry: points from Postgres; message counts from Postgres and Redis."""

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from django.db import connection

from devices.sql import device_group_member_ids_sql
from iot.redis import get_redis
from telemetry.models import TABLE, DeviceMessageCount, MessageCountWatermark, TelemetryPoint
from telemetry.redis_keys import (
    COUNT_WINDOW_SECONDS,
    COUNT_WINDOW_TTL_SECONDS,
    ERRORS_DAYS,
    count_window_key,
    count_window_start,
    errors_day_key,
    messages_per_second_key,
)


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


# --- message counts: exact up to the watermark (Postgres), the minutes since from Redis ---------

_COUNTS = DeviceMessageCount._meta.db_table
_WATERMARK = MessageCountWatermark._meta.db_table


@dataclass(frozen=True)
class MessageStats:
    """Points received and the sum of their latencies (received_at - timestamp, ms)."""

    messages: int
    latency_ms_sum: float

    @property
    def average_latency_ms(self) -> float | None:
        return self.latency_ms_sum / self.messages if self.messages else None


def _since_watermark(*, reconciled_until: datetime | None, fields: list[str]) -> list[list[float]]:
    """For each minute since the watermark (all the kept ones if there is none), the `fields` of its
    counters in Redis: ONE round trip (a pipeline), whatever the number of minutes or devices."""
    now = time.time()
    first = count_window_start(reconciled_until.timestamp() if reconciled_until else now - COUNT_WINDOW_TTL_SECONDS)
    pipe = get_redis().pipeline(transaction=False)
    for window in range(first, count_window_start(now) + COUNT_WINDOW_SECONDS, COUNT_WINDOW_SECONDS):
        pipe.hmget(count_window_key(window), fields)
    return [[float(value) if value is not None else 0.0 for value in row] for row in pipe.execute()]


def telemetry_fleet_message_stats() -> MessageStats:
    """All devices: one query (the watermark row), then one Redis round trip.

    The query comes first: a reconciliation that commits in between is then counted from
    Redis (its minutes are still after the watermark read), never twice and never lost.
    """
    row = MessageCountWatermark.objects.filter(pk=1).values_list("reconciled_until", "messages", "latency_ms_sum")
    reconciled_until, messages, latency = row.first() or (None, 0, 0.0)
    recent = _since_watermark(reconciled_until=reconciled_until, fields=["total", "latency_ms"])
    return MessageStats(
        messages=messages + int(sum(r[0] for r in recent)), latency_ms_sum=latency + sum(r[1] for r in recent)
    )


def telemetry_device_message_stats(*, device_id: uuid.UUID) -> MessageStats:
    """One device: one query (its row and the watermark together), then one Redis round trip."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT w.reconciled_until, COALESCE(c.messages, 0), COALESCE(c.latency_ms_sum, 0) "
            f"FROM (SELECT 1) AS one LEFT JOIN {_WATERMARK} AS w ON w.id = 1 "
            f"LEFT JOIN {_COUNTS} AS c ON c.device_id = %s",
            [device_id],
        )
        reconciled_until, messages, latency = cursor.fetchone()
    recent = _since_watermark(reconciled_until=reconciled_until, fields=[f"d:{device_id}", f"l:{device_id}"])
    return MessageStats(
        messages=messages + int(sum(r[0] for r in recent)), latency_ms_sum=latency + sum(r[1] for r in recent)
    )


def telemetry_group_message_count(*, group_id: str) -> int:
    """The devices now in the group: one query (their reconciled counts summed in SQL, with the
    watermark), then one Redis round trip. The minutes since the watermark count points by the
    group their device was in when they arrived; reconciled ones by the device's group now."""
    devices_sql, params = device_group_member_ids_sql(group_id=group_id)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT (SELECT reconciled_until FROM {_WATERMARK} WHERE id = 1), "
            f"(SELECT COALESCE(sum(c.messages), 0) FROM {_COUNTS} AS c WHERE c.device_id IN {devices_sql})",
            params,
        )
        reconciled_until, messages = cursor.fetchone()
    recent = _since_watermark(reconciled_until=reconciled_until, fields=[f"g:{group_id}"])
    return int(messages) + int(sum(r[0] for r in recent))


def telemetry_messages_per_second(*, window_seconds: int = 10) -> float:
    """Average points per second received over the last `window_seconds` complete seconds (one pipelined
    round trip: the seconds of two minutes are in two Redis Cluster slots, which one MGET can't span)."""
    now = int(time.time())
    pipe = get_redis().pipeline(transaction=False)
    for second in range(now - window_seconds, now):
        pipe.get(messages_per_second_key(second))
    return sum(int(value) for value in pipe.execute() if value is not None) / window_seconds


def telemetry_device_error_count(*, device_id: uuid.UUID) -> int:
    """Submissions of the device refused over the last `ERRORS_DAYS` days (points counted): one round trip."""
    today = int(time.time() // 86400)
    pipe = get_redis().pipeline(transaction=False)
    for day in range(today - ERRORS_DAYS + 1, today + 1):
        pipe.hget(errors_day_key(day), str(device_id))
    return sum(int(value) for value in pipe.execute() if value is not None)


def telemetry_messages_per_minute(*, minutes: int = 60) -> list[tuple[datetime, int]]:
    """Points received in each of the last `minutes` minutes, oldest first, the current (unfinished)
    minute last: (minute start, count). ONE pipelined round trip over the per-minute counters
    (`count_window_key`, field `total`, kept `COUNT_WINDOW_TTL_SECONDS`), whatever the fleet's size;
    a minute nobody sent anything in counts 0. For the fleet dashboard's ingestion chart."""
    minutes = max(1, min(minutes, COUNT_WINDOW_TTL_SECONDS // COUNT_WINDOW_SECONDS))
    current = count_window_start(time.time())
    starts = [current - COUNT_WINDOW_SECONDS * back for back in range(minutes - 1, -1, -1)]
    pipe = get_redis().pipeline(transaction=False)
    for start in starts:
        pipe.hget(count_window_key(start), "total")
    return [
        (datetime.fromtimestamp(start, tz=UTC), int(value) if value is not None else 0)
        for start, value in zip(starts, pipe.execute(), strict=True)
    ]
