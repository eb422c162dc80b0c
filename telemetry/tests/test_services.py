"""Ingestion service, selectors and event handler, in process against the test database and Redis."""

import itertools
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import orjson
import pytest
import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings as django_settings
from django.db import transaction

from devices.models import Device
from devices.services import device_update
from devices.testing import device_create
from iot import event_queue
from iot.api.exceptions import api_exception_handler
from iot.event_queue import Admission, EventQueueFull
from iot.ratelimit import RateLimitDecision
from iot.redis import get_redis
from telemetry import events, selectors, services
from telemetry.metrics import EVENTS_LOST, POINTS
from telemetry.models import TelemetryPoint
from telemetry.redis_keys import count_window_key, count_window_start, live_group_name, messages_per_second_key

pytestmark = pytest.mark.django_db


@pytest.fixture
def device() -> Device:
    return device_create(serial_prefix="SN-SVC").device


def columns(device_id, points: list[tuple[str, datetime, float]]) -> services.PointColumns:
    return services.PointColumns(
        device_id=device_id,
        metrics=[p[0] for p in points],
        timestamps=[p[1] for p in points],
        values=[p[2] for p in points],
    )


def recent(minutes: float) -> datetime:
    return datetime.now(UTC) - timedelta(minutes=minutes)


_ORIGIN = recent(5)
_STAMPS = itertools.count()


def distinct(n: int, value: float, *, metric: str = "t") -> list[tuple[str, datetime, float]]:
    """`n` points of `metric` whose timestamps no other call of this module gives (a point is identified
    by device, metric and timestamp: repeated ones would be stored once)."""
    return [(metric, _ORIGIN + timedelta(microseconds=next(_STAMPS)), value) for _ in range(n)]


@pytest.fixture
def published(monkeypatch):
    sent = []
    monkeypatch.setattr(services, "event_queue_publish", lambda **kwargs: sent.append(kwargs))
    return sent


def test_ingest_stores_marks_seen_and_publishes_after_commit(device, published, django_capture_on_commit_callbacks):
    batch = columns(device.pk, [("t", recent(2), 1.0), ("t", recent(1), 2.0), ("h", recent(1), 3.0)])
    with django_capture_on_commit_callbacks(execute=True):
        result = services.telemetry_points_ingest(batch=batch)
        assert published == [], "published before the commit"
    assert result.count == 3
    assert TelemetryPoint.objects.filter(device_id=device.pk).count() == 3
    device.refresh_from_db()
    assert device.status == "active" and device.last_seen is not None

    (event,) = published
    assert event["event_type"] == "telemetry.points" and event["weight"] == 3
    payload = orjson.loads(orjson.dumps(event["payload"]))  # what the consumer gets
    assert payload["device_id"] == str(device.pk)
    assert payload["metrics"] == ["t", "t", "h"] and payload["values"] == [1.0, 2.0, 3.0]
    assert [datetime.fromisoformat(ts) for ts in payload["timestamps"]] == batch.timestamps


@pytest.mark.parametrize(
    ("failure", "reason"), [(EventQueueFull("full"), "queue_full"), (redis.ConnectionError("down"), "redis_error")]
)
def test_failed_publish_after_commit_keeps_the_points(
    device, monkeypatch, failure, reason, django_capture_on_commit_callbacks
):
    def publish(**kwargs):
        raise failure

    monkeypatch.setattr(services, "event_queue_publish", publish)
    lost = EVENTS_LOST.labels(reason=reason)
    before = lost._value.get()
    with django_capture_on_commit_callbacks(execute=True):
        services.telemetry_points_ingest(batch=columns(device.pk, [("t", recent(1), 1.0)]))
    assert TelemetryPoint.objects.filter(device_id=device.pk).count() == 1
    assert lost._value.get() == before + 1


def test_a_caller_that_rolls_back_publishes_nothing(device, published, django_capture_on_commit_callbacks):
    """Publishing is tied to the commit, not to the call order: a rolled-back ingestion never publishes."""
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with pytest.raises(RuntimeError), transaction.atomic():
            services.telemetry_points_ingest(batch=columns(device.pk, [("t", recent(1), 1.0)]))
            raise RuntimeError("the caller fails after ingesting")
    assert callbacks == [] and published == []
    assert not TelemetryPoint.objects.filter(device_id=device.pk).exists()


def test_unknown_device_stores_nothing(published):
    unknown = uuid.uuid4()
    with pytest.raises(services.TelemetryUnknownDevice):
        services.telemetry_points_ingest(batch=columns(unknown, [("t", recent(1), 1.0)]))
    assert not TelemetryPoint.objects.filter(device_id=unknown).exists()
    assert published == []


