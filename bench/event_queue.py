#!/usr/bin/env python
"""Latency of the per-request Redis primitives: backpressure admission and the rate limiter.

    python bench/event_queue.py                # 10 000 calls each, against REDIS_URL
    python bench/event_queue.py --calls 50000

Every telemetry request pays for `event_queue_admission()` (one GET) and
`rate_limit_consume()` (one Lua script); this prints p50/p99/max of each, one
call at a time from one process (the per-call cost, not throughput). Keys go to
a throw-away prefix that is deleted afterwards.
"""

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "iot.settings")
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-secret-key")
PREFIX = f"iotbench-{uuid.uuid4().hex[:8]}"
os.environ["REDIS_KEY_PREFIX"] = PREFIX

import django  # noqa: E402

django.setup()

from django.test import override_settings  # noqa: E402

from iot.event_queue import event_queue_admission, event_queue_publish  # noqa: E402
from iot.ratelimit import rate_limit_consume  # noqa: E402
from iot.redis import get_redis  # noqa: E402


def measure(name: str, calls: int, fn: Callable[[int], object]) -> None:
    for i in range(min(200, calls)):  # warm up: connection, EVALSHA script load
        fn(i)
    samples = []
    for i in range(calls):
        started = time.perf_counter_ns()
        fn(i)
        samples.append(time.perf_counter_ns() - started)
    samples.sort()
    p50 = samples[len(samples) // 2] / 1000
    p99 = samples[int(len(samples) * 0.99) - 1] / 1000
    mean = statistics.fmean(samples) / 1000
    print(f"{name:<58} p50 {p50:7.1f} µs   p99 {p99:7.1f} µs   mean {mean:7.1f} µs   max {samples[-1] / 1000:8.1f} µs")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=10_000)
    calls = parser.parse_args().calls
    client = get_redis()
    print(f"redis {client.info('server')['redis_version']} at {client.connection_pool.connection_kwargs.get('host')}")
    try:
        for n in range(500):
            event_queue_publish(event_type="bench", payload={"n": n}, weight=10)
        measure("event_queue_admission()  (depth 5000)", calls, lambda i: event_queue_admission())
        devices = [uuid.uuid4().hex for _ in range(calls // 10 + 1)]
        measure(
            "rate_limit_consume(points=1)  10 calls/device, all allowed",
            calls,
            lambda i: rate_limit_consume(device_id=devices[i // 10], points=1),
        )
        hot = uuid.uuid4().hex
        measure(
            "rate_limit_consume(points=1)  one device, limit 100 (refused)",
            calls,
            lambda i: rate_limit_consume(device_id=hot, points=1),
        )
        with override_settings(RATE_LIMIT_TELEMETRY_PER_DEVICE=10_000_000, RATE_LIMIT_GLOBAL_PER_SECOND=10_000_000):
            big = uuid.uuid4().hex
            measure(
                "rate_limit_consume(points=50) one device, limit 10M (growing)",
                calls,
                lambda i: rate_limit_consume(device_id=big, points=50),
            )
    finally:
        for key in client.scan_iter(match=f"{PREFIX}:*", count=1000):
            client.delete(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
