"""What the platform does with each message a device publishes over MQTT: the same services as HTTP.

`mqtt_message_handle(topic=, payload=)` is called by the ingest bridge (`mqtt.bridge`) for every
message on `devices/+/telemetry`, `devices/+/ota/status` and `devices/+/status`, and returns what
the bridge must do with it (`Outcome`):

* `ack`: the message is done with: stored (points committed, report recorded), or refused for good;
  a refusal carries the `error` the bridge tells the device on `devices/{id}/errors`: the topic it
  published to, the HTTP status the same request would have got, and the same body (`detail`,
  `code`, the fields at fault, `retry_after`);
* not `ack`: it could be stored later (backpressure, Postgres or Redis unreachable, a partition
  being attached): the bridge keeps it unacknowledged and handles it again after `retry_after`
  seconds, so the broker holds it, and the ones behind it, instead of anything being dropped.

Telemetry: the payload is the JSON of `POST /telemetry/point` or `/telemetry/batch` (a batch has
`points`), validated by the same strict validator (`telemetry.api.validation`); `device_id` may be
left out (the topic names the device) and, if given, must be the topic's. Then
`telemetry.services.telemetry_points_ingest`: admission, backpressure, the rate limit, one INSERT
(a point already stored, by a redelivery of the message, is not stored again), alert evaluation,
the event. A rate-limited message is refused like a `429` (the device resends it later; the
broker cannot hold it back, as it holds nothing per device), backpressure is waited out.

The device is authenticated by the broker (`POST /mqtt/auth`) and may publish only on its own
topics (`POST /mqtt/acl`), so the topic's id is the sender's.
"""

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from rest_framework.exceptions import APIException, ParseError, ValidationError

from devices.models import DeviceStatus
from devices.services import device_mark_seen, device_status_transition
from firmware.api.serializers import UpdateReportSerializer
from firmware.services import firmware_update_report
from iot.api.exceptions import DEPENDENCY_ERRORS
from iot.errors import ServiceError
from mqtt import topics
from mqtt.metrics import count_message
from telemetry.api.validation import TelemetryOutOfWindow, validate_batch, validate_point
from telemetry.metrics import count_points
from telemetry.services import (
    TelemetryBackpressure,
    TelemetryRateLimited,
    TelemetryRetryLater,
    telemetry_errors_count,
    telemetry_points_ingest,
)

logger = logging.getLogger(__name__)

# Seconds before a message that could not be stored yet (Postgres or Redis unreachable) is tried again.
UNAVAILABLE_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class Outcome:
    """What the bridge does with a message: acknowledge it (done), or hold it and retry after `retry_after`."""

    outcome: str  # accepted, invalid, forbidden, rate_limited, backpressure, unavailable
    ack: bool = True
    error: dict[str, Any] | None = None  # told to the device on devices/{id}/errors
    retry_after: float = 0.0
    points: int = field(default=0)


def _refused(topic: str, status: int, body: Any, *, outcome: str = "invalid", retry_after: float = 0.0) -> Outcome:
    error = {"topic": topic, "status": status, "error": body}
    if retry_after:
        error["retry_after"] = retry_after
    return Outcome(outcome=outcome, error=error)


def _api_refusal(topic: str, exc: APIException) -> Outcome:
    return _refused(
        topic, exc.status_code, exc.detail if isinstance(exc.detail, dict | list) else {"detail": exc.detail}
    )


def _service_refusal(topic: str, exc: ServiceError, *, outcome: str = "invalid") -> Outcome:
    retry_after = float(exc.headers["Retry-After"]) if "Retry-After" in exc.headers else 0.0
    return _refused(topic, exc.status_code, exc.body(), outcome=outcome, retry_after=retry_after)


def _json_object(topic: str, payload: bytes) -> dict | Outcome:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return _refused(topic, 400, {"detail": f"JSON parse error - {exc}"})
    if not isinstance(data, dict):
        return _refused(topic, 400, {"detail": "Expected a JSON object."})
    return data


