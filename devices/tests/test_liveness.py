"""Device liveness: the sweep that makes silent devices inactive, and their way back on the next point.

In process, against the test database and Redis. A device's point goes through the real ingest path
(`POST /telemetry/point` with its own credential, Django's test client): the devices app never
imports telemetry.
"""

import threading
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from devices.cache import device_cache_key
from devices.models import Device, DeviceStatus
from devices.selectors import device_get
from devices.services import device_mark_inactive, device_token_hash
from devices.tasks import device_liveness_sweep
from devices.testing import device_create
from iot import cache
from iot.cache import versioned_cache_get
from iot.testing.factories import operator_token_create
from iot.testing.processes import psycopg_conninfo

SILENCE = 60  # DEVICE_INACTIVE_AFTER_SECONDS in these tests


@pytest.fixture(autouse=True)
def _short_timeout(settings):
    settings.DEVICE_INACTIVE_AFTER_SECONDS = SILENCE


def device_in(status: str, *, silent_for: float | None):
    """A device in `status`, last seen `silent_for` seconds ago (None: never), written directly."""
    registration = device_create(serial_prefix="LIVE")
    last_seen = None if silent_for is None else timezone.now() - timedelta(seconds=silent_for)
    Device.objects.filter(pk=registration.device.pk).update(status=status, last_seen=last_seen)
    return registration


def row(registration) -> tuple[str, int]:
    device = Device.objects.get(pk=registration.device.pk)
    return device.status, device.version


@pytest.mark.django_db
def test_the_sweep_makes_only_silent_active_devices_inactive():
    stale = device_in(DeviceStatus.ACTIVE, silent_for=SILENCE + 30)
    untouched = {
        "fresh": device_in(DeviceStatus.ACTIVE, silent_for=SILENCE - 30),
        "never seen": device_in(DeviceStatus.REGISTERED, silent_for=None),
        "maintenance": device_in(DeviceStatus.MAINTENANCE, silent_for=SILENCE * 100),
        "decommissioned": device_in(DeviceStatus.DECOMMISSIONED, silent_for=SILENCE * 100),
        "already inactive": device_in(DeviceStatus.INACTIVE, silent_for=SILENCE * 100),
    }
    before = {name: row(registration) for name, registration in untouched.items()}
    assert device_liveness_sweep() == 1
    assert row(stale) == (DeviceStatus.INACTIVE, 2)  # the version moves with the write (the cache's guard)
    assert {name: row(registration) for name, registration in untouched.items()} == before
    assert device_liveness_sweep() == 0  # idempotent


@pytest.mark.django_db
def test_the_cache_serves_the_new_status_right_after_the_sweep(client):
    stale = device_in(DeviceStatus.ACTIVE, silent_for=SILENCE + 30).device
    assert device_get(device_id=stale.pk).status == DeviceStatus.ACTIVE  # cached as active
    assert versioned_cache_get(key=device_cache_key(stale.pk)).hit
    device_liveness_sweep()
    assert device_get(device_id=stale.pk).status == DeviceStatus.INACTIVE
    client.defaults["HTTP_AUTHORIZATION"] = f"Token {operator_token_create().key}"
    answer = client.get(f"/devices/{stale.pk}")
    assert answer.status_code == 200 and answer.json()["status"] == "inactive", answer.content
    assert versioned_cache_get(key=device_cache_key(stale.pk)).hit  # and the new row was cached again
    assert device_get(device_id=stale.pk).status == DeviceStatus.INACTIVE


def send_point(client, registration) -> int:
    body = {
        "device_id": str(registration.device.pk),
        "timestamp": datetime.now(UTC).isoformat(),
        "metric": "temperature",
        "value": 21.5,
    }
    answer = client.post(
        "/telemetry/point",
        body,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Device {registration.device_token}",
    )
    return answer.status_code


@pytest.mark.django_db
def test_an_inactive_device_is_active_again_on_its_next_point(client, redis_namespace):
    registration = device_in(DeviceStatus.ACTIVE, silent_for=SILENCE + 30)
    device_get(device_id=registration.device.pk)  # cached as active
    device_liveness_sweep()
    assert device_get(device_id=registration.device.pk).status == DeviceStatus.INACTIVE  # cached as inactive
    assert send_point(client, registration) == 202
    status, version = row(registration)
    assert (status, version) == (DeviceStatus.ACTIVE, 3)
    device = device_get(device_id=registration.device.pk)
    assert (device.status, device.version) == (DeviceStatus.ACTIVE, 3)  # not the cached inactive row
    assert device.last_seen > timezone.now() - timedelta(seconds=5)
    assert device_liveness_sweep() == 0