def test_decommissioned_device_stores_nothing(device, published):
    device_update(device_id=device.pk, changes={"status": "decommissioned"})
    with pytest.raises(services.TelemetryDeviceDecommissioned):
        services.telemetry_points_ingest(batch=columns(device.pk, [("t", recent(1), 1.0)]))
    assert not TelemetryPoint.objects.filter(device_id=device.pk).exists()


def test_rate_limit_refusal_stores_nothing(device, published, settings, django_capture_on_commit_callbacks):
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 2
    with django_capture_on_commit_callbacks(execute=True):
        services.telemetry_points_ingest(batch=columns(device.pk, [*distinct(1, 1.0), *distinct(1, 2.0)]))
    with pytest.raises(services.TelemetryRateLimited) as refused:
        services.telemetry_points_ingest(batch=columns(device.pk, [("t", recent(1), 3.0)]))
    assert refused.value.decision.scope == "device"
    with pytest.raises(services.TelemetryBatchOverLimit):
        services.telemetry_points_ingest(batch=columns(device.pk, distinct(3, 1.0)))
    assert TelemetryPoint.objects.filter(device_id=device.pk).count() == 2
    assert len(published) == 1


def queue_depth_set(depth: int) -> None:
    """The event queue's depth counter, as consumers lagging behind leave it."""
    get_redis().set(event_queue.admission_keys()[0], depth)


def test_backpressure_refusal_comes_first(device, published, redis_namespace, settings):
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 1
    queue_depth_set(settings.BACKPRESSURE_REJECT_THRESHOLD)
    with pytest.raises(services.TelemetryBackpressure) as refused:
        services.telemetry_points_ingest(batch=columns(device.pk, [("t", recent(1), 1.0)]))
    assert refused.value.admission.state == "critical" and refused.value.status_code == 503
    assert not TelemetryPoint.objects.filter(device_id=device.pk).exists()
    # The refusal took nothing: the device's whole window (one point) is still there, and no room is held.
    assert event_queue.event_queue_reserved() == 0
    queue_depth_set(0)
    services.telemetry_points_ingest(batch=columns(device.pk, [("t", recent(1), 1.0)]))


@pytest.mark.django_db(transaction=True)
def test_admission_reserves_the_events_room_so_the_publish_after_commit_cannot_be_refused(
    device, redis_namespace, settings
):
    """The queue's room is taken at admission: requests that would not fit are refused before storing,
    and every accepted one is published (none lost for a full queue)."""
    settings.EVENT_QUEUE_MAX_SIZE = 10
    settings.BACKPRESSURE_QUEUE_THRESHOLD = 8
    settings.BACKPRESSURE_REJECT_THRESHOLD = 9
    lost = EVENTS_LOST.labels(reason="queue_full")
    lost_before = lost._value.get()
    # Six points admitted, not yet published (the caller's transaction is open): their room is held.
    with transaction.atomic():
        services.telemetry_points_ingest(batch=columns(device.pk, distinct(6, 1.0)))
        assert event_queue.event_queue_reserved() == 6 and event_queue.event_queue_depth() == 0
        # Depth 0 is far below the thresholds, but 6 reserved + 5 > 10: refused, nothing stored or held.
        with pytest.raises(services.TelemetryBackpressure) as refused:
            services.telemetry_points_ingest(batch=columns(device.pk, distinct(5, 2.0)))
        assert refused.value.admission.state == "full" and refused.value.status_code == 503
        assert event_queue.event_queue_reserved() == 6
        # A publish of anyone else must leave the reserved room alone too.
        with pytest.raises(event_queue.EventQueueFull):
            event_queue.event_queue_publish(event_type=services.EVENT_TYPE, payload={}, weight=5)
    # The commit publishes into the reserved room.
    assert event_queue.event_queue_reserved() == 0 and event_queue.event_queue_depth() == 6
    services.telemetry_points_ingest(batch=columns(device.pk, distinct(2, 3.0)))
    assert event_queue.event_queue_depth() == 8 and lost._value.get() == lost_before
    assert TelemetryPoint.objects.filter(device_id=device.pk).count() == 8


def test_a_refusal_after_admission_releases_the_reserved_room(redis_namespace):
    unknown = uuid.uuid4()
    with pytest.raises(services.TelemetryUnknownDevice):
        services.telemetry_points_ingest(batch=columns(unknown, distinct(3, 1.0)))
    assert event_queue.event_queue_reserved() == 0 and event_queue.event_queue_depth() == 0


