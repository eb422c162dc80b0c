"""The platform on a real Redis Cluster (three primaries, `iot.testing.redis_cluster`), through redis-py's
`RedisCluster` (`REDIS_CLUSTER=1`).

First the primitives in this process, under concurrency: the rate limiter stays exact, the event queue's
depth stays exact through publish, consume, reclaim and reconcile, the cache's many-key calls go per slot.
Then a whole platform (web x2 + worker) on the cluster, its Celery broker and Channels layer on a plain
Redis (neither speaks Cluster): exact rate limit over HTTP, every event consumed and counted, readiness.
A key of a script in the wrong slot would fail all of this with `CROSSSLOT`.
"""

import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from redis.cluster import RedisCluster

import iot.tests.event_handlers  # noqa: F401 - registers test.record and test.fail
from iot import cache, event_queue, ratelimit
from iot.redis import get_redis, redis_key, redis_key_slot
from iot.testing.live import UNLIMITED, dedicated_platform, register_device
from iot.testing.processes import http_client, wait_until
from iot.testing.redis_cluster import redis_cluster, redis_cluster_binaries
from iot.testing.telemetry import point_body

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(redis_cluster_binaries() is None, reason="redis-server/redis-cli not installed"),
]


@pytest.fixture(scope="module")
def cluster_urls():
    with redis_cluster(nodes=3) as urls:
        yield urls


@pytest.fixture
def on_cluster(settings, cluster_urls):
    """This process' Redis client is the cluster's, under a fresh prefix."""
    settings.REDIS_URL = cluster_urls[0]
    settings.REDIS_CLUSTER = True
    settings.REDIS_KEY_PREFIX = f"cluster-{uuid.uuid4().hex[:8]}"
    assert isinstance(get_redis(), RedisCluster)
    return get_redis()


def _node_of(client: RedisCluster, key: str) -> str:
    return client.get_node_from_key(key).name


