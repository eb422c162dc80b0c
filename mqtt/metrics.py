"""Prometheus counters of the MQTT ingest bridge (aggregated across processes by `iot.metrics`)."""

from prometheus_client import Counter

# accepted; refused for good (told on devices/{id}/errors): invalid, forbidden, rate_limited;
# held and retried (not acknowledged to the broker): backpressure, unavailable; failed: an unexpected
# error on every attempt (logged, acknowledged, told to the device).
OUTCOMES = ("accepted", "invalid", "forbidden", "rate_limited", "backpressure", "unavailable", "failed")
KINDS = ("telemetry", "ota/status", "status", "unknown")

MESSAGES = Counter(
    "iot_mqtt_messages",
    "MQTT messages handled by the ingest bridge, by topic kind and outcome (a held message counts once per attempt).",
    ["kind", "outcome"],
)

for _kind in KINDS:
    for _outcome in OUTCOMES:
        MESSAGES.labels(kind=_kind, outcome=_outcome)


def count_message(*, kind: str, outcome: str) -> None:
    MESSAGES.labels(kind=kind, outcome=outcome).inc()


# The broker's questions (`POST /mqtt/auth`, `POST /mqtt/acl`, `mqtt.services`), by answer. A refused
# CONNECT or topic is a deny; a broker that could not ask (the endpoint down, a wrong secret) counts nothing here.
AUTH_DECISIONS = Counter("iot_mqtt_auth", "MQTT logins the broker asked about, by answer.", ["result"])
ACL_DECISIONS = Counter(
    "iot_mqtt_acl", "MQTT publish/subscribe checks the broker asked about, by answer.", ["action", "result"]
)

for _result in ("allow", "deny"):
    AUTH_DECISIONS.labels(result=_result)
    for _action in ("publish", "subscribe"):
        ACL_DECISIONS.labels(action=_action, result=_result)
