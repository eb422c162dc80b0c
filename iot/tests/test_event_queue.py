"""The Redis Stream event queue: exact depth, refusal when full, reclaim, dead letters, real consumer processes."""

import os
import signal
import subprocess
import sys

import orjson
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import RequestFactory

import iot.tests.event_handlers  # noqa: F401 - registers test.record and test.fail
from iot import event_queue
from iot.event_queue import (
    GROUP,
    EventQueueFull,
    event_handler,
    event_queue_ack,
    event_queue_admission,
    event_queue_consume,
    event_queue_depth,
    event_queue_publish,
    event_queue_reclaim,
)
from iot.metrics import metrics_view
from iot.redis import get_redis, redis_key, redis_tagged_key
from iot.testing.processes import REPO_ROOT, wait_until


@pytest.fixture(autouse=True)
def namespace(redis_namespace, settings):
    """A key prefix of this test's own: its own stream, counter and group, shared with nothing else."""
    settings.EVENT_QUEUE_MAX_SIZE = 10_000
    settings.BACKPRESSURE_QUEUE_THRESHOLD = 8_000
    settings.BACKPRESSURE_REJECT_THRESHOLD = 9_500
    event_queue.ensure_consumer_group()
    return redis_namespace


def stream() -> str:
    return redis_tagged_key("events", "stream")


def dead() -> str:
    return redis_tagged_key("events", "dead")


def record(n: int, **extra) -> dict:
    return {"counter": redis_key("t", "counter"), "seen": redis_key("t", "seen"), "n": n, **extra}


def counter() -> int:
    return int(get_redis().get(redis_key("t", "counter")) or 0)


def seen() -> int:
    return get_redis().scard(redis_key("t", "seen"))


def read_without_ack(consumer: str, count: int = 100) -> list[str]:
    """What a consumer that crashes right after reading leaves behind: pending entries."""
    response = get_redis().xreadgroup(GROUP, consumer, {stream(): ">"}, count=count)
    return [entry_id.decode() for entry_id, _ in response[0][1]] if response else []


def test_publish_consume_ack_keeps_depth_exact():
    for n, weight in enumerate([1, 5, 2]):
        event_queue_publish(event_type="test.record", payload=record(n), weight=weight)
    assert event_queue_depth() == 8
    assert get_redis().xlen(stream()) == 3
    report = event_queue_consume(consumer="c1", block_ms=100)
    assert report.handled == 3 and report.failed == 0 and report.dead_lettered == 0
    assert counter() == 3 and seen() == 3
    assert event_queue_depth() == 0
    assert get_redis().xlen(stream()) == 0  # acknowledged entries are deleted, not left to pile up
    assert get_redis().xpending(stream(), GROUP)["pending"] == 0


def test_entry_stores_type_weight_and_compact_payload():
    event_queue_publish(event_type="test.record", payload={"a": [1, 2], "b": "x"}, weight=4)
    [(_, fields)] = get_redis().xrange(stream())
    assert fields == {b"t": b"test.record", b"w": b"4", b"p": b'{"a":[1,2],"b":"x"}'}


def test_publish_past_max_raises_and_stores_nothing(settings):
    settings.EVENT_QUEUE_MAX_SIZE = 10
    event_queue_publish(event_type="test.record", payload=record(1), weight=6)
    with pytest.raises(EventQueueFull):
        event_queue_publish(event_type="test.record", payload=record(2), weight=5)
    assert event_queue_depth() == 6 and get_redis().xlen(stream()) == 1
    event_queue_publish(event_type="test.record", payload=record(3), weight=4)
    with pytest.raises(EventQueueFull):
        event_queue_publish(event_type="test.record", payload=record(4), weight=1)
    assert event_queue_depth() == 10 and get_redis().xlen(stream()) == 2


def test_concurrent_publishers_never_exceed_max(settings):
    from concurrent.futures import ThreadPoolExecutor

    settings.EVENT_QUEUE_MAX_SIZE = 100

    def publish(n: int) -> bool:
        try:
            event_queue_publish(event_type="test.record", payload=record(n), weight=3)
        except EventQueueFull:
            return False
        return True

    with ThreadPoolExecutor(16) as pool:
        stored = sum(pool.map(publish, range(60)))
    assert stored == 33  # 33 * 3 = 99; a 34th would make 102
    assert event_queue_depth() == 99 and get_redis().xlen(stream()) == 33


