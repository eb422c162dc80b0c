"""Helpers for the live tests: dedicated real platforms, device registration over HTTP, `/metrics` scraping.

The session's platform (`conftest.py`) runs with the production limits (100 points per device per 60 s,
queue thresholds 8 000 / 9 500). A test that needs other limits gets a real multi-process server of its
own from `dedicated_platform`, with extra environment and its own `REDIS_KEY_PREFIX` (so its rate-limit
windows and event queue are its own), on the same test database.
"""

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from iot.testing.processes import Platform, database_url, platform_env, start_mqtt_broker, start_web, start_worker
from iot.testing.redis import redis_namespace

# Limits high enough that only what a test drives on purpose can refuse anything.
UNLIMITED = {
    "RATE_LIMIT_TELEMETRY_PER_DEVICE": "100000000",
    "RATE_LIMIT_GLOBAL_PER_SECOND": "100000000",
    "EVENT_QUEUE_MAX_SIZE": "10000000",
    "BACKPRESSURE_QUEUE_THRESHOLD": "8000000",
    "BACKPRESSURE_REJECT_THRESHOLD": "9500000",
}


@contextmanager
def dedicated_platform(
    django_db_blocker, log_dir: Path, *, name: str, env: dict[str, str], worker: bool = True, mqtt: bool = False
) -> Iterator[Platform]:
    """A real web server (2 processes) and optionally a worker, with `env` on top of the test settings; with
    `mqtt`, an embedded MQTT broker of its own too (`running.mqtt_url`; MQTT is off otherwise).

    Its Redis namespace is `iottest-<name>` (unless `env` names another), emptied before and after; its
    processes are `running.processes` in start order (web, the broker if any, then the worker). Logs go to
    `log_dir/<name>/`.
    """
    prefix = env.get("REDIS_KEY_PREFIX", f"iottest-{name}")
    with redis_namespace(prefix):
        with django_db_blocker.unblock():
            full_env = platform_env(
                database=database_url(connection.settings_dict), extra={**env, "REDIS_KEY_PREFIX": prefix}, mqtt=mqtt
            )
        running = Platform(env=full_env)
        directory = log_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        try:
            start_web(running, workers=2, log_dir=directory)
            if mqtt:
                start_mqtt_broker(running, log_dir=directory)
            if worker:
                start_worker(running, log_dir=directory)
            yield running
        finally:
            running.stop()


@contextmanager
def dedicated_platforms(
    django_db_blocker,
    log_dir: Path,
    *,
    name: str,
    env: dict[str, str],
    count: int = 2,
    set_env: list[dict[str, str]] | None = None,
) -> Iterator[list[Platform]]:
    """`count` independent server sets, each a web server (2 processes) and a worker of its own, on one
    database and one Redis namespace: what `count` machines behind a load balancer run. `set_env[i]` goes
    on top of `env` for set i (e.g. `WORKER_BEAT=0` on all but one). Started side by side; logs in
    `log_dir/<name>/set-<i>/`; the namespace (`iottest-<name>` unless `env` names one) emptied before and after.
    """
    prefix = env.get("REDIS_KEY_PREFIX", f"iottest-{name}")
    with redis_namespace(prefix):
        with django_db_blocker.unblock():
            base = platform_env(
                database=database_url(connection.settings_dict), extra={**env, "REDIS_KEY_PREFIX": prefix}
            )
        sets = [Platform(env={**base, **(set_env[n] if set_env else {})}) for n in range(count)]

        def start(n: int) -> None:
            directory = log_dir / name / f"set-{n + 1}"
            directory.mkdir(parents=True, exist_ok=True)
            start_web(sets[n], workers=2, log_dir=directory)
            start_worker(sets[n], log_dir=directory)

        try:
            with ThreadPoolExecutor(max_workers=count) as pool:
                list(pool.map(start, range(count)))
            yield sets
        finally:
            for running in sets:
                running.stop()


def register_device(client: httpx.Client, prefix: str = "SN-TEST", *, idempotency_key: str | None = None, **fields):
    """A new device registered over HTTP (`201` asserted): its JSON, `device_token` included.

    The serial number is `<prefix>-<32 hex>` unless `fields` gives one; `fields` go into the body as is.
    """
    body = {
        "serial_number": f"{prefix}-{uuid.uuid4().hex}",
        "device_type": "sensor",
        "firmware_version": "1.0.0",
        **fields,
    }
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    response = client.post("/devices", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


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
    """One sample of `/metrics` (0.0 if the series does not exist yet)."""
    return scrape(client).get((name, tuple(sorted(labels.items()))), 0.0)
