"""Notifications: the outbox written with the alert, its delivery through the per-channel circuit breaker,
retries, expiry, silences and maintenance, and the channels API. Webhooks go to a local HTTP server."""

import json
import logging
import threading
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import connection, connections
from django.utils import timezone

from alerts import services
from alerts.metrics import notification_outcomes
from alerts.models import Alert, AlertRuleChannel, Notification, NotificationChannel, Silence
from alerts.services import (
    alert_rule_create,
    channel_breaker_name,
    notification_backoff_seconds,
    notification_deliver_attempt,
)
from alerts.tasks import notifications_sweep
from alerts.testing import points_evaluate
from devices.models import Device
from devices.testing import device_create
from iot.circuit_breaker import breaker_state
from iot.testing.factories import operator_token_create
from iot.testing.processes import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


class Target:
    """A webhook receiver: answers `status` (after `delay` seconds) and records every request it gets."""

    def __init__(self):
        self.status = 200
        self.delay = 0.0
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if target.delay:
                    threading.Event().wait(target.delay)  # the receiver is slow, not the test
                with target.lock:
                    target.requests.append({"key": self.headers["Idempotency-Key"], "body": body})
                    status = target.status
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def keys(self) -> list[str]:
        with self.lock:
            return [request["key"] for request in self.requests]


@pytest.fixture
def target(settings):
    settings.ALERT_WEBHOOK_ALLOW_PRIVATE = True
    settings.CIRCUIT_BREAKER_FAILURE_THRESHOLD = 3
    settings.CIRCUIT_BREAKER_TIMEOUT_SECONDS = 0.5
    settings.CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS = 1
    server = Target()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def queued(monkeypatch):
    """The notification ids queued after commit (instead of sending them to the broker)."""
    ids: list[uuid.UUID] = []
    monkeypatch.setattr(services, "_notifications_queue", lambda notification_ids: ids.extend(notification_ids))
    return ids


def channel_create(url: str, name: str = "ops") -> NotificationChannel:
    return NotificationChannel.objects.create(name=name, url=url)


def rule_with_channels(*, device_id=None, group_id=None, channels=(), threshold=50.0):
    return alert_rule_create(
        device_id=device_id,
        group_id=group_id,
        metric="temperature",
        operator="gt",
        threshold=threshold,
        channel_ids=[channel.pk for channel in channels],
    )


def make_due() -> None:
    """What time passing does to the rows held back by a backoff or an open breaker."""
    Notification.objects.filter(status="pending").update(next_attempt_at=timezone.now())


def test_a_new_alert_writes_one_notification_per_channel_queued_after_commit(target, queued):
    device = device_create(serial_prefix="NOTIFY").device
    first, second = channel_create(target.url, "a"), channel_create(target.url, "b")
    rule_with_channels(device_id=device.pk, channels=[first, second])
    result = points_evaluate(device_id=device.pk, values=[60.0, 70.0])
    [alert_id] = result.created
    notifications = list(Notification.objects.order_by("channel__name"))
    assert [n.channel_id for n in notifications] == [first.pk, second.pk]
    assert all(n.alert_ids == [alert_id] and n.status == "pending" and n.attempts == 0 for n in notifications)
    ttl = notifications[0].expires_at - notifications[0].created_at
    assert abs(ttl.total_seconds() - 86_400) < 1
    assert sorted(queued) == sorted(n.pk for n in notifications)


def test_repeated_violations_of_an_open_alert_are_coalesced(target, queued):
    device = device_create(serial_prefix="NOTIFY").device
    rule_with_channels(device_id=device.pk, channels=[channel_create(target.url)])
    for value in range(10):
        points_evaluate(device_id=device.pk, values=[60.0 + value])
    [alert] = Alert.objects.filter(device_id=device.pk)
    assert alert.occurrences == 10
    [notification] = Notification.objects.all()
    assert notification.alert_ids == [alert.pk] and len(queued) == 1


def test_a_rolled_back_ingest_leaves_no_notification_and_queues_nothing(target, queued):
    device = device_create(serial_prefix="NOTIFY").device
    rule_with_channels(device_id=device.pk, channels=[channel_create(target.url)])
    from django.db import transaction

    with pytest.raises(RuntimeError), transaction.atomic():
        points_evaluate(device_id=device.pk, values=[60.0])
        raise RuntimeError("the ingest failed after evaluating")
    assert Notification.objects.count() == 0 and Alert.objects.count() == 0 and queued == []


