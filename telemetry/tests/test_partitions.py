"""Partition maintenance against the real (test) database. Each test runs in a transaction that
is rolled back, so the DDL it performs (create, attach, drop) leaves nothing behind."""

import uuid
from datetime import UTC, date, datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from telemetry.models import DEFAULT_PARTITION, TABLE
from telemetry.partitions import (
    partition_name,
    telemetry_partition_window,
    telemetry_partitions_drop_expired,
    telemetry_partitions_ensure,
    telemetry_partitions_list,
    telemetry_partitions_maintain,
)
from telemetry.tasks import telemetry_partitions_maintenance

pytestmark = pytest.mark.django_db

RETENTION_DAYS = settings.TELEMETRY_RETENTION_SECONDS // 86400


def insert_point(ts: datetime) -> str:
    """Insert one row directly and return the partition it landed in."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {TABLE} (device_id, metric, ts, value) VALUES (gen_random_uuid(), 'm', %s, 1) "
            "RETURNING tableoid::regclass::text",
            [ts],
        )
        return cursor.fetchone()[0]


def rows_in(table: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table}")
        return cursor.fetchone()[0]


def test_migrate_created_the_whole_window():
    """post_migrate ensured a partition for every day from the oldest retained one to the days ahead."""
    window = telemetry_partition_window()
    days = telemetry_partitions_list()
    expected = {window.first + timedelta(days=n) for n in range((window.last - window.first).days + 1)}
    assert expected <= set(days)
    assert (window.last - window.first).days == RETENTION_DAYS + settings.TELEMETRY_PARTITION_PREMAKE_DAYS
    assert telemetry_partitions_ensure() == []  # idempotent


def test_points_land_in_their_day_partition():
    now = timezone.now()
    assert insert_point(now) == partition_name(now.date())
    yesterday = now - timedelta(days=1)
    assert insert_point(yesterday) == partition_name(yesterday.date())


def test_ensure_moves_points_out_of_the_default_partition():
    """A point for a day without a partition is kept in DEFAULT, and moved when its day gets one."""
    later = timezone.now() + timedelta(days=settings.TELEMETRY_PARTITION_PREMAKE_DAYS + 3)
    assert insert_point(later) == DEFAULT_PARTITION
    before_default = rows_in(DEFAULT_PARTITION)

    created = telemetry_partitions_ensure(now=later)
    assert partition_name(later.date()) in created
    assert rows_in(DEFAULT_PARTITION) == before_default - 1
    assert rows_in(partition_name(later.date())) == 1
    assert insert_point(later) == partition_name(later.date())


def test_a_partition_made_later_enforces_uniqueness_over_the_points_moved_into_it():
    """Migration 0003's unique index reaches the partitions that maintenance attaches afterwards (the
    ATTACH builds theirs, over the points moved in from DEFAULT): a point stored again is skipped there."""
    later = timezone.now() + timedelta(days=settings.TELEMETRY_PARTITION_PREMAKE_DAYS + 3)
    device = uuid.uuid4()

    def store() -> str | None:
        """Where the point went (None: skipped, stored already), as ingestion inserts it."""
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {TABLE} (device_id, metric, ts, value) VALUES (%s, 'm', %s, 1) "
                "ON CONFLICT (device_id, metric, ts) DO NOTHING RETURNING tableoid::regclass::text",
                [device, later],
            )
            row = cursor.fetchone()
        return row and row[0]

    assert store() == DEFAULT_PARTITION
    assert store() is None
    assert partition_name(later.date()) in telemetry_partitions_ensure(now=later)
    assert store() is None
    plain = f"INSERT INTO {TABLE} (device_id, metric, ts, value) VALUES (%s, 'm', %s, 2)"
    with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(plain, [device, later])
    assert rows_in(partition_name(later.date())) == 1


def test_drop_expired_removes_whole_days_past_retention_only():
    before = telemetry_partitions_list()
    future = timezone.now() + timedelta(days=5)
    cutoff = future - timedelta(seconds=settings.TELEMETRY_RETENTION_SECONDS)

    dropped = telemetry_partitions_drop_expired(now=future)

    def upper_bound(day: date) -> datetime:
        return datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=UTC)

    expected = sorted(name for day, name in before.items() if upper_bound(day) <= cutoff)
    assert len(expected) >= 4  # five days' worth, give or take the time of day
    assert sorted(dropped) == expected
    remaining = telemetry_partitions_list()
    assert all(upper_bound(day) > cutoff for day in remaining)
    assert cutoff.date() in remaining  # the day the cutoff falls in still holds retained points


def test_drop_expired_purges_old_rows_from_default():
    # A row older than any partition (as if written before the partitions existed) sits in DEFAULT.
    ancient = datetime(2000, 1, 1, tzinfo=UTC)
    assert insert_point(ancient) == DEFAULT_PARTITION
    telemetry_partitions_drop_expired()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {DEFAULT_PARTITION} WHERE ts = %s", [ancient])
        assert cursor.fetchone()[0] == 0


def test_maintenance_task_runs_both_halves(settings):
    settings.TELEMETRY_PARTITION_PREMAKE_DAYS = 10
    result = telemetry_partitions_maintenance.apply().get()
    today = timezone.now().date()
    expected = {partition_name(today + timedelta(days=n)) for n in (8, 9, 10)}
    assert expected <= set(result["created"])
    assert telemetry_partitions_maintain().created == []


def test_partition_days_are_utc_days():
    assert partition_name(date(2024, 1, 31)) == "telemetry_point_p20240131"
    evening_in_new_york = datetime(2024, 1, 31, 23, 30, tzinfo=dt_timezone(timedelta(hours=-5)))  # 04:30 UTC on Feb 1
    window = telemetry_partition_window(now=evening_in_new_york)
    assert window.last == date(2024, 2, 1) + timedelta(days=settings.TELEMETRY_PARTITION_PREMAKE_DAYS)


# --- Ingestion racing partition maintenance ---------------------------------------------------


def _ingest_while_a_partition_is_attached(caller_transaction: bool):
    """Force the race: the day's partition is created and attached in a transaction that holds
    the DEFAULT partition's lock while an insert for that day waits on it, then commits."""
    import threading

    import psycopg

    from devices.testing import device_create
    from iot.testing.processes import psycopg_conninfo, wait_until
    from telemetry.partitions import _create_partition
    from telemetry.services import PointColumns, telemetry_points_ingest

    device = device_create(serial_prefix="PART").device
    day = (timezone.now() - timedelta(days=10)).date()
    ts = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {partition_name(day)}")  # the day has no partition now

    maintenance = psycopg.connect(**psycopg_conninfo(connection.settings_dict))
    maintenance.execute(f"LOCK TABLE {DEFAULT_PARTITION} IN ACCESS EXCLUSIVE MODE")  # what _create_partition takes
    outcome = {}

    def ingest():
        from django.db import connection as thread_connection
        from django.db import transaction

        try:
            batch = PointColumns(device_id=device.pk, metrics=["m"], timestamps=[ts], values=[1.0])
            if caller_transaction:
                with transaction.atomic():
                    telemetry_points_ingest(batch=batch)
            else:
                telemetry_points_ingest(batch=batch)
            outcome["result"] = "stored"
        except Exception as exc:
            outcome["result"] = exc
        finally:
            thread_connection.close()

    worker = threading.Thread(target=ingest)
    worker.start()
    try:
        wait_until(
            lambda: maintenance.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "WHERE c.relname = %s AND NOT l.granted",
                [DEFAULT_PARTITION],
            ).fetchone()[0],
            timeout=10,
            message="the insert waiting on the DEFAULT partition",
        )
        # Finish what _create_partition does, on the connection that holds the lock, and commit.
        name = partition_name(day)
        low, high = f"'{day.isoformat()} 00:00:00+00'", f"'{(day + timedelta(days=1)).isoformat()} 00:00:00+00'"
        maintenance.execute(f"CREATE TABLE {name} (LIKE {TABLE} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        maintenance.execute(f"ALTER TABLE {TABLE} ATTACH PARTITION {name} FOR VALUES FROM ({low}) TO ({high})")
        maintenance.commit()
    finally:
        maintenance.close()
        worker.join(30)
    assert _create_partition  # the steps above mirror it
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {partition_name(day)} WHERE device_id = %s", [device.pk])
        stored = cursor.fetchone()[0]
    return outcome["result"], stored


@pytest.mark.django_db(transaction=True)
def test_an_insert_that_meets_an_attach_is_retried_and_stored():
    result, stored = _ingest_while_a_partition_is_attached(caller_transaction=False)
    assert result == "stored", result
    assert stored == 1


@pytest.mark.django_db(transaction=True)
def test_inside_a_callers_transaction_the_race_is_a_retry_later_not_an_error():
    from telemetry.services import TelemetryRetryLater

    result, stored = _ingest_while_a_partition_is_attached(caller_transaction=True)
    assert isinstance(result, TelemetryRetryLater), result
    assert stored == 0
