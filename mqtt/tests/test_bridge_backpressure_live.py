"""Backpressure over MQTT slows the bridge down and drops nothing: a bridge (in this process, so the test
sets the event queue's depth in its Redis namespace) against a live broker and web server (whose auth
endpoints the broker asks). While the queue is past its critical threshold the device's QoS 1 points
are held unacknowledged and retried; once it drains, every one is stored."""

import threading
import time
from datetime import UTC, datetime

import pytest

from devices.testing import device_create
from iot import event_queue
from iot.redis import get_redis
from iot.testing.live import dedicated_platform
from iot.testing.processes import wait_until
from mqtt.bridge import MqttBridge
from mqtt.metrics import MESSAGES
from mqtt.testing import device_connection
from telemetry.models import TelemetryPoint

pytestmark = [pytest.mark.live, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def broker_only(django_db_setup, django_db_blocker, platform_logs):
    """Web + broker, no worker: the only bridge is the test's."""
    with dedicated_platform(
        django_db_blocker, platform_logs, name="mqtt-bp", env={}, worker=False, mqtt=True
    ) as running:
        yield running


@pytest.fixture
def bridge(broker_only, settings, redis_namespace):
    settings.MQTT_URL = broker_only.mqtt_url
    settings.MQTT_BRIDGE_PASSWORD = broker_only.env["MQTT_BRIDGE_PASSWORD"]
    running = MqttBridge(client_id=f"test-bridge-{time.monotonic_ns()}", lanes=2)
    running.start()
    assert running.wait_subscribed(15)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    yield running
    running.stop()
    thread.join(10)


def held() -> float:
    return MESSAGES.labels(kind="telemetry", outcome="backpressure")._value.get()


def test_points_published_under_backpressure_are_held_then_all_stored(broker_only, bridge, settings):
    device = device_create(serial_prefix="SN-MQTT-BP")
    depth_key = event_queue.admission_keys()[0]
    get_redis().set(depth_key, settings.BACKPRESSURE_REJECT_THRESHOLD)  # consumers far behind: critical
    held_before = held()
    base = time.time() - 30
    with device_connection(broker_only.mqtt_url, str(device.device.pk), device.device_token) as connection:
        for n in range(5):
            ts = datetime.fromtimestamp(base + n, tz=UTC).isoformat()
            connection.publish("telemetry", {"timestamp": ts, "metric": "bp", "value": float(n)})
    wait_until(lambda: held() >= held_before + 2, timeout=30, message="the bridge retried a held message")
    assert not TelemetryPoint.objects.filter(device_id=device.device.pk).exists()  # held, not stored, not dropped
    get_redis().set(depth_key, 0)  # the consumers caught up
    wait_until(
        lambda: TelemetryPoint.objects.filter(device_id=device.device.pk).count() == 5,
        timeout=30,
        interval=0.2,
        message="every held point stored",
    )