def test_rate_limiter_is_exact_on_the_cluster(on_cluster, settings):
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 25
    # The global second, shared by every device: 10 points a second, exactly, across 30 devices (one
    # second boundary may fall among the 30 requests: at most 10 in each second).
    settings.RATE_LIMIT_GLOBAL_PER_SECOND = 10
    fresh = [f"g-{n}" for n in range(30)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        scopes = [d.scope for d in pool.map(lambda d: ratelimit.rate_limit_consume(device_id=d, points=1), fresh)]
    assert scopes.count("") in range(10, 21) and set(scopes) <= {"", "global"}
    # Per device, 160 requests over 4 devices: exactly 25 each.
    settings.RATE_LIMIT_GLOBAL_PER_SECOND = 1_000_000
    devices = [f"dev-{n}" for n in range(4)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        decisions = list(
            pool.map(lambda n: ratelimit.rate_limit_consume(device_id=devices[n % 4], points=1), range(160))
        )
    allowed = Counter(devices[n % 4] for n, decision in enumerate(decisions) if decision.allowed)
    assert allowed == {device: 25 for device in devices}
    # Every rate-limit key is on the event queue's node: the cost of taking a device's window, the global
    # second and the queue's room in one script (`iot.admission`, docs/SCALING.md).
    keys = [key for d in devices + fresh for key in ratelimit.rate_limit_keys(d)]
    assert {_node_of(on_cluster, key) for key in keys} == {_node_of(on_cluster, event_queue._stream_key())}


def test_event_queue_depth_stays_exact_on_the_cluster(on_cluster, settings):
    settings.EVENT_QUEUE_MAX_SIZE = 100_000
    settings.EVENT_QUEUE_MAX_DELIVERIES = 2
    event_queue.ensure_consumer_group()
    counter, seen = redis_key("t", "counter"), redis_key("t", "seen")

    def publish(n: int) -> None:
        event_queue.event_queue_publish(
            event_type="test.record", payload={"counter": counter, "seen": seen, "n": n}, weight=1 + n % 3
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(publish, range(200)))
    event_queue.event_queue_publish(event_type="test.fail", payload={"attempts": redis_key("t", "attempts")})
    assert event_queue.event_queue_depth() == sum(1 + n % 3 for n in range(200)) + 1

    def consume(name: str) -> int:
        handled = 0
        while True:
            report = event_queue.event_queue_consume(consumer=name, count=20, block_ms=200)
            if not report.handled + report.failed:
                return handled
            handled += report.handled

    with ThreadPoolExecutor(max_workers=3) as pool:
        assert sum(pool.map(consume, ["c1", "c2", "c3"])) == 200
    assert int(on_cluster.get(counter)) == 200 and on_cluster.scard(seen) == 200
    # The poison event: failed once, reclaimed and failed again, then dead-lettered.
    while event_queue.event_queue_depth():
        event_queue.event_queue_reclaim(consumer="c4", min_idle_ms=0)
    assert event_queue.event_queue_dead_letters() == 1
    assert event_queue.event_queue_reconcile().depth_after == 0
    assert event_queue.prune_idle_consumers(idle_ms=0) >= 1


def test_cache_many_key_calls_go_per_slot_on_the_cluster(on_cluster):
    keys = [redis_key("cache", "device", uuid.uuid4()) for _ in range(60)]
    assert len({_node_of(on_cluster, key) for key in keys}) == 3  # untagged keys spread over every node
    lookups = cache.versioned_cache_get_many(keys=keys)
    for key, lookup in zip(keys, lookups, strict=True):
        assert cache.versioned_cache_fill(key=key, version=1, payload=b"v1", lookup=lookup, ttl_seconds=60)
    assert [lookup.payload for lookup in cache.versioned_cache_get_many(keys=keys)] == [b"v1"] * 60
    cache.versioned_cache_invalidate_many(versions=dict.fromkeys(keys, 2))
    stale = cache.versioned_cache_get_many(keys=keys)
    assert not any(lookup.hit for lookup in stale)
    # An old read (version 1) can't come back after the tombstones; version 3 can.
    assert not any(
        cache.versioned_cache_fill(key=k, version=1, payload=b"old", lookup=lookup, ttl_seconds=60)
        for k, lookup in zip(keys, stale, strict=True)
    )
    assert cache.versioned_cache_fill(key=keys[0], version=3, payload=b"v3", lookup=stale[0], ttl_seconds=60)


def test_a_minutes_counters_are_one_transaction_on_the_cluster(on_cluster):
    from telemetry.events import counters_add
    from telemetry.redis_keys import count_window_key, count_window_start, messages_per_second_key

    received = datetime.now(UTC)
    counters_add(device_id="d1", group_id="g1", received_at=received, latencies_ms=[1.0, 2.0, 3.0])
    window = count_window_key(count_window_start(received.timestamp()))
    second = messages_per_second_key(int(received.timestamp()))
    assert redis_key_slot(window) == redis_key_slot(second)
    assert on_cluster.hget(window, "total") == b"3" and on_cluster.get(second) == b"3"


CLUSTER_PLATFORM_ENV = {
    **UNLIMITED,
    "RATE_LIMIT_TELEMETRY_PER_DEVICE": "20",
    "REDIS_CLUSTER": "1",
    "WEB_THREADS": "6",
    "WEB_OPS_THREADS": "1",
    "DB_POOL_MAX_SIZE": "8",
    "EVENT_BUS_WORKER_COUNT": "1",
}


def test_the_platform_runs_on_the_cluster(
    django_db_setup, django_db_blocker, platform_logs, operator_token, settings, cluster_urls
):
    env = {
        **CLUSTER_PLATFORM_ENV,
        "REDIS_URL": cluster_urls[0],
        # Neither speaks Redis Cluster: Celery's broker and the Channels layer stay on a plain Redis.
        "CELERY_BROKER_URL": settings.REDIS_URL,
        "CHANNEL_LAYER_REDIS_URL": settings.REDIS_URL,
    }
    with dedicated_platform(django_db_blocker, platform_logs, name="redis-cluster", env=env) as running:
        with http_client(running, operator_token) as api:
            wait_until(lambda: api.get("/health/ready").status_code == 200, timeout=60, message="ready on the cluster")
            devices = [register_device(api, "SN-CLUSTER")["id"] for _ in range(3)]

            def send(n: int) -> int:
                return api.post("/telemetry/point", json=point_body(devices[n % 3])).status_code

            with ThreadPoolExecutor(max_workers=24) as pool:
                statuses = list(pool.map(send, range(90)))
            assert Counter(statuses) == {202: 60, 429: 30}  # 20 per device, exactly

            def counted() -> list[int]:
                return [api.get(f"/analytics/devices/{d}").json()["message_count"] for d in devices]

            wait_until(lambda: counted() == [20, 20, 20], timeout=60, message="every event consumed and counted")
            patched = api.patch(f"/devices/{devices[0]}", json={"location": "rack 7"})
            assert patched.status_code == 200, patched.text
            assert api.get(f"/devices/{devices[0]}").json()["location"] == "rack 7"
            ready = api.get("/health/ready").json()
            assert ready["checks"] == {"database": "ok", "redis": "ok", "workers": "ok", "redis_policy": "ok"}, ready
