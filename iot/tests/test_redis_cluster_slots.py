"""Redis Cluster readiness: every script call, MULTI and multi-key command keeps its keys in one hash slot.

A Redis Cluster refuses (`CROSSSLOT`) a script, a MULTI/EXEC or a command such as MGET whose keys hash to
different slots. `slot_checked` wraps this process' Redis client: every EVALSHA/EVAL, every command and
every pipeline is checked with redis-py's `redis.crc.key_slot` (the cluster's own CRC16) before it goes
out; the keys of other commands are found with `COMMAND GETKEYS`. The tests run the platform's code
that uses Redis (the primitives one by one, then ingestion, the consumers, the reads and the sweeps
through their services), and the first also checks it ran every script registered with
`iot.redis.register_script` anywhere in the code, so a new script cannot go unchecked.
"""

import importlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
import redis

import iot.tests.event_handlers  # noqa: F401 - registers test.record and test.fail
from iot import cache, event_queue
from iot.redis import get_redis, redis_key, redis_key_slot, redis_slot_groups, redis_tagged_key, registered_scripts
from iot.testing.processes import REPO_ROOT

# Multi-key commands redis-py's RedisCluster splits per slot itself (its "non-atomic" multi-key commands).
SPLIT_BY_CLUSTER_CLIENT = {"DEL", "UNLINK", "EXISTS", "TOUCH"}
PACKAGES = ("iot", "devices", "telemetry", "alerts", "firmware", "analytics")


@dataclass
class SlotRecord:
    violations: list[str] = field(default_factory=list)
    scripts: dict[str, list[list[bytes]]] = field(default_factory=dict)  # sha -> the KEYS of each call
    transactions: int = 0

    def check(self, what: str, keys: list) -> None:
        slots = {redis_key_slot(key) for key in keys}
        if len(slots) > 1:
            self.violations.append(f"{what}: {len(slots)} slots for {[_text(k) for k in keys][:6]}")


def _text(key) -> str:
    return key.decode(errors="replace") if isinstance(key, bytes) else str(key)


@contextmanager
def slot_checked() -> Iterator[SlotRecord]:
    """Check every Redis call of this process made inside the block (see the module docstring)."""
    record = SlotRecord()
    command, execute = redis.Redis.execute_command, redis.client.Pipeline.execute
    key_client = get_redis()

    def keys_of(args: tuple) -> list:
        name = str(args[0]).upper()
        if name in ("EVALSHA", "EVAL"):
            return list(args[3 : 3 + int(args[2])])
        if len(args) < 3:  # a command name and at most one key
            return []
        try:
            return command(key_client, "COMMAND GETKEYS", *args)
        except redis.ResponseError:  # a command without keys (INFO, TIME, SCRIPT LOAD, ...)
            return []

    def check_command(args: tuple) -> list:
        name = str(args[0]).upper()
        keys = keys_of(args)
        if name in ("EVALSHA", "EVAL"):
            record.scripts.setdefault(str(args[1]) if name == "EVALSHA" else "eval", []).append(keys)
        if name not in SPLIT_BY_CLUSTER_CLIENT:
            record.check(name, keys)
        return keys

    def checked_command(self, *args, **kwargs):
        check_command(args)
        return command(self, *args, **kwargs)

    def checked_execute(self, *args, **kwargs):
        keys = [key for stacked, _ in self.command_stack for key in check_command(stacked)]
        if self.transaction:
            record.transactions += 1
            record.check("MULTI", keys)
        return execute(self, *args, **kwargs)

    redis.Redis.execute_command = checked_command
    redis.client.Pipeline.execute = checked_execute
    try:
        yield record
    finally:
        redis.Redis.execute_command = command
        redis.client.Pipeline.execute = execute


@pytest.fixture
def cluster_grouping(monkeypatch):
    """The cache's many-key calls grouped per slot, as under `REDIS_CLUSTER` (this Redis is not a cluster)."""
    monkeypatch.setattr(cache, "redis_slot_groups", partial(redis_slot_groups, by_slot=True))


def _import_every_script_module() -> None:
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            if "tests" in path.parts or path.name == "redis.py":
                continue
            if re.search(r"\bregister_script\(", path.read_text()):
                importlib.import_module(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts))


# --- the helpers --------------------------------------------------------------------------------


