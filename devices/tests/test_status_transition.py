"""`device_status_transition` and `device_state_for_update`: the conditional status hand-back a workflow
(a firmware update's maintenance) relies on."""

import uuid

import pytest
from django.db import transaction

from devices.models import Device, DeviceStatus
from devices.selectors import device_get, device_state_for_update
from devices.services import device_status_transition
from devices.testing import device_create

pytestmark = pytest.mark.django_db


def test_transition_happens_only_from_the_expected_status(redis_namespace):
    device = device_create(firmware_version="1.0").device
    assert device_get(device_id=device.pk).status == DeviceStatus.REGISTERED  # cached now
    assert device_status_transition(
        device_id=device.pk, from_status=DeviceStatus.REGISTERED, to_status=DeviceStatus.MAINTENANCE
    )
    cached = device_get(device_id=device.pk)  # the cache was tombstoned: the new row, not the cached one
    assert (cached.status, cached.firmware_version, cached.version) == ("maintenance", "1.0", device.version + 1)
    assert not device_status_transition(
        device_id=device.pk, from_status=DeviceStatus.ACTIVE, to_status=DeviceStatus.REGISTERED, firmware_version="x"
    )
    assert device_status_transition(
        device_id=device.pk,
        from_status=DeviceStatus.MAINTENANCE,
        to_status=DeviceStatus.ACTIVE,
        firmware_version="2.0",
    )
    row = Device.objects.get(pk=device.pk)
    assert (row.status, row.firmware_version, row.version) == ("active", "2.0", device.version + 2)
    assert not device_status_transition(device_id=uuid.uuid4(), from_status="active", to_status="maintenance")


def test_state_for_update_reads_and_locks():
    device = device_create(firmware_version="3.3").device
    with transaction.atomic():
        assert device_state_for_update(device_id=device.pk) == ("registered", "3.3")
        assert device_state_for_update(device_id=uuid.uuid4()) is None
