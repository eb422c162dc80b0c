#!/usr/bin/env python
"""What a chart of a week of per-minute data costs: GET /telemetry/{device_id}/{metric}/series.

    python bench/series.py [--devices 20] [--requests 50]

Against real Postgres and Redis (DATABASE_URL / REDIS_URL), on a fresh database with the daily
partitions made (`telemetry_partitions_maintain`) and `--devices` devices, each with a week of
per-minute points of one metric (10 080 each) ending now. For one device it times, in process:

* the whole request through Django's stack (test client, operator token: auth, DRF, the query,
  serialization), for 1h buckets (168), 10m buckets (1008) and 1h over the default 24 hours;
* the query alone (`telemetry.series.telemetry_series`), and its plan (`EXPLAIN ANALYZE`).

Medians and p90 of `--requests` requests per variant, interleaved so that load from other
processes falls on all of them alike.
"""

import argparse
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from _harness import in_process_django, percentile  # noqa: E402

MINUTES_A_WEEK = 7 * 24 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()

    prefix = f"iotbench-series-{uuid.uuid4().hex[:6]}"
    in_process_django(database_name="iot_bench_series", redis_prefix=prefix)
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from rest_framework.authtoken.models import Token

    from devices.services import device_register
    from iot.testing.redis import redis_prefix_flush
    from telemetry.models import TABLE
    from telemetry.partitions import telemetry_partitions_maintain
    from telemetry.series import _SERIES_SQL, AGGREGATES, ORIGIN, telemetry_series
    from telemetry.testing import points_insert

    try:
        telemetry_partitions_maintain()
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        start = now - timedelta(days=7)
        devices = []
        t0 = time.perf_counter()
        for n in range(args.devices):
            device = device_register(
                serial_number=f"SERIES-{n}-{uuid.uuid4().hex}", device_type="s", firmware_version="1"
            )
            points_insert(
                device_id=device.device.pk,
                metric="temperature",
                points=[(start + timedelta(minutes=m), 20.0 + (m % 60) / 10) for m in range(MINUTES_A_WEEK)],
            )
            devices.append(device.device.pk)
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {TABLE}")
        print(f"{args.devices} devices x {MINUTES_A_WEEK} points inserted in {time.perf_counter() - t0:.1f} s")
        device_id = devices[len(devices) // 2]

        user = get_user_model().objects.create(username=f"bench-{uuid.uuid4().hex[:6]}")
        client = Client(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
        path = f"/telemetry/{device_id}/temperature/series"
        week = {"start_time": start.isoformat(), "end_time": now.isoformat()}
        variants = {
            "HTTP, a week, 1h (168 buckets)": lambda: client.get(path, {**week, "interval": "1h"}),
            "HTTP, a week, 10m (1008 buckets)": lambda: client.get(path, {**week, "interval": "10m"}),
            "HTTP, last 24 h, 1h (24 buckets)": lambda: client.get(path, {"interval": "1h"}),
            "query alone, a week, 1h": lambda: telemetry_series(
                device_id=device_id,
                metric="temperature",
                agg="avg",
                interval_seconds=3600,
                start_time=start,
                end_time=now,
            ),
        }
        expected = {
            "HTTP, a week, 1h (168 buckets)": 168,
            "HTTP, a week, 10m (1008 buckets)": 1008,
            "HTTP, last 24 h, 1h (24 buckets)": 24,
        }
        for name, call in variants.items():  # warm up, and check what is timed
            result = call()
            if name in expected:
                assert result.status_code == 200, result.content
                assert abs(len(result.json()["buckets"]) - expected[name]) <= 1, (name, len(result.json()["buckets"]))
        timings: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.requests):
            for name, call in variants.items():
                began = time.perf_counter()
                call()
                timings[name].append((time.perf_counter() - began) * 1000)
        for name, ms in timings.items():
            print(f"{name}: median {statistics.median(ms):.1f} ms, p90 {percentile(ms, 90):.1f} ms")

        params = {
            "stride": timedelta(hours=1),
            "origin": ORIGIN,
            "device_id": device_id,
            "metric": "temperature",
            "start": start,
            "end": now,
        }
        with connection.cursor() as cursor:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + _SERIES_SQL.format(aggregate=AGGREGATES["avg"]), params)
            plan = [row[0] for row in cursor.fetchall()]
        # The plan's top (aggregate, sort, one partition's index scan) and its times.
        print("\n" + "\n".join([*plan[:12], "...", *plan[-2:]]))
    finally:
        redis_prefix_flush(prefix)


if __name__ == "__main__":
    main()