def test_tagged_keys_share_a_slot_whatever_follows_the_tag(settings):
    settings.REDIS_KEY_PREFIX = "pfx"
    assert redis_tagged_key("events", "ratelimit", "d1", "log") == "pfx:{events}:ratelimit:d1:log"
    slots = {redis_key_slot(redis_tagged_key("events", "ratelimit", f"d{n}", "log")) for n in range(50)}
    assert slots == {redis_key_slot(redis_tagged_key("events", "stream"))}
    # Untagged keys spread: 50 device cache keys fall in (almost surely) many slots.
    assert len({redis_key_slot(redis_key("cache", "device", n)) for n in range(50)}) > 40
    for tag in ("", "a{b", "a}b"):
        with pytest.raises(ValueError):
            redis_tagged_key(tag, "x")


def test_slot_groups_are_one_group_unless_clustered(settings):
    keys = [redis_key("cache", "device", n) for n in range(20)] + [redis_tagged_key("t", n) for n in range(5)]
    settings.REDIS_CLUSTER = False
    assert redis_slot_groups(keys) == [list(range(25))]
    groups = redis_slot_groups(keys, by_slot=True)
    assert sorted(i for group in groups for i in group) == list(range(25))
    assert all(len({redis_key_slot(keys[i]) for i in group}) == 1 for group in groups)
    assert [20, 21, 22, 23, 24] in groups  # the tagged keys go together
    assert redis_slot_groups([]) == []


def test_a_prefix_with_braces_is_refused_at_start():
    check = "import django; from django.conf import settings; settings.REDIS_KEY_PREFIX"
    env = {"DJANGO_SETTINGS_MODULE": "iot.settings", "REDIS_KEY_PREFIX": "app{1}", "DJANGO_SECRET_KEY": "x"}
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True
    )
    assert result.returncode != 0 and "REDIS_KEY_PREFIX must not contain braces" in result.stderr


# --- the primitives, one by one -----------------------------------------------------------------


def test_every_script_keeps_its_keys_in_one_slot(redis_namespace, settings, cluster_grouping):
    from iot import admission, circuit_breaker, health, ratelimit

    settings.EVENT_QUEUE_MAX_SIZE = 10_000
    settings.EVENT_QUEUE_MAX_DELIVERIES = 1
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 3
    _import_every_script_module()
    with slot_checked() as record:
        # Rate limiter: admit, refuse, and both repairs (a lost total, a lost log).
        for device in ("d1", "d2"):
            assert ratelimit.rate_limit_consume(device_id=device, points=2).allowed
        assert not ratelimit.rate_limit_consume(device_id="d1", points=2).allowed
        log_key, total_key, _ = ratelimit.rate_limit_keys("d1")
        get_redis().delete(total_key)
        assert ratelimit.rate_limit_peek(device_id="d1").remaining == 1
        get_redis().delete(log_key)
        assert not ratelimit.rate_limit_consume(device_id="d1", points=2).allowed

        # Ingest admission (backpressure, room, rate limits, a reservation: one script), then the
        # reservation published with its event, or released.
        admitted = admission.ingest_admit(device_id="d3", points=2)
        assert admitted.reservation is not None
        event_queue.event_queue_publish(
            event_type="test.nobody", payload={}, weight=2, reservation=admitted.reservation
        )
        assert event_queue.event_queue_release(reservation=admission.ingest_admit(device_id="d3", points=1).reservation)

        # Event queue: publish, consume + ack, a failing handler reclaimed into the dead letters,
        # an unknown type, pruning, reconciliation.
        event_queue.ensure_consumer_group()
        counter, seen = redis_key("t", "counter"), redis_key("t", "seen")
        event_queue.event_queue_publish(event_type="test.record", payload={"counter": counter, "seen": seen, "n": 1})
        event_queue.event_queue_publish(event_type="test.fail", payload={"attempts": redis_key("t", "a")}, weight=2)
        event_queue.event_queue_publish(event_type="test.nobody", payload={})
        assert event_queue.event_queue_admission().depth == 6
        report = event_queue.event_queue_consume(consumer="c1", block_ms=100)
        assert (report.handled, report.failed, report.dead_lettered) == (1, 1, 2)
        assert event_queue.event_queue_reclaim(consumer="c2", min_idle_ms=0).dead_lettered == 1
        assert event_queue.event_queue_depth() == 0 and event_queue.event_queue_dead_letters() == 3
        assert event_queue.prune_idle_consumers(idle_ms=0) >= 1
        assert event_queue.event_queue_reconcile().checked
        assert event_queue.event_queue_ack(ids=["0-1"]) == 0

        # The version-guarded cache: single keys, and many keys (per slot, as under Redis Cluster).
        keys = [redis_key("cache", "device", uuid.uuid4()) for _ in range(30)]
        lookup = cache.versioned_cache_get(key=keys[0])
        assert cache.versioned_cache_fill(key=keys[0], version=1, payload=b"x", lookup=lookup, ttl_seconds=60)
        cache.versioned_cache_invalidate(key=keys[0], version=2)
        cache.timed_cache_hold(key=keys[1], ttl_ms=1000)
        cache.timed_cache_invalidate(key=keys[1])
        before = len(record.scripts.get(cache._INVALIDATE_MANY.sha, []))
        cache.versioned_cache_invalidate_many(versions={key: 5 for key in keys})
        assert len(record.scripts[cache._INVALIDATE_MANY.sha]) - before == len({redis_key_slot(k) for k in keys})
        lookups = cache.versioned_cache_get_many(keys=keys)
        assert [lookup.hit for lookup in lookups] == [False] * 30

        # Circuit breaker: closed -> open -> half-open probe -> closed, listing, forgetting.
        settings.CIRCUIT_BREAKER_FAILURE_THRESHOLD = 1
        name = f"slots-{uuid.uuid4().hex[:6]}"
        permit = circuit_breaker.breaker_acquire(name=name, now_ms=1_000)
        assert circuit_breaker.breaker_record(permit=permit, success=False, now_ms=1_000) == "open"
        probe = circuit_breaker.breaker_acquire(name=name, now_ms=10_000_000)
        assert circuit_breaker.breaker_record(permit=probe, success=True, now_ms=10_000_000) == "closed"
        assert circuit_breaker.breaker_states(names=[name, "other"]) == {name: "closed", "other": "closed"}
        circuit_breaker.breaker_forget(name=name)

        # Worker heartbeats.
        health.worker_heartbeat_record(worker_name="w1")
        assert health.workers_alive_count() >= 1

    assert record.violations == []
    unchecked = [script.source[:80] for script in registered_scripts() if script.sha not in record.scripts]
    assert unchecked == [], "scripts this test never ran (add them above)"


