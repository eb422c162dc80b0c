#!/usr/bin/env python
"""Ingestion while alert notifications go to a webhook that is healthy, hangs, or is down; and the outbox's pace.

    python bench/alerts_notify.py [--devices 20] [--points 6] [--deliveries 300]

Against the real platform (web x2 processes + a Celery worker, `bench/_harness`) on a
fresh database, with a webhook target in this process (`iot.testing.webhook`):

1. ingest latency: `--devices` devices in a group whose rule every point violates, each
   sending `--points` single points (4 client threads), so every device opens one alert
   and one notification; measured with no rule at all (the baseline), then with the rule's
   channel pointing at a target that answers 200 (`healthy`), one that accepts and never
   answers (`hanging`: each delivery ends at the 1 s read timeout until the breaker
   opens), and a port where nothing listens (`refused`). Ingestion must not notice.
2. deliveries/s: `--deliveries` alerts opened at once (one point each from as many
   devices) and delivered to the healthy target; the rate is alerts / (time from the
   first point sent to the last acknowledgement), so it includes the outbox write, the
   task queue, the claim, the breaker and the POST.

The client is Python (httpx), which is fine for latency at this load (4 connections);
the target is Python's threaded HTTP server, which answers in well under a millisecond.
"""

import argparse
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
from _harness import UNLIMITED_ENV, api_token, fresh_database, percentile, running_platform

from iot.testing.webhook import WebhookTarget, refused_url

ENV = {
    **UNLIMITED_ENV,
    "ALERT_WEBHOOK_ALLOW_PRIVATE": "1",
    "WEBHOOK_CONNECT_TIMEOUT_SECONDS": "1",
    "WEBHOOK_READ_TIMEOUT_SECONDS": "1",
    "CIRCUIT_BREAKER_FAILURE_THRESHOLD": "5",
    "CIRCUIT_BREAKER_TIMEOUT_SECONDS": "30",
}


def point(device_id: str, value: float) -> dict:
    return {"device_id": device_id, "timestamp": datetime.now(UTC).isoformat(), "metric": "temperature", "value": value}


def register(api: httpx.Client, count: int, group: str) -> list[str]:
    def one(_):
        body = {
            "serial_number": f"BENCH-{uuid.uuid4().hex}",
            "device_type": "s",
            "firmware_version": "1",
            "group_id": group,
        }
        response = api.post("/devices", json=body)
        response.raise_for_status()
        return response.json()["id"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(count)))


def rule_for(api: httpx.Client, group: str, url: str | None) -> None:
    channel_ids = []
    if url is not None:
        channel = api.post("/alerts/channels", json={"name": f"bench-{group}", "kind": "webhook", "url": url})
        channel.raise_for_status()
        channel_ids = [channel.json()["id"]]
    body = {"group_id": group, "metric": "temperature", "operator": "gt", "threshold": 0, "channel_ids": channel_ids}
    api.post("/alerts/rules", json=body).raise_for_status()


def ingest_latencies(api: httpx.Client, devices: list[str], points: int) -> list[float]:
    def send(device_id: str) -> list[float]:
        latencies = []
        for n in range(points):
            started = time.perf_counter()
            response = api.post("/telemetry/point", json=point(device_id, 40.0 + n))
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 202, response.text
        return latencies

    with ThreadPoolExecutor(max_workers=4) as pool:
        return [latency for chunk in pool.map(send, devices) for latency in chunk]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--points", type=int, default=6)
    parser.add_argument("--deliveries", type=int, default=300)
    args = parser.parse_args()

    database = fresh_database("iot_bench_notify")
    token = api_token(database)
    healthy, hanging = WebhookTarget(mode="ok"), WebhookTarget(mode="hang")
    try:
        with running_platform(database, extra_env=ENV, with_worker=True) as platform:
            with httpx.Client(
                base_url=platform.base_url, headers={"Authorization": f"Token {token}"}, timeout=60
            ) as api:
                cases = {"no rule (baseline)": None, "healthy": healthy.url, "hanging": hanging.url}
                cases["refused"] = refused_url()
                ingest_latencies(api, register(api, 4, "warm-up"), 5)  # connections, caches, code paths
                print(f"ingest latency, {args.devices} devices x {args.points} violating single points, 4 threads")
                baseline = None
                for name, url in cases.items():
                    group = f"bench-{uuid.uuid4().hex[:8]}"
                    devices = register(api, args.devices, group)
                    if name != "no rule (baseline)":
                        rule_for(api, group, url)
                    ms = [seconds * 1000 for seconds in ingest_latencies(api, devices, args.points)]
                    mean = statistics.fmean(ms)
                    baseline = baseline or mean
                    print(
                        f"  {name:<20} mean {mean:6.1f} ms  p50 {percentile(ms, 50):6.1f} ms  "
                        f"p99 {percentile(ms, 99):6.1f} ms  ({mean / baseline:.2f}x the baseline's mean)"
                    )

                group = f"bench-{uuid.uuid4().hex[:8]}"
                devices = register(api, args.deliveries, group)
                rule_for(api, group, healthy.url)
                already = len(healthy.acknowledged)
                started = time.perf_counter()
                with ThreadPoolExecutor(max_workers=4) as pool:
                    list(
                        pool.map(lambda d: api.post("/telemetry/point", json=point(d, 1.0)).raise_for_status(), devices)
                    )
                sent = time.perf_counter() - started
                deadline = started + 300
                while len(healthy.acknowledged) - already < args.deliveries and time.perf_counter() < deadline:
                    time.sleep(0.02)
                done = len(healthy.acknowledged) - already
                elapsed = time.perf_counter() - started
                print(
                    f"outbox: {done}/{args.deliveries} notifications delivered in {elapsed:.2f} s from the first point "
                    f"(points sent in {sent:.2f} s): {done / elapsed:.0f} deliveries/s"
                )
                if done < args.deliveries:
                    sys.exit("not every notification was delivered")
    finally:
        healthy.close()
        hanging.close()


if __name__ == "__main__":
    main()
