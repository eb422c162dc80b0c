"""The telemetry rate limiter against real Redis: exact under concurrency from several processes."""

import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from iot.ratelimit import rate_limit_consume, rate_limit_keys, rate_limit_peek
from iot.redis import get_redis, redis_key
from iot.testing.processes import REPO_ROOT, wait_until


@pytest.fixture(autouse=True)
def namespace(redis_namespace, settings):
    """A key prefix of this test's own, so the global counter is not shared with anything else."""
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 100
    settings.RATE_LIMIT_WINDOW_SECONDS = 60
    settings.RATE_LIMIT_GLOBAL_PER_SECOND = 10_000
    return redis_namespace


def device() -> str:
    return uuid.uuid4().hex


def redis_now_ms() -> int:
    seconds, micros = get_redis().time()
    return seconds * 1000 + micros // 1000


_CHILD = """
import sys
from concurrent.futures import ThreadPoolExecutor

import django

django.setup()
from iot.ratelimit import rate_limit_consume
from iot.redis import get_redis, redis_key

device_id, calls = sys.argv[1], int(sys.argv[2])
client = get_redis()
client.rpush(redis_key("ready"), 1)
while not client.blpop([redis_key("go")], timeout=1):
    pass
with ThreadPoolExecutor(8) as pool:
    decisions = list(pool.map(lambda _: rate_limit_consume(device_id=device_id, points=1), range(calls)))
print(sum(d.allowed for d in decisions))
"""


