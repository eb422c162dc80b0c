"""The fleet dashboard in the admin: exact figures, the same cost for 10 or 1000 devices, the admin's
login and permissions; a device's page with its telemetry, alerts and firmware history."""

import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from alerts.models import Alert
from alerts.testing import points_evaluate, rule_create
from analytics import charts
from analytics.dashboard import INGESTION_MINUTES, TIME_RANGES
from devices.models import Device
from devices.testing import device_create, devices_bulk_create
from firmware.models import FirmwareUpdate
from firmware.rollouts import firmware_rollout_advance, firmware_rollout_pause, firmware_rollout_start
from firmware.testing import release_create, rollout_advance_capture
from iot.testing.factories import user_create
from iot.testing.redis import redis_round_trips
from telemetry import events
from telemetry.redis_keys import count_window_start
from telemetry.testing import points_insert

pytestmark = pytest.mark.django_db(transaction=True)

DASHBOARD_JSON = "/admin/devices/device/fleet-dashboard.json"
DASHBOARD_FRAGMENT = "/admin/devices/device/fleet-dashboard/"


def admin_client(*, superuser: bool = False, permissions: tuple[str, ...] = ()) -> Client:
    client = Client()
    client.force_login(user_create(staff=True, superuser=superuser, permissions=permissions))
    return client


def received(device_id, count: int, *, at: datetime) -> None:
    """`count` points of the device counted as received at `at`, as an event consumer counts them."""
    events.telemetry_points_received(
        {
            "event_id": uuid.uuid4().hex,
            "device_id": str(device_id),
            "group_id": None,
            "received_at": at.isoformat(),
            "metrics": ["t"] * count,
            "timestamps": [at.isoformat()] * count,
            "values": [1.0] * count,
        }
    )


def update_create(device: Device, release, status: str, *, progress: int = 0, minutes_ago: int = 1):
    return FirmwareUpdate.objects.create(
        device=device,
        release=release,
        from_version=device.firmware_version,
        to_version=release.version,
        status=status,
        progress=progress,
        started_at=timezone.now() - timedelta(minutes=minutes_ago),
    )


def svg(html: str, name: str) -> str:
    match = re.search(rf'<svg class="fleet-chart" data-chart="{re.escape(name)}".*?</svg>', html, re.S)
    assert match, f"no chart {name!r} in the page"
    return match.group(0)


def test_dashboard_figures_are_exact(redis_namespace):
    active = devices_bulk_create(count=4, status="active", seen_seconds_after_registration=600)
    silent = devices_bulk_create(count=3, status="inactive", seen_seconds_after_registration=60)
    # The most recently lost comes first (the others were last seen a day ago).
    Device.objects.filter(pk=silent[2].pk).update(last_seen=timezone.now() - timedelta(minutes=7))
    devices_bulk_create(count=2, status="decommissioned")
    new = device_create(serial_prefix="DASH", firmware_version="2.0.0").device
    device_create(serial_prefix="DASH", firmware_version="2.0.0")
    Device.objects.filter(pk=active[0].pk).update(firmware_version="2.1.0")
    # Points received this minute and five minutes ago; the minute before the hour is not shown.
    now = datetime.now(UTC)
    received(active[0].pk, 7, at=now)
    received(active[1].pk, 5, at=now - timedelta(minutes=5))
    received(active[1].pk, 100, at=now - timedelta(minutes=INGESTION_MINUTES))
    rule_create(device_id=active[0].pk, threshold=10.0, severity="critical")
    rule_create(device_id=active[1].pk, threshold=10.0, severity="warning")
    points_evaluate(device_id=active[0].pk, values=[20.0])
    points_evaluate(device_id=active[1].pk, values=[30.0, 40.0])
    rule_create(device_id=active[2].pk, threshold=10.0, severity="info")
    points_evaluate(device_id=active[2].pk, values=[11.0])
    Alert.objects.filter(device_id=active[2].pk).update(status="resolved")
    release = release_create(version=f"3.0.{uuid.uuid4().hex[:6]}", content=b"firmware")
    update_create(active[0], release, "downloading", progress=40, minutes_ago=2)
    update_create(active[1], release, "installing", progress=90, minutes_ago=1)
    update_create(active[2], release, "installed", progress=100, minutes_ago=30)

    data = admin_client(superuser=True).get(DASHBOARD_JSON).json()

    assert data["devices_total"] == 11
    assert data["devices_by_status"] == {
        "registered": 2,
        "active": 4,
        "inactive": 3,
        "maintenance": 0,
        "decommissioned": 2,
    }
    minutes = data["ingestion_per_minute"]
    assert len(minutes) == INGESTION_MINUTES
    assert minutes[-1] == {
        "minute": datetime.fromtimestamp(count_window_start(now.timestamp()), tz=UTC).isoformat(),
        "points": 7,
    }
    assert minutes[-6]["points"] == 5 and data["messages_last_hour"] == 12
    assert data["alerts_by_severity"] == {"critical": 1, "warning": 1, "info": 0}
    assert [alert["device_id"] for alert in data["alerts_newest"]] == [str(active[1].pk), str(active[0].pk)]
    newest = data["alerts_newest"][0]
    assert (newest["severity"], newest["last_value"], newest["occurrences"]) == ("warning", 40.0, 2)
    assert newest["device_serial_number"] == active[1].serial_number
    # Versions of the devices in service (decommissioned left out), most common first.
    assert data["firmware_versions"] == [
        {"version": "1.0.0", "devices": 6},
        {"version": "2.0.0", "devices": 2},
        {"version": "2.1.0", "devices": 1},
    ]
    assert data["firmware_versions_other"] == 0
    assert data["updates_by_status"] == {"pending": 0, "downloading": 1, "downloaded": 0, "installing": 1}
    assert [(u["status"], u["progress"]) for u in data["updates_newest"]] == [("installing", 90), ("downloading", 40)]
    assert data["rollouts"] == []
    assert data["silent_devices"][0]["id"] == str(silent[2].pk)
    assert {device["id"] for device in data["silent_devices"]} == {str(device.pk) for device in silent}
    assert new.pk not in {device["id"] for device in data["silent_devices"]}