def test_admission_is_one_redis_call_and_the_insert_marks_the_device_seen(device, published, redis_namespace):
    """Issue 12: admission (backpressure, room, rate limit) is one Redis call; the device's `last_seen`
    is written by the insert statement, and its cache tombstoned only when that changed the row."""
    from devices.cache import device_cache_key
    from iot.testing.redis import redis_round_trips

    version = device.version
    with redis_round_trips() as calls:
        services.telemetry_points_ingest(batch=columns(device.pk, [("t", recent(1), 1.0)]))
    # The admission, then the tombstone of the woken device (the publish waits for the test's commit).
    assert calls == ["EVALSHA", "EVALSHA"], calls
    device.refresh_from_db()
    assert (device.status, device.version) == ("active", version + 1) and device.last_seen is not None
    assert int(get_redis().hget(device_cache_key(device.pk), "v")) == version + 1
    with redis_round_trips() as calls:  # within LAST_SEEN_RESOLUTION_MS: the UPDATE changes nothing
        services.telemetry_points_ingest(batch=columns(device.pk, [("t", recent(1), 2.0)]))
    assert calls == ["EVALSHA"], calls
    device.refresh_from_db()
    assert device.version == version + 1
    assert published == []


@pytest.mark.django_db(transaction=True)
def test_the_devices_after_commit_tombstone_travels_with_the_publish(device, redis_namespace, monkeypatch):
    """After the commit: the publish and the device's cache tombstone, one round trip."""
    import devices.services
    from devices.cache import device_cache_key
    from iot.testing.redis import redis_round_trips

    # Without the in-transaction tombstone, only the after-commit one can write the entry.
    monkeypatch.setattr(devices.services, "device_cache_invalidate_now", lambda **kwargs: None)
    with redis_round_trips() as calls:
        services.telemetry_points_ingest(batch=columns(device.pk, [("t", recent(1), 1.0)]))
    assert calls == ["EVALSHA", "pipeline"], calls  # admission; after the commit, publish + tombstone
    assert int(get_redis().hget(device_cache_key(device.pk), "v")) == device.version + 1
    assert event_queue.event_queue_depth() == 1 and event_queue.event_queue_reserved() == 0


FULL_WINDOW = RateLimitDecision(allowed=False, limit=100, remaining=0, retry_after_seconds=30, scope="device")


