"""Shared set-up for benchmarks: a fresh database, the real multi-process server, a token.

Benchmarks run against exactly what `make web` runs (uvicorn, WEB_CONCURRENCY
processes) on real Postgres and Redis from DATABASE_URL / REDIS_URL (`make bench`
starts embedded ones when unset).
"""

import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import environ
import psycopg

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from iot.testing.processes import (  # noqa: E402
    Platform,
    database_url,
    platform_env,
    psycopg_conninfo,
    start_mqtt_broker,
    start_web,
    start_worker,
)


def fresh_database(name: str) -> str:
    """Drop and recreate database `name` on the DATABASE_URL server, migrate it; return its URL."""
    config = environ.Env.db_url_config(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/iot"))
    with psycopg.connect(**psycopg_conninfo({**config, "NAME": "postgres"}), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = database_url({**config, "NAME": name})
    env = platform_env(database=url, extra={"DJANGO_SETTINGS_MODULE": "iot.settings", **_bench_secret()})
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--no-input", "-v", "0"], cwd=REPO_ROOT, env=env, check=True
    )
    return url


def _bench_secret() -> dict[str, str]:
    return {"DJANGO_SECRET_KEY": os.environ.get("DJANGO_SECRET_KEY", "bench-only-secret-key")}


def api_token(database: str, username: str = "bench") -> str:
    env = platform_env(database=database, extra={"DJANGO_SETTINGS_MODULE": "iot.settings", **_bench_secret()})
    out = subprocess.run(
        [sys.executable, "manage.py", "create_api_token", username],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


@contextmanager
def running_platform(
    database: str, *, workers: int = 2, extra_env: dict[str, str] | None = None, with_worker=False, mqtt=False
):
    """The web server (and the worker; with `mqtt`, the embedded broker before it, so its bridge subscribes)."""
    env = platform_env(
        database=database,
        extra={
            "DJANGO_SETTINGS_MODULE": "iot.settings",
            "REDIS_KEY_PREFIX": "iotbench",
            **_bench_secret(),
            **(extra_env or {}),
        },
        mqtt=mqtt,
    )
    platform = Platform(env=env)
    log_dir = Path(tempfile.mkdtemp(prefix="iot-bench-"))
    try:
        start_web(platform, workers=workers, log_dir=log_dir)
        if mqtt:
            start_mqtt_broker(platform, log_dir=log_dir)
        if with_worker:
            start_worker(platform, log_dir=log_dir)
        yield platform
    finally:
        platform.stop()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize(latencies_s: list[float]) -> str:
    ms = [v * 1000 for v in latencies_s]
    return (
        f"p50 {percentile(ms, 50):.1f} ms, p99 {percentile(ms, 99):.1f} ms, "
        f"mean {statistics.fmean(ms):.1f} ms, max {max(ms):.1f} ms"
    )


# Limits high enough that only the measured code decides (queue never full, no rate limit).
UNLIMITED_ENV = {
    "RATE_LIMIT_TELEMETRY_PER_DEVICE": "1000000000",
    "RATE_LIMIT_GLOBAL_PER_SECOND": "1000000000",
    "EVENT_QUEUE_MAX_SIZE": "1000000000",
    "BACKPRESSURE_QUEUE_THRESHOLD": "900000000",
    "BACKPRESSURE_REJECT_THRESHOLD": "950000000",
}


def in_process_django(*, database_name: str, redis_prefix: str) -> str:
    """Set up Django in this process on a fresh migrated database with the limits out of the way
    (for in-process benches that time the full request stack); returns the database URL."""
    database = fresh_database(database_name)
    os.environ.update(
        {
            "DATABASE_URL": database,
            "DJANGO_SETTINGS_MODULE": "iot.settings",
            "REDIS_KEY_PREFIX": redis_prefix,
            "LOG_LEVEL": "WARNING",
            **_bench_secret(),
            **UNLIMITED_ENV,
        }
    )
    import django

    django.setup()
    return database
