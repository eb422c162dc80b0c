"""Finding a device by serial number, and refusals that say what a valid value is."""

import uuid

import pytest
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token

from devices.services import device_register

pytestmark = pytest.mark.django_db

VERSION_RULE = "Must be 1-64 characters from letters, digits and . _ + - (e.g. 2.0.1 or 2.0.a3f1)."


@pytest.fixture
def operator(client):
    user = get_user_model().objects.create(username=f"op-{uuid.uuid4().hex[:8]}")
    client.defaults["HTTP_AUTHORIZATION"] = f"Token {Token.objects.create(user=user).key}"
    return client


@pytest.fixture
def serial() -> str:
    return f"SN-FIND-{uuid.uuid4().hex[:8]}"


def listed(operator, **query) -> list[str]:
    response = operator.get("/devices", query)
    assert response.status_code == 200, response.content
    return [device["serial_number"] for device in response.json()["results"]]


def test_a_device_is_found_by_its_exact_serial_number(operator, serial):
    for candidate in (serial, f"{serial}-2", f"X{serial}", serial.lower()):
        device_register(serial_number=candidate, device_type="sensor", firmware_version="1.0.0")
    assert listed(operator, serial_number=serial) == [serial]
    assert listed(operator, serial_number=f"  {serial} ") == [serial]  # trimmed, as at registration
    assert listed(operator, serial_number=serial[:-1]) == []  # exact: no prefix match
    assert listed(operator, serial_number="SN-NO-SUCH-DEVICE") == []


def test_the_serial_number_combines_with_the_other_filters(operator, serial):
    device_register(serial_number=serial, device_type="sensor", firmware_version="1.0.0", group_id="north")
    assert listed(operator, serial_number=serial, group_id="north", status="registered") == [serial]
    assert listed(operator, serial_number=serial, group_id="south") == []
    assert listed(operator, serial_number=serial, status="active") == []


@pytest.mark.parametrize("value", ["", "x" * 129])
def test_a_bad_serial_number_query_is_a_400(operator, value):
    response = operator.get("/devices", {"serial_number": value})
    assert response.status_code == 400
    assert list(response.json()) == ["serial_number"]


@pytest.mark.parametrize("version", ["2.0 beta", "v2/1", "ünicode", "", "1" * 65])
def test_a_bad_firmware_version_says_what_a_version_is(operator, serial, version):
    body = {"serial_number": serial, "device_type": "sensor", "firmware_version": version}
    response = operator.post("/devices", body, content_type="application/json")
    assert response.status_code == 400
    message = response.json()["firmware_version"][0]
    assert "1-64 characters from letters, digits and . _ + -" in message, message
    assert listed(operator, serial_number=serial) == []  # nothing stored


def test_a_bad_firmware_version_in_an_update_says_the_same(operator, serial):
    device = device_register(serial_number=serial, device_type="sensor", firmware_version="1.0.0").device
    response = operator.patch(f"/devices/{device.pk}", {"firmware_version": "2.0 rc1"}, content_type="application/json")
    assert response.status_code == 400
    assert response.json() == {"firmware_version": [VERSION_RULE]}
    accepted = operator.patch(
        f"/devices/{device.pk}", {"firmware_version": "2.0.a3f1+b_7-x"}, content_type="application/json"
    )
    assert accepted.status_code == 200 and accepted.json()["firmware_version"] == "2.0.a3f1+b_7-x"