@pytest.mark.parametrize("weight", [0, -2, 1.0, True])
def test_weight_must_be_a_positive_integer(weight):
    with pytest.raises(ValueError):
        event_queue_publish(event_type="test.record", payload={}, weight=weight)
    assert event_queue_depth() == 0


def test_admission_thresholds(settings):
    settings.BACKPRESSURE_QUEUE_THRESHOLD = 5
    settings.BACKPRESSURE_REJECT_THRESHOLD = 8
    settings.EVENT_QUEUE_MAX_SIZE = 100
    assert event_queue_admission() == event_queue.Admission(state="ok", depth=0, retry_after_seconds=0)
    event_queue_publish(event_type="test.record", payload=record(1), weight=4)
    assert event_queue_admission().state == "ok"
    event_queue_publish(event_type="test.record", payload=record(2), weight=1)
    warning = event_queue_admission()
    assert warning.state == "warning" and warning.depth == 5 and warning.retry_after_seconds >= 1
    event_queue_publish(event_type="test.record", payload=record(3), weight=3)
    critical = event_queue_admission()
    assert critical.state == "critical" and critical.depth == 8 and critical.retry_after_seconds >= 1
    event_queue_consume(consumer="c1", block_ms=100)
    assert event_queue_admission().state == "ok"  # recovers as the queue drains


def test_crashed_consumer_entries_are_reclaimed_by_another():
    event_queue_publish(event_type="test.record", payload=record(1), weight=2)
    [entry_id] = read_without_ack("crashed")
    # Not idle long enough yet: nobody takes it.
    assert event_queue_reclaim(consumer="alive", min_idle_ms=60_000).handled == 0
    assert counter() == 0 and event_queue_depth() == 2
    # Once idle past the claim time, another consumer takes it over and processes it.
    report = wait_until(
        lambda: event_queue_reclaim(consumer="alive", min_idle_ms=200).handled,
        timeout=5,
        interval=0.05,
        message="the reclaim",
    )
    assert report == 1
    assert counter() == 1 and event_queue_depth() == 0
    assert get_redis().xpending(stream(), GROUP)["pending"] == 0
    assert event_queue_ack(ids=[entry_id]) == 0  # the crashed consumer's late ack changes nothing
    assert event_queue_depth() == 0


def test_poison_message_goes_to_dead_letters_after_max_deliveries(settings):
    settings.EVENT_QUEUE_MAX_DELIVERIES = 3
    attempts = redis_key("t", "attempts")
    event_queue_publish(event_type="test.fail", payload={"attempts": attempts}, weight=4)
    event_queue_publish(event_type="test.record", payload=record(1), weight=1)
    first = event_queue_consume(consumer="c1", block_ms=100)
    assert (first.failed, first.handled) == (1, 1)
    assert event_queue_depth() == 4  # the failed entry stays pending, and counted
    reports = [event_queue_reclaim(consumer="c1", min_idle_ms=0) for _ in range(3)]
    assert [(r.failed, r.dead_lettered) for r in reports] == [(1, 0), (1, 0), (0, 1)]
    assert int(get_redis().get(attempts)) == 3  # the handler ran exactly max-deliveries times
    assert event_queue_depth() == 0 and get_redis().xlen(stream()) == 0
    [(_, letter)] = get_redis().xrange(dead())
    assert letter[b"t"] == b"test.fail" and letter[b"w"] == b"4" and b"delivered 4 times" in letter[b"reason"]
    assert event_queue.event_queue_dead_letters() == 1


def test_duplicate_ack_does_not_double_decrement():
    event_queue_publish(event_type="test.record", payload=record(1), weight=3)
    event_queue_publish(event_type="test.record", payload=record(2), weight=2)
    first_id, _ = read_without_ack("c1")
    assert event_queue_ack(ids=[first_id]) == 1
    assert event_queue_ack(ids=[first_id]) == 0
    assert event_queue_ack(ids=[first_id, "1-1"]) == 0
    assert event_queue_depth() == 2 and get_redis().xlen(stream()) == 1


