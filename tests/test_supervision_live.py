"""Issue 6, item 1, live: SIGKILL a supervised process of the real platform under HTTP load.

The runner (`scripts/platform.py worker`) must restart only the killed process (an event
consumer, or the Celery main process); web and the other processes keep their pids, no request
is refused, and the restarted process does its work again. The figures (time from the kill to
the new process, requests sent and refused meanwhile) are printed; run with `-s` to see them:

    pytest tests/test_supervision_live.py -s
"""

import os
import signal
import time

import httpx
import psutil
import pytest
import redis
from django.test import override_settings

from iot import event_queue
from iot.redis import get_redis, redis_key, redis_tagged_key
from iot.testing.live import dedicated_platform, register_device
from iot.testing.processes import wait_until
from iot.testing.supervision import CELERY, CONSUMER, PointLoad, children_matching, is_running

pytestmark = pytest.mark.live

PREFIX = "iottest-supervision"
ENV = {
    "REDIS_KEY_PREFIX": PREFIX,  # its own event queue, heartbeats and rate-limit windows
    "EVENT_BUS_WORKER_COUNT": "2",
    "WORKER_CONCURRENCY": "1",
    # A killed consumer's unacknowledged entries are reclaimed after this long (default 30 s).
    "EVENT_QUEUE_CLAIM_IDLE_MS": "1000",
    # Only a fault may refuse anything here.
    "RATE_LIMIT_TELEMETRY_PER_DEVICE": "100000000",
    "RATE_LIMIT_GLOBAL_PER_SECOND": "100000000",
}
RESTART_DEADLINE = 10.0  # detection (0.1 s) + first backoff (0.5 s), with room for a loaded machine


@pytest.fixture(scope="module")
def supervised(django_db_setup, django_db_blocker, platform_logs):
    with dedicated_platform(django_db_blocker, platform_logs, name="supervision", env=ENV) as running:
        web, worker = running.processes
        yield running, web.process.pid, worker.process.pid


@pytest.fixture
def client(supervised, operator_token):
    running, _, _ = supervised
    with httpx.Client(base_url=running.base_url, headers={"Authorization": f"Token {operator_token}"}) as client:
        yield client


def _group_consumers() -> set[str]:
    with override_settings(REDIS_KEY_PREFIX=PREFIX):
        try:
            consumers = get_redis().xinfo_consumers(redis_tagged_key("events", "stream"), event_queue.GROUP)
        except redis.ResponseError:  # no stream or group yet
            return set()
    return {consumer["name"].decode() for consumer in consumers}


def _depth() -> int:
    with override_settings(REDIS_KEY_PREFIX=PREFIX):
        return event_queue.event_queue_depth()


def _heartbeats() -> int:
    with override_settings(REDIS_KEY_PREFIX=PREFIX):
        return get_redis().zcard(redis_key("workers", "heartbeat"))


def _clear_heartbeats() -> None:
    with override_settings(REDIS_KEY_PREFIX=PREFIX):
        get_redis().delete(redis_key("workers", "heartbeat"))


def _consumer_name(pid: int) -> str:
    return f"{os.uname().nodename}-{pid}"


def _web_pids(web_pid: int) -> set[int]:
    return {web_pid, *(child.pid for child in psutil.Process(web_pid).children())}


def _consumers(runner_pid: int) -> dict[int, psutil.Process]:
    consumers = children_matching(runner_pid, CONSUMER)
    return consumers if len(consumers) == 2 else {}


def _reading(pids) -> bool:
    """Each of these consumers has been handed entries (Redis 7 lists a group consumer only from then on)."""
    return {_consumer_name(pid) for pid in pids} <= _group_consumers()


def test_killed_event_consumer_is_restarted_alone_and_no_request_is_refused(supervised, client, operator_token):
    running, web_pid, runner_pid = supervised
    device_id = register_device(client, "SN-SUP")["id"]
    consumers = wait_until(lambda: _consumers(runner_pid), timeout=60, message="two consumers")
    celery = set(children_matching(runner_pid, CELERY))
    web = _web_pids(web_pid)
    victim, survivor = sorted(consumers)

    with PointLoad(base_url=running.base_url, token=operator_token, device_id=device_id) as load:
        wait_until(lambda: load.accepted() >= 100 and _reading(consumers), timeout=60, message="load consumed")
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        replacement = wait_until(
            lambda: set(children_matching(runner_pid, CONSUMER)) - {victim, survivor},
            timeout=RESTART_DEADLINE,
            interval=0.01,
            message="a new consumer process",
        ).pop()
        restarted_at = time.monotonic()
        wait_until(lambda: _reading([replacement]), timeout=60, message="the new consumer reading")
        reading_at = time.monotonic()
        accepted = load.accepted()
        wait_until(lambda: load.accepted() >= accepted + 100, timeout=30, message="load after the restart")
    during = load.between(killed_at, reading_at)

    print(
        f"\nconsumer kill: new process after {restarted_at - killed_at:.2f}s, reading the stream after "
        f"{reading_at - killed_at:.2f}s; requests sent meanwhile {len(during)}, refused "
        f"{sum(a.status != 202 for a in during)}; in all {len(load.answers)} sent, {len(load.refused())} refused"
    )
    assert load.refused() == []
    assert len(during) > 0
    assert not is_running(victim)
    assert set(children_matching(runner_pid, CONSUMER)) == {survivor, replacement}
    assert set(children_matching(runner_pid, CELERY)) == celery
    assert _web_pids(web_pid) == web
    # Events are consumed again, the killed consumer's unacknowledged ones included (reclaimed).
    wait_until(lambda: _depth() == 0, timeout=60, interval=0.2, message="event queue drained")


def test_killed_celery_main_process_is_restarted_alone(supervised, client, operator_token):
    running, web_pid, runner_pid = supervised
    device_id = register_device(client, "SN-SUP")["id"]
    consumers = wait_until(lambda: _consumers(runner_pid), timeout=60, message="two consumers")
    (celery_pid, celery), *others = children_matching(runner_pid, CELERY).items()
    assert others == []
    leftovers = [child.pid for child in celery.children()]  # the pool process and the embedded beat
    assert leftovers
    web = _web_pids(web_pid)

    with PointLoad(base_url=running.base_url, token=operator_token, device_id=device_id) as load:
        wait_until(lambda: load.accepted() >= 100, timeout=30, message="load running")
        killed_at = time.monotonic()
        os.kill(celery_pid, signal.SIGKILL)
        (replacement,) = wait_until(
            lambda: set(children_matching(runner_pid, CELERY)) - {celery_pid},
            timeout=RESTART_DEADLINE,
            interval=0.01,
            message="a new Celery main process",
        )
        restarted_at = time.monotonic()
        # The old worker is dead, so a heartbeat recorded from now on is the new worker's: it booted.
        _clear_heartbeats()
        wait_until(_heartbeats, timeout=60, message="a heartbeat of the new worker")
        beating_at = time.monotonic()
    during = load.between(killed_at, beating_at)

    print(
        f"\nCelery kill: new process after {restarted_at - killed_at:.2f}s, heartbeat after "
        f"{beating_at - killed_at:.2f}s; requests sent meanwhile {len(during)}, refused "
        f"{sum(a.status != 202 for a in during)}"
    )
    assert load.refused() == []
    assert len(during) > 0
    # Nothing of the killed worker survives it (a second beat would schedule every task twice).
    assert [pid for pid in [celery_pid, *leftovers] if is_running(pid)] == []
    assert set(children_matching(runner_pid, CONSUMER)) == set(consumers)
    assert _web_pids(web_pid) == web