@pytest.mark.parametrize(
    ("refusal", "status", "body", "headers"),
    [
        (
            services.TelemetryBackpressure(Admission("warning", 8_000, 0)),
            429,
            {"detail": "The platform is busy; slow down.", "code": "busy"},
            {"Retry-After": "1"},
        ),
        (
            services.TelemetryBackpressure(Admission("critical", 9_600, 5)),
            503,
            {"detail": "The platform is overloaded; retry later.", "code": "overloaded"},
            {"Retry-After": "5"},
        ),
        (
            services.TelemetryRateLimited(FULL_WINDOW),
            429,
            {
                "detail": "Rate limit exceeded (device): at most 100 points per device per window.",
                "code": "rate_limited",
                "scope": "device",
            },
            {"Retry-After": "30", "X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "0"},
        ),
        (
            services.TelemetryBatchOverLimit(FULL_WINDOW, 101),
            429,
            {
                "detail": "101 points can never fit the per-device limit of 100 points per "
                f"{django_settings.RATE_LIMIT_WINDOW_SECONDS} s; split the batch.",
                "code": "batch_exceeds_limit",
                "limit": 100,
                "points": 101,
            },
            {"X-RateLimit-Limit": "100", "X-RateLimit-Remaining": "0"},
        ),
        (
            services.TelemetryRetryLater(),
            503,
            {"detail": "Telemetry storage is being reorganised; retry shortly.", "code": "retry_later"},
            {"Retry-After": "1"},
        ),
        (services.TelemetryUnknownDevice("No device with id 7."), 422, {"device_id": ["No device with id 7."]}, {}),
    ],
    ids=["busy", "overloaded", "rate_limited", "batch_exceeds_limit", "retry_later", "unknown_device"],
)
def test_each_refusal_carries_its_http_answer(refusal, status, body, headers):
    """The one mapping (`api_exception_handler`) gives what the service's exception says, nothing else."""
    response = api_exception_handler(refusal, {})
    assert (response.status_code, response.data) == (status, body)
    sent = {
        name: response[name]
        for name in ("Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining")
        if name in response
    }
    assert sent == headers


def counted(outcome: str) -> float:
    return POINTS.labels(outcome=outcome)._value.get()


def test_the_service_counts_its_refusals_by_outcome(device, published, settings, redis_namespace):
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 2
    before = {outcome: counted(outcome) for outcome in ("rate_limited", "backpressure", "invalid")}
    services.telemetry_points_ingest(batch=columns(device.pk, distinct(2, 1.0)))
    with pytest.raises(services.TelemetryRateLimited):
        services.telemetry_points_ingest(batch=columns(device.pk, [("t", recent(1), 1.0)]))
    with pytest.raises(services.TelemetryBatchOverLimit):  # can never pass: invalid, not rate_limited
        services.telemetry_points_ingest(batch=columns(device.pk, distinct(3, 1.0)))
    with pytest.raises(services.TelemetryUnknownDevice):
        services.telemetry_points_ingest(batch=columns(uuid.uuid4(), [("t", recent(1), 1.0)]))
    queue_depth_set(django_settings.BACKPRESSURE_QUEUE_THRESHOLD)
    with pytest.raises(services.TelemetryBackpressure):
        services.telemetry_points_ingest(batch=columns(device.pk, distinct(5, 1.0)))
    after = {outcome: counted(outcome) - before[outcome] for outcome in before}
    assert after == {"rate_limited": 1, "backpressure": 5, "invalid": 3 + 1}


@pytest.mark.django_db(transaction=True)
def test_accepted_points_are_counted_at_the_commit_and_never_for_a_rollback(device, published):
    """Real commits and rollbacks (no test transaction around them): the count is a side effect of the commit."""
    before = counted("accepted")
    with pytest.raises(RuntimeError), transaction.atomic():
        services.telemetry_points_ingest(batch=columns(device.pk, distinct(3, 1.0)))
        raise RuntimeError("the caller fails after ingesting")
    assert counted("accepted") == before and published == []
    with transaction.atomic():
        services.telemetry_points_ingest(batch=columns(device.pk, distinct(2, 1.0)))
        assert counted("accepted") == before and published == [], "counted before the commit"
    assert counted("accepted") == before + 2 and len(published) == 1
    assert TelemetryPoint.objects.filter(device_id=device.pk).count() == 2


def test_query_newest_first_across_metrics_and_windows(device, published):
    points = [(metric, recent(60 - i), float(i)) for i in range(30) for metric in ("a", "b", "c")]
    services.telemetry_points_ingest(batch=columns(device.pk, points))

    newest = selectors.telemetry_points_query(device_id=device.pk, limit=4)
    assert [p.value for p in newest] == [29.0, 29.0, 29.0, 28.0]
    assert [p.ts for p in newest] == sorted((p.ts for p in newest), reverse=True)

    only_b = selectors.telemetry_points_query(device_id=device.pk, metric="b", limit=2)
    assert [(p.metric, p.value) for p in only_b] == [("b", 29.0), ("b", 28.0)]

    window = selectors.telemetry_points_query(
        device_id=device.pk, start_time=recent(60 - 10.5), end_time=recent(60 - 12.5), limit=100
    )
    assert sorted(p.value for p in window) == [11.0] * 3 + [12.0] * 3
    windowed_metric = selectors.telemetry_points_query(
        device_id=device.pk, metric="c", start_time=recent(60 - 10.5), end_time=recent(60 - 12.5)
    )
    assert [p.value for p in windowed_metric] == [12.0, 11.0]

    latest = selectors.telemetry_points_latest(device_id=device.pk, metric="a")
    assert latest.value == 29.0
    assert selectors.telemetry_points_latest(device_id=device.pk, metric="zzz") is None
    assert selectors.telemetry_points_query(device_id=uuid.uuid4()) == []


def _event(device_id: str, n: int, received_at: datetime) -> dict:
    return {
        "event_id": uuid.uuid4().hex,
        "device_id": device_id,
        "received_at": received_at.isoformat(),
        "metrics": ["t"] * n,
        "timestamps": [received_at.isoformat()] * n,
        "values": [float(i) for i in range(n)],
    }


def test_event_handler_counts_points_in_their_minute_and_second(redis_namespace):
    device_id = str(uuid.uuid4())
    received = datetime.now(UTC)
    client = get_redis()

    events.telemetry_points_received({**_event(device_id, 3, received), "group_id": "g1"})
    events.telemetry_points_received(_event(device_id, 2, received))

    window = client.hgetall(count_window_key(count_window_start(received.timestamp())))
    assert int(window[b"total"]) == 5 and int(window[f"d:{device_id}".encode()]) == 5
    assert int(window[b"g:g1"]) == 3  # the second event had no group
    second_key = messages_per_second_key(int(received.timestamp()))
    assert int(client.get(second_key)) == 5  # this test's own namespace: nothing else counted there
    assert 0 < client.ttl(second_key) <= 300
    assert 0 < client.ttl(count_window_key(count_window_start(received.timestamp()))) <= 2 * 24 * 3600


def test_messages_per_second_averages_the_last_complete_seconds(redis_namespace, monkeypatch):
    """The 10 complete seconds before the current one count; the current second (still filling) and older don't."""
    now = int(datetime.now(UTC).timestamp())
    monkeypatch.setattr(selectors, "time", SimpleNamespace(time=lambda: now + 0.5))  # no second ticks over
    client = get_redis()
    for offset in (1, 2, 3, 10):
        client.set(messages_per_second_key(now - offset), 25, ex=60)
    client.set(messages_per_second_key(now), 1000, ex=60)
    client.set(messages_per_second_key(now - 11), 1000, ex=60)
    assert selectors.telemetry_messages_per_second(window_seconds=10) == 10.0


def test_event_handler_pushes_to_the_live_group():
    device_id = str(uuid.uuid4())
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(live_group_name(device_id), channel)
    try:
        event = _event(device_id, 2, datetime.now(UTC))
        events.telemetry_points_received(event)
        message = async_to_sync(layer.receive)(channel)
    finally:
        async_to_sync(layer.group_discard)(live_group_name(device_id), channel)
    assert message["type"] == "telemetry.points"
    assert message["event_id"] == event["event_id"]
    assert [p["value"] for p in message["points"]] == [0.0, 1.0]


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {**_event("x", 1, datetime.now(UTC)), "metrics": []},
        {**_event("x", 2, datetime.now(UTC)), "values": [1.0]},
        {**_event("x", 1, datetime.now(UTC)), "received_at": "yesterday"},
        {**_event("x", 1, datetime.now(UTC)), "timestamps": "many"},
    ],
)
def test_malformed_events_raise_for_the_dead_letter_stream(payload):
    with pytest.raises(ValueError, match="malformed"):
        events.telemetry_points_received(payload)