@pytest.mark.django_db
def test_points_never_change_an_operators_status(client, redis_namespace):
    maintenance = device_in(DeviceStatus.MAINTENANCE, silent_for=SILENCE * 100)
    assert send_point(client, maintenance) == 202
    assert Device.objects.get(pk=maintenance.device.pk).status == DeviceStatus.MAINTENANCE
    decommissioned = device_in(DeviceStatus.DECOMMISSIONED, silent_for=SILENCE * 100)
    assert send_point(client, decommissioned) == 401  # its credential no longer authenticates
    assert Device.objects.get(pk=decommissioned.device.pk).status == DeviceStatus.DECOMMISSIONED


def stale_devices(count: int) -> list[uuid.UUID]:
    """`count` active devices silent for twice the timeout, in one INSERT."""
    silent_since = timezone.now() - timedelta(seconds=2 * SILENCE)
    devices = []
    for _ in range(count):
        token = uuid.uuid4().hex
        devices.append(
            Device(
                serial_number=f"STALE-{token}",
                device_type="sensor",
                firmware_version="1",
                status=DeviceStatus.ACTIVE,
                last_seen=silent_since,
                token_hash=device_token_hash(token),
            )
        )
    return [device.pk for device in Device.objects.bulk_create(devices)]


@pytest.mark.django_db
@pytest.mark.parametrize("stale", [10, 1000])
def test_the_sweep_costs_the_same_queries_and_redis_calls_for_10_or_1000_devices(
    stale, django_assert_max_num_queries, monkeypatch
):
    ids = stale_devices(stale)
    fresh = device_in(DeviceStatus.ACTIVE, silent_for=1).device.pk
    redis_calls = []
    script = cache._INVALIDATE_MANY
    monkeypatch.setattr(cache, "_INVALIDATE_MANY", lambda **kwargs: redis_calls.append(1) or script(**kwargs))
    # SAVEPOINT, the UPDATE ... RETURNING, RELEASE (inside the test's transaction); one script call
    # for up to INVALIDATE_MANY_CHUNK tombstones (and the same again after commit, not run here).
    with django_assert_max_num_queries(3):
        assert device_liveness_sweep() == stale
    assert len(redis_calls) == 1
    assert set(Device.objects.filter(status=DeviceStatus.INACTIVE).values_list("pk", flat=True)) == set(ids)
    assert Device.objects.get(pk=fresh).status == DeviceStatus.ACTIVE
    assert all(not versioned_cache_get(key=device_cache_key(pk)).hit for pk in ids[:20])


@pytest.mark.django_db
def test_a_fleet_larger_than_a_batch_is_swept_in_batches():
    ids = stale_devices(7)
    assert device_mark_inactive(silent_seconds=SILENCE, batch_size=3) == 7
    assert Device.objects.filter(pk__in=ids, status=DeviceStatus.INACTIVE).count() == 7


@pytest.mark.django_db(transaction=True)
def test_a_device_whose_row_is_busy_is_skipped_not_waited_for():
    """A point arriving for that device right now holds its row: the sweep passes it by (`SKIP LOCKED`)
    instead of waiting; the next sweep takes it if it is still silent."""
    busy = device_in(DeviceStatus.ACTIVE, silent_for=SILENCE + 30).device.pk
    other = device_in(DeviceStatus.ACTIVE, silent_for=SILENCE + 30).device.pk
    swept = []

    def sweep_in_a_thread():
        try:
            swept.append(device_liveness_sweep())
        finally:
            connection.close()  # this thread's own connection

    with psycopg.connect(**psycopg_conninfo(connection.settings_dict)) as holder:
        holder.execute("SELECT 1 FROM devices_device WHERE id = %s FOR UPDATE", [busy])  # transaction left open
        sweeper = threading.Thread(target=sweep_in_a_thread)
        sweeper.start()
        sweeper.join(timeout=10)
        assert not sweeper.is_alive(), "the sweep waited for a locked row"
        assert swept == [1]
        assert Device.objects.get(pk=other).status == DeviceStatus.INACTIVE
        assert Device.objects.get(pk=busy).status == DeviceStatus.ACTIVE
        holder.rollback()
    assert device_liveness_sweep() == 1
    assert Device.objects.get(pk=busy).status == DeviceStatus.INACTIVE


def test_the_beat_schedule_runs_the_sweep():
    entry = settings.CELERY_BEAT_SCHEDULE["device-liveness-sweep"]
    assert entry["task"] == device_liveness_sweep.name
    assert entry["schedule"] == settings.DEVICE_LIVENESS_INTERVAL_SECONDS