def _telemetry(topic: str, device_id: uuid.UUID, payload: bytes) -> Outcome:
    data = _json_object(topic, payload)
    if isinstance(data, Outcome):
        count_points(outcome="invalid", points=1)
        telemetry_errors_count(device_id=device_id, points=1)
        return data
    data.setdefault("device_id", str(device_id))
    is_batch = "points" in data
    points_in = len(data["points"]) if is_batch and isinstance(data["points"], list) else 1
    try:
        batch = validate_batch(data) if is_batch else validate_point(data)
    except (ParseError, ValidationError, TelemetryOutOfWindow) as exc:
        count_points(outcome="invalid", points=points_in)
        telemetry_errors_count(device_id=device_id, points=points_in)
        return _api_refusal(topic, exc)
    if batch.device_id != device_id:
        return _refused(
            topic,
            403,
            {"device_id": [f"A device may only send its own telemetry: this topic is {device_id}'s."]},
            outcome="forbidden",
        )
    try:
        result = telemetry_points_ingest(batch=batch)
    except (TelemetryBackpressure, TelemetryRetryLater) as exc:
        # The broker holds the message (and the ones behind it) until the queue has room again.
        return Outcome(outcome="backpressure", ack=False, retry_after=float(exc.headers.get("Retry-After", 1)))
    except TelemetryRateLimited as exc:
        return _service_refusal(topic, exc, outcome="rate_limited")
    except ServiceError as exc:  # unknown or decommissioned device, a batch larger than its whole window
        return _service_refusal(topic, exc)
    return Outcome(outcome="accepted", points=result.stored)


def _ota_status(topic: str, device_id: uuid.UUID, payload: bytes) -> Outcome:
    data = _json_object(topic, payload)
    if isinstance(data, Outcome):
        return data
    raw_update_id = data.pop("update_id", None)
    try:
        update_id = uuid.UUID(raw_update_id) if isinstance(raw_update_id, str) else None
    except ValueError:
        update_id = None
    if update_id is None:
        return _refused(topic, 400, {"update_id": ["Required: the id of the update this reports on (a UUID)."]})
    report = UpdateReportSerializer(data=data)
    if not report.is_valid():
        return _refused(topic, 400, report.errors)
    try:
        firmware_update_report(update_id=update_id, device_id=device_id, **report.validated_data)
    except ServiceError as exc:  # not found, another device's update, a conflicting or late report
        return _service_refusal(topic, exc, outcome="forbidden" if exc.status_code == 403 else "invalid")
    return Outcome(outcome="accepted")


STATUS_ONLINE, STATUS_OFFLINE = "online", "offline"


def _status(topic: str, device_id: uuid.UUID, payload: bytes) -> Outcome:
    """`online` (published at connect) counts as a sign of life; `offline` (the device's last will, or
    its clean goodbye) makes an `active` device `inactive` at once, rather than after the liveness sweep's
    300 s. Other statuses (maintenance, decommissioned) are never changed by a device."""
    data = _json_object(topic, payload)
    if isinstance(data, Outcome):
        return data
    status = data.get("status")
    if status == STATUS_ONLINE:
        device_mark_seen(device_ids=[device_id])
    elif status == STATUS_OFFLINE:
        device_status_transition(device_id=device_id, from_status=DeviceStatus.ACTIVE, to_status=DeviceStatus.INACTIVE)
    else:
        return _refused(topic, 400, {"status": [f'Expected "{STATUS_ONLINE}" or "{STATUS_OFFLINE}".']})
    return Outcome(outcome="accepted")


_HANDLERS = {topics.TELEMETRY: _telemetry, topics.OTA_STATUS: _ota_status, topics.STATUS: _status}


def mqtt_message_handle(*, topic: str, payload: bytes) -> Outcome:
    """Handle one message a device published; see the module docstring. Bad input never raises; an
    unexpected error does (the bridge retries the message a few times, then gives up on it)."""
    parsed = topics.topic_parse(topic)
    if parsed is None or parsed.kind not in _HANDLERS:
        # The ACL lets no device publish there; only a misconfigured broker would deliver it.
        logger.warning("MQTT message on an unexpected topic %r dropped", topic)
        count_message(kind="unknown", outcome="invalid")
        return Outcome(outcome="invalid")
    try:
        outcome = _HANDLERS[parsed.kind](topic, parsed.device_id, payload)
    except DEPENDENCY_ERRORS as exc:
        logger.warning("MQTT message on %s not handled yet (%s); it is kept and retried", topic, exc)
        outcome = Outcome(outcome="unavailable", ack=False, retry_after=UNAVAILABLE_RETRY_SECONDS)
    count_message(kind=parsed.kind, outcome=outcome.outcome)
    return outcome
