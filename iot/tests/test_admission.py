"""`iot.admission.ingest_admit`: backpressure, queue room and rate limits in one script, against real Redis."""

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from iot import event_queue
from iot.admission import ingest_admit
from iot.event_queue import (
    EventQueueFull,
    admission_keys,
    event_queue_admission,
    event_queue_depth,
    event_queue_publish,
    event_queue_reconcile,
    event_queue_release,
    event_queue_reserved,
)
from iot.ratelimit import rate_limit_keys, rate_limit_peek
from iot.redis import get_redis, redis_key_slot
from iot.testing.processes import wait_until


@pytest.fixture(autouse=True)
def namespace(redis_namespace, settings):
    settings.EVENT_QUEUE_MAX_SIZE = 1000
    settings.BACKPRESSURE_QUEUE_THRESHOLD = 800
    settings.BACKPRESSURE_REJECT_THRESHOLD = 950
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 1_000_000
    settings.RATE_LIMIT_WINDOW_SECONDS = 60
    settings.RATE_LIMIT_GLOBAL_PER_SECOND = 1_000_000
    settings.EVENT_QUEUE_RESERVATION_TTL_SECONDS = 30
    return redis_namespace


def device() -> str:
    return uuid.uuid4().hex


def depth_set(depth: int) -> None:
    get_redis().set(admission_keys()[0], depth)


@pytest.mark.parametrize(
    ("depth", "state"),
    [(0, "ok"), (799, "ok"), (800, "warning"), (949, "warning"), (950, "critical"), (5000, "critical")],
)
def test_backpressure_thresholds_are_exactly_the_depths_of_before(depth, state):
    depth_set(depth)
    admitted = ingest_admit(device_id=device(), points=1)
    assert admitted.admission.state == state == event_queue_admission().state
    assert admitted.admission.depth == depth
    assert (admitted.reservation is not None) == (state == "ok")


def test_reservations_in_flight_do_not_count_as_backlog_but_as_room():
    depth_set(700)
    held = ingest_admit(device_id=device(), points=250)
    assert held.reservation is not None and event_queue_reserved() == 250
    # 700 + 250 is past the warning threshold, but 250 of it is in flight, not backlog: admitted.
    assert ingest_admit(device_id=device(), points=1).admission.state == "ok"
    # No room for 50 more beside 700 queued and 251 reserved: "full", a 503 for telemetry.
    full = ingest_admit(device_id=device(), points=50)
    assert full.admission.state == "full" and full.reservation is None and full.rate_limit is None
    assert full.admission.retry_after_seconds >= 1
    assert event_queue_reserved() == 251


@pytest.mark.parametrize("refusal", ["critical", "full", "rate_limited", "global"])
def test_a_refusal_takes_nothing(settings, refusal):
    device_id = device()
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 100
    if refusal == "critical":
        depth_set(960)
    elif refusal == "full":
        settings.EVENT_QUEUE_MAX_SIZE = 5
    elif refusal == "rate_limited":
        assert ingest_admit(device_id=device_id, points=95).reservation is not None
    else:
        settings.RATE_LIMIT_GLOBAL_PER_SECOND = 0
    remaining, reserved = rate_limit_peek(device_id=device_id).remaining, event_queue_reserved()
    admitted = ingest_admit(device_id=device_id, points=10)
    assert admitted.reservation is None
    if refusal in ("critical", "full"):
        assert admitted.admission.state == refusal and admitted.rate_limit is None
    else:
        assert admitted.rate_limit.scope == ("device" if refusal == "rate_limited" else "global")
    settings.RATE_LIMIT_GLOBAL_PER_SECOND = 1_000_000
    assert rate_limit_peek(device_id=device_id).remaining == remaining
    assert event_queue_reserved() == reserved


def test_the_publish_with_its_reservation_cannot_be_refused(settings):
    settings.EVENT_QUEUE_MAX_SIZE = 10
    admitted = ingest_admit(device_id=device(), points=10)
    with pytest.raises(EventQueueFull):  # anyone else's publish finds no room
        event_queue_publish(event_type="t", payload={}, weight=1)
    event_queue_publish(event_type="t", payload={"n": 1}, weight=10, reservation=admitted.reservation)
    assert event_queue_depth() == 10 and event_queue_reserved() == 0
    assert not event_queue_release(reservation=admitted.reservation)  # consumed: nothing to give back
    assert event_queue_depth() == 10 and event_queue_reserved() == 0


def test_an_event_heavier_than_its_reservation_is_refused():
    admitted = ingest_admit(device_id=device(), points=3)
    with pytest.raises(ValueError, match="reservation of weight 3"):
        event_queue_publish(event_type="t", payload={}, weight=4, reservation=admitted.reservation)
    assert event_queue_reserved() == 3 and event_queue_depth() == 0


