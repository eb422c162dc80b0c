"""Grader for task 08 (device cache invalidation under concurrency), over HTTP against the live platform.

Ported from the seed's grader (the same scenarios and request counts), with the end state of concurrent
updates checked against the registry: `GET /devices?serial_number=...` lists the device from the
database, so once the writes have returned every read must agree with it. Plus readers racing a writer
across both web processes (the last test): no read may show a value that a write which had already
returned had replaced.
"""

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from iot.testing.live import register_device
from iot.testing.telemetry import point_body

pytestmark = pytest.mark.live


@pytest.fixture
def device(api, unique_id):
    return register_device(api, "SN-CACHE", idempotency_key=f"reg-cache-{unique_id}", location="Building A")


@pytest.fixture
def device_id(device):
    return device["id"]


def patch(api, device_id, **changes) -> dict:
    response = api.patch(f"/devices/{device_id}", json=changes)
    assert response.status_code == 200, response.text
    return response.json()


def read(api, device_id) -> dict:
    response = api.get(f"/devices/{device_id}")
    assert response.status_code == 200, response.text
    return response.json()


def in_registry(api, serial_number: str) -> dict:
    """The device as the registry's list shows it (a database query)."""
    response = api.get("/devices", params={"serial_number": serial_number})
    assert response.status_code == 200, response.text
    (found,) = response.json()["results"]
    return found


def test_device_update_invalidates_cache_immediately(api, device_id):
    assert read(api, device_id)["location"] == "Building A"
    patch(api, device_id, location="Building B")
    assert read(api, device_id)["location"] == "Building B"


def test_multiple_rapid_updates_no_stale_reads(api, device_id):
    for location in ["Floor 1", "Floor 2", "Floor 3", "Floor 4", "Floor 5"]:
        read(api, device_id)
        patch(api, device_id, location=location)
        assert read(api, device_id)["location"] == location


def test_concurrent_updates_maintain_cache_consistency(api, device):
    """20 concurrent updates (10 at a time): afterwards every read shows what the registry holds."""
    locations = [f"Location-{i}" for i in range(20)]
    assert read(api, device["id"])["location"] == "Building A"
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda loc: patch(api, device["id"], location=loc)["location"], locations))
    assert sorted(answers) == sorted(locations)
    final = in_registry(api, device["serial_number"])["location"]
    assert final in locations
    assert [read(api, device["id"])["location"] for _ in range(10)] == [final] * 10


def test_telemetry_updates_last_seen_visible(api, device_id):
    before = read(api, device_id)
    assert before["status"] == "registered" and before["last_seen"] is None
    sent = datetime.now(UTC)
    accepted = api.post("/telemetry/point", json=point_body(device_id))
    answered = datetime.now(UTC)
    assert accepted.status_code == 202, accepted.text
    after = read(api, device_id)
    assert after["status"] == "active"
    assert sent <= datetime.fromisoformat(after["last_seen"]) <= answered
    assert after["location"] == before["location"]


def test_status_change_immediately_reflected(api, device_id):
    patch(api, device_id, status="maintenance")
    assert read(api, device_id)["status"] == "maintenance"
    patch(api, device_id, status="active")
    assert read(api, device_id)["status"] == "active"


def test_metadata_updates_not_cached_stale(api, device_id):
    patch(api, device_id, metadata={"sensor_type": "temperature", "calibration": "2023-01"})
    assert read(api, device_id)["metadata"]["sensor_type"] == "temperature"
    patch(api, device_id, metadata={"sensor_type": "humidity", "calibration": "2024-01"})
    assert read(api, device_id)["metadata"]["sensor_type"] == "humidity"


def test_group_assignment_updates_visible(api, unique_id):
    created = register_device(api, "SN-GROUP", idempotency_key=f"reg-group-{unique_id}", group_id="group-a")
    assert read(api, created["id"])["group_id"] == "group-a"
    patch(api, created["id"], group_id="group-b")
    assert read(api, created["id"])["group_id"] == "group-b"


def test_concurrent_reads_during_update_consistent(api, device_id):
    """The seed's 3 clients that each PATCH then GET, 5 times, all at once: every GET shows a value one
    of the writes set (the exact ordering check, with readers racing a writer, is the last test)."""
    patch(api, device_id, location="Initial Location")

    def read_and_update(worker: int) -> list[str]:
        seen = []
        for i in range(5):
            patch(api, device_id, location=f"Location-{worker}-{i}")
            seen.append(read(api, device_id)["location"])
        return seen

    with ThreadPoolExecutor(max_workers=3) as pool:
        observed = [location for seen in pool.map(read_and_update, range(3)) for location in seen]
    assert len(observed) == 15
    assert all(location.startswith("Location-") or location == "Initial Location" for location in observed)


def test_high_frequency_updates_no_stale_cache(api, device_id):
    for i in range(50):
        patch(api, device_id, location=f"Loc-{i}")
        if i % 10 == 0:
            assert read(api, device_id)["location"] == f"Loc-{i}"


def test_cache_invalidation_across_multiple_devices(api, unique_id):
    ids = [
        register_device(api, "SN-MULTI", idempotency_key=f"reg-multi-{unique_id}-{i}", location=f"Initial-{i}")["id"]
        for i in range(10)
    ]
    for device_id in ids:
        read(api, device_id)
    for i, device_id in enumerate(ids):
        patch(api, device_id, location=f"Updated-{i}")
    for i, device_id in enumerate(ids):
        assert read(api, device_id)["location"] == f"Updated-{i}"


def test_no_cache_pollution_between_devices(api, unique_id):
    first = register_device(api, "SN-A", idempotency_key=f"reg-a-{unique_id}", location="Location A")["id"]
    second = register_device(api, "SN-B", idempotency_key=f"reg-b-{unique_id}", location="Location B")["id"]
    patch(api, first, location="New Location A")
    assert read(api, first)["location"] == "New Location A"
    assert read(api, second)["location"] == "Location B"


def test_readers_never_see_a_value_older_than_a_returned_write(api, device):
    """One writer bumps a counter 150 times while 16 readers hammer both web processes.

    Each read must show at least the newest counter whose PATCH had returned before that read was
    sent (the cache may lag nothing a client was told), and the end state is the registry's.
    """
    device_id = device["id"]
    writes = 150
    committed = 0  # the highest counter whose PATCH has returned
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
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    assert not any(thread.is_alive() for thread in threads), "the writer or a reader never finished"
    assert reads > writes, "readers must actually interleave with the writes"
    assert violations == [], f"{len(violations)} stale reads, the first (expected at least, got): {violations[:5]}"
    assert in_registry(api, device["serial_number"])["location"] == str(writes)
    assert [read(api, device_id)["location"] for _ in range(10)] == [str(writes)] * 10
