"""Seed task 7/8 (cache invalidation), ported to the live multi-process server, and readers-versus-writers
races across processes.

The concurrent tests check every read against the writes' timings: a read may show any write that could be
the newest one when it was served, never one that a write which had already returned had replaced.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from devices.models import Device
from iot.testing.live import register_device
from iot.testing.telemetry import point_body

pytestmark = pytest.mark.live


@pytest.fixture
def device_id(api, unique_id):
    registered = register_device(api, "SN-CACHE", idempotency_key=f"reg-cache-{unique_id}", location="Building A")
    return registered["id"]


def patch(api, device_id, **changes):
    response = api.patch(f"/devices/{device_id}", json=changes)
    assert response.status_code == 200, response.text
    return response.json()


def read(api, device_id):
    response = api.get(f"/devices/{device_id}")
    assert response.status_code == 200, response.text
    return response.json()


@dataclass(frozen=True)
class Op:
    """A PATCH or GET of `location`, with when it was sent and when its answer came (`time.monotonic()`)."""

    sent: float
    returned: float
    location: str


def timed_patch(api, device_id, location: str) -> Op:
    sent = time.monotonic()
    answer = patch(api, device_id, location=location)
    assert answer["location"] == location
    return Op(sent, time.monotonic(), location)


def timed_read(api, device_id) -> Op:
    sent = time.monotonic()
    location = read(api, device_id)["location"]
    return Op(sent, time.monotonic(), location)


def stale_reads(writes: list[Op], reads: list[Op]) -> list[tuple[Op, str]]:
    """The reads no order of the writes explains, with why.

    Every write sets a distinct location, so a read's value names its write W. The read is wrong if W had
    not been sent when the read returned, or if another write was sent after W returned and itself returned
    before the read was sent: whatever order Postgres applied them in, that one came after W and was
    acknowledged, so serving W's value is a stale cache entry.
    """
    by_location = {write.location: write for write in writes}
    assert len(by_location) == len(writes), "every write must set a distinct value"
    wrong = []
    for observed in reads:
        source = by_location.get(observed.location)
        if source is None:
            wrong.append((observed, "a value nobody wrote"))
        elif source.sent > observed.returned:
            wrong.append((observed, "a value written after the read returned"))
        elif any(later.sent > source.returned and later.returned < observed.sent for later in writes):
            wrong.append((observed, "a value an acknowledged later write had replaced"))
    return wrong


def newest_candidates(writes: list[Op]) -> set[str]:
    """The values that may be last: those of the writes no other write was certainly sent after."""
    return {w.location for w in writes if not any(other.sent > w.returned for other in writes)}


def postgres_row(django_db_blocker, device_id) -> Device:
    with django_db_blocker.unblock():
        return Device.objects.get(pk=device_id)


def test_device_update_invalidates_cache_immediately(api, device_id):
    assert read(api, device_id)["location"] == "Building A"
    patch(api, device_id, location="Building B")
    assert read(api, device_id)["location"] == "Building B"


def test_multiple_rapid_updates_no_stale_reads(api, device_id):
    for location in ["Floor 1", "Floor 2", "Floor 3", "Floor 4", "Floor 5"]:
        read(api, device_id)  # warm the cache with the old value each time
        patch(api, device_id, location=location)
        assert read(api, device_id)["location"] == location


def test_concurrent_updates_maintain_cache_consistency(api, device_id, django_db_blocker):
    locations = [f"Location-{i}" for i in range(20)]
    assert read(api, device_id)["location"] == "Building A"  # cached now: the PATCHes must displace it
    with ThreadPoolExecutor(max_workers=10) as pool:
        writes = list(pool.map(lambda loc: timed_patch(api, device_id, loc), locations))
    row = postgres_row(django_db_blocker, device_id)
    assert row.version == 1 + len(locations), "every PATCH applied once, none lost"
    assert row.location in newest_candidates(writes)
    # Both server processes' reads (cached or not) show exactly what Postgres holds.
    assert [read(api, device_id)["location"] for _ in range(10)] == [row.location] * 10


def test_telemetry_updates_last_seen_visible(api, device_id):
    """Seed task 8: after a point is accepted, the next read shows `active` and `last_seen`."""
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
    assert read(api, device_id)["metadata"] == {"sensor_type": "temperature", "calibration": "2023-01"}
    patch(api, device_id, metadata={"sensor_type": "humidity"})
    # metadata is replaced as a whole
    assert read(api, device_id)["metadata"] == {"sensor_type": "humidity"}


def test_group_assignment_updates_visible(api):
    created = register_device(api, "SN-GROUP", group_id="group-a")
    assert read(api, created["id"])["group_id"] == "group-a"
    patch(api, created["id"], group_id="group-b")
    assert read(api, created["id"])["group_id"] == "group-b"
    listed = api.get("/devices", params={"group_id": "group-b"}).json()["results"]
    assert created["id"] in {d["id"] for d in listed}


def test_concurrent_reads_during_update_consistent(api, device_id, django_db_blocker):
    """3 clients each PATCH then GET, 5 times, at once: every GET shows a value some order of the writes
    explains (at the latest its own client's write, or one racing with it), and the end state is Postgres'."""
    writes = [timed_patch(api, device_id, "Initial Location")]
    reads: list[Op] = []
    lock = threading.Lock()

    def read_and_update(worker):
        for i in range(5):
            written = timed_patch(api, device_id, f"Location-{worker}-{i}")
            observed = timed_read(api, device_id)
            with lock:
                writes.append(written)
                reads.append(observed)

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(read_and_update, range(3)))
    assert len(writes) == 16 and len(reads) == 15
    assert stale_reads(writes, reads) == []
    row = postgres_row(django_db_blocker, device_id)
    assert row.version == 1 + len(writes)
    assert row.location in newest_candidates(writes)
    assert [read(api, device_id)["location"] for _ in range(10)] == [row.location] * 10


def test_high_frequency_updates_no_stale_cache(api, device_id):
    for i in range(50):
        patch(api, device_id, location=f"Loc-{i}")
        assert read(api, device_id)["location"] == f"Loc-{i}"


def test_cache_invalidation_across_multiple_devices(api):
    ids = [register_device(api, "SN-MULTI", location=f"Initial-{i}")["id"] for i in range(10)]
    for device in ids:
        read(api, device)
    for i, device in enumerate(ids):
        patch(api, device, location=f"Updated-{i}")
    for i, device in enumerate(ids):
        assert read(api, device)["location"] == f"Updated-{i}"


def test_no_cache_pollution_between_devices(api):
    first, second = (register_device(api, f"SN-{name}", location=f"Location {name}")["id"] for name in ("A", "B"))
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
