"""A Celery worker SIGKILLed in the middle of deliveries loses no notification.

The webhook target holds every request (the worker is mid-POST, its rows claimed with a
lease); the worker and its whole process group are SIGKILLed; the target then answers.
A new worker's sweeper finds the rows whose lease ran out and re-queues them (the killed
worker's task messages are not redelivered by the Redis broker until its visibility
timeout, an hour: the outbox, not the broker, is what holds the work). Every notification
must end delivered and be acknowledged by the target exactly once (the held requests
were never answered, so none of them counts as acknowledged).
"""

import time
import uuid

import pytest

from iot.testing.live import UNLIMITED, dedicated_platform, register_device
from iot.testing.processes import http_client, start_worker, wait_until
from iot.testing.telemetry import point_body
from iot.testing.webhook import WebhookTarget

pytestmark = pytest.mark.live

DEVICES = 10
ENV = {
    **UNLIMITED,
    "ALERT_WEBHOOK_ALLOW_PRIVATE": "1",
    "WEBHOOK_CONNECT_TIMEOUT_SECONDS": "1",
    "WEBHOOK_READ_TIMEOUT_SECONDS": "3",
    "CIRCUIT_BREAKER_FAILURE_THRESHOLD": "1000",  # this test is about the worker, not the breaker
    "ALERT_NOTIFICATION_LEASE_SECONDS": "5",
    "ALERT_NOTIFICATION_SWEEP_INTERVAL_SECONDS": "1",
    "ALERT_NOTIFICATION_RETRY_BASE_SECONDS": "0.5",
    "ALERT_NOTIFICATION_RETRY_MAX_SECONDS": "2",
}


def test_a_worker_killed_mid_delivery_loses_no_notification(
    django_db_setup, django_db_blocker, platform_logs, operator_token
):
    target = WebhookTarget(mode="hang")
    try:
        with dedicated_platform(django_db_blocker, platform_logs, name="notify-kill", env=ENV) as running:
            with http_client(running, operator_token) as api:
                _run(api, running, target, django_db_blocker, platform_logs / "notify-kill")
    finally:
        target.close()


def _run(api, running, target: WebhookTarget, django_db_blocker, log_dir) -> None:
    channel = api.post("/alerts/channels", json={"name": "kill", "kind": "webhook", "url": target.url}).json()
    group = f"kill-{uuid.uuid4().hex[:8]}"
    api.post(
        "/alerts/rules",
        json={
            "group_id": group,
            "metric": "temperature",
            "operator": "gt",
            "threshold": 0,
            "channel_ids": [channel["id"]],
        },
    ).raise_for_status()
    for _ in range(DEVICES):
        device = register_device(api, prefix="SN-KILL", group_id=group)
        assert api.post("/telemetry/point", json=point_body(device["id"], value=1.0)).status_code == 202

    wait_until(lambda: target.held() >= 1, timeout=30, message="the worker is in the middle of a delivery")
    worker = running.processes[1]
    assert worker.name == "worker"
    worker.kill()
    killed_at = time.monotonic()
    held_at_kill = target.held()
    target.set_mode("ok")
    start_worker(running, log_dir=log_dir, name="worker-2")

    wait_until(lambda: len(set(target.acknowledged)) == DEVICES, timeout=120, message="every notification delivered")
    print(
        f"worker killed with {held_at_kill} delivery(ies) in flight; all {DEVICES} delivered "
        f"{time.monotonic() - killed_at:.1f} s later"
    )
    from alerts.models import Notification

    def rows() -> list:
        with django_db_blocker.unblock():
            return list(Notification.objects.filter(channel_id=channel["id"]))

    # The target answered; the worker records `delivered` right after: poll for it.
    wait_until(lambda: {n.status for n in rows()} == {"delivered"}, timeout=30, message="every row delivered")
    notifications = rows()
    assert len(notifications) == DEVICES
    assert sorted(target.acknowledged) == sorted(str(n.pk) for n in notifications)  # each exactly once
