#!/usr/bin/env python
"""Where the per-request Redis work lands on a Redis Cluster, and what one node can take of it.

    python bench/redis_cluster.py                 # 20 000 calls of each, 8 threads
    python bench/redis_cluster.py --calls 50000

Starts a throw-away 3-primary cluster (`iot.testing.redis_cluster`, redis-server from PATH) and runs
the platform's own functions on it through `RedisCluster` (`REDIS_CLUSTER=1`), over 1 000 devices:
what every telemetry request costs Redis: the admission (`iot.admission`: backpressure, room,
rate limits and a reservation in one script, every key under the event queue's tag `{events}`), the
publish after the commit (`{events}`), the consumer's read and ack (`{events}`), the device cache read
(untagged keys, spread over the slots) and a minute's counters (one MULTI under
`{telemetry:messages:<minute>}`). For each it prints how the calls spread over the
nodes (`INFO commandstats`) and Redis' own CPU per call (the commands' `usec` over the calls made), i.e.
the ceiling of one node: 1e6 / that many calls a second if the node did nothing else. Client-side rates are printed
too, but on a small loaded machine they measure the client more than Redis.
"""

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from iot.testing.redis_cluster import redis_cluster  # noqa: E402


def node_stats(urls: list[str]) -> dict[str, dict[str, tuple[int, float]]]:
    """Per node: command -> (calls, usec) from INFO commandstats."""
    import redis

    stats = {}
    for url in urls:
        info = redis.Redis.from_url(url).info("commandstats")
        stats[url] = {name.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for name, v in info.items()}
    return stats


def reset_stats(urls: list[str]) -> None:
    import redis

    for url in urls:
        redis.Redis.from_url(url).config_resetstat()


def run(
    name: str,
    urls: list[str],
    calls: int,
    threads: int,
    fn: Callable[[int], object],
    commands: tuple,
    *,
    per_result=False,
) -> None:
    """`calls` calls of `fn(n)` on `threads` threads; Redis CPU reported per call, or with `per_result` per
    unit of what the calls returned (events handled)."""
    reset_stats(urls)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(fn, range(calls)))
    per = sum(results) if per_result else calls
    elapsed = time.perf_counter() - started
    stats = node_stats(urls)
    per_node = [sum(stats[url].get(c, (0, 0))[0] for c in commands) for url in urls]
    usec = sum(stats[url].get(c, (0, 0))[1] for url in urls for c in commands)
    total = sum(per_node)
    per_call = usec / per
    shares = " / ".join(f"{100 * n / total:.0f}%" for n in per_node) if total else "-"
    print(
        f"{name:<38} {per / elapsed:>6.0f}/s client-side   commands per node: {shares:<14} "
        f"Redis CPU {per_call:5.1f} us each -> one node's ceiling ~{1e6 / per_call:,.0f}/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=8)
    options = parser.parse_args()
    with redis_cluster(nodes=3) as urls:
        os.environ.update(
            {
                "DJANGO_SETTINGS_MODULE": "iot.settings",
                "DJANGO_SECRET_KEY": os.environ.get("DJANGO_SECRET_KEY", "bench-only-secret-key"),
                "REDIS_URL": urls[0],
                "REDIS_CLUSTER": "1",
                # Not used here, but neither may be the cluster.
                "CELERY_BROKER_URL": "memory://",
                "CHANNEL_LAYER_REDIS_URL": "redis://127.0.0.1:1/0",
                "REDIS_KEY_PREFIX": f"iotbench-{uuid.uuid4().hex[:8]}",
                "RATE_LIMIT_TELEMETRY_PER_DEVICE": "100000000",
                "RATE_LIMIT_GLOBAL_PER_SECOND": "100000000",
                "EVENT_QUEUE_MAX_SIZE": "100000000",
            }
        )
        import django

        django.setup()
        from devices.cache import device_cache_key
        from iot.admission import ingest_admit
        from iot.cache import versioned_cache_get
        from iot.event_queue import ensure_consumer_group, event_handler, event_queue_consume, event_queue_publish
        from telemetry.events import counters_add

        event_handler("bench.noop")(lambda payload: None)
        ensure_consumer_group()
        devices = [str(uuid.uuid4()) for _ in range(1000)]
        now = datetime.now(UTC)
        reservations = [None] * options.calls

        def admit(n: int) -> None:
            reservations[n] = ingest_admit(device_id=devices[n % 1000], points=1).reservation

        def drain(n: int) -> int:
            handled = 0
            while report := event_queue_consume(consumer=f"bench-{n}", count=100, block_ms=1).handled:
                handled += report
            return handled

        print(f"Redis Cluster, 3 primaries; {options.calls} calls each, {options.threads} threads, 1000 devices")
        measures = [
            ("ingest_admit ({events})", options.calls, admit, ("evalsha",)),
            (
                "event_queue_publish ({events})",
                options.calls,
                lambda n: event_queue_publish(event_type="bench.noop", payload={"n": n}, reservation=reservations[n]),
                ("evalsha",),
            ),
            # Consumers read 100 events at a time and acknowledge each: per event, 1/100 XREADGROUP + 1 script.
            ("consume + ack, per event ({events})", options.threads, drain, ("xreadgroup", "evalsha")),
            (
                "versioned_cache_get (untagged)",
                options.calls,
                lambda n: versioned_cache_get(key=device_cache_key(devices[n % 1000])),
                ("evalsha",),
            ),
            (
                "counters_add (MULTI, one minute)",
                options.calls,
                lambda n: counters_add(device_id=devices[n % 1000], group_id="g", received_at=now, latencies_ms=[1.0]),
                ("hincrby", "hincrbyfloat", "incrby", "expire", "exec"),
            ),
        ]
        for name, calls, fn, commands in measures:
            run(name, urls, calls, options.threads, fn, commands, per_result=fn is drain)


if __name__ == "__main__":
    main()