def test_the_checker_catches_keys_of_two_slots(redis_namespace):
    """The check itself: a script, a MULTI and an MGET over two tags are reported; DEL is not (the
    cluster client splits it)."""
    from iot.cache import _GET_MANY

    a, b = redis_tagged_key("a", "k"), redis_tagged_key("b", "k")
    assert redis_key_slot(a) != redis_key_slot(b)
    with slot_checked() as record:
        _GET_MANY(keys=[a, b])
        pipe = get_redis().pipeline(transaction=True)
        pipe.incr(a)
        pipe.incr(b)
        pipe.execute()
        get_redis().mget([a, b])
        get_redis().delete(a, b)
    assert [violation.split(":")[0] for violation in record.violations] == ["EVALSHA", "MULTI", "MGET"]


# --- the platform's paths, through their services -----------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_ingest_consumers_reads_and_sweeps_keep_keys_in_one_slot(redis_namespace, settings, cluster_grouping):
    from alerts.testing import rule_create
    from devices.services import device_mark_inactive, device_update
    from devices.testing import device_create
    from telemetry import selectors
    from telemetry.services import PointColumns, telemetry_points_ingest

    settings.EVENT_QUEUE_MAX_SIZE = 10_000
    event_queue.load_event_handlers()
    event_queue.ensure_consumer_group()
    devices = [device_create(serial_prefix="SN-SLOT", group_id="slots").device for _ in range(3)]
    rule_create(group_id="slots", threshold=10.0)
    rule_create(device_id=devices[0].id, threshold=20.0)
    now = datetime.now(UTC)
    with slot_checked() as record:
        for device in devices:
            telemetry_points_ingest(
                batch=PointColumns(
                    device_id=device.id,
                    metrics=["temperature"] * 2,
                    timestamps=[now - timedelta(seconds=1), now],  # one point per timestamp
                    values=[30.0, 5.0],
                )
            )
        while event_queue.event_queue_consume(consumer="slots", block_ms=100).handled:
            pass
        assert event_queue.event_queue_depth() == 0
        device_update(device_id=devices[1].id, changes={"location": "lab"})
        assert device_mark_inactive(silent_seconds=0) == 3
        stats = selectors.telemetry_fleet_message_stats()
        assert stats.messages >= 6
        assert selectors.telemetry_device_message_stats(device_id=devices[0].id).messages == 2
        assert selectors.telemetry_group_message_count(group_id="slots") == 6
        selectors.telemetry_messages_per_second(window_seconds=120)
        assert sum(count for _, count in selectors.telemetry_messages_per_minute(minutes=5)) >= 6
    assert record.violations == []
    assert record.transactions >= 1  # the counters: one MULTI per minute of what a consumer read
