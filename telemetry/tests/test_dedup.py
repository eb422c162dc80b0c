"""A point is identified by (device, metric, timestamp): storing it again is a no-op.

In process against the test database and Redis: the ingest service (what is stored, what the
hooks, the event and the counters see), two transactions inserting the same point at once, and
migration 0003 on a table that already holds duplicates. Over HTTP: `test_ingest_live.py`.
"""

import threading
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from devices.models import Device
from devices.testing import device_create
from iot import event_queue
from iot.redis import get_redis
from iot.testing.processes import wait_until
from telemetry import services
from telemetry.metrics import POINTS
from telemetry.models import DEFAULT_PARTITION, TABLE, TelemetryPoint
from telemetry.partitions import partition_name

pytestmark = pytest.mark.django_db

START = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)


@pytest.fixture
def device() -> Device:
    return device_create(serial_prefix="SN-DEDUP").device


def at(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


def columns(device_id, points: list[tuple[str, datetime, float]]) -> services.PointColumns:
    return services.PointColumns(
        device_id=device_id,
        metrics=[p[0] for p in points],
        timestamps=[p[1] for p in points],
        values=[p[2] for p in points],
    )


def stored(device_id) -> list[tuple[str, datetime, float]]:
    return sorted(TelemetryPoint.objects.filter(device_id=device_id).values_list("metric", "ts", "value"))


def counted(outcome: str) -> float:
    return POINTS.labels(outcome=outcome)._value.get()


@pytest.fixture
def evaluated(monkeypatch):
    """Every call of the stored-points hooks, as (metrics, values, timestamps); alerts' hook stays registered."""
    calls = []

    def spy(*, device_id, group_id, metrics, values, timestamps):
        calls.append((list(metrics), list(values), list(timestamps)))

    monkeypatch.setattr(
        services, "_points_stored_hooks", [*services._points_stored_hooks, services._PointsStoredHook(spy, {})]
    )
    monkeypatch.setattr(services, "_store_sql", [])  # the statement is rebuilt with the hooks above
    return calls


def events() -> list[dict]:
    """The "telemetry.points" events in the (test's own) stream, as the consumers get them."""
    entries = get_redis().xrange(event_queue._stream_key())
    return [orjson.loads(fields[b"p"]) | {"weight": int(fields[b"w"])} for _, fields in entries]


def ingest(batch: services.PointColumns, capture) -> services.IngestResult:
    """Ingest and run what is due after the commit (the test's transaction never commits)."""
    with capture(execute=True):
        return services.telemetry_points_ingest(batch=batch)


def test_the_same_point_twice_is_stored_once_evaluated_once_published_once(
    device, evaluated, redis_namespace, django_capture_on_commit_callbacks
):
    batch = columns(device.pk, [("t", at(1), 1.0)])
    accepted, duplicate = counted("accepted"), counted("duplicate")
    first = ingest(batch, django_capture_on_commit_callbacks)
    again = ingest(columns(device.pk, [("t", at(1), 2.0)]), django_capture_on_commit_callbacks)
    assert (first.count, first.stored, first.duplicates) == (1, 1, 0)
    assert (again.count, again.stored, again.duplicates) == (1, 0, 1)
    assert stored(device.pk) == [("t", at(1), 1.0)]  # the first value stays
    assert evaluated == [(["t"], [1.0], [at(1)])]
    [event] = events()
    assert event["weight"] == 1 and event["values"] == [1.0]
    assert (counted("accepted"), counted("duplicate")) == (accepted + 1, duplicate + 1)
    # Admission runs before the insert can tell: the retry took its point from the rate limit (documented).
    assert again.rate_limit.remaining == first.rate_limit.remaining - 1
    # The duplicate's reserved room was given back, not left to expire.
    assert event_queue.event_queue_reserved() == 0 and event_queue.event_queue_depth() == 1


def test_a_batch_with_duplicates_inside_stores_each_point_once(
    device, evaluated, redis_namespace, django_capture_on_commit_callbacks
):
    batch = columns(
        device.pk,
        [("t", at(1), 1.0), ("t", at(1), 9.0), ("h", at(1), 3.0), ("t", at(2), 4.0), ("h", at(1), 3.0)],
    )
    result = ingest(batch, django_capture_on_commit_callbacks)
    assert (result.count, result.stored, result.duplicates) == (5, 3, 2)
    assert stored(device.pk) == [("h", at(1), 3.0), ("t", at(1), 1.0), ("t", at(2), 4.0)]
    # The hooks and the event get the stored points, in the batch's order, with the values stored.
    assert evaluated == [(["t", "h", "t"], [1.0, 3.0, 4.0], [at(1), at(1), at(2)])]
    [event] = events()
    assert event["weight"] == 3 and event["metrics"] == ["t", "h", "t"] and event["values"] == [1.0, 3.0, 4.0]
    assert [datetime.fromisoformat(ts) for ts in event["timestamps"]] == [at(1), at(1), at(2)]


def test_a_batch_retried_after_its_answer_was_lost_stores_nothing_twice(
    device, evaluated, redis_namespace, settings, django_capture_on_commit_callbacks
):
    """The client never saw the first 202 and sends the batch again, then one overlapping it."""
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 1000  # a retry counts as a request: 120 points in all
    first = [("t", at(i), float(i)) for i in range(50)]
    ingest(columns(device.pk, first), django_capture_on_commit_callbacks)
    retry = ingest(columns(device.pk, first), django_capture_on_commit_callbacks)
    assert (retry.count, retry.stored, retry.duplicates) == (50, 0, 50)
    overlapping = first[40:] + [("t", at(i), float(i)) for i in range(50, 60)]
    partial = ingest(columns(device.pk, overlapping), django_capture_on_commit_callbacks)
    assert (partial.stored, partial.duplicates) == (10, 10)
    assert stored(device.pk) == sorted(("t", at(i), float(i)) for i in range(60))
    assert [len(call[0]) for call in evaluated] == [50, 10]  # the retry evaluated nothing
    assert evaluated[1][1] == [float(i) for i in range(50, 60)]
    assert [event["weight"] for event in events()] == [50, 10]
    assert event_queue.event_queue_reserved() == 0 and event_queue.event_queue_depth() == 60


def test_a_batch_of_duplicates_still_marks_the_device_seen(
    device, redis_namespace, monkeypatch, django_capture_on_commit_callbacks
):
    """The device did send: `last_seen` moves on even when nothing new is stored, and its cache is told
    after the commit although no event is published (the tombstone then goes alone)."""
    import devices.services
    from devices.cache import device_cache_key

    batch = columns(device.pk, [("t", at(1), 1.0)])
    ingest(batch, django_capture_on_commit_callbacks)
    Device.objects.filter(pk=device.pk).update(last_seen=timezone.now() - timedelta(minutes=5), status="inactive")
    # Without the in-transaction tombstone, only the after-commit one can write the entry.
    monkeypatch.setattr(devices.services, "device_cache_invalidate_now", lambda **kwargs: None)
    assert ingest(batch, django_capture_on_commit_callbacks).stored == 0
    device.refresh_from_db()
    assert device.status == "active" and device.last_seen > timezone.now() - timedelta(minutes=1)
    assert int(get_redis().hget(device_cache_key(device.pk), "v")) == device.version
    assert [event["weight"] for event in events()] == [1]
    assert event_queue.event_queue_reserved() == 0


def test_an_unknown_device_is_still_refused_not_taken_for_duplicates(redis_namespace):
    with pytest.raises(services.TelemetryUnknownDevice):
        services.telemetry_points_ingest(batch=columns(uuid.uuid4(), [("t", at(1), 1.0)]))
    assert event_queue.event_queue_reserved() == 0


# --- Two transactions storing the same point at once ---------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("first_commits", [True, False], ids=["first-commits", "first-rolls-back"])
def test_concurrent_identical_inserts_store_exactly_one_row(first_commits, redis_namespace):
    """Thread A stores the point and holds its transaction open; thread B stores the same point and must
    wait on A's uncommitted row (seen in pg_locks); then A commits (B skips the point) or rolls back (B
    stores it). Exactly one row either way, and B's answer says which."""
    device = device_create(serial_prefix="SN-RACE").device
    batch = columns(device.pk, [("t", at(7), 7.0)])
    a_inserted, a_release, results, pids = threading.Event(), threading.Event(), {}, {}

    def first():
        try:
            with transaction.atomic():
                results["a"] = services.telemetry_points_ingest(batch=batch)
                a_inserted.set()
                assert a_release.wait(30)
                if not first_commits:
                    raise LookupError("roll back")
        except LookupError:
            pass
        except Exception as exc:  # reported below
            results["a"] = exc
            a_inserted.set()
        finally:
            connection.close()

    def second():
        try:
            connection.ensure_connection()
            pids["b"] = connection.connection.info.backend_pid
            results["b"] = services.telemetry_points_ingest(batch=batch)
        except Exception as exc:  # reported below
            results["b"] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    try:
        assert a_inserted.wait(30) and not isinstance(results.get("a"), Exception), results
        threads[1].start()
        wait_until(lambda: pids.get("b") and lock_waiting(pids["b"]), timeout=30, message="B waiting on A's row")
    finally:
        a_release.set()
        for thread in threads:
            thread.join(30)
    assert not any(isinstance(result, Exception) for result in results.values()), results
    assert results["a"].stored == 1
    assert results["b"].stored == (0 if first_commits else 1)
    assert stored(device.pk) == [("t", at(7), 7.0)]


def lock_waiting(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return row is not None and row[0] == "Lock"


# --- Migration 0003 on a table that holds duplicates ----------------------------------------------

BEFORE, AFTER = ("telemetry", "0002_message_counts"), ("telemetry", "0003_point_unique")


def migrate(target) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate([target])


def unique_indexes_by_table() -> dict[str, bool]:
    """Every partition of the table (and the parent) -> whether it has a UNIQUE (device_id, metric, ts)."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT c.relname, bool_or(i.indisunique AND pg_get_indexdef(i.indexrelid) LIKE
                                      '%%(device_id, metric, ts DESC)')
            FROM pg_class c LEFT JOIN pg_index i ON i.indrelid = c.oid
            WHERE c.oid = %s::regclass OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = %s::regclass)
            GROUP BY c.relname
            """,
            [TABLE, TABLE],
        )
        return dict(cursor.fetchall())


def insert_rows(rows: list[tuple]) -> None:
    """(device_id, metric, ts, value, received_at) rows as they are, past ingestion."""
    with connection.cursor() as cursor:
        for row in rows:
            cursor.execute(
                f"INSERT INTO {TABLE} (device_id, metric, ts, value, received_at) VALUES (%s, %s, %s, %s, %s)",
                list(row),
            )


def test_the_migration_removes_duplicates_keeping_the_first_stored_then_enforces_uniqueness():
    """Run in the test's transaction, so the migration back and forth leaves nothing behind."""
    migrate(BEFORE)
    assert not any(unique_indexes_by_table().values())
    device, other = device_create(serial_prefix="SN-MIG").device.pk, device_create(serial_prefix="SN-MIG").device.pk
    today = timezone.now().replace(microsecond=0) - timedelta(hours=1)
    beyond = today + timedelta(days=400)  # no daily partition: the DEFAULT one
    received = today
    insert_rows(
        [
            (device, "t", today, 3.0, received + timedelta(seconds=3)),
            (device, "t", today, 1.0, received + timedelta(seconds=1)),  # the first stored: kept
            (device, "t", today, 2.0, received + timedelta(seconds=2)),
            (device, "h", today, 5.0, received),  # another metric: another point
            (other, "t", today, 6.0, received),  # another device: another point
            (device, "t", beyond, 8.0, received + timedelta(seconds=1)),
            (device, "t", beyond, 7.0, received),  # kept
            (device, "t", today - timedelta(days=1), 9.0, received),
        ]
    )
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {DEFAULT_PARTITION} WHERE device_id = %s", [device])
        assert cursor.fetchone()[0] == 2

    migrate(AFTER)

    assert stored(device) == sorted(
        [("t", today, 1.0), ("h", today, 5.0), ("t", beyond, 7.0), ("t", today - timedelta(days=1), 9.0)]
    )
    assert stored(other) == [("t", today, 6.0)]
    indexes = unique_indexes_by_table()
    assert indexes[TABLE] and indexes[DEFAULT_PARTITION] and indexes[partition_name(today.date())]
    assert all(indexes.values()), [name for name, unique in indexes.items() if not unique]
    with pytest.raises(IntegrityError), transaction.atomic():
        insert_rows([(device, "t", today, 4.0, received)])
    with pytest.raises(IntegrityError), transaction.atomic():
        insert_rows([(device, "t", beyond, 4.0, received)])
    assert stored(device)[-1] == ("t", beyond, 7.0)


def test_the_migration_backwards_restores_the_plain_index():
    migrate(BEFORE)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT to_regclass('telemetry_point_device_metric_ts'), to_regclass(%s)",
            ["telemetry_point_device_metric_ts_key"],
        )
        assert cursor.fetchone() == ("telemetry_point_device_metric_ts", None)
    migrate(AFTER)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT to_regclass('telemetry_point_device_metric_ts'), to_regclass(%s)",
            ["telemetry_point_device_metric_ts_key"],
        )
        assert cursor.fetchone() == (None, "telemetry_point_device_metric_ts_key")
