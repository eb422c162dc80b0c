"""Message counts: exact from Postgres up to the watermark, Redis minutes on top; drift is corrected."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection

from devices.models import Device
from devices.testing import device_create
from iot.redis import get_redis
from telemetry import events, selectors
from telemetry.models import TABLE, DeviceMessageCount, MessageCountWatermark
from telemetry.services import telemetry_message_counts_reconcile

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _no_points():
    """`telemetry_point` is unmanaged, so the transactional tests' flush leaves its rows: empty it here."""
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {TABLE}")


def store(device_id, count: int, received_at: datetime, *, ts_lag_ms: float = 250.0) -> None:
    """Rows as the ingest insert writes them, received at `received_at` (backdated, so their minute is closed);
    one metric each, so that they are `count` points (a point is identified by device, metric and ts)."""
    ts = received_at - timedelta(milliseconds=ts_lag_ms)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {TABLE} (device_id, metric, ts, value, received_at) "
            "SELECT %s, 't' || g, %s, g, %s FROM generate_series(1, %s) AS g",
            [device_id, ts, received_at, count],
        )


def handle(device_id, count: int, received_at: datetime, group_id: str | None = None) -> None:
    """The derived event's counters, as a consumer applies them."""
    ts = (received_at - timedelta(milliseconds=250)).isoformat()
    events.telemetry_points_received(
        {
            "event_id": uuid.uuid4().hex,
            "device_id": str(device_id),
            "group_id": group_id,
            "received_at": received_at.isoformat(),
            "metrics": ["t"] * count,
            "timestamps": [ts] * count,
            "values": [1.0] * count,
        }
    )


def test_drift_in_redis_is_corrected_by_the_reconciliation(redis_namespace):
    a = device_create(serial_prefix="COUNT", group_id="count-g").device
    b = device_create(serial_prefix="COUNT", group_id="count-g").device
    five_minutes_ago = datetime.now(UTC) - timedelta(minutes=5)
    store(a.pk, 3, five_minutes_ago)
    store(b.pk, 2, five_minutes_ago)
    handle(a.pk, 3, five_minutes_ago, "count-g")
    handle(a.pk, 3, five_minutes_ago, "count-g")  # a consumer crashed before its ack: counted twice
    # b's event was lost between the commit and the publish: never counted in Redis.

    assert selectors.telemetry_device_message_stats(device_id=a.pk).messages == 6
    assert selectors.telemetry_device_message_stats(device_id=b.pk).messages == 0
    assert selectors.telemetry_group_message_count(group_id="count-g") == 6

    result = telemetry_message_counts_reconcile()
    assert (result.devices, result.messages) == (2, 5)
    assert selectors.telemetry_device_message_stats(device_id=a.pk).messages == 3
    assert selectors.telemetry_device_message_stats(device_id=b.pk).messages == 2
    assert selectors.telemetry_group_message_count(group_id="count-g") == 5
    assert selectors.telemetry_fleet_message_stats().messages == 5
    stats = selectors.telemetry_device_message_stats(device_id=a.pk)
    assert stats.average_latency_ms == pytest.approx(250.0)

    # The current minute is not reconciled yet: its Redis counters are read on top, exactly once.
    now = datetime.now(UTC)
    store(a.pk, 4, now)
    handle(a.pk, 4, now, "count-g")
    assert selectors.telemetry_device_message_stats(device_id=a.pk).messages == 7
    assert selectors.telemetry_fleet_message_stats().messages == 9
    assert selectors.telemetry_group_message_count(group_id="count-g") == 9


def test_reconciliation_counts_each_minute_once(redis_namespace):
    device = device_create(serial_prefix="COUNT").device
    store(device.pk, 10, datetime.now(UTC) - timedelta(minutes=3))
    first = telemetry_message_counts_reconcile()
    again = telemetry_message_counts_reconcile()
    assert first.messages == 10 and again.messages == 0
    assert DeviceMessageCount.objects.get(device_id=device.pk).messages == 10
    assert MessageCountWatermark.objects.get().messages == 10
    # A point still inside the grace (received 10 s ago) waits for a later run, and is not lost meanwhile.
    store(device.pk, 1, datetime.now(UTC) - timedelta(seconds=10))
    handle(device.pk, 1, datetime.now(UTC) - timedelta(seconds=10))
    telemetry_message_counts_reconcile()
    assert selectors.telemetry_device_message_stats(device_id=device.pk).messages == 11


@pytest.mark.parametrize("devices", [10, 1000])
def test_reads_cost_one_query_and_one_redis_round_trip_whatever_the_fleet(
    devices, redis_namespace, django_assert_num_queries, monkeypatch
):
    group = f"size-{devices}"
    members = Device.objects.bulk_create(
        Device(
            serial_number=f"SIZE-{uuid.uuid4().hex}",
            device_type="s",
            firmware_version="1",
            group_id=group,
            token_hash=uuid.uuid4().hex,
        )
        for _ in range(devices)
    )
    DeviceMessageCount.objects.bulk_create(DeviceMessageCount(device_id=d.pk, messages=2) for d in members)
    MessageCountWatermark.objects.create(
        pk=1, reconciled_until=datetime.now(UTC) - timedelta(minutes=1), messages=2 * devices
    )
    received = datetime.now(UTC)
    for device in members[:5]:
        handle(device.pk, 1, received, group)
    round_trips = []
    redis_client = get_redis()

    class Counting:
        def pipeline(self, **kwargs):
            pipe = redis_client.pipeline(**kwargs)
            execute = pipe.execute
            pipe.execute = lambda: round_trips.append(1) or execute()
            return pipe

    monkeypatch.setattr(selectors, "get_redis", Counting)
    with django_assert_num_queries(1):
        assert selectors.telemetry_fleet_message_stats().messages == 2 * devices + 5
    with django_assert_num_queries(1):
        assert selectors.telemetry_group_message_count(group_id=group) == 2 * devices + 5
    with django_assert_num_queries(1):
        assert selectors.telemetry_device_message_stats(device_id=members[0].pk).messages == 3
    assert round_trips == [1, 1, 1]
