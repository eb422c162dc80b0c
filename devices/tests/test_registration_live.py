"""Seed task 1 (registration race), ported to the live multi-process server, and scaled up."""

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.live


def register(api, serial, key=None, **fields):
    body = {"serial_number": serial, "device_type": "sensor", "firmware_version": "1.0.0", **fields}
    headers = {"Idempotency-Key": key} if key else {}
    return api.post("/devices", json=body, headers=headers)


def test_concurrent_registration_creates_single_device(api, unique_id):
    serial = f"SN-CONCURRENT-{unique_id}"
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda i: register(api, serial, f"reg-{unique_id}-{i}"), range(50)))
    assert all(r.status_code in (200, 201) for r in results)
    assert len({r.json()["id"] for r in results}) == 1


def test_duplicate_returns_same_device_id(api, unique_id):
    serial = f"SN-DUPLICATE-{unique_id}"
    first = register(api, serial, f"reg1-{unique_id}")
    second = register(api, serial, f"reg2-{unique_id}", device_type="gateway", firmware_version="2.0.0")
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]


def test_different_serials_create_different_devices(api, unique_id):
    first = register(api, f"SN-FIRST-{unique_id}", f"reg1-{unique_id}")
    second = register(api, f"SN-SECOND-{unique_id}", f"reg2-{unique_id}")
    assert first.json()["id"] != second.json()["id"]


def test_high_concurrency_maintains_uniqueness(api, unique_id):
    serial = f"SN-HIGHLOAD-{unique_id}"
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda _: register(api, serial, str(uuid.uuid4())), range(100)))
    assert len({r.json()["id"] for r in results}) == 1


def test_mixed_concurrent_registrations(api, unique_id):
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(
            pool.map(lambda i: register(api, f"SN-MIXED-{unique_id}-{i}", f"reg-{unique_id}-{i}"), range(20))
        )
    assert all(r.status_code == 201 for r in results)
    assert len({r.json()["id"] for r in results}) == 20


def test_concurrent_with_same_idempotency_key(api, unique_id):
    serial = f"SN-IDEMPOTENT-{unique_id}"
    key = f"same-key-{unique_id}"
    with ThreadPoolExecutor(max_workers=30) as pool:
        results = list(pool.map(lambda _: register(api, serial, key), range(30)))
    # Every caller gets the first response replayed: the same status and body.
    assert {r.status_code for r in results} == {201}
    assert len({r.json()["id"] for r in results}) == 1
    assert len({r.json()["device_token"] for r in results}) == 1
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in results) == 29


def test_registration_preserves_first_request_data(api, unique_id):
    serial = f"SN-DATA-{unique_id}"
    first = register(api, serial, f"reg1-{unique_id}", location="Building A").json()
    second = register(
        api, serial, f"reg2-{unique_id}", device_type="gateway", firmware_version="2.0.0", location="Building B"
    ).json()
    assert first["id"] == second["id"]
    assert second["device_type"] == "sensor"
    assert second["firmware_version"] == "1.0.0"
    assert second["location"] == "Building A"
    assert "device_token" not in second


def test_200_concurrent_registrations_of_one_serial_give_one_device(api, unique_id, django_db_blocker):
    """200 simultaneous callers, no idempotency keys, spread over both server processes."""
    from devices.models import Device

    serial = f"SN-STORM-{unique_id}"
    with ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(lambda i: register(api, serial, location=f"caller-{i}"), range(200)))
    statuses = [r.status_code for r in results]
    assert statuses.count(201) == 1 and statuses.count(200) == 199
    ids = {r.json()["id"] for r in results}
    assert len(ids) == 1
    winner = next(r.json() for r in results if r.status_code == 201)
    # Every caller sees the first request's data, not its own.
    assert {r.json()["location"] for r in results} == {winner["location"]}
    with django_db_blocker.unblock():
        assert Device.objects.filter(serial_number=serial).count() == 1


def test_idempotency_key_with_different_body_is_422(api, unique_id):
    key = f"k-{unique_id}"
    assert register(api, f"SN-A-{unique_id}", key).status_code == 201
    reused = register(api, f"SN-B-{unique_id}", key)
    assert reused.status_code == 422
    assert "different request body" in reused.json()["detail"]


def test_idempotent_replay_returns_first_response(api, unique_id):
    key = f"k-{unique_id}"
    first = register(api, f"SN-R-{unique_id}", key)
    again = register(api, f"SN-R-{unique_id}", key)
    assert (again.status_code, again.json()) == (first.status_code, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"


def test_registration_returns_working_device_token(api, anonymous, unique_id):
    created = register(api, f"SN-TOKEN-{unique_id}").json()
    token = created["device_token"]
    assert len(token) >= 40
    # A device credential is not an operator credential.
    response = anonymous.get(f"/devices/{created['id']}", headers={"Authorization": f"Device {token}"})
    assert response.status_code == 403
    response = anonymous.get(f"/devices/{created['id']}", headers={"Authorization": "Device wrong"})
    assert response.status_code == 401


def test_reads_return_exactly_what_registration_returned(api, unique_id):
    created = register(api, f"SN-SAME-{unique_id}", metadata={"fw": {"channel": "beta"}}).json()
    created.pop("device_token")
    first_read = api.get(f"/devices/{created['id']}").json()  # from Postgres, fills the cache
    second_read = api.get(f"/devices/{created['id']}").json()  # from the cache
    assert first_read == created
    assert second_read == created
