"""Grader for task 10 (backpressure only logged), over HTTP against a live platform (tests/conftest.py).

Ported from the seed's grader, on a queue ten times smaller than production (max 1 000 points, 429 from
800, 503 from 950) whose consumers the test starts and stops, so the queue fills exactly as fast as the
test publishes. The queue's depth is read where operators read it, `iot_event_queue_depth` (and
`iot_event_queue_reserved`) on `/metrics`; depth counts points (each accepted request publishes one
event weighted by its points). What a device stored is read back with `GET /telemetry/{device_id}`.
"""

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from iot.testing.live import metric_value, register_device
from iot.testing.processes import start_worker, wait_until
from iot.testing.telemetry import batch_body, point_body

pytestmark = pytest.mark.live

MAX_SIZE, WARNING, CRITICAL = 1000, 800, 950  # tests/conftest.py's QUEUE


class Consumers:
    """Start and stop the platform's worker (Celery and the event-queue consumers)."""

    def __init__(self, platform, client, log_dir):
        self.platform, self.client, self.log_dir = platform, client, log_dir
        self.worker = None
        self.generation = 0

    def depth(self) -> int:
        return int(metric_value(self.client, "iot_event_queue_depth"))

    def held(self) -> int:
        """Queued plus reserved by requests in flight: what the queue's bound covers."""
        return self.depth() + int(metric_value(self.client, "iot_event_queue_reserved"))

    def start(self):
        self.generation += 1
        self.worker = start_worker(self.platform, log_dir=self.log_dir, name=f"consumers-{self.generation}")

    def stop(self):
        if self.worker is not None:
            self.worker.stop()
            self.platform.processes.remove(self.worker)
            self.worker = None

    def drain(self):
        """Run the consumers until the queue is empty, then stop them again."""
        self.start()
        try:
            wait_until(lambda: self.depth() == 0, timeout=120, interval=0.2, message="the event queue drained")
        finally:
            self.stop()


@pytest.fixture(scope="module")
def consumers(platform, api, platform_logs):
    controlled = Consumers(platform, api, platform_logs / "grader")
    try:
        yield controlled
    finally:
        controlled.stop()


@pytest.fixture
def queue(consumers):
    """The consumers' controller, with an empty queue and no consumer running."""
    if consumers.depth() != 0:
        consumers.drain()
    assert consumers.depth() == 0
    return consumers


@pytest.fixture
def device_id(api):
    return register_device(api, "SN-BP")["id"]


