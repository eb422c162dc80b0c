"""Notifications on the live multi-process server (web x2 + Celery worker) with a webhook target that hangs.

The target accepts connections and never answers (each delivery ends at the 1 s read
timeout): ingestion must not notice, the channel's breaker must open and hold further
deliveries away from the target, and once the target answers again every notification
must be acknowledged exactly once.
"""

import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from iot.testing.live import UNLIMITED, dedicated_platform, metric_value, register_device
from iot.testing.processes import http_client, wait_until
from iot.testing.telemetry import point_body
from iot.testing.webhook import WebhookTarget

pytestmark = pytest.mark.live

DEVICES = 20
POINTS_PER_DEVICE = 6
THRESHOLD = 3
ENV = {
    **UNLIMITED,
    "ALERT_WEBHOOK_ALLOW_PRIVATE": "1",
    "WEBHOOK_CONNECT_TIMEOUT_SECONDS": "1",
    "WEBHOOK_READ_TIMEOUT_SECONDS": "1",
    "CIRCUIT_BREAKER_FAILURE_THRESHOLD": str(THRESHOLD),
    "CIRCUIT_BREAKER_TIMEOUT_SECONDS": "5",
    "CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS": "1",
    "CIRCUIT_BREAKER_PROBE_LEASE_SECONDS": "5",
    "ALERT_NOTIFICATION_LEASE_SECONDS": "5",
    "ALERT_NOTIFICATION_RETRY_BASE_SECONDS": "0.5",
    "ALERT_NOTIFICATION_RETRY_MAX_SECONDS": "2",
}


def test_a_hanging_target_neither_slows_ingestion_nor_loses_or_repeats_a_notification(
    django_db_setup, django_db_blocker, platform_logs, operator_token
):
    target = WebhookTarget(mode="hang")
    try:
        with dedicated_platform(django_db_blocker, platform_logs, name="notify-hang", env=ENV) as running:
            with http_client(running, operator_token) as api:
                _run(api, target, django_db_blocker)
    finally:
        target.close()


def _run(api, target: WebhookTarget, django_db_blocker) -> None:
    channel = api.post("/alerts/channels", json={"name": "hangs", "kind": "webhook", "url": target.url})
    assert channel.status_code == 201, channel.text
    channel = channel.json()
    group = f"grp-{uuid.uuid4().hex[:8]}"
    rule = api.post(
        "/alerts/rules",
        json={
            "group_id": group,
            "metric": "temperature",
            "operator": "gt",
            "threshold": 30.0,
            "channel_ids": [channel["id"]],
        },
    )
    assert rule.status_code == 201, rule.text
    devices = [register_device(api, prefix="SN-NOTIFY", group_id=group) for _ in range(DEVICES)]

    def send(device_id: str) -> list[tuple[int, float]]:
        answers = []
        for n in range(POINTS_PER_DEVICE):
            started = time.perf_counter()
            response = api.post("/telemetry/point", json=point_body(device_id, value=40.0 + n))
            answers.append((response.status_code, time.perf_counter() - started))
        return answers

    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = [a for device_answers in pool.map(send, [d["id"] for d in devices]) for a in device_answers]
    assert [status for status, _ in answers] == [202] * DEVICES * POINTS_PER_DEVICE
    latencies = [seconds for _, seconds in answers]
    mean_ms, p95_ms = statistics.mean(latencies) * 1000, sorted(latencies)[int(len(latencies) * 0.95)] * 1000
    print(f"ingest latency while the webhook hangs: mean {mean_ms:.1f} ms, p95 {p95_ms:.1f} ms, n={len(latencies)}")
    assert mean_ms < 100

    def channel_state() -> str:
        return api.get(f"/alerts/channels/{channel['id']}").json()["breaker_state"]

    wait_until(lambda: channel_state() == "open", timeout=60, message="the breaker opens")
    # Deliveries keep coming (one per new alert) and are held without reaching the target.
    wait_until(
        lambda: metric_value(api, "iot_alert_notifications_total", outcome="held") >= DEVICES - THRESHOLD - 2,
        timeout=30,
        message="deliveries held by the open breaker",
    )
    # At most the threshold plus what the worker's 2 processes had in flight when it opened.
    assert target.hits() <= THRESHOLD + 1

    target.set_mode("ok")
    wait_until(lambda: len(set(target.acknowledged)) == DEVICES, timeout=120, message="every notification delivered")
    wait_until(lambda: channel_state() == "closed", timeout=30, message="the breaker closes")
    from alerts.models import Alert, Notification

    def statuses() -> set[str]:
        with django_db_blocker.unblock():
            return set(Notification.objects.filter(channel_id=channel["id"]).values_list("status", flat=True))

    # The target answered; each worker records `delivered` right after: poll for it.
    wait_until(lambda: statuses() == {"delivered"}, timeout=30, message="every row delivered")
    with django_db_blocker.unblock():
        notifications = list(Notification.objects.filter(channel_id=channel["id"]))
        occurrences = sum(Alert.objects.filter(rule_id=rule.json()["id"]).values_list("occurrences", flat=True))
    assert len(notifications) == DEVICES and {n.status for n in notifications} == {"delivered"}
    assert sorted(target.acknowledged) == sorted(str(n.pk) for n in notifications)  # each exactly once
    assert occurrences == DEVICES * POINTS_PER_DEVICE
    assert all(body["alerts"] for body in target.bodies)
