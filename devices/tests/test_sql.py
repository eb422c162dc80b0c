"""The device registry's SQL for other apps (`devices.sql`) and the status lookup that goes with it."""

import uuid

import pytest
from django.db import connection

from devices.models import Device, DeviceStatus
from devices.selectors import device_status_get
from devices.services import DeviceNotFound, device_register, device_update
from devices.sql import device_live_sql

pytestmark = pytest.mark.django_db


def live_ids(device_id: uuid.UUID) -> list[uuid.UUID]:
    sql, params = device_live_sql(device_id=device_id)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT d.id FROM {sql} AS d", params)
        return [row[0] for row in cursor.fetchall()]


def new_device():
    return device_register(serial_number=f"SN-SQL-{uuid.uuid4().hex}", device_type="s", firmware_version="1").device


@pytest.mark.parametrize("status", [s for s in DeviceStatus if s != DeviceStatus.DECOMMISSIONED])
def test_a_device_that_may_send_is_one_row(status):
    device = new_device()
    device_update(device_id=device.pk, changes={"status": status})
    assert live_ids(device.pk) == [device.pk]
    assert device_status_get(device_id=device.pk) == status


def test_a_decommissioned_or_unknown_device_is_no_row_and_the_status_says_which():
    device = new_device()
    other = new_device()
    device_update(device_id=device.pk, changes={"status": DeviceStatus.DECOMMISSIONED})
    assert live_ids(device.pk) == []
    assert device_status_get(device_id=device.pk) == DeviceStatus.DECOMMISSIONED
    unknown = uuid.uuid4()
    assert live_ids(unknown) == []
    assert device_status_get(device_id=unknown) is None
    assert live_ids(other.pk) == [other.pk]  # the filter is by id, not "any live device"


def test_an_unknown_device_is_a_404_that_is_also_the_orms_does_not_exist():
    unknown = uuid.uuid4()
    with pytest.raises(DeviceNotFound) as refused:
        device_update(device_id=unknown, changes={"location": "x"})
    assert isinstance(refused.value, Device.DoesNotExist)  # the admin catches that
    assert (refused.value.status_code, refused.value.body()) == (404, {"detail": "No device with this id."})
