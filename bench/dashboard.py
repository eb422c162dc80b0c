#!/usr/bin/env python
"""The admin's fleet dashboard at 1 000, 10 000 and 100 000 devices: what one refresh costs.

    python bench/dashboard.py [--sizes 1000,10000,100000] [--requests 30]

In this process, on a fresh database (DATABASE_URL's server) and Redis (REDIS_URL), through the
whole Django stack (`django.test.Client`, a logged-in superuser: session, admin_view, template).
The fleet is bulk-loaded to each size in turn: 70% active, 20% inactive (the "not seen recently"
list sorts them), 10% registered, three firmware versions; 50 open alerts, 20 updates in progress,
and an hour of per-minute counters. For each size it prints the median and p99 of the dashboard's
fragment (what an open index polls every DASHBOARD_REFRESH_SECONDS) and of its JSON, with the
number of queries of one request: that number stays the same, only Postgres' own aggregation grows.
"""

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from _harness import in_process_django, percentile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    prefix = f"iotbench-dashboard-{uuid.uuid4().hex[:6]}"
    in_process_django(database_name="iot_bench_dashboard", redis_prefix=prefix)
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.utils import timezone

    from alerts.testing import points_evaluate, rule_create
    from devices.models import Device
    from devices.testing import devices_bulk_create
    from firmware.models import FirmwareUpdate
    from firmware.testing import release_create
    from iot.redis import get_redis
    from iot.testing.redis import redis_prefix_flush
    from telemetry.redis_keys import count_window_key, count_window_start

    user = get_user_model().objects.create(username="bench", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(user)
    release = release_create(version="9.9.9", content=b"bench")

    def load(count: int) -> None:
        for start in range(0, count, 10_000):
            n = min(10_000, count - start)
            for status, share in (("active", 0.7), ("inactive", 0.2), ("registered", 0.1)):
                members = devices_bulk_create(
                    count=round(n * share),
                    status=status,
                    seen_seconds_after_registration=None if status == "registered" else 600,
                )
                third = len(members) // 3
                for index, version in enumerate(("1.1.0", "1.2.0")):
                    part = members[index * third : (index + 1) * third]
                    Device.objects.filter(pk__in=[d.pk for d in part]).update(firmware_version=version)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")

    load(sizes[0])
    for device in Device.objects.filter(status="active")[:50]:
        rule_create(device_id=device.pk, threshold=1.0, severity="critical")
        points_evaluate(device_id=device.pk, values=[5.0])
    for device in Device.objects.filter(status="active")[50:70]:
        FirmwareUpdate.objects.create(
            device=device, release=release, from_version="1.0.0", to_version="9.9.9", status="downloading", progress=30
        )
    redis = get_redis()
    current = count_window_start(timezone.now().timestamp())
    for back in range(60):
        redis.hincrby(count_window_key(current - 60 * back), "total", 1000 + back)

    def timed(path: str, n: int) -> tuple[list[float], int]:
        assert client.get(path).status_code == 200  # warm
        queries = []

        def count(execute, sql, params, many, context):
            queries.append(sql)
            return execute(sql, params, many, context)

        with connection.execute_wrapper(count):
            client.get(path)
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            response = client.get(path)
            samples.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
        return samples, len(queries)

    loaded = sizes[0]
    header = f"{'fragment p50':>12} {'p99':>7} {'queries':>7} | {'json p50':>8} {'p99':>7} {'queries':>7}"
    print(f"{'devices':>8} | {header}")
    for size in sizes:
        load(size - loaded)
        loaded = size
        fragment, fragment_queries = timed("/admin/devices/device/fleet-dashboard/", args.requests)
        data, data_queries = timed("/admin/devices/device/fleet-dashboard.json", args.requests)
        print(
            f"{size:>8} | {statistics.median(fragment):10.1f}ms {percentile(fragment, 99):5.1f}ms "
            f"{fragment_queries:>7} | "
            f"{statistics.median(data):6.1f}ms {percentile(data, 99):5.1f}ms {data_queries:>7}"
        )
    redis_prefix_flush(prefix)


if __name__ == "__main__":
    main()
