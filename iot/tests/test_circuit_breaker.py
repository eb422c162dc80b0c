"""The shared circuit breaker against real Redis: every transition with an injected clock, the probe limit across
processes, lease expiry, Redis down, metrics."""

import os
import subprocess
import sys
import time
import uuid

import pytest
import redis
from django.test import RequestFactory
from redis.backoff import NoBackoff
from redis.retry import Retry

from iot import circuit_breaker as cb
from iot.circuit_breaker import (
    BreakerOpen,
    BreakerPermit,
    breaker_acquire,
    breaker_forget,
    breaker_record,
    breaker_release,
    breaker_state,
    breaker_states,
)
from iot.metrics import metrics_view
from iot.redis import get_redis, redis_key, redis_tagged_key
from iot.testing.processes import REPO_ROOT, free_port

T0 = 1_700_000_000_000  # an injected Redis time, ms
THRESHOLD, TIMEOUT_MS, MAX_PROBES, LEASE_MS = 3, 10_000, 2, 4_000


@pytest.fixture(autouse=True)
def namespace(settings):
    """A key prefix of this test's own (its registry shared with nothing else), emptied afterwards."""
    prefix = f"{settings.REDIS_KEY_PREFIX}:cb-{uuid.uuid4().hex[:10]}"
    settings.REDIS_KEY_PREFIX = prefix
    settings.CIRCUIT_BREAKER_FAILURE_THRESHOLD = THRESHOLD
    settings.CIRCUIT_BREAKER_TIMEOUT_SECONDS = TIMEOUT_MS / 1000
    settings.CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS = MAX_PROBES
    settings.CIRCUIT_BREAKER_PROBE_LEASE_SECONDS = LEASE_MS / 1000
    yield prefix
    client = get_redis()
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


@pytest.fixture
def name() -> str:
    return f"channel:{uuid.uuid4()}"


def permit(name: str, now: int) -> BreakerPermit:
    decision = breaker_acquire(name=name, now_ms=now)
    assert isinstance(decision, BreakerPermit), decision
    return decision


def fail(name: str, now: int, times: int = 1) -> str | None:
    state = None
    for _ in range(times):
        state = breaker_record(permit=permit(name, now), success=False, now_ms=now)
    return state


def trip(name: str, now: int = T0) -> None:
    assert fail(name, now, THRESHOLD) == "open"


def probes(name: str) -> set[str]:
    return {m.decode() for m in get_redis().zrange(redis_tagged_key("breaker", "probes", name), 0, -1)}


def test_closed_opens_after_threshold_consecutive_failures(name):
    assert breaker_state(name=name, now_ms=T0) == "closed"
    first = permit(name, T0)
    assert first.probe_id is None and not first.degraded and first.allowed
    assert fail(name, T0, THRESHOLD - 1) == "closed"
    # A success resets the count: failures must be consecutive.
    assert breaker_record(permit=permit(name, T0), success=True, now_ms=T0) == "closed"
    assert fail(name, T0, THRESHOLD - 1) == "closed"
    assert fail(name, T0 + 5) == "open"
    refused = breaker_acquire(name=name, now_ms=T0 + 5)
    assert isinstance(refused, BreakerOpen) and not refused.allowed
    assert refused.state == "open" and refused.retry_after_seconds == TIMEOUT_MS / 1000


def test_open_refuses_until_the_timeout_then_half_opens(name):
    trip(name)
    late = breaker_acquire(name=name, now_ms=T0 + TIMEOUT_MS - 1)
    assert isinstance(late, BreakerOpen) and late.retry_after_seconds == 0.001
    assert breaker_state(name=name, now_ms=T0 + TIMEOUT_MS - 1) == "open"
    # Past the timeout reads already say half-open (that is how the next call is treated) ...
    assert breaker_state(name=name, now_ms=T0 + TIMEOUT_MS) == "half_open"
    probe = permit(name, T0 + TIMEOUT_MS)
    # ... and the next acquire makes it so, as a probe.
    assert probe.probe_id and probes(name) == {probe.probe_id}
    assert get_redis().hget(redis_tagged_key("breaker", "state", name), "s") == b"2"


