"""What the bridge does with each message a device publishes (`mqtt.messages`), in process against
the test database and Redis: the same services and refusals as HTTP, and which messages are held."""

import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from django.db import OperationalError

from devices.models import Device
from devices.services import device_update
from devices.testing import device_create
from iot import event_queue
from iot.redis import get_redis
from mqtt import messages
from mqtt.metrics import MESSAGES
from telemetry.models import TelemetryPoint

pytestmark = pytest.mark.django_db


@pytest.fixture
def device() -> Device:
    return device_create(serial_prefix="SN-MQTT").device


def recent(seconds: float = 1) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


def handle(device_id, kind: str, body) -> messages.Outcome:
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    return messages.mqtt_message_handle(topic=f"devices/{device_id}/{kind}", payload=payload)


def counted(kind: str, outcome: str) -> float:
    return MESSAGES.labels(kind=kind, outcome=outcome)._value.get()


def test_a_point_without_device_id_is_the_topics_device_and_is_stored(device, redis_namespace):
    before = counted("telemetry", "accepted")
    outcome = handle(device.pk, "telemetry", {"timestamp": recent(), "metric": "t", "value": 1.5})
    assert outcome == messages.Outcome(outcome="accepted", points=1)
    assert list(TelemetryPoint.objects.filter(device_id=device.pk).values_list("metric", "value")) == [("t", 1.5)]
    assert counted("telemetry", "accepted") == before + 1


def test_a_batch_is_stored_whole(device, redis_namespace):
    points = [{"timestamp": recent(i + 1), "metric": "t", "value": float(i)} for i in range(5)]
    outcome = handle(device.pk, "telemetry", {"device_id": str(device.pk), "points": points})
    assert outcome.ack and outcome.outcome == "accepted" and outcome.points == 5
    assert TelemetryPoint.objects.filter(device_id=device.pk).count() == 5


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "detail"),
        (b"[1, 2]", "detail"),
        ({"timestamp": "yesterday", "metric": "t", "value": 1}, "timestamp"),
        ({"timestamp": None, "metric": "t", "value": float("inf")}, None),
        ({"metric": "t", "value": 1}, "timestamp"),
        ({"points": []}, "points"),
    ],
    ids=["malformed", "not-an-object", "bad-timestamp", "infinite", "missing-field", "empty-batch"],
)
def test_invalid_telemetry_is_refused_for_good_and_told(device, redis_namespace, body, field):
    if isinstance(body, dict) and body.get("value") == float("inf"):
        body = b'{"timestamp": "%s", "metric": "t", "value": 1e999}' % recent().encode()
    outcome = handle(device.pk, "telemetry", body)
    assert outcome.ack and outcome.outcome == "invalid"
    assert outcome.error["topic"] == f"devices/{device.pk}/telemetry" and outcome.error["status"] == 400
    if field is not None:
        assert field in outcome.error["error"], outcome.error
    assert not TelemetryPoint.objects.filter(device_id=device.pk).exists()


def test_a_payload_naming_another_device_is_forbidden(device, redis_namespace):
    other = device_create(serial_prefix="SN-MQTT-OTHER").device
    outcome = handle(
        device.pk, "telemetry", {"device_id": str(other.pk), "timestamp": recent(), "metric": "t", "value": 1}
    )
    assert outcome.ack and outcome.outcome == "forbidden" and outcome.error["status"] == 403
    assert not TelemetryPoint.objects.filter(device_id__in=[device.pk, other.pk]).exists()


def test_an_unknown_or_decommissioned_device_is_refused(device, redis_namespace):
    outcome = handle(uuid.uuid4(), "telemetry", {"timestamp": recent(), "metric": "t", "value": 1})
    assert outcome.ack and outcome.error["status"] == 422 and "device_id" in outcome.error["error"]
    device_update(device_id=device.pk, changes={"status": "decommissioned"})
    outcome = handle(device.pk, "telemetry", {"timestamp": recent(), "metric": "t", "value": 1})
    assert outcome.ack and outcome.error["status"] == 422