def stored(api, device_id) -> int:
    response = api.get(f"/telemetry/{device_id}", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return len(response.json())


def fill_until_refused(api, device_id, *, size: int, attempts: int) -> list:
    """Send `size`-point batches until one is refused (429/503), at most `attempts`; all the responses."""
    responses = []
    for _ in range(attempts):
        response = api.post("/telemetry/batch", json=batch_body(device_id, size))
        responses.append(response)
        if response.status_code != 202:
            break
    return responses


def test_backpressure_returns_429_when_overloaded(api, queue, device_id):
    """Past the warning threshold (800 queued points) the answer is 429 + Retry-After, and nothing is stored."""
    responses = fill_until_refused(api, device_id, size=100, attempts=30)
    codes = [r.status_code for r in responses]
    assert codes == [202] * 8 + [429], f"expected 429 once 800 points are queued, got {codes}"
    refused = responses[-1]
    assert int(refused.headers["Retry-After"]) >= 1
    point = api.post("/telemetry/point", json=point_body(device_id))
    assert point.status_code == 429 and int(point.headers["Retry-After"]) >= 1
    assert stored(api, device_id) == 800
    assert queue.depth() == 800


def test_backpressure_returns_503_when_critical(api, queue, device_id):
    """Past the critical threshold (950) the answer is 503 + Retry-After, for batches and single points."""
    for _ in range(7):
        assert api.post("/telemetry/batch", json=batch_body(device_id, 100)).status_code == 202
    # Admitted below the warning threshold, it takes the queue straight past the critical one.
    assert api.post("/telemetry/batch", json=batch_body(device_id, 260)).status_code == 202
    assert queue.depth() == 960
    for path, body in [("/telemetry/batch", batch_body(device_id, 10)), ("/telemetry/point", point_body(device_id))]:
        refused = api.post(path, json=body)
        assert refused.status_code == 503, f"{path}: {refused.status_code} with 960 of 1000 points queued"
        headers = {name.lower(): value for name, value in refused.headers.items()}
        assert int(headers["retry-after"]) >= 1
    # No data accepted over the critical threshold.
    assert stored(api, device_id) == 960
    assert queue.depth() == 960


def test_backpressure_prevents_queue_overflow(api, queue):
    """40 concurrent 100-point batches from 10 devices against a queue of 1 000: queued + reserved never
    passes the maximum, every accepted batch is stored and queued, and the rest is refused."""
    device_ids = [register_device(api, "SN-STORM")["id"] for _ in range(10)]
    samples: list[int] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(queue.held())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        barrier = threading.Barrier(40, timeout=60)

        def send(i: int):
            barrier.wait()
            return api.post("/telemetry/batch", json=batch_body(device_ids[i % 10], 100))

        with ThreadPoolExecutor(max_workers=40) as pool:
            results = list(pool.map(send, range(40)))
    finally:
        stop.set()
        sampler.join()
    codes = Counter(r.status_code for r in results)
    assert set(codes) <= {202, 429, 503}, codes
    samples.append(queue.held())
    assert max(samples) <= MAX_SIZE, f"the queue held {max(samples)} points (max {MAX_SIZE})"
    assert codes[202] * 100 == queue.depth() <= MAX_SIZE
    assert sum(stored(api, d) for d in device_ids) == 100 * codes[202]
    assert codes[429] + codes[503] > 0


def test_concurrent_load_triggers_backpressure(api, queue, device_id):
    """60 concurrent 200-point batches (30 at a time): some are refused with 429 or 503."""
    with ThreadPoolExecutor(max_workers=30) as pool:
        results = list(pool.map(lambda _: api.post("/telemetry/batch", json=batch_body(device_id, 200)), range(60)))
    codes = Counter(r.status_code for r in results)
    assert set(codes) <= {202, 429, 503}, codes
    assert codes[429] + codes[503] > 0, codes
    assert queue.depth() <= MAX_SIZE


def test_backpressure_with_multiple_devices(api, queue):
    """Backpressure is global: 10 devices sending 50-point batches at once are all pushed back."""
    device_ids = [register_device(api, "SN-MULTI-BP")["id"] for _ in range(10)]

    def storm(device):
        return [api.post("/telemetry/batch", json=batch_body(device, 50)).status_code for _ in range(10)]

    with ThreadPoolExecutor(max_workers=10) as pool:
        codes = Counter(code for device_codes in pool.map(storm, device_ids) for code in device_codes)
    assert set(codes) <= {202, 429, 503}, codes
    assert codes[429] + codes[503] > 0, codes
    assert codes[202] * 50 == queue.depth() <= MAX_SIZE


def test_system_recovers_after_load_decrease(api, queue, device_id):
    """Refused while the queue is past its threshold; accepted again once the consumers have caught up."""
    responses = fill_until_refused(api, device_id, size=50, attempts=40)
    assert responses[-1].status_code in (429, 503), "the queue was never pushed back"
    queue.start()
    try:
        wait_until(lambda: queue.depth() == 0, timeout=120, interval=0.2, message="the consumers to catch up")
        assert api.post("/telemetry/point", json=point_body(device_id)).status_code == 202
        assert api.post("/telemetry/batch", json=batch_body(device_id, 100)).status_code == 202
    finally:
        queue.stop()


def test_backpressure_minimal_performance_impact(api, queue, device_id):
    """50 single points under no load average well under 200 ms each."""
    started = time.perf_counter()
    for _ in range(50):
        assert api.post("/telemetry/point", json=point_body(device_id)).status_code == 202
    assert (time.perf_counter() - started) / 50 < 0.2