def test_dashboard_fragment_draws_the_figures(redis_namespace):
    devices_bulk_create(count=5, status="active", seen_seconds_after_registration=60)
    devices_bulk_create(count=2, status="inactive", seen_seconds_after_registration=60)
    received(uuid.uuid4(), 9, at=datetime.now(UTC))
    html = admin_client(permissions=("view_device",)).get(DASHBOARD_FRAGMENT).content.decode()

    status_bar = svg(html, "devices-by-status")
    assert re.findall(r'data-key="(\w+)" data-value="(\d+)"', status_bar) == [("active", "5"), ("inactive", "2")]
    ingestion = svg(html, "ingestion")
    values = re.findall(r'<rect class="fleet-bar[^"]*"[^>]* data-value="(\d+)"', ingestion)
    assert len(values) == INGESTION_MINUTES and values[-1] == "9" and set(values[:-1]) == {"0"}
    assert 'class="fleet-bar fleet-bar--partial"' in ingestion  # the unfinished minute is marked
    assert re.search(r'data-kpi="silent">\s*<span class="fleet-kpi-value" data-value="2">', html)
    firmware = svg(html, "firmware-versions")
    assert re.findall(r'data-label="([^"]+)" data-value="(\d+)"', firmware) == [("1.0.0", "7")]
    assert "No open alerts." in html and "No staged rollouts" in html


def test_firmware_versions_beyond_the_shown_ones_are_counted_together(redis_namespace):
    for index, device in enumerate(devices_bulk_create(count=12, status="active")):
        Device.objects.filter(pk=device.pk).update(firmware_version=f"1.{index % 10}.0")  # 1.0.0, 1.1.0: 2 each
    data = admin_client(superuser=True).get(DASHBOARD_JSON).json()
    assert data["firmware_versions"][:2] == [{"version": "1.0.0", "devices": 2}, {"version": "1.1.0", "devices": 2}]
    assert len(data["firmware_versions"]) == 8 and data["firmware_versions_other"] == 2


def _costs(client: Client, path: str) -> tuple[int, int]:
    with CaptureQueriesContext(connection) as queries, redis_round_trips() as calls:
        response = client.get(path)
        assert response.status_code == 200
    return len(queries), len(calls)


