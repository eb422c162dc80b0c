import pytest

from devices.models import Device
from devices.selectors import device_get, device_get_by_token_hash
from devices.services import device_token_hash
from devices.testing import device_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def devices():
    return [device_create(serial_prefix="ADM").device for _ in range(3)]


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


def test_devices_cannot_be_added_in_admin_and_the_admin_says_how_they_are(admin_client):
    changelist = admin_client.get("/admin/devices/device/")
    assert b"/admin/devices/device/add/" not in changelist.content  # no add button
    page = admin_client.get("/admin/devices/device/add/", follow=True)
    assert page.redirect_chain == [("/admin/devices/device/", 302)]
    assert page["Content-Type"].startswith("text/html")
    shown = [str(message) for message in page.context["messages"]]
    assert len(shown) == 1 and "POST /devices" in shown[0] and "/api/docs" in shown[0]
    before = Device.objects.count()
    posted = admin_client.post(
        "/admin/devices/device/add/",
        {"serial_number": "ADM-ADDED", "device_type": "sensor", "firmware_version": "1", "status": "active"},
    )
    assert posted.status_code == 302
    assert Device.objects.count() == before


def test_admin_errors_are_pages_and_api_errors_stay_json(admin_client):
    not_found = admin_client.get("/admin/devices/no-such-model/")
    assert not_found.status_code == 404
    assert not_found["Content-Type"].startswith("text/html")
    forbidden = admin_client.get("/admin/telemetry/telemetrypoint/add/")  # points are read-only
    assert forbidden.status_code == 403
    assert forbidden["Content-Type"].startswith("text/html")
    api = admin_client.get("/no-such-endpoint")
    assert api.status_code == 404 and api.json() == {"detail": "Not found."}


def test_view_site_leads_to_the_api_docs(admin_client):
    page = admin_client.get("/admin/")
    assert b'<a href="/api/docs">View site</a>' in page.content
    assert admin_client.get("/api/docs").status_code == 200


def test_a_device_page_links_to_its_telemetry(admin_client, devices):
    device = devices[0]
    page = admin_client.get(f"/admin/devices/device/{device.pk}/change/")
    link = f'<a href="/admin/telemetry/telemetrypoint/?q={device.pk}">'
    assert link.encode() in page.content
    points = admin_client.get("/admin/telemetry/telemetrypoint/", {"q": str(device.pk)})
    assert points.status_code == 200
    assert points.context["cl"].query == str(device.pk)
    assert not [str(m) for m in points.context["messages"]]  # the device was found: no warning


@pytest.fixture
def registrations():
    return [device_create(serial_prefix="ADM-DEL") for _ in range(3)]


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