def test_an_event_lighter_than_its_reservation_gives_the_rest_back():
    """Telemetry publishes only the points a batch stored (duplicates are not): the event may weigh less."""
    admitted = ingest_admit(device_id=device(), points=3)
    event_queue_publish(event_type="t", payload={}, weight=2, reservation=admitted.reservation)
    assert event_queue_depth() == 2 and event_queue_reserved() == 0
    assert not event_queue_release(reservation=admitted.reservation)


def test_release_gives_the_room_back_once(settings):
    settings.EVENT_QUEUE_MAX_SIZE = 10
    admitted = ingest_admit(device_id=device(), points=10)
    assert ingest_admit(device_id=device(), points=1).admission.state == "full"
    assert event_queue_release(reservation=admitted.reservation)
    assert not event_queue_release(reservation=admitted.reservation)
    assert event_queue_reserved() == 0
    assert ingest_admit(device_id=device(), points=10).reservation is not None


def test_an_abandoned_reservation_expires_and_its_late_publish_needs_room(settings):
    """A request that dies between admission and publish holds its room only until its reservation expires."""
    settings.EVENT_QUEUE_MAX_SIZE = 10
    settings.EVENT_QUEUE_RESERVATION_TTL_SECONDS = 0.3
    abandoned = ingest_admit(device_id=device(), points=8)
    assert ingest_admit(device_id=device(), points=5).admission.state == "full"
    settings.EVENT_QUEUE_RESERVATION_TTL_SECONDS = 30
    later = wait_until(
        lambda: ingest_admit(device_id=device(), points=5).reservation,
        timeout=10,
        interval=0.05,
        message="the abandoned reservation to expire",
    )
    assert event_queue_reserved() == 5
    # Published after all, its reservation gone: it needs room beside the 5 held, and there is none.
    with pytest.raises(EventQueueFull):
        event_queue_publish(event_type="t", payload={}, weight=8, reservation=abandoned.reservation)
    event_queue_publish(event_type="t", payload={}, weight=5, reservation=later)
    assert event_queue_depth() == 5 and event_queue_reserved() == 0


def test_reconcile_recounts_the_reservations(settings):
    client = get_redis()
    _, reserved_key, reservations_key = admission_keys()
    first = ingest_admit(device_id=device(), points=3)
    ingest_admit(device_id=device(), points=4)
    client.set(reserved_key, 100, keepttl=True)  # drift, as a lost write or a foreign DEL/SET leaves it
    report = event_queue_reconcile()
    assert (report.reserved_before, report.reserved_after) == (100, 7) and event_queue_reserved() == 7
    # A lost counter is summed again from the set by the next admission (the set survived).
    client.delete(reserved_key)
    assert ingest_admit(device_id=device(), points=2).reservation is not None
    assert event_queue_reserved() == 9
    assert event_queue_release(reservation=first.reservation) and event_queue_reserved() == 6
    # Expired reservations are dropped; nothing held, nothing left behind.
    client.zadd(reservations_key, {m: 1 for m in client.zrange(reservations_key, 0, -1)})  # expired long ago
    report = event_queue_reconcile()
    assert (report.reserved_before, report.reserved_after) == (6, 0)
    assert not client.exists(reserved_key) and not client.exists(reservations_key)


def test_concurrent_admissions_hold_the_device_limit_and_the_room_exactly(settings):
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 100
    one = device()
    with ThreadPoolExecutor(16) as pool:
        decisions = list(pool.map(lambda _: ingest_admit(device_id=one, points=1), range(300)))
    assert sum(d.reservation is not None for d in decisions) == 100
    assert event_queue_reserved() == 100
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 1_000_000
    settings.EVENT_QUEUE_MAX_SIZE = 160  # room for 60 more points, thresholds never reached (depth stays 0)
    settings.BACKPRESSURE_QUEUE_THRESHOLD = settings.BACKPRESSURE_REJECT_THRESHOLD = 10_000
    with ThreadPoolExecutor(16) as pool:
        decisions = list(pool.map(lambda _: ingest_admit(device_id=device(), points=1), range(300)))
    assert sum(d.reservation is not None for d in decisions) == 60
    assert {d.admission.state for d in decisions if d.reservation is None} == {"full"}
    assert event_queue_reserved() == 160


def test_the_scripts_keys_share_one_redis_cluster_slot():
    keys = [*admission_keys(), *rate_limit_keys(device()), event_queue._stream_key()]
    assert len({redis_key_slot(key) for key in keys}) == 1
