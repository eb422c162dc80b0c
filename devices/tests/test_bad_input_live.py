"""Bad input gets a clear 4xx with a useful message, never a 500, and stores nothing."""

import uuid

import pytest

pytestmark = pytest.mark.live

VALID = {"serial_number": "SN-X", "device_type": "sensor", "firmware_version": "1.0.0"}


@pytest.fixture
def device(api, unique_id):
    return api.post("/devices", json={**VALID, "serial_number": f"SN-BAD-{unique_id}"}).json()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"device_type": "sensor", "firmware_version": "1"}, "serial_number"),
        ({**VALID, "serial_number": ""}, "serial_number"),
        ({**VALID, "serial_number": "x" * 129}, "serial_number"),
        ({**VALID, "serial_number": 12345}, "serial_number"),
        ({**VALID, "serial_number": ["a"]}, "serial_number"),
        ({**VALID, "serial_number": "bad\x00serial"}, "serial_number"),
        ({**VALID, "device_type": None}, "device_type"),
        ({**VALID, "firmware_version": "1.0 beta"}, "firmware_version"),
        ({**VALID, "location": "x" * 256}, "location"),
        ({**VALID, "metadata": ["not", "an", "object"]}, "metadata"),
        ({**VALID, "metadata": {"blob": "x" * 20000}}, "metadata"),
        ({**VALID, "colour": "red"}, "colour"),
    ],
)
def test_invalid_registration_is_400_and_stores_nothing(api, body, field, django_db_blocker):
    from devices.models import Device

    serial = f"SN-INVALID-{uuid.uuid4().hex[:8]}"
    if isinstance(body.get("serial_number"), str) and body["serial_number"] == "SN-X":
        body = {**body, "serial_number": serial}
    response = api.post("/devices", json=body)
    assert response.status_code == 400, response.text
    assert field in response.json()
    with django_db_blocker.unblock():
        assert not Device.objects.filter(serial_number=serial).exists()


@pytest.mark.parametrize(
    "raw",
    [b'{"serial_number": ', b"not json", b"[1, 2]", b'"a string"', b'{"a": NaN}', b"\xff\xfe"],
)
def test_malformed_json_is_400(api, raw):
    response = api.post("/devices", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "detail" in response.json() or "non_field_errors" in response.json()


def test_wrong_content_type_is_415(api):
    response = api.post("/devices", content=b"serial_number=x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415


@pytest.mark.parametrize("device_ref", ["not-a-uuid", "123", str(uuid.uuid4()), "%00", "x" * 300])
def test_unknown_or_malformed_ids_are_404(api, device_ref):
    assert api.get(f"/devices/{device_ref}").status_code == 404
    response = api.patch(f"/devices/{device_ref}", json={"location": "x"})
    assert response.status_code == 404
    assert response.json() == {"detail": "No device with this id."}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"status": "exploded"}, "status"),
        ({"serial_number": "SN-NEW"}, "serial_number"),
        ({"id": str(uuid.uuid4())}, "id"),
        ({"last_seen": "2020-01-01T00:00:00Z"}, "last_seen"),
        ({"metadata": "text"}, "metadata"),
        ({"location": 42.5}, "location"),
        ({"group_id": True}, "group_id"),
        ({}, "non_field_errors"),
    ],
)
def test_invalid_patch_is_400_and_changes_nothing(api, device, changes, field):
    response = api.patch(f"/devices/{device['id']}", json=changes)
    assert response.status_code == 400, response.text
    assert field in response.json()
    unchanged = api.get(f"/devices/{device['id']}").json()
    assert unchanged["serial_number"] == device["serial_number"]
    assert unchanged["status"] == device["status"]


def test_methods_not_allowed(api, device):
    assert api.put(f"/devices/{device['id']}", json=VALID).status_code == 405
    assert api.delete(f"/devices/{device['id']}").status_code == 405


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "abc"}, {"limit": "100000"}, {"status": "weird"}])
def test_bad_list_parameters_are_400(api, params):
    assert api.get("/devices", params=params).status_code == 400


def test_bad_cursor_is_404_not_500(api):
    assert api.get("/devices", params={"cursor": "garbage"}).status_code == 404


def test_idempotency_key_too_long_is_400(api, unique_id):
    response = api.post(
        "/devices", json={**VALID, "serial_number": f"SN-K-{unique_id}"}, headers={"Idempotency-Key": "k" * 256}
    )
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()


def test_unauthenticated_is_401_everywhere(anonymous, device):
    for method, path in [("GET", "/devices"), ("POST", "/devices"), ("GET", f"/devices/{device['id']}")]:
        response = anonymous.request(method, path, json=VALID)
        assert response.status_code == 401
    assert anonymous.get("/devices", headers={"Authorization": "Token nope"}).status_code == 401


def test_unknown_path_is_json_404(api):
    response = api.get("/no/such/thing")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}
