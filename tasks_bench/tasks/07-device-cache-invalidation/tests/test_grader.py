"""Grader for task 07 (device cache invalidation), over HTTP against the live platform.

The seed has no grader tests for this task; these check the task.yaml requirements as a client sees
them. Every test reads the device first, so that whatever a server may cache holds the old values, then
changes it and reads again: `GET /devices/{id}` must show the change at once, on either web process.
`GET /devices?serial_number=...` lists the device from the database, so it is also compared with the
read of the device itself.
"""

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from iot.testing.live import register_device
from iot.testing.processes import wait_until
from iot.testing.telemetry import point_body

pytestmark = pytest.mark.live


@pytest.fixture
def device(api):
    return register_device(api, "SN-CACHE7", location="Building A")


def patch(api, device_id, **changes) -> dict:
    response = api.patch(f"/devices/{device_id}", json=changes)
    assert response.status_code == 200, response.text
    return response.json()


def read(api, device_id) -> dict:
    response = api.get(f"/devices/{device_id}")
    assert response.status_code == 200, response.text
    return response.json()


def listed(api, serial_number: str) -> dict:
    """The device as the list (a query of the registry) shows it."""
    response = api.get("/devices", params={"serial_number": serial_number})
    assert response.status_code == 200, response.text
    (found,) = response.json()["results"]
    return found


def warm(api, device_id, times: int = 4) -> dict:
    """Read the device a few times (both web processes, whatever they cache); the last read."""
    for _ in range(times):
        last = read(api, device_id)
    return last


def test_update_visible_immediately(api, device):
    assert warm(api, device["id"])["location"] == "Building A"
    patch(api, device["id"], location="Building B")
    assert read(api, device["id"])["location"] == "Building B"
    assert [read(api, device["id"])["location"] for _ in range(6)] == ["Building B"] * 6


def test_rapid_successive_updates_never_stale(api, device):
    for floor in range(1, 6):
        warm(api, device["id"], times=2)
        patch(api, device["id"], location=f"Floor {floor}")
        assert read(api, device["id"])["location"] == f"Floor {floor}"


def test_concurrent_updates_end_consistent(api, device):
    """20 concurrent updates (10 at a time): afterwards every read shows what the registry holds."""
    warm(api, device["id"])
    locations = [f"Location-{i}" for i in range(20)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda loc: patch(api, device["id"], location=loc)["location"], locations))
    assert sorted(answers) == sorted(locations)
    final = listed(api, device["serial_number"])["location"]
    assert final in locations
    assert [read(api, device["id"])["location"] for _ in range(10)] == [final] * 10


def test_telemetry_updates_last_seen_and_status(api, device):
    """A point accepted from the device makes it `active` with a new `last_seen`, visible at once."""
    before = warm(api, device["id"])
    assert before["status"] == "registered" and before["last_seen"] is None
    sent = datetime.now(UTC)
    accepted = api.post("/telemetry/point", json=point_body(device["id"]))
    assert accepted.status_code == 202, accepted.text
    after = read(api, device["id"])
    assert after["status"] == "active"
    assert after["last_seen"] is not None and datetime.fromisoformat(after["last_seen"]) >= sent
    assert after["location"] == before["location"]
    # Later points move last_seen on (it has a resolution of about a second): each read right after a
    # point shows what that point did.

    def moved_on() -> bool:
        warm(api, device["id"], times=2)
        assert api.post("/telemetry/point", json=point_body(device["id"])).status_code == 202
        return read(api, device["id"])["last_seen"] > after["last_seen"]

    wait_until(moved_on, timeout=15, interval=0.2, message="a later point's last_seen in the device read")


def test_status_change_immediately_reflected(api, device):
    warm(api, device["id"])
    patch(api, device["id"], status="maintenance")
    assert read(api, device["id"])["status"] == "maintenance"
    warm(api, device["id"])
    patch(api, device["id"], status="active")
    assert read(api, device["id"])["status"] == "active"


def test_metadata_updates_not_served_stale(api, device):
    patch(api, device["id"], metadata={"sensor_type": "temperature", "calibration": "2023-01"})
    assert warm(api, device["id"])["metadata"] == {"sensor_type": "temperature", "calibration": "2023-01"}
    patch(api, device["id"], metadata={"sensor_type": "humidity", "calibration": "2024-01"})
    assert read(api, device["id"])["metadata"] == {"sensor_type": "humidity", "calibration": "2024-01"}


def test_group_reassignment_visible_immediately(api):
    """The seed's story: devices moved from one group to another are routed by the new group at once."""
    devices = [register_device(api, "SN-GROUP7", group_id="building-a") for _ in range(5)]
    for device in devices:
        assert warm(api, device["id"], times=2)["group_id"] == "building-a"
    for device in devices:
        patch(api, device["id"], group_id="building-b")
    assert [read(api, device["id"])["group_id"] for device in devices] == ["building-b"] * 5
    assert all(listed(api, device["serial_number"])["group_id"] == "building-b" for device in devices)


def test_high_frequency_updates_no_stale_hits(api, device):
    """60 updates in a row, each followed by reads: never the previous value."""
    for i in range(60):
        patch(api, device["id"], location=f"Loc-{i}")
        assert [read(api, device["id"])["location"] for _ in range(2)] == [f"Loc-{i}"] * 2


def test_invalidation_across_many_devices(api):
    devices = [register_device(api, "SN-MULTI7", location=f"Initial-{i}") for i in range(10)]
    for device in devices:
        warm(api, device["id"], times=2)
    for i, device in enumerate(devices):
        patch(api, device["id"], location=f"Updated-{i}")
    assert [read(api, device["id"])["location"] for device in devices] == [f"Updated-{i}" for i in range(10)]


def test_no_cache_pollution_between_devices(api):
    first = register_device(api, "SN-A7", location="Location A")
    second = register_device(api, "SN-B7", location="Location B")
    warm(api, first["id"])
    warm(api, second["id"])
    patch(api, first["id"], location="New Location A")
    assert read(api, first["id"])["location"] == "New Location A"
    assert read(api, second["id"])["location"] == "Location B"
    assert listed(api, second["serial_number"])["location"] == "Location B"


def test_read_agrees_with_the_registry(api, device):
    """After any mix of changes, the device read and the registry's list agree on every field."""
    warm(api, device["id"])
    patch(api, device["id"], location="Dock 4", group_id="dock", metadata={"rack": 7})
    warm(api, device["id"])
    assert api.post("/telemetry/point", json=point_body(device["id"])).status_code == 202
    patch(api, device["id"], firmware_version="2.1.0", device_type="gateway")
    read_back = read(api, device["id"])
    in_registry = listed(api, device["serial_number"])
    fields = ["location", "group_id", "metadata", "firmware_version", "device_type", "status", "last_seen"]
    assert {f: read_back[f] for f in fields} == {f: in_registry[f] for f in fields}
