"""Celery on RabbitMQ by settings alone: `CELERY_BROKER_URL=amqp://...`, nothing else changed.

An alert's notification goes through a countdown retry (`apply_async(countdown=...)`) while its
worker is SIGKILLed holding that retry: with `acks_late` the worker acknowledges a message only once
its task has run, and an ETA message waits unacknowledged in the worker until then, so RabbitMQ hands
it to the next worker the moment the connection dies (Redis' transport would hide it for its
visibility timeout, an hour). The outbox's sweeper is off here (an hour apart), so nothing but the
broker can bring the retry back. The notification must end delivered, acknowledged by the target
exactly once, and readiness (worker heartbeats in Redis) must not care which broker runs.

Skipped when no RabbitMQ answers at `RABBITMQ_TEST_URL` (default amqp://guest:guest@127.0.0.1:5672//).
"""

import os
import re
import uuid

import pytest
from kombu import Connection

from iot.redis import get_redis
from iot.testing.live import UNLIMITED, dedicated_platform, register_device
from iot.testing.processes import http_client, start_worker, wait_until
from iot.testing.telemetry import point_body
from iot.testing.webhook import WebhookTarget

pytestmark = pytest.mark.live

BROKER_URL = os.environ.get("RABBITMQ_TEST_URL", "amqp://guest:guest@127.0.0.1:5672//")
TASK = "alerts.tasks.notification_deliver"


def _rabbitmq_problem() -> str | None:
    try:
        with Connection(BROKER_URL, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:  # any failure to reach it means: nothing to test against
        return f"RabbitMQ unreachable at {BROKER_URL}: {exc!r}"
    return None


@pytest.fixture
def queue_name():
    problem = _rabbitmq_problem()
    if problem:
        pytest.skip(problem)
    name = f"iottest-{uuid.uuid4().hex[:10]}"
    yield name
    with Connection(BROKER_URL) as connection:
        connection.default_channel.queue_delete(name)
        connection.default_channel.exchange_delete(name)


def _received(log: str) -> list[str]:
    """Ids of the `notification_deliver` tasks a worker received, in order (Celery logs each at INFO)."""
    return re.findall(rf"Task {re.escape(TASK)}\[([0-9a-f-]+)\] received", log)


def _succeeded(log: str) -> list[str]:
    return re.findall(rf"Task {re.escape(TASK)}\[([0-9a-f-]+)\] succeeded", log)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_countdown_retry_survives_its_worker_killed_on_rabbitmq(
    django_db_setup, django_db_blocker, platform_logs, operator_token, queue_name, queue_type
):
    """classic: the retry waits for its countdown in the worker, unacknowledged; killed, the worker's
    connection drops and RabbitMQ hands the very message to the next worker. quorum: Celery sends the
    retry to RabbitMQ's delay queues ("native delayed delivery"), so no worker holds it at all."""
    env = {
        **UNLIMITED,
        "CELERY_BROKER_URL": BROKER_URL,
        "CELERY_TASK_DEFAULT_QUEUE": queue_name,
        "CELERY_TASK_DEFAULT_QUEUE_TYPE": queue_type,
        "ALERT_WEBHOOK_ALLOW_PRIVATE": "1",
        "WEBHOOK_CONNECT_TIMEOUT_SECONDS": "1",
        "WEBHOOK_READ_TIMEOUT_SECONDS": "1",
        "CIRCUIT_BREAKER_FAILURE_THRESHOLD": "1000",  # this test is about the broker, not the breaker
        "ALERT_NOTIFICATION_LEASE_SECONDS": "3",
        "ALERT_NOTIFICATION_RETRY_BASE_SECONDS": "4",
        "ALERT_NOTIFICATION_RETRY_MAX_SECONDS": "4",
        "ALERT_NOTIFICATION_SWEEP_INTERVAL_SECONDS": "3600",  # only the broker may bring a task back
        "LOG_LEVEL": "INFO",
    }
    target = WebhookTarget(mode="hang")  # the first attempt times out: a retry with a countdown
    name = f"rabbitmq-{queue_type}"
    try:
        with dedicated_platform(django_db_blocker, platform_logs, name=name, env=env) as running:
            with http_client(running, operator_token) as api:
                worker = running.processes[1]
                wait_until(lambda: api.get("/health/ready").status_code == 200, timeout=60, message="ready")
                assert re.search(r"transport:\s+amqp://", worker.log_tail(100_000))
                channel = api.post("/alerts/channels", json={"name": "mq", "kind": "webhook", "url": target.url})
                group = f"mq-{uuid.uuid4().hex[:8]}"
                rule = {"group_id": group, "metric": "temperature", "operator": "gt", "threshold": 0}
                response = api.post("/alerts/rules", json={**rule, "channel_ids": [channel.json()["id"]]})
                assert response.status_code == 201, response.text
                device = register_device(api, prefix="SN-MQ", group_id=group)
                assert api.post("/telemetry/point", json=point_body(device["id"], value=5.0)).status_code == 202

                # The first attempt hangs and fails (1 s); its task queues the retry, 2-4 s ahead, and ends.
                wait_until(lambda: target.hits() == 1, timeout=30, message="the first attempt")
                first = wait_until(lambda: _succeeded(worker.log_tail(100_000)), timeout=30, message="its end")
                if queue_type == "classic":
                    # The worker received the retry at once and holds it until its ETA.
                    wait_until(
                        lambda: len(_received(worker.log_tail(100_000))) == 2, timeout=30, message="the retry held"
                    )
                worker.kill()
                assert target.hits() == 1  # the retry had not run yet
                received_before = _received(worker.log_tail(100_000))
                assert received_before[0] == first[0]
                # quorum: the worker never saw the retry, RabbitMQ kept it.
                assert len(received_before) == (2 if queue_type == "classic" else 1)
                target.set_mode("ok")
                second = start_worker(running, log_dir=platform_logs / name, name="worker-2")
                wait_until(lambda: len(target.acknowledged) == 1, timeout=90, message="the notification delivered")

                from alerts.models import Notification

                def rows() -> list:
                    with django_db_blocker.unblock():
                        return list(Notification.objects.filter(channel_id=channel.json()["id"]))

                wait_until(lambda: [n.status for n in rows()] == ["delivered"], timeout=30, message="delivered")
                assert target.acknowledged == [str(rows()[0].pk)]  # once
                retried = [task for task in _received(second.log_tail(100_000)) if task != first[0]]
                assert retried, "the new worker got the retry"
                if queue_type == "classic":
                    assert retried[0] == received_before[1]  # the very message the killed worker held
                assert api.get("/health/ready").status_code == 200
                # Nothing of Celery's went to Redis.
                prefix = running.env["REDIS_KEY_PREFIX"]
                assert not list(get_redis().scan_iter(match=f"{prefix}:celery:*", count=1000))
    finally:
        target.close()
