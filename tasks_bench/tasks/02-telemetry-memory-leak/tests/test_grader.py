"""Grader for task 02 (telemetry memory leak), against the live platform.

The seed's grader counted the entries of in-process lists (`processed_points`, `all_events`,
`in_memory_cache`); this one measures what those lists cost, as an operator does: the web server's
resident memory (every process of it, read from the OS) before and after hundreds of thousands of
points sent over HTTP, once a warm-up has grown the allocator's arenas to their working size. Kept
points weigh about 0.5 KB each, so 300 000 of them would add well over 100 MiB; a server that keeps
nothing grows a few MiB at most. The other graders check, over HTTP, that the event queue drains
and that every accepted point is stored.
"""

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from iot.testing.processes import wait_until

pytestmark = pytest.mark.live

MIB = 1024 * 1024
BATCH = 1000
WARM_UP_BATCHES = 60
LOAD_BATCHES = 300
CLIENTS = 4
# Growth allowed over the measured load: allocator noise and high-water marks, not kept points.
MAX_GROWTH_MIB = 40


def register(api) -> str:
    response = api.post(
        "/devices",
        json={"serial_number": f"SN-MEM-{uuid.uuid4().hex}", "device_type": "sensor", "firmware_version": "1.0.0"},
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


class Timestamps:
    """Distinct timestamps, a microsecond apart, starting an hour ago: every point is a new point."""

    def __init__(self):
        self.start = datetime.now(UTC) - timedelta(hours=1)
        self.next = 0

    def take(self, count: int) -> list[str]:
        first, self.next = self.next, self.next + count
        return [(self.start + timedelta(microseconds=first + i)).isoformat() for i in range(count)]


def send_batches(api, devices: list[str], batches: int, stamps: Timestamps) -> None:
    bodies = [
        {
            "device_id": devices[n % len(devices)],
            "points": [
                {"device_id": devices[n % len(devices)], "timestamp": ts, "metric": "temperature", "value": i % 10}
                for i, ts in enumerate(stamps.take(BATCH))
            ],
        }
        for n in range(batches)
    ]

    def post(body: dict) -> int:
        response = api.post("/telemetry/batch", json=body)
        assert response.status_code == 202, response.text[:500]
        assert response.json()["count"] == BATCH
        return BATCH

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        assert sum(pool.map(post, bodies)) == batches * BATCH


def queue_depth(api) -> float:
    response = api.get("/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "iot_event_queue_depth":
                return sample.value
    raise AssertionError("/metrics has no iot_event_queue_depth")


def test_web_memory_stays_flat_during_high_volume_ingestion(api, web_memory):
    devices = [register(api) for _ in range(10)]
    stamps = Timestamps()
    send_batches(api, devices, WARM_UP_BATCHES, stamps)
    before = web_memory()
    send_batches(api, devices, LOAD_BATCHES, stamps)
    after = web_memory()
    growth = (after - before) / MIB
    print(
        f"\nweb server RSS {before / MIB:.0f} -> {after / MIB:.0f} MiB "
        f"({growth:+.1f} MiB over {LOAD_BATCHES * BATCH} points)"
    )
    assert growth < MAX_GROWTH_MIB, f"the web server grew {growth:.0f} MiB over {LOAD_BATCHES * BATCH} points"


def test_continuous_ingestion_in_waves_does_not_accumulate(api, web_memory):
    """Five waves of 40 000 points: the last waves must not keep adding what the first ones added."""
    devices = [register(api) for _ in range(5)]
    stamps = Timestamps()
    send_batches(api, devices, WARM_UP_BATCHES, stamps)
    readings = []
    for _ in range(5):
        send_batches(api, devices, 40, stamps)
        readings.append(web_memory())
    growth = (readings[-1] - readings[0]) / MIB
    print("\nRSS after each wave (MiB):", [round(value / MIB) for value in readings])
    assert growth < MAX_GROWTH_MIB / 2, f"the web server grew {growth:.0f} MiB over the last 160 000 points"


def test_event_queue_drains_after_a_burst(api):
    devices = [register(api) for _ in range(4)]
    send_batches(api, devices, 20, Timestamps())
    wait_until(lambda: queue_depth(api) == 0, timeout=120, interval=0.2, message="the event queue to drain")


def test_every_accepted_point_is_stored(api):
    device = register(api)
    send_batches(api, [device], 2, Timestamps())
    response = api.get(f"/telemetry/{device}", params={"metric": "temperature", "limit": 1000})
    assert response.status_code == 200, response.text
    assert len(response.json()) == 1000
    latest = api.get(f"/telemetry/{device}/temperature/latest")
    assert latest.status_code == 200, latest.text