def test_dashboard_costs_the_same_for_10_and_1000_devices(redis_namespace, django_assert_max_num_queries):
    client = admin_client(superuser=True)
    release = release_create(version=f"3.1.{uuid.uuid4().hex[:6]}", content=b"firmware")

    def fleet(count: int) -> None:
        devices = devices_bulk_create(count=count, status="inactive", seen_seconds_after_registration=60)
        for device in devices[:3]:
            rule_create(device_id=device.pk, threshold=1.0, severity="critical")
            points_evaluate(device_id=device.pk, values=[5.0])
            update_create(device, release, "downloading", progress=10)
        received(devices[0].pk, count, at=datetime.now(UTC))

    fleet(10)
    small = {path: _costs(client, path) for path in (DASHBOARD_JSON, DASHBOARD_FRAGMENT, "/admin/")}
    fleet(990)
    large = {path: _costs(client, path) for path in (DASHBOARD_JSON, DASHBOARD_FRAGMENT, "/admin/")}
    assert small == large
    # 8 reads of the dashboard plus the session and the user.
    with django_assert_max_num_queries(10):
        client.get(DASHBOARD_JSON)
    assert large[DASHBOARD_JSON][1] <= 3  # 2 Redis round trips for the figures (+ the session cache, if any)


def test_running_and_paused_rollouts_fill_the_rollouts_panel(redis_namespace):
    release = release_create(content=b"firmware")
    group = f"g-{uuid.uuid4().hex[:8]}"
    for device in devices_bulk_create(count=4, group_id=group, status="active"):
        update_create(device, release, "failed")  # not the rollout's: not counted in it
    with rollout_advance_capture():
        rollout = firmware_rollout_start(to_version=release.version, group_id=group, stages=[50, 100])
        firmware_rollout_advance(rollout_id=rollout.pk)  # 2 updates created
        FirmwareUpdate.objects.filter(rollout_id=rollout.pk).update(status="failed")
        paused = firmware_rollout_start(to_version=release.version, name="paused one", group_id=group)
        firmware_rollout_pause(rollout_id=paused.pk)
    client = admin_client(superuser=True)
    data = client.get(DASHBOARD_JSON).json()
    rows = [
        (r["name"], r["status"], r["devices_total"], r["devices_done"], r["devices_failed"]) for r in data["rollouts"]
    ]
    assert rows == [("paused one", "paused", 4, 0, 0), (rollout.name, "running", 4, 2, 2)]
    html = client.get(DASHBOARD_FRAGMENT).content.decode()
    assert f'data-rollout="{rollout.pk}"' in html and "No staged rollouts" not in html
    assert f"/admin/firmware/firmwarerollout/{paused.pk}/change/" in html and 'aria-valuenow="50"' in html


def test_anonymous_is_sent_to_the_admin_login():
    for path in (DASHBOARD_JSON, DASHBOARD_FRAGMENT, "/admin/"):
        response = Client().get(path)
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/?next=")


def test_staff_without_device_permission_get_403_and_a_plain_index():
    client = admin_client(permissions=("view_alert",))
    assert client.get(DASHBOARD_JSON).status_code == 403
    assert client.get(DASHBOARD_FRAGMENT).status_code == 403
    index = client.get("/admin/")
    assert index.status_code == 200 and b'id="fleet-dashboard"' not in index.content
    not_staff = Client()
    not_staff.force_login(user_create(permissions=("view_device",)))
    assert not_staff.get(DASHBOARD_JSON).status_code == 302  # not staff: the admin's login


def test_staff_with_view_permission_see_the_dashboard_on_the_index(redis_namespace):
    devices_bulk_create(count=3, status="active", seen_seconds_after_registration=60)
    index = admin_client(permissions=("view_device",)).get("/admin/")
    html = index.content.decode()
    assert index.status_code == 200 and 'id="fleet-dashboard"' in html
    assert 'data-live-url="/admin/devices/device/fleet-dashboard/"' in html
    assert re.search(r'data-kpi="devices">\s*<span class="fleet-kpi-value" data-value="3">', html)
    assert "analytics/fleet.js" in html and "analytics/fleet.css" in html


# --- a device's page --------------------------------------------------------------------------------