def test_half_open_grants_at_most_max_probes(name):
    trip(name)
    now = T0 + TIMEOUT_MS
    granted = [permit(name, now + i) for i in range(MAX_PROBES)]
    assert len({p.probe_id for p in granted}) == MAX_PROBES
    refused = breaker_acquire(name=name, now_ms=now + 100)
    assert isinstance(refused, BreakerOpen) and refused.state == "half_open"
    # Until the oldest lease ends, at the latest.
    assert refused.retry_after_seconds == (LEASE_MS - 100) / 1000
    assert probes(name) == {p.probe_id for p in granted}


def test_half_open_closes_on_a_probe_success(name):
    trip(name)
    now = T0 + TIMEOUT_MS
    winner, other = permit(name, now), permit(name, now)
    assert breaker_record(permit=winner, success=True, now_ms=now + 1) == "closed"
    assert probes(name) == set()
    assert breaker_state(name=name, now_ms=now + 1) == "closed"
    after = permit(name, now + 2)
    assert after.probe_id is None
    # The other probe's late failure changes nothing: its slot went with the transition.
    assert breaker_record(permit=other, success=False, now_ms=now + 3) == "closed"
    # And failures count from zero again.
    assert fail(name, now + 4, THRESHOLD - 1) == "closed"
    assert fail(name, now + 5) == "open"


def test_half_open_reopens_on_a_probe_failure_for_a_full_timeout(name):
    trip(name)
    now = T0 + TIMEOUT_MS
    probe, other = permit(name, now), permit(name, now)
    assert breaker_record(permit=probe, success=False, now_ms=now + 500) == "open"
    assert probes(name) == set()
    refused = breaker_acquire(name=name, now_ms=now + 500)
    assert isinstance(refused, BreakerOpen) and refused.state == "open"
    assert refused.retry_after_seconds == TIMEOUT_MS / 1000
    # A probe of the finished half-open period can't close it.
    assert breaker_record(permit=other, success=True, now_ms=now + 600) == "open"
    assert isinstance(breaker_acquire(name=name, now_ms=now + 500 + TIMEOUT_MS - 1), BreakerOpen)
    assert permit(name, now + 500 + TIMEOUT_MS).probe_id


def test_a_dead_probes_slot_is_freed_after_its_lease(name):
    trip(name)
    now = T0 + TIMEOUT_MS
    dead = [permit(name, now) for _ in range(MAX_PROBES)]  # their workers never report
    assert isinstance(breaker_acquire(name=name, now_ms=now + LEASE_MS - 1), BreakerOpen)
    fresh = permit(name, now + LEASE_MS)
    assert fresh.probe_id and probes(name) == {fresh.probe_id}
    # A dead probe reporting after its lease decides nothing ...
    assert breaker_record(permit=dead[0], success=True, now_ms=now + LEASE_MS + 1) == "half_open"
    # ... the live one does.
    assert breaker_record(permit=fresh, success=True, now_ms=now + LEASE_MS + 2) == "closed"


def test_an_ended_lease_counts_for_nothing_even_before_anyone_reclaims_it(name):
    trip(name)
    now = T0 + TIMEOUT_MS
    probe = permit(name, now)
    assert breaker_record(permit=probe, success=False, now_ms=now + LEASE_MS) == "half_open"
    assert probes(name) == set()


def test_release_frees_a_probe_slot_without_a_verdict(name):
    trip(name)
    now = T0 + TIMEOUT_MS
    held = [permit(name, now) for _ in range(MAX_PROBES)]
    assert isinstance(breaker_acquire(name=name, now_ms=now), BreakerOpen)
    breaker_release(permit=held[0], now_ms=now + 1)
    assert breaker_state(name=name, now_ms=now + 1) == "half_open"
    assert permit(name, now + 2).probe_id