def test_a_read_of_events_is_handled_together_and_a_bad_event_fails_alone(redis_namespace, monkeypatch):
    """Issue 12: the consumer handles a read's events at once: the counters of all of them in one
    MULTI/EXEC, one ack call; a malformed event, or one whose push failed, stays pending alone."""
    from iot.testing.redis import redis_round_trips

    event_queue.ensure_consumer_group()
    received = datetime.now(UTC)
    device_ids = [str(uuid.uuid4()) for _ in range(3)]
    good = [_event(device_id, 2, received) for device_id in device_ids]
    malformed = {**_event(device_ids[0], 1, received), "values": "none"}
    for payload in [good[0], malformed, good[1], good[2]]:
        event_queue.event_queue_publish(event_type=services.EVENT_TYPE, payload=orjson.loads(orjson.dumps(payload)))
    pushed = []
    real_send_many = events.channel_group_send_many

    def send_many(*, sends):
        pushed.extend(message["event_id"] for _, message in sends)
        outcomes = real_send_many(sends=sends)
        failed = RuntimeError("push failed")
        return [failed if m["device_id"] == device_ids[2] else o for (_, m), o in zip(sends, outcomes, strict=True)]

    monkeypatch.setattr(events, "channel_group_send_many", send_many)
    with redis_round_trips() as calls:
        report = event_queue.event_queue_consume(consumer="c1", block_ms=100)
    assert (report.handled, report.failed) == (2, 2)
    # On a fresh Redis a script's first EVALSHA is refused (NOSCRIPT), loaded once and sent again: not a
    # round trip of the steady state.
    steady = [c for i, c in enumerate(calls) if c != "SCRIPT LOAD" and calls[i + 1 : i + 2] != ["SCRIPT LOAD"]]
    assert steady == ["XREADGROUP", "pipeline", "EVALSHA"], calls  # read, counters (one MULTI), one ack
    assert pushed == [event["event_id"] for event in good]  # the malformed one is never pushed
    window = get_redis().hgetall(count_window_key(count_window_start(received.timestamp())))
    assert int(window[b"total"]) == 4  # the two events handled, 2 points each
    assert {key for key in window if key.startswith(b"d:")} == {f"d:{d}".encode() for d in device_ids[:2]}
    assert event_queue.event_queue_depth() == 2  # the two that failed stay pending, for a retry
    assert get_redis().xpending(event_queue._stream_key(), event_queue.GROUP)["pending"] == 2
