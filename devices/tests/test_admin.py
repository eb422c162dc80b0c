import uuid

import pytest

from devices.models import Device
from devices.selectors import device_get, device_get_by_token_hash
from devices.services import device_register, device_token_hash

pytestmark = pytest.mark.django_db


@pytest.fixture
def devices():
    return [
        device_register(
            serial_number=f"ADM-{uuid.uuid4().hex[:8]}", device_type="sensor", firmware_version="1.0.0"
        ).device
        for _ in range(3)
    ]


def test_changelist_filters_and_search(admin_client, devices):
    url = "/admin/devices/device/"
    assert admin_client.get(url).status_code == 200
    page = admin_client.get(url, {"status__exact": "registered", "q": devices[0].serial_number})
    assert page.status_code == 200
    assert devices[0].serial_number in page.content.decode()
    assert devices[1].serial_number not in page.content.decode()


def test_bulk_status_action_goes_through_the_cache_safe_service(admin_client, devices):
    for device in devices:
        device_get(device_id=device.pk)  # warm the cache
    response = admin_client.post(
        "/admin/devices/device/",
        {"action": "set_status_maintenance", "_selected_action": [str(d.pk) for d in devices]},
    )
    assert response.status_code == 302
    assert {device_get(device_id=d.pk).status for d in devices} == {"maintenance"}


def test_assign_group_action(admin_client, devices):
    selected = [str(d.pk) for d in devices[:2]]
    form = admin_client.post("/admin/devices/device/", {"action": "assign_group", "_selected_action": selected})
    assert form.status_code == 200 and b"Assign" in form.content
    done = admin_client.post(
        "/admin/devices/device/",
        {"action": "assign_group", "_selected_action": selected, "apply": "1", "group_id": "north"},
    )
    assert done.status_code == 302
    assert [device_get(device_id=d.pk).group_id for d in devices] == ["north", "north", None]


def test_change_form_saves_through_service_and_keeps_audit_fields_read_only(admin_client, devices):
    device = devices[0]
    device_get(device_id=device.pk)
    url = f"/admin/devices/device/{device.pk}/change/"
    page = admin_client.get(url)
    assert page.status_code == 200
    response = admin_client.post(
        url,
        {
            "device_type": "gateway",
            "firmware_version": "1.0.0",
            "status": "active",
            "location": "Hall 3",
            "group_id": "",
            "metadata": "{}",
            "serial_number": "HACKED",
        },
    )
    assert response.status_code == 302, response.content[:2000]
    fresh = device_get(device_id=device.pk)
    assert (fresh.device_type, fresh.location, fresh.serial_number) == ("gateway", "Hall 3", device.serial_number)
    assert Device.objects.get(pk=device.pk).version == 2


def test_devices_cannot_be_added_in_admin(admin_client):
    assert admin_client.get("/admin/devices/device/add/").status_code == 403


@pytest.fixture
def registrations():
    return [
        device_register(serial_number=f"ADM-DEL-{uuid.uuid4().hex[:8]}", device_type="sensor", firmware_version="1")
        for _ in range(3)
    ]


def _warm(registration):
    """A read and an authentication: the device and its credential mapping are cached."""
    assert device_get(device_id=registration.device.pk) is not None
    assert device_get_by_token_hash(token_hash=device_token_hash(registration.device_token)) is not None


def _forgotten(registration) -> bool:
    return (
        device_get(device_id=registration.device.pk) is None
        and device_get_by_token_hash(token_hash=device_token_hash(registration.device_token)) is None
    )


def test_deleting_a_device_in_the_admin_forgets_it_at_once(admin_client, registrations):
    doomed, kept = registrations[0], registrations[1]
    _warm(doomed)
    _warm(kept)
    url = f"/admin/devices/device/{doomed.device.pk}/delete/"
    assert admin_client.get(url).status_code == 200
    assert admin_client.post(url, {"post": "yes"}).status_code == 302
    assert _forgotten(doomed)
    assert not _forgotten(kept)


def test_the_delete_selected_action_forgets_every_device_at_once(admin_client, registrations):
    for registration in registrations:
        _warm(registration)
    selected = [str(r.device.pk) for r in registrations[:2]]
    response = admin_client.post(
        "/admin/devices/device/", {"action": "delete_selected", "_selected_action": selected, "post": "yes"}
    )
    assert response.status_code == 302
    assert [_forgotten(r) for r in registrations] == [True, True, False]
    assert not Device.objects.filter(pk__in=selected).exists()