def test_device_page_charts_each_metric_per_bucket_with_its_alerts_and_updates(redis_namespace):
    device = device_create(serial_prefix="DASH-DEV").device
    other = device_create(serial_prefix="DASH-OTHER").device
    now = timezone.now()
    # 20 temperature points 3 minutes apart (1h range: one-minute buckets, 20 of them), 4 humidity points.
    temperature = [(now - timedelta(minutes=3 * i, seconds=5), 20.0 + i) for i in range(20)]
    points_insert(device_id=device.pk, metric="temperature", points=temperature)
    points_insert(device_id=device.pk, metric="humidity", points=[(now - timedelta(minutes=i), 50.0) for i in range(4)])
    points_insert(device_id=device.pk, metric="pressure", points=[(now - timedelta(hours=3), 1000.0)])  # 24h only
    points_insert(device_id=other.pk, metric="temperature", points=[(now - timedelta(minutes=1), 99.0)])
    rule_create(device_id=device.pk, threshold=10.0, severity="critical")
    points_evaluate(device_id=device.pk, values=[50.0])
    release = release_create(version=f"3.2.{uuid.uuid4().hex[:6]}", content=b"firmware")
    update_create(device, release, "installed", progress=100, minutes_ago=60)
    update_create(device, release, "downloading", progress=30)
    client = admin_client(permissions=("view_device",))

    html = client.get(f"/admin/devices/device/{device.pk}/change/").content.decode()
    assert 'id="device-panels"' in html and 'data-range="1h"' in html
    chart = svg(html, "metric:temperature")
    assert len(re.findall(r'<circle class="fleet-point"', chart)) == 20
    assert len(re.findall(r'<circle class="fleet-point"', svg(html, "metric:humidity"))) == 4
    assert 'data-chart="metric:pressure"' not in html  # nothing in the last hour
    values = sorted(float(v) for v in re.findall(r'class="fleet-point"[^>]* data-value="([^"]+)"', chart))
    assert values == [20.0 + i for i in range(20)]
    assert html.count('data-table="device-alerts"') == 1 and 'data-status="open"' in html
    assert re.findall(r'data-update="[^"]+" data-status="(\w+)"', html) == ["downloading", "installed"]

    day = client.get(f"/admin/devices/device/{device.pk}/panels/?range=24h").content.decode()
    assert 'data-range="24h"' in day and 'data-chart="metric:pressure"' in day
    buckets = {int(ts.timestamp()) // TIME_RANGES["24h"].bucket_seconds for ts, _ in temperature}
    assert len(re.findall(r'<circle class="fleet-point"', svg(day, "metric:temperature"))) == len(buckets)
    # An unknown range is the default one, not an error.
    assert 'data-range="1h"' in client.get(f"/admin/devices/device/{device.pk}/panels/?range=1y").content.decode()


def test_device_panels_without_telemetry_and_for_unknown_devices():
    device = device_create(serial_prefix="DASH-EMPTY").device
    client = admin_client(superuser=True)
    html = client.get(f"/admin/devices/device/{device.pk}/panels/").content.decode()
    assert 'data-empty="telemetry"' in html and "never been updated" in html
    assert client.get(f"/admin/devices/device/{uuid.uuid4()}/panels/").status_code == 404
    assert client.get("/admin/devices/device/not-a-uuid/panels/").status_code == 404
    without_permission = admin_client(permissions=("view_alert",))
    assert without_permission.get(f"/admin/devices/device/{device.pk}/panels/").status_code == 403


def test_device_panels_cost_does_not_grow_with_history(redis_namespace):
    device = device_create(serial_prefix="DASH-COST").device
    client = admin_client(superuser=True)
    now = timezone.now()
    points_insert(device_id=device.pk, metric="temperature", points=[(now - timedelta(minutes=1), 1.0)])
    path = f"/admin/devices/device/{device.pk}/panels/?range=7d"
    before = _costs(client, path)
    points_insert(
        device_id=device.pk,
        metric="temperature",
        points=[(now - timedelta(minutes=i, seconds=30), float(i)) for i in range(5000)],  # new timestamps
    )
    assert _costs(client, path) == before


# --- the charts --------------------------------------------------------------------------------------


def test_chart_axes_and_numbers():
    assert [charts.nice_ceiling(v) for v in (0, 0.7, 1, 3, 7, 240, 2501)] == [1, 1, 1, 5, 10, 250, 5000]
    assert [charts.number(v) for v in (1234567, 0.123456, 12.5, 12.0, 1234.56)] == [
        "1,234,567",
        "0.123",
        "12.5",
        "12",
        "1,235",
    ]


def test_line_chart_breaks_where_buckets_are_missing():
    start = datetime(2026, 1, 1, tzinfo=UTC)
    points = [charts.SeriesPoint(at=start + timedelta(minutes=m), value=float(m), count=1) for m in (0, 1, 2, 10, 11)]
    drawn = charts.line_chart(
        name="t", points=points, start=start, end=start + timedelta(hours=1), bucket_seconds=60, label="t"
    )
    assert drawn.count("<polyline") == 2 and drawn.count("<circle") == 5


def test_chart_labels_are_escaped():
    drawn = charts.hbar_chart(name="v", rows=[charts.Row(label='<script>"x"</script>', value=1)], label="v")
    assert "<script>" not in drawn and "&lt;script&gt;" in drawn
