"""Seed task 10 (backpressure only logged), ported to a live server whose event consumers the test controls.

The dedicated server runs with a small queue (max 1 000, warning 800, critical
950: the production 10 000 / 8 000 / 9 500 scaled down) and no consumers, so the
queue fills exactly as fast as the test publishes. Depth counts points (each
accepted request publishes one event weighted by its points).
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.test import override_settings

from iot.event_queue import admission_keys
from iot.redis import get_redis
from iot.testing.live import dedicated_platform, metric_value, register_device
from iot.testing.processes import http_client, start_worker, wait_until
from iot.testing.telemetry import batch_body, point_body
from telemetry.testing import stored_points

pytestmark = pytest.mark.live

QUEUE = {"EVENT_QUEUE_MAX_SIZE": "1000", "BACKPRESSURE_QUEUE_THRESHOLD": "800", "BACKPRESSURE_REJECT_THRESHOLD": "950"}
NO_RATE_LIMIT = {"RATE_LIMIT_TELEMETRY_PER_DEVICE": "100000000", "RATE_LIMIT_GLOBAL_PER_SECOND": "100000000"}


class ControlledPlatform:
    """The dedicated server plus start/stop of its worker (Celery + event consumers)."""

    def __init__(self, running, client, log_dir):
        self.running, self.client, self.log_dir = running, client, log_dir
        self.worker = None
        self.generation = 0

    def depth(self) -> int:
        return int(metric_value(self.client, "iot_event_queue_depth"))

    def start_consumers(self):
        self.generation += 1
        self.worker = start_worker(self.running, log_dir=self.log_dir, name=f"worker-{self.generation}")

    def stop_consumers(self):
        if self.worker is not None:
            self.worker.stop()
            self.running.processes.remove(self.worker)
            self.worker = None

    def drain(self):
        """Run the consumers until the queue is empty, then stop them again."""
        self.start_consumers()
        try:
            wait_until(lambda: self.depth() == 0, timeout=90, interval=0.2, message="event queue drained")
        finally:
            self.stop_consumers()


@pytest.fixture(scope="module")
def bp(django_db_setup, django_db_blocker, platform_logs, operator_token):
    env = {**QUEUE, **NO_RATE_LIMIT}
    with dedicated_platform(django_db_blocker, platform_logs, name="bp", env=env, worker=False) as running:
        with http_client(running, operator_token) as client:
            controlled = ControlledPlatform(running, client, platform_logs / "bp")
            try:
                yield controlled
            finally:
                controlled.stop_consumers()


@pytest.fixture
def empty_queue(bp):
    if bp.depth() != 0:
        bp.drain()
    assert bp.depth() == 0
    return bp


def test_warning_threshold_answers_429_until_consumers_catch_up(empty_queue, django_db_blocker):
    bp = empty_queue
    device_id = register_device(bp.client, "SN-BP")["id"]
    before = metric_value(bp.client, "iot_telemetry_points_total", outcome="backpressure")
    for _ in range(8):
        assert bp.client.post("/telemetry/batch", json=batch_body(device_id, 100)).status_code == 202
    assert bp.depth() == 800

    refused = bp.client.post("/telemetry/batch", json=batch_body(device_id, 50))
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert "busy" in refused.json()["detail"]
    point = bp.client.post("/telemetry/point", json=point_body(device_id))
    assert point.status_code == 429 and "Retry-After" in point.headers
    assert stored_points(django_db_blocker, device_id) == 800
    assert bp.depth() == 800
    assert metric_value(bp.client, "iot_telemetry_points_total", outcome="backpressure") == before + 51

    bp.start_consumers()
    try:
        wait_until(lambda: bp.depth() == 0, timeout=90, interval=0.2, message="queue drained by the consumers")
        accepted = wait_until(
            lambda: bp.client.post("/telemetry/point", json=point_body(device_id)).status_code == 202,
            timeout=10,
            message="a point accepted again",
        )
        assert accepted
    finally:
        bp.stop_consumers()


def test_critical_threshold_answers_503_with_retry_after(empty_queue, django_db_blocker):
    bp = empty_queue
    device_id = register_device(bp.client, "SN-BP")["id"]
    for _ in range(7):
        assert bp.client.post("/telemetry/batch", json=batch_body(device_id, 100)).status_code == 202
    # Admitted below the warning threshold, it takes the queue straight past the critical one.
    assert bp.client.post("/telemetry/batch", json=batch_body(device_id, 260)).status_code == 202
    assert bp.depth() == 960

    for path, body in [("/telemetry/batch", batch_body(device_id, 10)), ("/telemetry/point", point_body(device_id))]:
        refused = bp.client.post(path, json=body)
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
        assert "overloaded" in refused.json()["detail"]
    assert stored_points(django_db_blocker, device_id) == 960

    bp.start_consumers()
    try:
        wait_until(lambda: bp.depth() == 0, timeout=90, interval=0.2, message="queue drained by the consumers")
        assert bp.client.post("/telemetry/point", json=point_body(device_id)).status_code == 202
    finally:
        bp.stop_consumers()


def test_storm_from_many_devices_never_overflows_the_queue(empty_queue, django_db_blocker):
    """40 concurrent 100-point batches from 10 devices against a queue of 1 000.

    Admission reserves each request's room in the queue (`iot.admission`): requests
    that would not fit beside what is queued and reserved are refused (503) before
    anything is stored, so every 202 is published (none lost for a full queue), and
    queued + reserved never passes the maximum.
    """
    bp = empty_queue
    device_ids = [register_device(bp.client, "SN-STORM")["id"] for _ in range(10)]
    lost_before = metric_value(bp.client, "iot_telemetry_events_lost_total", reason="queue_full")

    with override_settings(REDIS_KEY_PREFIX=bp.running.env["REDIS_KEY_PREFIX"]):
        depth_key, reserved_key, _ = admission_keys()
    samples: list[int] = []
    stop = threading.Event()

    def sample_depth():
        while not stop.is_set():
            depth, reserved = get_redis().mget([depth_key, reserved_key])
            samples.append(int(depth or 0) + int(reserved or 0))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample_depth)
    sampler.start()
    try:
        with ThreadPoolExecutor(max_workers=40) as pool:
            results = list(
                pool.map(
                    lambda i: bp.client.post("/telemetry/batch", json=batch_body(device_ids[i % 10], 100)), range(40)
                )
            )
    finally:
        stop.set()
        sampler.join()

    codes = [r.status_code for r in results]
    assert set(codes) <= {202, 429, 503}, codes
    assert len(samples) > 10 and max(samples) <= 1000
    depth = bp.depth()
    assert 800 <= depth <= 1000
    accepted = codes.count(202)
    stored = sum(stored_points(django_db_blocker, d) for d in device_ids)
    assert stored == 100 * accepted
    published = depth // 100
    lost = metric_value(bp.client, "iot_telemetry_events_lost_total", reason="queue_full") - lost_before
    assert lost == 0 and published == accepted
    # Past the warning threshold now: shedding load, not accepting it.
    assert bp.client.post("/telemetry/batch", json=batch_body(device_ids[0], 10)).status_code in (429, 503)
    bp.drain()


def test_backpressure_check_has_minimal_latency_impact(api):
    """Seed: 50 points average well under 200 ms each (admission is one Redis GET)."""
    device_id = register_device(api, "SN-BP-LAT")["id"]
    started = time.perf_counter()
    for _ in range(50):
        assert api.post("/telemetry/point", json=point_body(device_id)).status_code == 202
    assert (time.perf_counter() - started) / 50 < 0.2