def test_concurrent_processes_admit_exactly_the_limit(namespace):
    device_id = device()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "iot.settings_test", "REDIS_KEY_PREFIX": namespace}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, device_id, "50"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    client = get_redis()
    try:
        # Start all three at once: each signals readiness, then waits for "go".
        deadline = time.monotonic() + 60
        ready = 0
        while ready < 3 and time.monotonic() < deadline:
            ready += client.blpop([redis_key("ready")], timeout=1) is not None
        assert ready == 3, [child.poll() for child in children]
        client.rpush(redis_key("go"), *[1] * 3)
        results = [child.communicate(timeout=60) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    assert [child.returncode for child in children] == [0, 0, 0], [err for _, err in results]
    allowed = sum(int(out.strip()) for out, _ in results)
    assert allowed == 100
    peek = rate_limit_peek(device_id=device_id)
    assert not peek.allowed and peek.remaining == 0 and peek.scope == "device"
    assert int(client.get(rate_limit_keys(device_id)[1])) == 100


def test_batch_consumes_its_number_of_points():
    device_id = device()
    with ThreadPoolExecutor(16) as pool:
        decisions = list(pool.map(lambda _: rate_limit_consume(device_id=device_id, points=5), range(30)))
    assert sum(d.allowed for d in decisions) == 20
    refused = [d for d in decisions if not d.allowed]
    assert all(d.scope == "device" and d.remaining == 0 and d.retry_after_seconds >= 1 for d in refused)
    assert rate_limit_peek(device_id=device_id).remaining == 0


def test_decision_reports_limit_and_remaining():
    device_id = device()
    first = rate_limit_consume(device_id=device_id, points=1)
    assert (first.allowed, first.limit, first.remaining, first.retry_after_seconds, first.scope) == (
        True,
        100,
        99,
        0,
        "",
    )
    assert rate_limit_consume(device_id=device_id, points=9).remaining == 90
    # A batch larger than what is left is refused whole and consumes nothing.
    assert rate_limit_consume(device_id=device_id, points=80).allowed
    too_big = rate_limit_consume(device_id=device_id, points=11)
    assert not too_big.allowed and too_big.remaining == 10 and too_big.scope == "device"
    assert rate_limit_consume(device_id=device_id, points=10).allowed
    assert rate_limit_peek(device_id=device_id).remaining == 0


def test_peek_consumes_nothing():
    device_id = device()
    rate_limit_consume(device_id=device_id, points=30)
    for _ in range(5):
        peek = rate_limit_peek(device_id=device_id)
        assert peek.allowed and peek.remaining == 70 and peek.retry_after_seconds == 0
    assert rate_limit_peek(device_id=device()).remaining == 100
    assert not get_redis().exists(rate_limit_keys("never-seen")[0])


def test_devices_are_isolated():
    noisy, quiet = device(), device()
    assert rate_limit_consume(device_id=noisy, points=100).allowed
    assert not rate_limit_consume(device_id=noisy, points=1).allowed
    decision = rate_limit_consume(device_id=quiet, points=1)
    assert decision.allowed and decision.remaining == 99


def test_oversized_batch_can_never_fit_and_consumes_nothing():
    device_id = device()
    decision = rate_limit_consume(device_id=device_id, points=101)
    assert not decision.allowed
    assert decision.scope == "device"
    assert decision.retry_after_seconds == 60
    assert rate_limit_peek(device_id=device_id).remaining == 100


@pytest.mark.parametrize("points", [0, -1, 1.5, True])
def test_points_must_be_a_positive_integer(points):
    with pytest.raises(ValueError):
        rate_limit_consume(device_id=device(), points=points)


def test_global_limit_admits_exactly_its_limit_within_one_second(settings, namespace):
    settings.RATE_LIMIT_GLOBAL_PER_SECOND = 10
    client = get_redis()
    for attempt in range(5):
        # A fresh global counter per attempt; start the burst early in a Redis second.
        settings.REDIS_KEY_PREFIX = f"{namespace}:burst{attempt}"
        wait_until(lambda: client.time()[1] < 400_000, timeout=3, interval=0.01, message="start of a second")
        started = client.time()[0]
        with ThreadPoolExecutor(30) as pool:
            decisions = list(pool.map(lambda _: rate_limit_consume(device_id=device(), points=1), range(30)))
        if client.time()[0] == started:  # the whole burst fell inside one fixed window
            break
    else:
        pytest.fail("no burst of 30 calls fitted in one second")
    assert sum(d.allowed for d in decisions) == 10
    refused = [d for d in decisions if not d.allowed]
    assert len(refused) == 20
    assert all(d.scope == "global" and d.retry_after_seconds == 1 and d.remaining == 100 for d in refused)


def test_global_refusal_consumes_no_device_quota(settings):
    device_id = device()
    settings.RATE_LIMIT_GLOBAL_PER_SECOND = 0  # every request is refused globally, whatever the second
    decision = rate_limit_consume(device_id=device_id, points=5)
    assert not decision.allowed and decision.scope == "global" and decision.retry_after_seconds == 1
    assert not get_redis().exists(rate_limit_keys(device_id)[0])
    settings.RATE_LIMIT_GLOBAL_PER_SECOND = 10_000
    assert rate_limit_peek(device_id=device_id).remaining == 100


def test_device_refusal_consumes_no_global_quota():
    device_id = device()
    assert rate_limit_consume(device_id=device_id, points=100).allowed
    global_key = rate_limit_keys("any")[2]
    before = get_redis().hgetall(global_key)
    assert not rate_limit_consume(device_id=device_id, points=3).allowed
    assert get_redis().hgetall(global_key) == before


def test_window_slides_and_retry_after_is_when_the_request_fits(settings):
    settings.RATE_LIMIT_WINDOW_SECONDS = 2
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 3
    device_id = device()
    assert rate_limit_consume(device_id=device_id, points=2).allowed
    first_at = redis_now_ms()  # read after the entry was stamped, so "1 s later" means at least 1 s old
    wait_until(lambda: redis_now_ms() >= first_at + 1000, timeout=3, interval=0.02, message="one second later")
    second_at = redis_now_ms()
    assert rate_limit_consume(device_id=device_id, points=1).allowed
    # One point fits once the first entry (2 points, ~1 s old) expires: within a second.
    one = rate_limit_consume(device_id=device_id, points=1)
    assert not one.allowed and one.retry_after_seconds == 1
    # Three points need both entries gone: the second expires ~2 s from now.
    three = rate_limit_consume(device_id=device_id, points=3)
    assert not three.allowed and three.retry_after_seconds == 2
    refused_at = time.monotonic()
    wait_until(
        lambda: rate_limit_peek(device_id=device_id).allowed, timeout=3, interval=0.02, message="the window to slide"
    )
    assert time.monotonic() - refused_at <= one.retry_after_seconds + 0.5
    assert rate_limit_consume(device_id=device_id, points=2).allowed  # the first entry's 2 points are free again
    assert not rate_limit_consume(device_id=device_id, points=1).allowed
    assert redis_now_ms() - second_at < 2000  # still inside the second entry's window: the refusal was exact


def test_expired_entries_are_subtracted_exactly_at_scale(settings):
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 1_000_000
    settings.RATE_LIMIT_GLOBAL_PER_SECOND = 1_000_000
    device_id = device()
    client = get_redis()
    with ThreadPoolExecutor(8) as pool:
        decisions = list(pool.map(lambda i: rate_limit_consume(device_id=device_id, points=1 + i % 3), range(3000)))
    assert all(d.allowed for d in decisions)
    log_key = rate_limit_keys(device_id)[0]
    total_key = rate_limit_keys(device_id)[1]
    assert client.zcard(log_key) == 3000
    assert int(client.get(total_key)) == sum(1 + i % 3 for i in range(3000))
    settings.RATE_LIMIT_WINDOW_SECONDS = 1  # shrink the window: every entry expires within a second
    wait_until(
        lambda: rate_limit_peek(device_id=device_id).remaining == 1_000_000,
        timeout=5,
        interval=0.05,
        message="all entries to expire",
    )
    assert client.zcard(log_key) == 0 and not client.exists(total_key)
    assert rate_limit_consume(device_id=device_id, points=7).remaining == 1_000_000 - 7
    assert client.zcard(log_key) == 1 and int(client.get(total_key)) == 7


def test_keys_expire_on_their_own():
    device_id = device()
    rate_limit_consume(device_id=device_id, points=1)
    client = get_redis()
    for key in (
        rate_limit_keys(device_id)[0],
        rate_limit_keys(device_id)[1],
    ):
        assert 0 < client.pttl(key) <= 61_000
    assert 0 < client.ttl(rate_limit_keys("any")[2]) <= 2


# --- a lost key of a device's pair (DEL, or an evicting maxmemory-policy) -----------------------


def _device_keys(device_id: str) -> tuple[str, str]:
    log_key, total_key, _ = rate_limit_keys(device_id)
    return log_key, total_key


def test_lost_total_is_recomputed_from_the_log(settings):
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 10
    device_id = device()
    log_key, total_key = _device_keys(device_id)
    client = get_redis()
    assert sum(rate_limit_consume(device_id=device_id, points=p).allowed for p in (3, 3, 4)) == 3
    client.delete(total_key)  # what an eviction of the total alone does
    admitted = sum(rate_limit_consume(device_id=device_id, points=1).allowed for _ in range(10))
    assert admitted == 0  # the old script admitted 10 more: 20 in one window against a limit of 10
    assert int(client.get(total_key)) == 10 and client.zcard(log_key) == 3
    assert 0 < client.pttl(total_key) <= client.pttl(log_key) + 5  # expires with its log, not later
    peek = rate_limit_peek(device_id=device_id)
    assert not peek.allowed and peek.remaining == 0 and peek.retry_after_seconds >= 59


def test_lost_total_is_recomputed_without_the_entries_that_left_the_window(settings):
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 10
    device_id = device()
    log_key, total_key = _device_keys(device_id)
    client = get_redis()
    now = redis_now_ms()
    # Two entries of 4 points, one of them older than the window (60 s).
    client.zadd(log_key, {"4:old": now - 61_000, "4:recent": now - 1_000})
    client.pexpire(log_key, 61_000)
    decision = rate_limit_consume(device_id=device_id, points=6)
    assert decision.allowed and decision.remaining == 0
    assert int(client.get(total_key)) == 10 and client.zcard(log_key) == 2


def test_lost_log_keeps_the_total_until_a_window_after_the_last_admission(settings):
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 10
    device_id = device()
    log_key, total_key = _device_keys(device_id)
    client = get_redis()
    assert rate_limit_consume(device_id=device_id, points=10).allowed
    client.delete(log_key)  # the converse: the log evicted, the total kept
    refused = rate_limit_consume(device_id=device_id, points=1)
    assert not refused.allowed and refused.scope == "device" and refused.remaining == 0
    assert 59 <= refused.retry_after_seconds <= 60  # the points free a window after they were taken
    assert client.zrange(log_key, 0, -1) == [b"10:rebuilt"] and int(client.get(total_key)) == 10


def test_lost_log_with_a_total_older_than_the_window_frees_it(settings):
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 10
    device_id = device()
    log_key, total_key = _device_keys(device_id)
    client = get_redis()
    # A total whose last admission was more than a window ago (its TTL is window + 1 s from then).
    client.set(total_key, 10, px=500)
    decision = rate_limit_consume(device_id=device_id, points=10)
    assert decision.allowed and decision.remaining == 0
    assert int(client.get(total_key)) == 10 and client.zcard(log_key) == 1
