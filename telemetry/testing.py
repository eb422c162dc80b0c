"""The telemetry app's part of the test kit (the shared part is `iot/testing/`, which imports no domain app)."""

import uuid
from collections.abc import Iterable
from datetime import datetime

from django.db import connection

from telemetry.models import TABLE, TelemetryPoint


def stored_points(django_db_blocker, device_id: str | uuid.UUID) -> int:
    """Points of the device in Postgres (what a `202` promised), read from a live test."""
    with django_db_blocker.unblock():
        return TelemetryPoint.objects.filter(device_id=device_id).count()


def points_insert(*, device_id: uuid.UUID, metric: str, points: Iterable[tuple[datetime, float]]) -> int:
    """Store points as they are, in one INSERT, past ingestion's checks (rate limit, time window): for
    tests and benches of the reads, e.g. a week of history. Returns how many."""
    rows = list(points)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {TABLE} (device_id, metric, ts, value) "
            "SELECT %s, %s, ts, value FROM unnest(%s::timestamptz[], %s::float8[]) AS p (ts, value)",
            [device_id, metric, [ts for ts, _ in rows], [value for _, value in rows]],
        )
    return len(rows)
