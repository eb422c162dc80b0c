"""Seed tasks 5 (batch deadlock) and 2 (memory leak), ported to a live server with raised limits.

The seed's deadlock came from distributed locks taken in different orders; here
ingestion takes no application lock at all (one INSERT, one conditional UPDATE
of one device row), so 50 devices sending large batches and single points
concurrently simply complete. The leak came from in-process lists of every
point and event; here nothing is kept in process memory, which the server's
resident memory shows under sustained load.
"""

import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from iot.testing.live import metric_value, register_device, scrape
from iot.testing.processes import wait_until
from iot.testing.telemetry import batch_body, point_body
from telemetry.testing import stored_points

pytestmark = pytest.mark.live


def test_fifty_devices_send_large_batches_and_points_concurrently(bulk_api, django_db_blocker):
    device_ids = [register_device(bulk_api, "SN-DEADLOCK")["id"] for _ in range(50)]

    def device_session(device_id):
        codes = [bulk_api.post("/telemetry/batch", json=batch_body(device_id, 200, metric="a")).status_code]
        codes += [
            bulk_api.post("/telemetry/point", json=point_body(device_id, metric="b")).status_code for _ in range(5)
        ]
        codes.append(bulk_api.post("/telemetry/batch", json=batch_body(device_id, 200, metric="c")).status_code)
        return codes

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(device_session, device_ids))
    elapsed = time.perf_counter() - started

    assert all(code == 202 for codes in results for code in codes), results
    assert elapsed < 10, f"50 devices x 405 points took {elapsed:.1f}s"
    with django_db_blocker.unblock():
        from telemetry.models import TelemetryPoint

        assert TelemetryPoint.objects.filter(device_id__in=device_ids).count() == 50 * 405


def test_interleaved_batches_for_the_same_devices(bulk_api, django_db_blocker):
    """Many concurrent batches hitting the same few device rows (the old lock-ordering trap)."""
    device_ids = [register_device(bulk_api, "SN-INTERLEAVE")["id"] for _ in range(3)]
    with ThreadPoolExecutor(max_workers=30) as pool:
        codes = list(
            pool.map(
                lambda i: bulk_api.post("/telemetry/batch", json=batch_body(device_ids[i % 3], 50)).status_code,
                range(90),
            )
        )
    assert codes == [202] * 90
    assert sum(stored_points(django_db_blocker, d) for d in device_ids) == 90 * 50


def test_query_default_limit_is_100_and_max_1000(bulk_api):
    device_id = register_device(bulk_api)["id"]
    for _ in range(2):
        assert bulk_api.post("/telemetry/batch", json=batch_body(device_id, 1000)).status_code == 202
    assert len(bulk_api.get(f"/telemetry/{device_id}").json()) == 100
    assert len(bulk_api.get(f"/telemetry/{device_id}", params={"limit": 1000}).json()) == 1000
    assert bulk_api.get(f"/telemetry/{device_id}", params={"limit": 1001}).status_code == 400


def _server_rss(bulk_platform) -> int:
    """Resident memory of the uvicorn worker processes (children of the server process)."""
    server = psutil.Process(bulk_platform.processes[0].process.pid)
    return sum(child.memory_info().rss for child in server.children(recursive=True))


def _drive(bulk_api, device_ids, *, batches: int, points: int) -> None:
    def batch(i):
        return bulk_api.post("/telemetry/batch", json=batch_body(device_ids[i % len(device_ids)], 100)).status_code

    def point(i):
        return bulk_api.post("/telemetry/point", json=point_body(device_ids[i % len(device_ids)])).status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(batch, range(batches))) + list(pool.map(point, range(points)))
    assert set(codes) == {202}


def test_sustained_ingestion_keeps_server_memory_flat(bulk_platform, bulk_api):
    """~100 000 points after a warm-up: the servers' RSS grows by less than 20 MB and the queue drains."""
    device_ids = [register_device(bulk_api, "SN-MEM")["id"] for _ in range(20)]
    _drive(bulk_api, device_ids, batches=200, points=500)  # warm-up: imports, pools, caches
    before = _server_rss(bulk_platform)
    _drive(bulk_api, device_ids, batches=1000, points=2000)
    after = _server_rss(bulk_platform)
    assert after - before < 20 * 1024 * 1024, f"server RSS grew {(after - before) / 2**20:.1f} MB"

    # The same figure is exported per process on /metrics.
    rss_samples = [v for (name, _), v in scrape(bulk_api).items() if name == "iot_process_resident_memory_bytes"]
    assert rss_samples and all(v > 0 for v in rss_samples)
    # Every event is processed: the queue is bounded by consumption, not by memory.
    wait_until(
        lambda: metric_value(bulk_api, "iot_event_queue_depth") == 0, timeout=120, interval=0.5, message="queue drained"
    )
