#!/usr/bin/env python
"""Fleet and group analytics at 100, 1 000, 10 000 and 100 000 devices; the ratio to a plain count.

    python bench/analytics.py [--sizes 100,1000,10000,100000] [--requests 50]

In this process, on a fresh database (DATABASE_URL's server) and Redis (REDIS_URL), through the
whole Django stack (`django.test.Client`: middleware, token auth, DRF, serializers). The fleet
is bulk-loaded (one INSERT per 10 000 devices) to each size in turn: 70% active, 20% inactive,
10% registered; a tenth of them in the measured group; every device has reconciled message
counts and the current minute has Redis counters for a few. For each size it prints the median
and p99 of `GET /analytics/fleet` and `GET /analytics/groups/{group}`, and of a plain
`SELECT count(*) FROM devices_device` in the same run, and the ratio of each median to that
count's: the endpoints cost a constant number of round trips, so what grows is only the
database's own aggregation. Target: 100 000 devices under 100 ms (the seed's bar was 3 s for
100 devices), growth far below linear.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000,100000")
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    prefix = f"iotbench-analytics-{uuid.uuid4().hex[:6]}"
    in_process_django(database_name="iot_bench_analytics", redis_prefix=prefix)
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from rest_framework.authtoken.models import Token

    from devices.models import Device
    from devices.testing import devices_bulk_create
    from iot.testing.redis import redis_prefix_flush
    from telemetry import events
    from telemetry.models import DeviceMessageCount, MessageCountWatermark

    user = get_user_model().objects.create(username="bench")
    client = Client(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    group = "bench-group"
    MessageCountWatermark.objects.create(pk=1, reconciled_until=datetime.now(UTC) - timedelta(minutes=1))

    def load(count: int) -> None:
        for start in range(0, count, 10_000):
            n = min(10_000, count - start)
            plan = [("active", 0.7), ("inactive", 0.2), ("registered", 0.1)]
            for status, share in plan:
                k = round(n * share)
                members = devices_bulk_create(
                    count=k, status=status, seen_seconds_after_registration=None if status == "registered" else 600
                )
                in_group = members[: k // 10]
                Device.objects.filter(pk__in=[d.pk for d in in_group]).update(group_id=group)
                DeviceMessageCount.objects.bulk_create(
                    DeviceMessageCount(device_id=d.pk, messages=100, latency_ms_sum=100 * 20.0) for d in members
                )
        now = datetime.now(UTC)
        for device in Device.objects.filter(group_id=group)[:5]:
            stamp = (now - timedelta(milliseconds=20)).isoformat()
            events.telemetry_points_received(
                {
                    "event_id": uuid.uuid4().hex,
                    "device_id": str(device.pk),
                    "group_id": group,
                    "received_at": now.isoformat(),
                    "metrics": ["t"],
                    "timestamps": [stamp],
                    "values": [1.0],
                }
            )
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")

    def timed(call, n: int) -> list[float]:
        call()  # warm
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            call()
            samples.append((time.perf_counter() - started) * 1000)
        return samples

    def get(path: str):
        def call():
            response = client.get(path)
            assert response.status_code == 200, response.content

        return call

    def plain_count():
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {Device._meta.db_table}")
            cursor.fetchone()

    loaded = 0
    print(f"{'devices':>8} | {'fleet p50':>9} {'p99':>7} | {'group p50':>9} {'p99':>7} | {'count(*) p50':>12} | ratios")
    for size in sizes:
        load(size - loaded)
        loaded = size
        fleet = timed(get("/analytics/fleet"), args.requests)
        grouped = timed(get(f"/analytics/groups/{group}"), args.requests)
        count = timed(plain_count, args.requests)
        base = statistics.median(count)
        print(
            f"{size:>8} | {statistics.median(fleet):7.1f}ms {percentile(fleet, 99):5.1f}ms | "
            f"{statistics.median(grouped):7.1f}ms {percentile(grouped, 99):5.1f}ms | {base:10.2f}ms | "
            f"fleet {statistics.median(fleet) / base:.1f}x, group {statistics.median(grouped) / base:.1f}x count(*)"
        )
    redis_prefix_flush(prefix)


if __name__ == "__main__":
    main()
