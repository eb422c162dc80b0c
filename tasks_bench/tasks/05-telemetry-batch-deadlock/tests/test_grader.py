"""Grader for task 05 (telemetry batch deadlock), over HTTP against the live platform.

The seed has no grader for this task; these follow its task.yaml: 50+ devices submitting large batches
at once, mixed with single points of the same devices, interleaved, must all be accepted (`202`), none
may hang, each wave must finish within 10 s, and every point must be stored. Requests of one device are
sent side by side, so a point arrives while its device's batch is being inserted: code that takes two
locks in one order for points and the other for batches deadlocks there (Postgres breaks the cycle after
a second by aborting one request, which then fails; a lock that is never broken hangs it).
"""

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

pytestmark = pytest.mark.live

DEVICES = 50
BATCH = 1000
POINTS_PER_DEVICE = 4
WAVE_SECONDS = 10.0
REQUEST_SECONDS = 8.0


def register_devices(api, count: int) -> list[str]:
    def one(_):
        body = {"serial_number": f"SN-LOCK-{uuid.uuid4().hex}", "device_type": "sensor", "firmware_version": "1.0.0"}
        response = api.post("/devices", json=body)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    with ThreadPoolExecutor(max_workers=10) as pool:
        return list(pool.map(one, range(count)))


def batch_body(device_id: str, size: int, start: datetime) -> dict:
    return {
        "device_id": device_id,
        "points": [
            {
                "device_id": device_id,
                "timestamp": (start + timedelta(microseconds=i)).isoformat(),
                "metric": "temperature",
                "value": float(i % 50),
            }
            for i in range(size)
        ],
    }


def point_body(device_id: str, n: int, start: datetime) -> dict:
    moment = (start + timedelta(milliseconds=n)).isoformat()
    return {"device_id": device_id, "timestamp": moment, "metric": "humidity", "value": 40.0 + n}


def send_all(api, requests: list[tuple[str, dict]], workers: int) -> tuple[list[tuple[int, float, str]], float]:
    """POST every (path, body) on `workers` threads, in order; returns (status, seconds, text) per request
    and the wall time of the whole wave."""

    def post(request: tuple[str, dict]) -> tuple[int, float, str]:
        path, body = request
        began = time.monotonic()
        response = api.post(path, json=body)
        return response.status_code, time.monotonic() - began, response.text[:200]

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        answers = list(pool.map(post, requests))
    return answers, time.monotonic() - began


def assert_all_accepted_in_time(answers: list[tuple[int, float, str]], wall: float) -> None:
    refused = [(status, text) for status, _, text in answers if status != 202]
    assert not refused, f"{len(refused)} of {len(answers)} requests refused, e.g. {refused[:3]}"
    slowest = max(seconds for _, seconds, _ in answers)
    assert slowest < REQUEST_SECONDS, f"a request took {slowest:.1f} s"
    assert wall < WAVE_SECONDS, f"the wave took {wall:.1f} s"


def stored(api, device_id: str, metric: str) -> int:
    response = api.get(f"/telemetry/{device_id}", params={"metric": metric, "limit": 1000})
    assert response.status_code == 200, response.text
    return len(response.json())


def test_concurrent_batches_from_50_devices_complete(api):
    devices = register_devices(api, DEVICES)
    start = datetime.now(UTC) - timedelta(minutes=10)
    answers, wall = send_all(api, [("/telemetry/batch", batch_body(d, BATCH, start)) for d in devices], DEVICES)
    print(f"\n{DEVICES} concurrent batches of {BATCH}: {wall:.2f} s")
    assert_all_accepted_in_time(answers, wall)
    assert [stored(api, device, "temperature") for device in devices] == [BATCH] * DEVICES


@pytest.mark.parametrize("wave", range(3))
def test_mixed_point_and_batch_ingestion_does_not_deadlock(api, wave):
    """Each device's batch and its single points sent side by side, 50 devices at once."""
    devices = register_devices(api, DEVICES)
    start = datetime.now(UTC) - timedelta(minutes=10)
    requests = []
    for device in devices:
        requests.append(("/telemetry/batch", batch_body(device, BATCH, start)))
        requests += [("/telemetry/point", point_body(device, n, start)) for n in range(POINTS_PER_DEVICE)]
    answers, wall = send_all(api, requests, workers=64)
    print(f"\nwave {wave}: {len(requests)} requests in {wall:.2f} s")
    assert_all_accepted_in_time(answers, wall)
    for device in devices:
        assert (stored(api, device, "temperature"), stored(api, device, "humidity")) == (BATCH, POINTS_PER_DEVICE)


def test_interleaved_requests_from_multiple_devices(api):
    """Per device, one client streams batches while another streams single points, for 10 devices."""
    devices = register_devices(api, 10)
    start = datetime.now(UTC) - timedelta(minutes=10)
    batches, points = 5, 20

    def batch_stream(device: str) -> list[tuple[int, float, str]]:
        answers = []
        for n in range(batches):
            began = time.monotonic()
            response = api.post("/telemetry/batch", json=batch_body(device, 200, start + timedelta(seconds=n)))
            answers.append((response.status_code, time.monotonic() - began, response.text[:200]))
        return answers

    def point_stream(device: str) -> list[tuple[int, float, str]]:
        answers = []
        for n in range(points):
            began = time.monotonic()
            response = api.post("/telemetry/point", json=point_body(device, n, start))
            answers.append((response.status_code, time.monotonic() - began, response.text[:200]))
        return answers

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=2 * len(devices)) as pool:
        futures = [pool.submit(stream, device) for device in devices for stream in (batch_stream, point_stream)]
        answers = [answer for future in futures for answer in future.result()]
    assert_all_accepted_in_time(answers, time.monotonic() - began)
    for device in devices:
        assert (stored(api, device, "temperature"), stored(api, device, "humidity")) == (batches * 200, points)
