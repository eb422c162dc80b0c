"""Seed task 7/8 (cache invalidation), ported to the live multi-process server, and a
readers-versus-writers race across processes."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC

import pytest

pytestmark = pytest.mark.live


@pytest.fixture
def device_id(api, unique_id):
    response = api.post(
        "/devices",
        json={
            "serial_number": f"SN-CACHE-{unique_id}",
            "device_type": "sensor",
            "firmware_version": "1.0.0",
            "location": "Building A",
        },
        headers={"Idempotency-Key": f"reg-cache-{unique_id}"},
    )
    assert response.status_code == 201
    return response.json()["id"]


def patch(api, device_id, **changes):
    response = api.patch(f"/devices/{device_id}", json=changes)
    assert response.status_code == 200, response.text
    return response.json()


def read(api, device_id):
    response = api.get(f"/devices/{device_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_device_update_invalidates_cache_immediately(api, device_id):
    assert read(api, device_id)["location"] == "Building A"
    patch(api, device_id, location="Building B")
    assert read(api, device_id)["location"] == "Building B"


def test_multiple_rapid_updates_no_stale_reads(api, device_id):
    for location in ["Floor 1", "Floor 2", "Floor 3", "Floor 4", "Floor 5"]:
        read(api, device_id)  # warm the cache with the old value each time
        patch(api, device_id, location=location)
        assert read(api, device_id)["location"] == location


def test_concurrent_updates_maintain_cache_consistency(api, device_id):
    locations = [f"Location-{i}" for i in range(20)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(lambda loc: patch(api, device_id, location=loc), locations))
    final = read(api, device_id)["location"]
    assert final in locations
    # Whatever the cache says, Postgres agrees.
    assert all(read(api, device_id)["location"] == final for _ in range(10))


def test_telemetry_updates_last_seen_visible(api, device_id):
    """Seed task 8: after a point is accepted, the next read shows `active` and `last_seen`."""
    from datetime import datetime

    before = read(api, device_id)
    assert before["status"] == "registered" and before["last_seen"] is None
    accepted = api.post(
        "/telemetry/point",
        json={
            "device_id": device_id,
            "timestamp": datetime.now(UTC).replace(tzinfo=None).isoformat(),
            "metric": "temperature",
            "value": 25.0,
        },
    )
    assert accepted.status_code == 202, accepted.text
    after = read(api, device_id)
    assert after["status"] == "active"
    assert after["last_seen"] is not None
    assert after["location"] == before["location"]


def test_status_change_immediately_reflected(api, device_id):
    patch(api, device_id, status="maintenance")
    assert read(api, device_id)["status"] == "maintenance"
    patch(api, device_id, status="active")
    assert read(api, device_id)["status"] == "active"


def test_metadata_updates_not_cached_stale(api, device_id):
    patch(api, device_id, metadata={"sensor_type": "temperature", "calibration": "2023-01"})
    assert read(api, device_id)["metadata"]["sensor_type"] == "temperature"
    patch(api, device_id, metadata={"sensor_type": "humidity"})
    # metadata is replaced as a whole
    assert read(api, device_id)["metadata"] == {"sensor_type": "humidity"}


def test_group_assignment_updates_visible(api, unique_id):
    created = api.post(
        "/devices",
        json={
            "serial_number": f"SN-GROUP-{unique_id}",
            "device_type": "sensor",
            "firmware_version": "1.0.0",
            "group_id": "group-a",
        },
    ).json()
    assert read(api, created["id"])["group_id"] == "group-a"
    patch(api, created["id"], group_id="group-b")
    assert read(api, created["id"])["group_id"] == "group-b"
    listed = api.get("/devices", params={"group_id": "group-b"}).json()["results"]
    assert created["id"] in {d["id"] for d in listed}


def test_concurrent_reads_during_update_consistent(api, device_id):
    patch(api, device_id, location="Initial Location")

    def read_and_update(worker):
        seen = []
        for i in range(5):
            patch(api, device_id, location=f"Location-{worker}-{i}")
            seen.append(read(api, device_id)["location"])
        return seen

    with ThreadPoolExecutor(max_workers=3) as pool:
        seen = [loc for result in pool.map(read_and_update, range(3)) for loc in result]
    assert all(loc.startswith("Location-") for loc in seen)


def test_high_frequency_updates_no_stale_cache(api, device_id):
    for i in range(50):
        patch(api, device_id, location=f"Loc-{i}")
        assert read(api, device_id)["location"] == f"Loc-{i}"


def test_cache_invalidation_across_multiple_devices(api, unique_id):
    ids = [
        api.post(
            "/devices",
            json={
                "serial_number": f"SN-MULTI-{unique_id}-{i}",
                "device_type": "sensor",
                "firmware_version": "1.0.0",
                "location": f"Initial-{i}",
            },
        ).json()["id"]
        for i in range(10)
    ]
    for device in ids:
        read(api, device)
    for i, device in enumerate(ids):
        patch(api, device, location=f"Updated-{i}")
    for i, device in enumerate(ids):
        assert read(api, device)["location"] == f"Updated-{i}"


def test_no_cache_pollution_between_devices(api, unique_id):
    first, second = (
        api.post(
            "/devices",
            json={
                "serial_number": f"SN-{name}-{unique_id}",
                "device_type": "sensor",
                "firmware_version": "1.0.0",
                "location": f"Location {name}",
            },
        ).json()["id"]
        for name in ("A", "B")
    )
    patch(api, first, location="New Location A")
    assert read(api, first)["location"] == "New Location A"
    assert read(api, second)["location"] == "Location B"


def test_readers_never_see_a_value_older_than_a_returned_write(api, device_id):
    """One writer bumps a counter; 16 readers hammer both server processes.

    Each read must show at least the newest counter whose PATCH had returned
    before that read was sent: the read cache may lag nothing a client was told.
    """
    writes = 150
    committed = 0  # highest counter whose PATCH has returned
    done = threading.Event()
    violations: list[tuple[int, int]] = []
    reads = 0
    lock = threading.Lock()

    def writer():
        nonlocal committed
        try:
            for n in range(1, writes + 1):
                patch(api, device_id, location=str(n))
                committed = n
        finally:
            done.set()

    def reader():
        nonlocal reads
        while not done.is_set():
            floor = committed
            location = read(api, device_id)["location"]
            value = int(location) if location.isdigit() else 0
            with lock:
                reads += 1
                if value < floor:
                    violations.append((floor, value))

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(16)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert time.monotonic() - started < 120
    assert reads > writes, "readers must actually interleave with the writes"
    assert violations == []
    assert read(api, device_id)["location"] == str(writes)
