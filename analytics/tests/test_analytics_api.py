"""The analytics API: exact figures, and the same number of queries and Redis round trips at any fleet size."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from rest_framework.test import APIClient

from alerts.models import Alert
from alerts.testing import points_evaluate, rule_create
from devices.models import Device
from devices.testing import device_create, devices_bulk_create
from iot.testing.factories import operator_token_create
from iot.testing.redis import redis_round_trips
from telemetry import events
from telemetry.models import DeviceMessageCount, MessageCountWatermark

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def api():
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {operator_token_create().key}")
    return client


def received(device_id, count: int, group_id: str | None, *, lag_ms: float = 100.0) -> None:
    """`count` points of the device received now, counted as a consumer counts them."""
    now = datetime.now(UTC)
    events.telemetry_points_received(
        {
            "event_id": uuid.uuid4().hex,
            "device_id": str(device_id),
            "group_id": group_id,
            "received_at": now.isoformat(),
            "metrics": ["t"] * count,
            "timestamps": [(now - timedelta(milliseconds=lag_ms)).isoformat()] * count,
            "values": [1.0] * count,
        }
    )


def test_fleet_group_and_device_figures_are_exact(api, redis_namespace):
    group = f"an-{uuid.uuid4().hex[:6]}"
    active = devices_bulk_create(count=3, group_id=group, status="active", seen_seconds_after_registration=600)
    devices_bulk_create(count=2, status="inactive", seen_seconds_after_registration=300)
    never = device_create(serial_prefix="AN").device  # registered, never seen: uptime 0
    # Reconciled history (as the reconciliation leaves it) plus this minute's counters.
    MessageCountWatermark.objects.create(
        pk=1, reconciled_until=datetime.now(UTC) - timedelta(minutes=2), messages=40, latency_ms_sum=40 * 50.0
    )
    DeviceMessageCount.objects.create(device_id=active[0].pk, messages=30, latency_ms_sum=30 * 50.0)
    DeviceMessageCount.objects.create(device_id=active[1].pk, messages=10, latency_ms_sum=10 * 50.0)
    received(active[0].pk, 5, group)
    received(never.pk, 1, None)
    rule = rule_create(group_id=group, threshold=10.0)
    points_evaluate(device_id=active[0].pk, group_id=group, values=[20.0])
    points_evaluate(device_id=active[1].pk, group_id=group, values=[20.0])
    Alert.objects.filter(device_id=active[1].pk).update(status="resolved")
    assert rule

    fleet = api.get("/analytics/fleet").json()
    assert fleet["total_devices"] == 6
    assert (fleet["active_devices"], fleet["inactive_devices"]) == (3, 2)
    assert fleet["devices_by_status"]["registered"] == 1
    assert fleet["total_messages"] == 46
    assert fleet["active_alerts"] == 1
    assert fleet["pending_updates"] == 0
    assert fleet["average_uptime_seconds"] == pytest.approx((3 * 600 + 2 * 300 + 0) / 6)
    assert fleet["messages_per_second"] == pytest.approx(0.0, abs=6 / 60)  # this second is not yet complete
    assert fleet["average_latency_ms"] == pytest.approx((40 * 50.0 + 6 * 100.0) / 46, rel=0.01)

    group_figures = api.get(f"/analytics/groups/{group}").json()
    assert group_figures == {
        "group_id": group,
        "device_count": 3,
        "active_count": 3,
        "total_messages": 45,
        "alert_count": 1,
        "average_uptime_seconds": pytest.approx(600.0),
    }

    device = api.get(f"/analytics/devices/{active[0].pk}").json()
    assert device["message_count"] == 35 and device["uptime_seconds"] == pytest.approx(600.0)
    assert device["average_latency_ms"] == pytest.approx((30 * 50.0 + 5 * 100.0) / 35, rel=0.01)
    assert device["error_count"] == 0 and device["status"] == "active"
    assert api.get(f"/analytics/devices/{never.pk}").json()["uptime_seconds"] == 0


def test_refused_submissions_are_the_device_error_count(api, redis_namespace):
    device = device_create(serial_prefix="AN-ERR")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Device {device.device_token}")
    bad = {"device_id": str(device.device.pk), "timestamp": "not a time", "metric": "t", "value": 1.0}
    assert client.post("/telemetry/point", bad, format="json").status_code == 400
    batch = {"device_id": str(device.device.pk), "points": [{"timestamp": "x", "metric": "t", "value": 1}] * 3}
    assert client.post("/telemetry/batch", batch, format="json").status_code == 400
    assert api.get(f"/analytics/devices/{device.device.pk}").json()["error_count"] == 4


def test_unknown_device_is_404_and_operators_only(api):
    assert api.get(f"/analytics/devices/{uuid.uuid4()}").status_code == 404
    assert api.get("/analytics/devices/not-a-uuid").status_code == 404
    assert APIClient().get("/analytics/fleet").status_code == 401
    device = device_create(serial_prefix="AN-AUTH")
    as_device = APIClient()
    as_device.credentials(HTTP_AUTHORIZATION=f"Device {device.device_token}")
    assert as_device.get("/analytics/fleet").status_code == 403


def _costs(api, path: str, django_assert_max_num_queries) -> tuple[int, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries, redis_round_trips() as calls:
        assert api.get(path).status_code == 200
    return len(queries), len([call for call in calls if call != "EVALSHA"])  # EVALSHA: the token cache


def test_round_trips_do_not_grow_with_the_fleet(api, redis_namespace, django_assert_max_num_queries):
    costs = {}
    api.get("/analytics/fleet")  # the operator token's lookup is cached from here on
    for size in (10, 1000):
        group = f"size-{size}-{uuid.uuid4().hex[:4]}"
        members = devices_bulk_create(count=size, group_id=group, status="active", seen_seconds_after_registration=60)
        DeviceMessageCount.objects.bulk_create(DeviceMessageCount(device_id=d.pk, messages=1) for d in members)
        for device in members[:3]:
            received(device.pk, 1, group)
        costs[size] = (
            _costs(api, "/analytics/fleet", django_assert_max_num_queries),
            _costs(api, f"/analytics/groups/{group}", django_assert_max_num_queries),
            _costs(api, f"/analytics/devices/{members[0].pk}", django_assert_max_num_queries),
        )
    assert costs[10] == costs[1000], costs
    fleet_queries, fleet_redis = costs[1000][0]
    assert fleet_queries <= 6 and fleet_redis <= 3, costs
    assert Device.objects.count() == 1010