def test_outcomes_from_an_earlier_closed_period_do_not_count(name):
    in_flight = [permit(name, T0) for _ in range(THRESHOLD)]
    trip(name)
    # Late failures while open, and a late success, change nothing.
    for p in in_flight[:-1]:
        assert breaker_record(permit=p, success=False, now_ms=T0 + 1) == "open"
    assert breaker_record(permit=in_flight[-1], success=True, now_ms=T0 + 1) == "open"
    now = T0 + TIMEOUT_MS
    assert breaker_record(permit=permit(name, now), success=True, now_ms=now) == "closed"
    # Failures of calls issued before the breaker opened don't count in the new closed period.
    for p in in_flight:
        assert breaker_record(permit=p, success=False, now_ms=now + 1) == "closed"
    assert get_redis().hget(redis_tagged_key("breaker", "state", name), "f") == b"0"


def test_states_are_read_in_one_round_trip(name, monkeypatch):
    other, never = f"{name}-b", f"{name}-never"
    trip(other)
    calls = []
    original = cb._STATES_READ
    monkeypatch.setattr(cb, "_STATES_READ", lambda **kw: calls.append(kw) or original(**kw))
    states = breaker_states(names=[name, other, never, name], now_ms=T0 + 1)
    assert states == {name: "closed", other: "open", never: "closed"}
    assert len(calls) == 1
    assert breaker_states(names=[], now_ms=T0) == {}


@pytest.mark.parametrize("bad", ["", "x" * 201, None, 5])
def test_names_are_validated(bad):
    with pytest.raises(ValueError):
        breaker_acquire(name=bad)


def test_real_clock_transitions_with_a_tiny_timeout(name, settings):
    """No injected time: Redis' TIME drives open -> half-open (polled with a deadline, no fixed sleep)."""
    settings.CIRCUIT_BREAKER_TIMEOUT_SECONDS = 0.2
    for _ in range(THRESHOLD):
        breaker_record(permit=breaker_acquire(name=name), success=False)
    assert breaker_state(name=name) == "open"
    assert isinstance(breaker_acquire(name=name), BreakerOpen)
    deadline = time.monotonic() + 5
    while isinstance(decision := breaker_acquire(name=name), BreakerOpen):
        assert time.monotonic() < deadline, "the breaker never half-opened"
        time.sleep(0.02)
    assert decision.probe_id
    assert breaker_record(permit=decision, success=True) == "closed"


_CHILD = """
import sys
from concurrent.futures import ThreadPoolExecutor

import django

django.setup()
from iot.circuit_breaker import breaker_acquire
from iot.redis import get_redis, redis_key

name, threads = sys.argv[1], int(sys.argv[2])
client = get_redis()
client.rpush(redis_key("ready"), 1)
while not client.blpop([redis_key("go")], timeout=1):
    pass
with ThreadPoolExecutor(threads) as pool:
    decisions = list(pool.map(lambda _: breaker_acquire(name=name), range(threads)))
print(",".join(d.probe_id for d in decisions if d.allowed))
"""


def test_probe_limit_holds_across_processes(name, namespace):
    """4 processes x 4 threads acquire at once on a half-open breaker: exactly MAX_PROBES probes in all."""
    client = get_redis()
    seconds, micros = client.time()
    redis_now = seconds * 1000 + micros // 1000
    trip(name, now=redis_now - 10 * TIMEOUT_MS)  # opened long ago on Redis' clock: the next acquire half-opens
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "iot.settings_test",
        "REDIS_KEY_PREFIX": namespace,
        "CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS": str(MAX_PROBES),
        "CIRCUIT_BREAKER_PROBE_LEASE_SECONDS": "60",
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, name, "4"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        deadline = time.monotonic() + 60
        ready = 0
        while ready < 4 and time.monotonic() < deadline:
            ready += client.blpop([redis_key("ready")], timeout=1) is not None
        assert ready == 4, [child.poll() for child in children]
        client.rpush(redis_key("go"), *[1] * 4)
        results = [child.communicate(timeout=60) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    assert [child.returncode for child in children] == [0] * 4, [err for _, err in results]
    granted = [probe for out, _ in results for probe in out.strip().split(",") if probe]
    assert len(granted) == MAX_PROBES
    assert set(granted) == probes(name)
    assert breaker_state(name=name) == "half_open"
    # The refusals the children counted reach this process's scrape: the count lives in Redis.
    rejected = sample(scrape(), f'iot_circuit_breaker_calls_total{{breaker="{name}",outcome="rejected"}}')
    assert rejected == 16 - MAX_PROBES


def dead_redis() -> redis.Redis:
    """A client for a port nothing listens on: real connection refusals, at once like the shared client's
    (`from_url` sets no retry; a bare `redis.Redis()` retries 10 times with backoff, ~3.5 s per call)."""
    return redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))