def test_rate_limited_telemetry_is_refused_with_retry_after(device, redis_namespace, settings):
    settings.RATE_LIMIT_TELEMETRY_PER_DEVICE = 1
    assert handle(device.pk, "telemetry", {"timestamp": recent(2), "metric": "t", "value": 1}).outcome == "accepted"
    outcome = handle(device.pk, "telemetry", {"timestamp": recent(1), "metric": "t", "value": 2})
    assert outcome.ack and outcome.outcome == "rate_limited"
    assert outcome.error["status"] == 429 and outcome.error["error"]["code"] == "rate_limited"
    assert outcome.error["retry_after"] >= 1
    assert TelemetryPoint.objects.filter(device_id=device.pk).count() == 1


def test_backpressure_holds_the_message_unacknowledged(device, redis_namespace, settings):
    get_redis().set(event_queue.admission_keys()[0], settings.BACKPRESSURE_REJECT_THRESHOLD)
    before = counted("telemetry", "backpressure")
    outcome = handle(device.pk, "telemetry", {"timestamp": recent(), "metric": "t", "value": 1})
    assert not outcome.ack and outcome.outcome == "backpressure" and outcome.retry_after >= 1
    assert outcome.error is None  # not a refusal: it is stored once there is room
    assert not TelemetryPoint.objects.filter(device_id=device.pk).exists()
    assert counted("telemetry", "backpressure") == before + 1


def test_an_unreachable_database_holds_the_message(device, redis_namespace, monkeypatch):
    def down(**kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(messages, "telemetry_points_ingest", down)
    outcome = handle(device.pk, "telemetry", {"timestamp": recent(), "metric": "t", "value": 1})
    assert not outcome.ack and outcome.outcome == "unavailable" and outcome.retry_after > 0


def test_an_unexpected_error_raises_for_the_bridge_to_retry(device, redis_namespace, monkeypatch):
    def bug(**kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(messages, "telemetry_points_ingest", bug)
    with pytest.raises(KeyError):
        handle(device.pk, "telemetry", {"timestamp": recent(), "metric": "t", "value": 1})


@pytest.mark.parametrize("topic", ["devices/not-a-uuid/telemetry", "things/x/telemetry", "devices/+/telemetry"])
def test_an_unexpected_topic_is_dropped(topic):
    outcome = messages.mqtt_message_handle(topic=topic, payload=b"{}")
    assert outcome.ack and outcome.outcome == "invalid" and outcome.error is None


def test_status_online_marks_seen_and_offline_makes_an_active_device_inactive(device, redis_namespace):
    assert handle(device.pk, "status", {"status": "online"}).outcome == "accepted"
    device.refresh_from_db()
    assert device.status == "active" and device.last_seen is not None
    assert handle(device.pk, "status", {"status": "offline"}).outcome == "accepted"
    device.refresh_from_db()
    assert device.status == "inactive"
    device_update(device_id=device.pk, changes={"status": "maintenance"})
    handle(device.pk, "status", {"status": "offline"})
    device.refresh_from_db()
    assert device.status == "maintenance"  # a workflow's status is never the device's to change
    refused = handle(device.pk, "status", {"status": "asleep"})
    assert refused.ack and refused.error["status"] == 400 and "status" in refused.error["error"]


def test_ota_status_needs_an_update_id_and_a_valid_report(device, redis_namespace):
    refused = handle(device.pk, "ota/status", {"status": "downloading"})
    assert refused.error["status"] == 400 and "update_id" in refused.error["error"]
    refused = handle(device.pk, "ota/status", {"update_id": str(uuid.uuid4()), "status": "installed"})
    assert refused.error["status"] == 400 and "version" in refused.error["error"]
    refused = handle(device.pk, "ota/status", {"update_id": str(uuid.uuid4()), "status": "downloading"})
    assert refused.error["status"] == 404