def test_unknown_event_type_goes_to_dead_letters():
    event_queue_publish(event_type="no.such.type", payload={"x": 1}, weight=7)
    report = event_queue_consume(consumer="c1", block_ms=100)
    assert report.dead_lettered == 1 and report.handled == 0
    assert event_queue_depth() == 0 and get_redis().xlen(stream()) == 0
    [(_, letter)] = get_redis().xrange(dead())
    assert b"no handler" in letter[b"reason"] and orjson.loads(letter[b"p"]) == {"x": 1}


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]"])
def test_unparsable_payload_goes_to_dead_letters(payload):
    # A foreign producer wrote this entry directly (publish cannot produce it).
    client = get_redis()
    client.xadd(stream(), {"t": "test.record", "w": "2", "p": payload})
    client.incrby(redis_tagged_key("events", "depth"), 2)
    report = event_queue_consume(consumer="c1", block_ms=100)
    assert report.dead_lettered == 1 and counter() == 0
    assert event_queue_depth() == 0 and client.xlen(dead()) == 1


def test_dead_letter_stream_is_capped(settings):
    settings.EVENT_QUEUE_DEAD_LETTER_MAX_LEN = 100
    settings.EVENT_QUEUE_MAX_SIZE = 100_000
    for n in range(1500):
        event_queue_publish(event_type="no.such.type", payload={"n": n})
    while event_queue_consume(consumer="c1", count=500, block_ms=10).dead_lettered:
        pass
    assert event_queue_depth() == 0
    assert 100 <= get_redis().xlen(dead()) < 1500  # MAXLEN ~ trims whole nodes, approximately


def test_conflicting_handler_registration_is_refused():
    with pytest.raises(ImproperlyConfigured):

        @event_handler("test.record")
        def another(payload: dict) -> None:
            pass


def test_metrics_report_shared_depth():
    event_queue_publish(event_type="test.record", payload=record(1), weight=6)
    body = metrics_view(RequestFactory().get("/metrics")).content.decode()
    assert "iot_event_queue_depth 6.0" in body
    assert "iot_event_queue_dead_letters 0.0" in body


# --- the real consumer process ------------------------------------------------------------------


def start_consumer(namespace: str, log_path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "iot.settings_test", "REDIS_KEY_PREFIX": namespace}
    argv = [
        sys.executable,
        str(REPO_ROOT / "manage.py"),
        "run_event_consumers",
        "--handler-module",
        "iot.tests.event_handlers",
        "--block-ms",
        "200",
        *extra,
    ]
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def test_consumer_process_drains_the_queue_and_stops_cleanly(namespace, tmp_path):
    log = tmp_path / "consumer.log"
    for n in range(1000):
        event_queue_publish(event_type="test.record", payload=record(n), weight=1 + n % 3)
    assert event_queue_depth() == sum(1 + n % 3 for n in range(1000))
    consumer = start_consumer(namespace, log)
    try:
        wait_until(lambda: event_queue_depth() == 0, timeout=60, interval=0.1, message="the queue to drain")
        assert counter() == 1000 and seen() == 1000  # no reclaim happened: each exactly once
        assert get_redis().xlen(stream()) == 0
    finally:
        code = stop(consumer)
    assert code == 0, log.read_text()
    assert "stopped" in log.read_text()


def test_sigterm_finishes_the_current_batch(namespace, tmp_path):
    log = tmp_path / "consumer.log"
    block_key = redis_key("t", "block")
    for n in range(10):
        event_queue_publish(event_type="test.record", payload=record(n, block_key=block_key if n == 3 else None))
    consumer = start_consumer(namespace, log)
    try:
        wait_until(lambda: get_redis().exists(block_key), timeout=30, message="the handler to block")
        consumer.send_signal(signal.SIGTERM)
        get_redis().rpush(f"{block_key}:release", 1)
    finally:
        code = stop(consumer)
    assert code == 0, log.read_text()
    assert counter() == 10 and event_queue_depth() == 0  # the whole batch was handled and acked before exiting