@pytest.fixture
def redis_down(monkeypatch):
    """Every breaker call goes to a Redis that refuses connections."""
    dead = dead_redis()
    monkeypatch.setattr(cb, "get_redis", lambda: dead)
    yield
    dead.close()


def test_redis_down_fails_open_and_never_raises(name, redis_down):
    decision = breaker_acquire(name=name)
    assert isinstance(decision, BreakerPermit) and decision.degraded and decision.probe_id is None
    assert breaker_record(permit=decision, success=False) is None
    breaker_release(permit=decision)
    assert breaker_state(name=name) == "closed"
    assert breaker_states(names=[name, f"{name}-b"]) == {name: "closed", f"{name}-b": "closed"}


def test_redis_down_mid_call_never_raises(name, monkeypatch):
    trip(name)
    probe = permit(name, T0 + TIMEOUT_MS)
    dead = dead_redis()
    monkeypatch.setattr(cb, "get_redis", lambda: dead)
    assert breaker_record(permit=probe, success=True, now_ms=T0 + TIMEOUT_MS) is None
    monkeypatch.undo()
    assert breaker_state(name=name, now_ms=T0 + TIMEOUT_MS) == "half_open"  # nothing was recorded


def scrape() -> str:
    return metrics_view(RequestFactory().get("/metrics")).content.decode()


def sample(text: str, prefix: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_expose_state_and_calls(name):
    closed, half = f"{name}-closed", f"{name}-half"
    assert breaker_record(permit=breaker_acquire(name=closed), success=True) == "closed"
    trip(name, now=T0)  # opened at an injected time far in the past: by Redis' clock it is half-open already
    seconds, micros = get_redis().time()
    trip(half, now=seconds * 1000 - TIMEOUT_MS - 1)
    breaker_record(permit=breaker_acquire(name=half), success=False)  # the probe fails: open again
    assert isinstance(breaker_acquire(name=half), BreakerOpen)

    text = scrape()
    assert sample(text, f'iot_circuit_breaker_state{{breaker="{closed}"}}') == 0.0
    assert sample(text, f'iot_circuit_breaker_state{{breaker="{half}"}}') == 1.0
    assert sample(text, f'iot_circuit_breaker_state{{breaker="{name}"}}') == 2.0
    assert sample(text, f'iot_circuit_breaker_calls_total{{breaker="{closed}",outcome="success"}}') == 1.0
    assert sample(text, f'iot_circuit_breaker_calls_total{{breaker="{half}",outcome="failure"}}') == THRESHOLD + 1
    assert sample(text, f'iot_circuit_breaker_calls_total{{breaker="{half}",outcome="rejected"}}') == 1.0

    assert sample(text, f'iot_circuit_breaker_calls_total{{breaker="{closed}",outcome="rejected"}}') == 0.0
    assert "# TYPE iot_circuit_breaker_calls_total counter" in text

    breaker_forget(name=half)
    after = scrape()
    assert f'breaker="{half}"' not in after and f'breaker="{closed}"' in after
    assert not get_redis().exists(redis_tagged_key("breaker", "state", half))


def test_metrics_scrape_survives_redis_down(name, redis_down):
    text = scrape()
    assert "# TYPE iot_circuit_breaker_state gauge" in text and "# TYPE iot_circuit_breaker_calls_total counter" in text
    assert "iot_circuit_breaker_state{" not in text and "iot_circuit_breaker_calls_total{" not in text