@pytest.mark.parametrize("silenced", ["rule", "device", "group"])
def test_a_silence_suppresses_notifications_but_not_alerts(target, queued, silenced):
    device = device_create(serial_prefix="NOTIFY", group_id="muted-group").device
    rule = rule_with_channels(group_id="muted-group", channels=[channel_create(target.url)])
    target_fields = {"rule": {"rule_id": rule.pk}, "device": {"device_id": device.pk}, "group": {}}[silenced]
    if silenced == "group":
        target_fields = {"group_id": "muted-group"}
    Silence.objects.create(ends_at=timezone.now() + timedelta(hours=1), **target_fields)
    points_evaluate(device_id=device.pk, group_id="muted-group", values=[60.0])
    assert Alert.objects.filter(device_id=device.pk).count() == 1
    assert Notification.objects.count() == 0 and queued == []


def test_an_ended_silence_no_longer_suppresses(target, queued):
    device = device_create(serial_prefix="NOTIFY").device
    rule = rule_with_channels(device_id=device.pk, channels=[channel_create(target.url)])
    Silence.objects.create(rule_id=rule.pk, starts_at=timezone.now() - timedelta(hours=2), ends_at=timezone.now())
    points_evaluate(device_id=device.pk, values=[60.0])
    assert Notification.objects.count() == 1


def test_a_device_in_maintenance_raises_alerts_without_notifying(target, queued):
    device = device_create(serial_prefix="NOTIFY").device
    Device.objects.filter(pk=device.pk).update(status="maintenance")
    rule_with_channels(device_id=device.pk, channels=[channel_create(target.url)])
    points_evaluate(device_id=device.pk, values=[60.0])
    assert Alert.objects.filter(device_id=device.pk).count() == 1
    assert Notification.objects.count() == 0 and queued == []


def test_delivered_once_with_the_alerts_in_the_body(target, queued):
    device = device_create(serial_prefix="NOTIFY").device
    channel = channel_create(target.url)
    rule = rule_with_channels(device_id=device.pk, channels=[channel])
    [alert_id] = points_evaluate(device_id=device.pk, values=[60.0, 61.0]).created
    before = notification_outcomes()["delivered"]
    [notification_id] = queued
    assert notification_deliver_attempt(notification_id=notification_id).outcome == "delivered"
    assert notification_deliver_attempt(notification_id=notification_id).outcome == "skipped"
    [request] = target.requests
    assert request["key"] == str(notification_id)
    assert request["body"]["channel"] == str(channel.pk)
    [reported] = request["body"]["alerts"]
    assert reported["id"] == str(alert_id) and reported["rule_id"] == str(rule.pk)
    assert (reported["device_id"], reported["occurrences"], reported["last_value"]) == (str(device.pk), 2, 61.0)
    assert set(reported) == {
        "id", "rule_id", "device_id", "metric", "severity", "status", "last_value", "occurrences",
        "first_triggered_at",
    }  # fmt: skip
    notification = Notification.objects.get(pk=notification_id)
    assert (notification.status, notification.attempts, notification.delivered_at is not None) == (
        "delivered",
        1,
        True,
    )
    assert notification_outcomes()["delivered"] == before + 1


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap(settings):
    settings.ALERT_NOTIFICATION_RETRY_BASE_SECONDS = 2.0
    settings.ALERT_NOTIFICATION_RETRY_MAX_SECONDS = 60.0
    for attempts, low, high in [(1, 1, 2), (2, 2, 4), (3, 4, 8), (10, 30, 60), (40, 30, 60)]:
        delays = [notification_backoff_seconds(attempts=attempts) for _ in range(50)]
        assert all(low <= d <= high for d in delays), (attempts, min(delays), max(delays))
        assert len(set(delays)) > 1  # jittered
    assert notification_backoff_seconds(attempts=1, retry_after=30) == 30  # a 429's Retry-After is honoured


def test_target_down_retries_with_backoff_opens_the_breaker_then_recovers_delivering_each_once(target, queued):
    channel = channel_create(target.url)
    rule_with_channels(group_id="fleet", channels=[channel])
    devices = [device_create(serial_prefix="NOTIFY", group_id="fleet").device for _ in range(6)]
    for device in devices:
        points_evaluate(device_id=device.pk, group_id="fleet", values=[60.0])
    assert len(queued) == 6
    target.status = 503
    outcomes = [notification_deliver_attempt(notification_id=n).outcome for n in queued]
    # 3 failures (the threshold) open the breaker: the other 3 are held without reaching the target.
    assert outcomes == ["failed"] * 3 + ["held"] * 3
    assert len(target.requests) == 3
    assert breaker_state(name=channel_breaker_name(channel.pk)) == "open"
    rows = {n.pk: n for n in Notification.objects.all()}
    now = timezone.now()
    assert all(row.status == "pending" and row.next_attempt_at > now for row in rows.values())
    assert sorted(row.attempts for row in rows.values()) == [0, 0, 0, 1, 1, 1]
    assert all("503" in rows[n].last_error for n in queued[:3])
    assert all("circuit breaker open" in rows[n].last_error for n in queued[3:])
    # Not due yet: nothing is sent.
    assert {notification_deliver_attempt(notification_id=n).outcome for n in queued} == {"skipped"}
    assert len(target.requests) == 3

    # The target recovers; after the breaker's timeout one probe goes through and closes it.
    target.status = 200
    wait_until(
        lambda: breaker_state(name=channel_breaker_name(channel.pk)) == "half_open", timeout=10, message="half-open"
    )
    make_due()
    assert notification_deliver_attempt(notification_id=queued[0]).outcome == "delivered"
    assert breaker_state(name=channel_breaker_name(channel.pk)) == "closed"
    make_due()
    assert [notification_deliver_attempt(notification_id=n).outcome for n in queued[1:]] == ["delivered"] * 5
    delivered_keys = target.keys()[3:]
    assert sorted(delivered_keys) == sorted(str(n) for n in queued)  # every held notification exactly once
    assert Notification.objects.filter(status="delivered").count() == 6