def test_killed_consumer_loses_nothing(namespace, tmp_path):
    log = tmp_path / "consumer.log"
    block_key = redis_key("t", "block")
    for n in range(1000):
        event_queue_publish(event_type="test.record", payload=record(n, block_key=block_key if n == 500 else None))
    first = start_consumer(namespace, log, "--batch", "50", "--name", "first")
    try:
        wait_until(lambda: get_redis().exists(block_key), timeout=60, message="the first consumer to reach #500")
        first.send_signal(signal.SIGKILL)  # mid-batch: it holds entries it read but never acknowledged
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    held = get_redis().xpending(stream(), GROUP)["pending"]
    assert held >= 1 and event_queue_depth() > 0
    assert counter() < 1000
    second = start_consumer(namespace, log, "--claim-idle-ms", "300", "--claim-interval", "0.2", "--name", "second")
    try:
        wait_until(lambda: event_queue_depth() == 0, timeout=60, interval=0.1, message="the queue to drain")
    finally:
        code = stop(second)
    assert code == 0, log.read_text()
    assert seen() == 1000  # every event handled at least once
    assert 1000 <= counter() <= 1000 + held  # redelivered at most what the killed consumer held
    assert get_redis().xpending(stream(), GROUP)["pending"] == 0
    assert get_redis().xlen(stream()) == 0 and get_redis().xlen(dead()) == 0


# --- pruning consumers, and reconciling the depth with the stream ---------------------------------


def consumers() -> dict[str, dict]:
    return {_name(info["name"]): info for info in get_redis().xinfo_consumers(stream(), GROUP)}


