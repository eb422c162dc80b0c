"""Bad input gets a clear 4xx with a useful message, never a 500, and stores nothing."""

import base64
import uuid
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

pytestmark = pytest.mark.live

VALID = {"serial_number": "SN-X", "device_type": "sensor", "firmware_version": "1.0.0"}


@pytest.fixture
def device(api, unique_id):
    return api.post("/devices", json={**VALID, "serial_number": f"SN-BAD-{unique_id}"}).json()


def device_view(device: dict) -> dict:
    """The device as GET shows it (the registration answer adds the token)."""
    return {name: value for name, value in device.items() if name != "device_token"}


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


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "%%%",
        "\u00e9t\u00e9",
        base64.b64encode(b"o=-1").decode(),
        base64.b64encode(b"o=1&r=maybe").decode(),
        base64.b64encode(b"p=not-a-date").decode(),
        base64.b64encode(b"p=2024-01-01T00:00:00%00").decode(),
        base64.b64encode(b"p=9999-12-31T23:59:59-01:00").decode(),
        base64.b64encode(b"o=999999999999").decode(),
        base64.b64encode(b"o=1&o=2").decode(),
        base64.b64encode(b"x=1").decode(),
    ],
)
def test_bad_cursor_is_400_naming_the_cursor(api, cursor):
    """A cursor the server did not make is bad input (400), not a missing page (404), and never a 500."""
    response = api.get("/devices", params={"cursor": cursor})
    assert response.status_code == 400, response.text
    assert "cursor" in response.json()


def test_cursor_the_server_made_still_pages(api, unique_id):
    group = f"grp-cursor-{unique_id}"
    for index in range(3):
        serial = f"SN-CUR-{unique_id}-{index}"
        assert api.post("/devices", json={**VALID, "serial_number": serial, "group_id": group}).status_code == 201
    first = api.get("/devices", params={"group_id": group, "limit": 2})
    assert first.status_code == 200
    assert len(first.json()["results"]) == 2
    cursor = parse_qs(urlsplit(first.json()["next"]).query)["cursor"][0]
    second = api.get("/devices", params={"group_id": group, "limit": 2, "cursor": cursor})
    assert second.status_code == 200, second.text
    assert len(second.json()["results"]) == 1


# --- Strings Postgres cannot store, and nesting the parser cannot follow -------------------
#
# A JSON string may spell the NUL character ("\u0000") or a lone UTF-16 surrogate ("\udc00");
# Postgres refuses the first in text and jsonb, and the second cannot be encoded as UTF-8.
# Either used to reach the database and come back as a 500.

NUL = "\\u0000"
SURROGATE = "\\udc00"


def _raw_json(template: str, serial: str) -> bytes:
    """A body sent byte for byte (httpx's json= cannot encode a lone surrogate)."""
    return template.replace("SERIAL", serial).encode()


REGISTRATION_TEMPLATES = [
    # (raw JSON body with SERIAL as the serial number, the field named in the answer)
    ('{"serial_number": "SERIAL", "device_type": "s", "firmware_version": "1", "metadata": {"k": "a%sb"}}', "metadata"),
    ('{"serial_number": "SERIAL", "device_type": "s", "firmware_version": "1", "metadata": {"a%sb": 1}}', "metadata"),
    (
        '{"serial_number": "SERIAL", "device_type": "s", "firmware_version": "1", "metadata": {"k": [1, {"x": "%s"}]}}',
        "metadata",
    ),
    ('{"serial_number": "SERIAL", "device_type": "s", "firmware_version": "1", "location": "%s"}', "location"),
    ('{"serial_number": "SERIAL", "device_type": "s", "firmware_version": "1", "group_id": "g%s"}', "group_id"),
    ('{"serial_number": "SERIAL", "device_type": "s%s", "firmware_version": "1"}', "device_type"),
    ('{"serial_number": "SERIAL", "device_type": "s", "firmware_version": "1%s"}', "firmware_version"),
    ('{"serial_number": "SERIAL%s", "device_type": "s", "firmware_version": "1"}', "serial_number"),
]


