"""Helpers and dedicated live platforms for the telemetry tests.

The session `platform` runs with the production defaults (100 points per device
per 60 s, queue thresholds 8 000 / 9 500). Tests that need other limits get
their own real multi-process server, started with extra environment and its own
`REDIS_KEY_PREFIX` (so its rate-limit windows and event queue are its own), on
the same test database.
"""

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from iot.redis import get_redis
from iot.testing.processes import Platform, database_url, http_client, platform_env, start_web, start_worker


def now_iso(offset_seconds: float = 0.0) -> str:
    """What the seed clients send: a naive UTC ISO timestamp (`datetime.utcnow().isoformat()`)."""
    return (datetime.now(UTC) + timedelta(seconds=offset_seconds)).replace(tzinfo=None).isoformat()


def point_body(device_id: str, *, metric: str = "temperature", value: float = 25.0, timestamp: str | None = None):
    return {"device_id": device_id, "timestamp": timestamp or now_iso(), "metric": metric, "value": value}


def batch_body(device_id: str, size: int, *, metric: str = "temperature", start_offset: float = -60.0):
    """`size` points with distinct timestamps (one millisecond apart) and values 0..size-1."""
    return {
        "device_id": device_id,
        "points": [
            {"device_id": device_id, "timestamp": now_iso(start_offset + i / 1000), "metric": metric, "value": float(i)}
            for i in range(size)
        ],
    }


def register_device(client: httpx.Client, prefix: str = "SN-TLM") -> dict:
    """A new device: its JSON plus `device_token`."""
    response = client.post(
        "/devices",
        json={"serial_number": f"{prefix}-{uuid.uuid4().hex}", "device_type": "sensor", "firmware_version": "1.0.0"},
    )
    assert response.status_code == 201, response.text
    return response.json()


def stored_points(django_db_blocker, device_id: str) -> int:
    """Points of the device in Postgres (what a 202 promised)."""
    from telemetry.models import TelemetryPoint

    with django_db_blocker.unblock():
        return TelemetryPoint.objects.filter(device_id=device_id).count()


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """`/metrics` as {(sample name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric_value(client: httpx.Client, name: str, **labels) -> float:
    return scrape(client).get((name, tuple(sorted(labels.items()))), 0.0)


def flush_prefix(prefix: str) -> None:
    client = get_redis()
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


@contextmanager
def dedicated_platform(
    django_db_blocker, log_dir: Path, *, name: str, env: dict[str, str], worker: bool = True
) -> Iterator[Platform]:
    """A real web server (2 processes) and optionally a worker, with `env` on top of the test settings."""
    prefix = f"iottest-{name}"
    flush_prefix(prefix)
    with django_db_blocker.unblock():
        full_env = platform_env(
            database=database_url(connection.settings_dict), extra={"REDIS_KEY_PREFIX": prefix, **env}
        )
    running = Platform(env=full_env)
    directory = log_dir / name
    directory.mkdir(parents=True, exist_ok=True)
    try:
        start_web(running, workers=2, log_dir=directory)
        if worker:
            start_worker(running, log_dir=directory)
        yield running
    finally:
        running.stop()
        flush_prefix(prefix)


@contextmanager
def client_for(running: Platform, token: str) -> Iterator[httpx.Client]:
    with http_client(running, token) as client:
        yield client


# Limits high enough that only what a test drives on purpose can refuse anything.
UNLIMITED = {
    "RATE_LIMIT_TELEMETRY_PER_DEVICE": "100000000",
    "RATE_LIMIT_GLOBAL_PER_SECOND": "100000000",
    "EVENT_QUEUE_MAX_SIZE": "10000000",
    "BACKPRESSURE_QUEUE_THRESHOLD": "8000000",
    "BACKPRESSURE_REJECT_THRESHOLD": "9500000",
}


@pytest.fixture(scope="module")
def bulk_platform(django_db_setup, django_db_blocker, platform_logs):
    """A live platform whose rate limits and queue thresholds don't get in the way (load tests)."""
    with dedicated_platform(django_db_blocker, platform_logs, name="bulk", env=UNLIMITED) as running:
        yield running


@pytest.fixture(scope="module")
def bulk_api(bulk_platform, operator_token):
    with client_for(bulk_platform, operator_token) as client:
        yield client