def test_a_failed_probe_reopens_the_breaker_without_reaching_the_target_again(target, queued):
    channel = channel_create(target.url)
    rule_with_channels(group_id="fleet2", channels=[channel])
    for _ in range(5):
        device = device_create(serial_prefix="NOTIFY", group_id="fleet2").device
        points_evaluate(device_id=device.pk, group_id="fleet2", values=[60.0])
    target.status = 500
    for n in queued:
        notification_deliver_attempt(notification_id=n)
    name = channel_breaker_name(channel.pk)
    wait_until(lambda: breaker_state(name=name) == "half_open", timeout=10, message="half-open")
    make_due()
    outcomes = [notification_deliver_attempt(notification_id=n).outcome for n in queued]
    assert outcomes == ["failed"] + ["held"] * 4  # one probe (HALF_OPEN_MAX_CALLS = 1), which failed
    assert breaker_state(name=name) == "open" and len(target.requests) == 4


def test_a_client_error_is_retried_until_expiry_without_tripping_the_breaker(target, queued):
    device = device_create(serial_prefix="NOTIFY").device
    channel = channel_create(target.url)
    rule_with_channels(device_id=device.pk, channels=[channel])
    points_evaluate(device_id=device.pk, values=[60.0])
    [notification_id] = queued
    target.status = 400
    for _ in range(4):
        make_due()
        assert notification_deliver_attempt(notification_id=notification_id).outcome == "failed"
    assert breaker_state(name=channel_breaker_name(channel.pk)) == "closed"
    row = Notification.objects.get(pk=notification_id)
    assert (row.status, row.attempts) == ("pending", 4) and "HTTP 400" in row.last_error
    # Expired: marked, logged and counted, never sent again.
    expired_before = notification_outcomes()["expired"]
    Notification.objects.filter(pk=notification_id).update(
        expires_at=timezone.now() - timedelta(seconds=1), next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.ERROR)
    handler.emit = records.append
    logging.getLogger("alerts.services").addHandler(handler)
    try:
        assert notification_deliver_attempt(notification_id=notification_id).outcome == "expired"
    finally:
        logging.getLogger("alerts.services").removeHandler(handler)
    assert Notification.objects.get(pk=notification_id).status == "expired"
    assert notification_outcomes()["expired"] == expired_before + 1
    assert any(str(notification_id) in record.getMessage() for record in records)
    assert notification_deliver_attempt(notification_id=notification_id).outcome == "skipped"
    assert len(target.requests) == 4


def test_the_next_attempt_is_never_scheduled_after_the_expiry(target, queued):
    device = device_create(serial_prefix="NOTIFY").device
    rule_with_channels(device_id=device.pk, channels=[channel_create(target.url)])
    points_evaluate(device_id=device.pk, values=[60.0])
    [notification_id] = queued
    expires_at = timezone.now() + timedelta(milliseconds=300)
    Notification.objects.filter(pk=notification_id).update(expires_at=expires_at, attempts=20)
    target.status = 503
    result = notification_deliver_attempt(notification_id=notification_id)
    assert result.outcome == "failed" and result.retry_in_seconds < 1
    assert Notification.objects.get(pk=notification_id).next_attempt_at == expires_at


def test_two_concurrent_deliveries_of_one_row_send_it_once(target, queued):
    device = device_create(serial_prefix="NOTIFY").device
    rule_with_channels(device_id=device.pk, channels=[channel_create(target.url)])
    points_evaluate(device_id=device.pk, values=[60.0])
    [notification_id] = queued
    target.delay = 0.5  # the first call is still in flight when the second claim is tried
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def deliver():
        try:
            barrier.wait()
            outcomes.append(notification_deliver_attempt(notification_id=notification_id).outcome)
        finally:
            connections.close_all()  # this thread's own connection

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes) == ["delivered", "skipped"]
    assert target.keys() == [str(notification_id)]


