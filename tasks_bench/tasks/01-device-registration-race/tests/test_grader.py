"""Grader for task 01 (device registration race), over HTTP against the live platform.

Ported from the seed's grader (the same scenarios, requests and concurrency), plus what a client
can check beyond the ids it was given: exactly one `201` per serial number, and
`GET /devices?serial_number=...` listing exactly one device. Concurrent requests are released
together (a barrier per wave), and each concurrency scenario is played for ROUNDS serial numbers:
a check-then-insert registration loses some races but not every one, and a grader must tell it
apart from the atomic one on every run.
"""

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.live

# Serial numbers raced in turn by each concurrency grader: a check-then-insert registration does not lose
# every race, so each grader gives it this many chances to, and must see one device every time.
ROUNDS = 10


def register(api, serial: str, key: str | None = None, **fields):
    body = {"serial_number": serial, "device_type": "sensor", "firmware_version": "1.0.0", **fields}
    headers = {"Idempotency-Key": key} if key else {}
    return api.post("/devices", json=body, headers=headers)


def burst(api, serial: str, *, count: int, workers: int, key=None) -> list:
    """`count` registrations of `serial` on `workers` threads, released `workers` at a time.

    `key(i)` gives request i's Idempotency-Key (None: no header). `count` is a multiple of `workers`.
    """
    assert count % workers == 0
    barrier = threading.Barrier(workers, timeout=60)

    def one(i: int):
        barrier.wait()
        return register(api, serial, key(i) if key else None)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(count)))


def listed(api, serial: str) -> list[str]:
    """The ids `GET /devices?serial_number=` lists for `serial`."""
    response = api.get("/devices", params={"serial_number": serial, "limit": 1000})
    assert response.status_code == 200, response.text
    return [device["id"] for device in response.json()["results"]]


def assert_one_device(api, serial: str, results: list) -> None:
    statuses = [r.status_code for r in results]
    assert set(statuses) <= {200, 201}, statuses
    ids = {r.json()["id"] for r in results}
    assert len(ids) == 1, f"{len(ids)} devices for serial number {serial}"
    assert statuses.count(201) == 1, f"{statuses.count(201)} registrations answered 201 (created)"
    assert listed(api, serial) == list(ids)


def test_concurrent_registration_creates_single_device(api, unique_id):
    """50 concurrent registrations with one serial number (10 at a time) create one device; for 10 serial
    numbers in turn (only the first wave of each can race: once the device exists, a lookup finds it)."""
    for n in range(ROUNDS):
        serial = f"SN-CONCURRENT-{unique_id}-{n}"
        results = burst(api, serial, count=50, workers=10, key=lambda i, n=n: f"reg-{unique_id}-{n}-{i}")
        assert_one_device(api, serial, results)


def test_duplicate_returns_same_device_id(api, unique_id):
    serial = f"SN-DUPLICATE-{unique_id}"
    first = register(api, serial, f"reg1-{unique_id}")
    second = register(api, serial, f"reg2-{unique_id}", device_type="gateway", firmware_version="2.0.0")
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]


def test_different_serials_create_different_devices(api, unique_id):
    first = register(api, f"SN-FIRST-{unique_id}", f"reg1-{unique_id}")
    second = register(api, f"SN-SECOND-{unique_id}", f"reg2-{unique_id}")
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json()["id"] != second.json()["id"]


def test_high_concurrency_maintains_uniqueness(api, unique_id):
    """100 concurrent registrations (20 at a time), each with a key of its own, create one device; for 10
    serial numbers in turn."""
    for n in range(ROUNDS):
        serial = f"SN-HIGHLOAD-{unique_id}-{n}"
        results = burst(api, serial, count=100, workers=20, key=lambda i: str(uuid.uuid4()))
        assert_one_device(api, serial, results)


def test_concurrent_registrations_without_idempotency_keys(api, unique_id):
    """The same without any Idempotency-Key (nothing but the serial number ties the requests together):
    10 serial numbers, each registered by 20 requests at once."""
    for n in range(ROUNDS):
        serial = f"SN-NOKEY-{unique_id}-{n}"
        results = burst(api, serial, count=20, workers=20)
        assert_one_device(api, serial, results)


def test_bursts_on_many_serials_each_make_one_device(api, unique_id):
    """10 serial numbers, each registered by 20 requests at once: one device each."""
    serials = [f"SN-BURST-{unique_id}-{n}" for n in range(ROUNDS)]
    for serial in serials:
        results = burst(api, serial, count=20, workers=20, key=lambda i: str(uuid.uuid4()))
        assert_one_device(api, serial, results)


def test_mixed_concurrent_registrations(api, unique_id):
    """20 different serial numbers registered concurrently: 20 devices."""

    def one(i: int):
        return register(api, f"SN-MIXED-{unique_id}-{i}", f"reg-{unique_id}-{i}")

    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(one, range(20)))
    assert [r.status_code for r in results] == [201] * 20
    assert len({r.json()["id"] for r in results}) == 20


def test_concurrent_with_same_idempotency_key(api, unique_id):
    """30 concurrent requests with one Idempotency-Key: one device, the first answer replayed to all."""
    serial = f"SN-IDEMPOTENT-{unique_id}"
    key = f"same-key-{unique_id}"
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda _: register(api, serial, key), range(30)))
    assert {r.status_code for r in results} == {201}
    assert len({r.json()["id"] for r in results}) == 1
    assert listed(api, serial) == [results[0].json()["id"]]


def test_registration_preserves_first_request_data(api, unique_id):
    serial = f"SN-DATA-{unique_id}"
    first = register(api, serial, f"reg1-{unique_id}", location="Building A")
    assert first.status_code == 201, first.text
    second = register(
        api, serial, f"reg2-{unique_id}", device_type="gateway", firmware_version="2.0.0", location="Building B"
    )
    assert second.status_code == 200, second.text
    data = second.json()
    assert data["id"] == first.json()["id"]
    assert (data["device_type"], data["firmware_version"], data["location"]) == ("sensor", "1.0.0", "Building A")
    assert "device_token" not in data
