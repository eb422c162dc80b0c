"""Prometheus counters of the telemetry pipeline (aggregated across processes by `iot.metrics`)."""

from prometheus_client import Counter

# `duplicate`: answered 202 but not stored again, the same (device, metric, timestamp) being stored
# already (an MQTT redelivery, a retry without an Idempotency-Key) or repeated within its request;
# `accepted` counts the points stored, so it matches the rows in Postgres.
OUTCOMES = ("accepted", "duplicate", "rate_limited", "backpressure", "invalid")

POINTS = Counter(
    "iot_telemetry_points",
    "Telemetry points received, by outcome (a batch of n counts n; duplicate: answered 202, stored before).",
    ["outcome"],
)
EVENTS_LOST = Counter(
    "iot_telemetry_events_lost",
    "Telemetry events not published after their points were committed (points stored, derived event lost).",
    ["reason"],
)

# Every outcome shows up (as 0) from the first scrape, so rates and alerts work before the first refusal.
for _outcome in OUTCOMES:
    POINTS.labels(outcome=_outcome)
for _reason in ("queue_full", "redis_error"):
    EVENTS_LOST.labels(reason=_reason)


def count_points(*, outcome: str, points: int) -> None:
    POINTS.labels(outcome=outcome).inc(max(points, 1))