def test_a_notification_whose_alerts_were_deleted_expires_without_a_call(target, queued):
    device = device_create(serial_prefix="NOTIFY").device
    rule_with_channels(device_id=device.pk, channels=[channel_create(target.url)])
    points_evaluate(device_id=device.pk, values=[60.0])
    Alert.objects.all().delete()
    [notification_id] = queued
    assert notification_deliver_attempt(notification_id=notification_id).outcome == "expired"
    assert target.requests == []


def test_the_sweeper_requeues_only_overdue_pending_rows(target, queued, monkeypatch, settings):
    settings.ALERT_NOTIFICATION_SWEEP_INTERVAL_SECONDS = 30
    device = device_create(serial_prefix="NOTIFY").device
    rule_with_channels(device_id=device.pk, channels=[channel_create(target.url, "a"), channel_create(target.url, "b")])
    points_evaluate(device_id=device.pk, values=[60.0])
    lost, fresh = queued
    Notification.objects.filter(pk=lost).update(next_attempt_at=timezone.now() - timedelta(minutes=5))
    swept: list[str] = []
    from alerts import tasks

    monkeypatch.setattr(tasks.notification_deliver, "delay", lambda notification_id: swept.append(notification_id))
    assert notifications_sweep() == 1 and swept == [str(lost)]
    Notification.objects.filter(pk=lost).update(status="delivered")
    swept.clear()
    assert notifications_sweep() == 0 and swept == []


def test_no_notification_statement_when_the_rule_has_no_channel(target, queued):
    from django.test.utils import CaptureQueriesContext

    device = device_create(serial_prefix="NOTIFY").device
    rule_with_channels(device_id=device.pk)
    points_evaluate(device_id=device.pk, values=[1.0])  # caches the rules
    with CaptureQueriesContext(connection) as captured:
        assert len(points_evaluate(device_id=device.pk, values=[60.0]).created) == 1
    assert not any("alerts_notification" in query["sql"] for query in captured.captured_queries)
    assert Notification.objects.count() == 0


# --- The channels API ------------------------------------------------------------------------------


@pytest.fixture
def operator(client):
    client.defaults["HTTP_AUTHORIZATION"] = f"Token {operator_token_create().key}"
    return client


def test_channel_api_create_read_list_delete_with_breaker_state(operator, target, queued):
    response = operator.post(
        "/alerts/channels", {"name": "ops", "kind": "webhook", "url": target.url}, content_type="application/json"
    )
    assert response.status_code == 201, response.content
    channel = response.json()
    assert channel["breaker_state"] == "closed" and channel["url"] == target.url
    # Open its breaker through failed deliveries.
    rule_with_channels(group_id="api-fleet", channels=[NotificationChannel.objects.get(pk=channel["id"])])
    target.status = 503
    for _ in range(3):
        device = device_create(serial_prefix="NOTIFY", group_id="api-fleet").device
        points_evaluate(device_id=device.pk, group_id="api-fleet", values=[60.0])
    for n in queued:
        notification_deliver_attempt(notification_id=n)
    assert operator.get(f"/alerts/channels/{channel['id']}").json()["breaker_state"] == "open"
    listed = operator.get("/alerts/channels").json()
    items = listed["results"] if isinstance(listed, dict) else listed
    assert [(c["id"], c["breaker_state"]) for c in items] == [(channel["id"], "open")]
    assert operator.delete(f"/alerts/channels/{channel['id']}").status_code == 204
    assert operator.get(f"/alerts/channels/{channel['id']}").status_code == 404
    assert operator.delete(f"/alerts/channels/{channel['id']}").status_code == 404
    assert Notification.objects.count() == 0 and AlertRuleChannel.objects.count() == 0  # cascaded
    assert breaker_state(name=channel_breaker_name(channel["id"])) == "closed"  # forgotten


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("ftp://hooks.example.com/x", "scheme"),
        ("http://user:pw@hooks.example.com/x", "credentials"),
        ("not a url", "whitespace"),
    ],
)
def test_channel_api_refuses_unsafe_urls_with_a_message(operator, settings, url, message):
    settings.ALERT_WEBHOOK_ALLOW_PRIVATE = False
    response = operator.post(
        "/alerts/channels", {"name": "bad", "kind": "webhook", "url": url}, content_type="application/json"
    )
    assert response.status_code == 400, response.content
    assert message in json.dumps(response.json())
    assert NotificationChannel.objects.count() == 0


def test_channel_api_refuses_bad_fields(operator):
    for body in [{"name": "x", "kind": "email", "url": "https://a.example"}, {"name": "x", "kind": "webhook"}, {}]:
        response = operator.post("/alerts/channels", body, content_type="application/json")
        assert response.status_code == 400, (body, response.content)
    assert operator.get("/alerts/channels/not-a-uuid").status_code == 404
    assert NotificationChannel.objects.count() == 0