@pytest.mark.parametrize("escape", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize(("template", "field"), REGISTRATION_TEMPLATES)
def test_unstorable_strings_in_registration_are_400(api, django_db_blocker, escape, template, field):
    from devices.models import Device

    serial = f"SN-UNSTORABLE-{uuid.uuid4().hex[:8]}"
    body = _raw_json(template.replace("%s", escape), serial)
    response = api.post("/devices", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    answer = response.json()
    # orjson refuses a lone surrogate while parsing (a `detail`); the fields refuse NUL by name.
    assert field in answer or answer.get("detail", "").startswith("JSON parse error"), answer
    with django_db_blocker.unblock():
        assert not Device.objects.filter(serial_number__startswith=serial).exists()


@pytest.mark.parametrize("escape", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize(
    ("template", "field"),
    [
        ('{"metadata": {"k": "a%sb"}}', "metadata"),
        ('{"metadata": {"%s": true}}', "metadata"),
        ('{"location": "x%s"}', "location"),
        ('{"group_id": "%s"}', "group_id"),
        ('{"device_type": "%s"}', "device_type"),
    ],
)
def test_unstorable_strings_in_patch_are_400(api, device, escape, template, field):
    body = template.replace("%s", escape).encode()
    response = api.patch(f"/devices/{device['id']}", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    answer = response.json()
    assert field in answer or answer.get("detail", "").startswith("JSON parse error"), answer
    assert api.get(f"/devices/{device['id']}").json() == device_view(device)


def test_nul_in_metadata_names_where_it_is(api, unique_id):
    body = {**VALID, "serial_number": f"SN-NUL-{unique_id}", "metadata": {"site": {"rack": ["ok", "b\x00d"]}}}
    response = api.post("/devices", json=body)
    assert response.status_code == 400, response.text
    message = response.json()["metadata"][0]
    assert "\\u0000" in message and "site" in message and "rack" in message, message


def test_raw_utf8_surrogate_bytes_are_400(api, unique_id):
    body = b'{"serial_number": "SN-SUR-' + unique_id.encode() + b'", "device_type": "s", "firmware_version": "1", '
    body += b'"metadata": {"k": "\xed\xb0\x80"}}'
    response = api.post("/devices", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text


def _nested(depth: int, leaf: str = "1") -> str:
    return '{"a": ' * depth + leaf + "}" * depth


@pytest.mark.parametrize("depth", [40, 1000, 1024, 1025, 100_000])
def test_deeply_nested_registration_is_400_and_stores_nothing(api, django_db_blocker, depth):
    from devices.models import Device

    serial = f"SN-DEEP-{uuid.uuid4().hex[:8]}"
    body = f'{{"serial_number": "{serial}", "device_type": "s", "firmware_version": "1", "metadata": {_nested(depth)}}}'
    response = api.post("/devices", content=body.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text[:500]
    answer = response.json()
    assert "metadata" in answer or answer["detail"].startswith("JSON parse error"), answer
    with django_db_blocker.unblock():
        assert not Device.objects.filter(serial_number=serial).exists()


@pytest.mark.parametrize("depth", [1000, 100_000])
@pytest.mark.parametrize("shape", ["object", "list"])
def test_deeply_nested_patch_is_400_and_changes_nothing(api, device, depth, shape):
    body = '{"metadata": ' + _nested(depth) + "}" if shape == "object" else "[" * depth + "]" * depth
    response = api.patch(
        f"/devices/{device['id']}", content=body.encode(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text[:500]
    assert api.get(f"/devices/{device['id']}").json() == device_view(device)


def test_metadata_nested_to_the_documented_depth_is_stored(api, unique_id):
    from iot.api.serializers import JSON_OBJECT_MAX_DEPTH

    metadata = orjson.loads(_nested(JSON_OBJECT_MAX_DEPTH))
    body = {**VALID, "serial_number": f"SN-DEPTH-{unique_id}", "metadata": metadata}
    response = api.post("/devices", json=body)
    assert response.status_code == 201, response.text
    assert api.get(f"/devices/{response.json()['id']}").json()["metadata"] == metadata


@pytest.mark.parametrize("number", ["1e20", "-1e19", "18446744073709551616", "1.5e300", "9223372036854775808"])
def test_metadata_number_postgres_would_hand_back_too_big_is_400(api, django_db_blocker, number):
    """jsonb returns 1e20 as the integer 100000000000000000000; the device cache could not serialize it,
    so every read of the device (and of its telemetry) answered 500 from then on."""
    from devices.models import Device

    serial = f"SN-BIGNUM-{uuid.uuid4().hex[:8]}"
    body = (
        f'{{"serial_number": "{serial}", "device_type": "s", "firmware_version": "1", "metadata": {{"n": {number}}}}}'
    )
    response = api.post("/devices", content=body.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "metadata" in response.json()
    with django_db_blocker.unblock():
        assert not Device.objects.filter(serial_number=serial).exists()


def test_metadata_numbers_within_64_bits_round_trip(api, unique_id):
    metadata = {"big": 9223372036854775807, "small": -9223372036854775807, "float": 1e18, "tiny": 1e-300}
    response = api.post("/devices", json={**VALID, "serial_number": f"SN-NUM-{unique_id}", "metadata": metadata})
    assert response.status_code == 201, response.text
    for _ in range(2):  # the first read fills the cache, the second is served from it
        read = api.get(f"/devices/{response.json()['id']}")
        assert read.status_code == 200, read.text
        assert read.json()["metadata"] == metadata
    assert api.get(f"/telemetry/{response.json()['id']}").status_code == 200


@pytest.mark.parametrize(
    "params",
    [
        {"group_id": "a\x00b"},
        {"status": "\x00"},
        {"limit": "1\x00"},
        {"cursor": "\x00"},
        {"nonsense": "1"},
    ],
)
def test_bad_list_query_strings_are_400(api, params):
    response = api.get("/devices", params=params)
    assert response.status_code == 400, response.text
    assert set(params) & set(response.json()), response.json()


def test_surrogate_escapes_in_the_query_string_are_not_a_500(api):
    response = api.get("/devices?group_id=%ED%B0%80&status=active")
    assert response.status_code == 200, response.text


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