def _name(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def idle_past(name: str, idle_ms: int) -> None:
    wait_until(lambda: consumers()[name]["idle"] > idle_ms, timeout=5, interval=0.01, message=f"{name} to idle")


def test_prune_removes_only_idle_consumers_holding_nothing():
    event_queue_publish(event_type="test.record", payload=record(1), weight=2)
    get_redis().xgroup_createconsumer(stream(), GROUP, "gone")
    [held] = read_without_ack("holding")
    idle_past("gone", 200)
    idle_past("holding", 200)
    get_redis().xgroup_createconsumer(stream(), GROUP, "fresh")  # not idle
    assert event_queue.prune_idle_consumers(idle_ms=200) == 1
    assert set(consumers()) == {"holding", "fresh"}
    assert get_redis().xpending(stream(), GROUP)["pending"] == 1  # "holding" keeps its entry
    assert event_queue_ack(ids=[held]) == 1 and event_queue_depth() == 0


def test_consumer_reading_while_it_is_pruned_loses_nothing(monkeypatch):
    """The forced interleaving: the consumer reads right after prune's first call to Redis."""
    client = get_redis()
    client.xgroup_createconsumer(stream(), GROUP, "reused")
    idle_past("reused", 20)
    event_queue_publish(event_type="test.record", payload=record(1), weight=7)
    real = client.execute_command
    read: list[str] = []
    fired = []

    def then_the_consumer_reads(*args, **options):
        result = real(*args, **options)
        # Once, after prune's first command (XINFO before; the whole script now, once it is loaded).
        if not fired and args[0] != "SCRIPT LOAD":
            fired.append(args[0])
            read.extend(read_without_ack("reused"))
        return result

    monkeypatch.setattr(client, "execute_command", then_the_consumer_reads)
    assert event_queue.prune_idle_consumers(idle_ms=20) == 1  # it was idle and held nothing: removed
    monkeypatch.undo()
    assert len(read) == 1  # the consumer got the entry and is handling it
    assert client.xpending(stream(), GROUP)["pending"] == 1  # ... and still holds it
    assert event_queue_ack(ids=read) == 1  # so its ack counts: before, 0, leaving depth 7 for good
    assert event_queue_depth() == 0 and client.xlen(stream()) == 0


def test_reconcile_corrects_a_drifted_depth():
    for n, weight in enumerate([3, 4, 5]):
        event_queue_publish(event_type="test.record", payload=record(n), weight=weight)
    read_without_ack("c1", count=1)  # one pending, two not yet delivered: all three count
    depth_key = redis_tagged_key("events", "depth")
    get_redis().incrby(depth_key, 40)  # drift, as an eviction or a lost write leaves it
    assert event_queue_depth() == 52
    report = event_queue.event_queue_reconcile()
    assert (report.checked, report.depth_before, report.depth_after, report.stream_length) == (True, 52, 12, 3)
    assert report.requeued == () and event_queue_depth() == 12
    get_redis().delete(depth_key)  # the counter lost altogether
    assert event_queue.event_queue_reconcile().depth_after == 12 and event_queue_depth() == 12
    assert event_queue_consume(consumer="c2", block_ms=100).handled == 2
    assert event_queue_reclaim(consumer="c2", min_idle_ms=0).handled == 1
    assert event_queue_depth() == 0 and event_queue.event_queue_reconcile().depth_after == 0


def test_reconcile_task_runs_the_reconciliation():
    from iot.tasks import event_queue_reconciliation

    event_queue_publish(event_type="test.record", payload=record(1), weight=6)
    get_redis().set(redis_tagged_key("events", "depth"), 9_999)  # every publish would be refused
    assert event_queue_reconciliation.apply().get() == {
        "checked": True,
        "depth_before": 9_999,
        "depth_after": 6,
        "requeued": 0,
        "reserved_before": 0,
        "reserved_after": 0,
    }
    event_queue_publish(event_type="test.record", payload=record(2), weight=6)
    assert event_queue_depth() == 12


def test_reconcile_hands_out_entries_no_consumer_holds_again():
    client = get_redis()
    event_queue_publish(event_type="test.record", payload=record(1), weight=7)
    event_queue_publish(event_type="test.record", payload=record(2), weight=1)
    lost, kept = read_without_ack("dropped", count=1)[0], read_without_ack("alive", count=1)[0]
    client.xgroup_delconsumer(stream(), GROUP, "dropped")  # what the old prune did: its entry is orphaned
    assert client.xpending(stream(), GROUP)["pending"] == 1 and event_queue_depth() == 8
    assert event_queue_reclaim(consumer="alive", min_idle_ms=0).handled == 1  # only "kept" can be reached
    assert event_queue_consume(consumer="alive", block_ms=50).handled == 0
    assert event_queue_depth() == 7 and client.xlen(stream()) == 1  # stuck for good, before
    report = event_queue.event_queue_reconcile()
    assert report.requeued == (lost,) and report.depth_after == 7 and report.stream_length == 1
    [(new_id, fields)] = client.xrange(stream())
    assert new_id.decode() > lost and fields[b"w"] == b"7" and fields[b"t"] == b"test.record"
    assert event_queue_consume(consumer="alive", block_ms=100).handled == 1  # delivered again
    assert counter() == 2 and event_queue_depth() == 0 and client.xlen(stream()) == 0
    assert kept != lost


def test_reconcile_leaves_a_long_stream_alone(settings):
    settings.EVENT_QUEUE_RECONCILE_MAX_ENTRIES = 5
    for n in range(6):
        event_queue_publish(event_type="test.record", payload=record(n))
    get_redis().incrby(redis_tagged_key("events", "depth"), 3)
    report = event_queue.event_queue_reconcile()
    assert (report.checked, report.depth_before, report.depth_after, report.stream_length) == (False, 9, 9, 6)
    assert event_queue_depth() == 9  # untouched: not checked


def test_reconcile_is_exact_under_concurrent_publish_and_consume(settings):
    """Drift 0 stays 0 while publishers and a consumer run: every reconcile sees one consistent state."""
    import threading

    settings.EVENT_QUEUE_MAX_SIZE = 1_000_000
    stop = threading.Event()
    drifts: list[int] = []

    def reconcile() -> None:
        while not stop.is_set():
            report = event_queue.event_queue_reconcile()
            drifts.append(report.depth_before - report.depth_after)

    def consume() -> None:
        while not stop.is_set():
            event_queue_consume(consumer="c1", count=20, block_ms=20)

    threads = [threading.Thread(target=reconcile), threading.Thread(target=consume)]
    for thread in threads:
        thread.start()
    try:
        for n in range(600):
            event_queue_publish(event_type="test.record", payload=record(n), weight=1 + n % 4)
        wait_until(lambda: event_queue_depth() == 0, timeout=30, interval=0.05, message="the queue to drain")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert len(drifts) > 10 and set(drifts) == {0}
    assert counter() == 600 and get_redis().xlen(stream()) == 0
