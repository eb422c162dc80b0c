"""The notification outcomes, counted in Redis: the Celery workers that deliver serve no `/metrics`,
so only a shared count reaches the web's scrape (`iot_alert_notifications_total{outcome}`)."""

import logging

import redis

from iot.metrics import register_shared_counter
from iot.redis import get_redis, redis_key

logger = logging.getLogger(__name__)

# delivered: the channel acknowledged it; failed: an attempt failed and a retry is scheduled;
# held: the channel's breaker was open, rescheduled without a call; expired: given up at `expires_at`.
OUTCOMES = ("delivered", "failed", "held", "expired")


def _key() -> str:
    return redis_key("alerts", "notifications")


def notification_outcome_count(outcome: str) -> None:
    """Count one outcome; a Redis outage loses the count, never the notification (its row says what happened)."""
    try:
        get_redis().hincrby(_key(), outcome, 1)
    except (redis.RedisError, OSError) as exc:
        logger.warning("could not count a notification outcome %s: %s", outcome, exc)


def notification_outcomes() -> dict[str, int]:
    counts = {outcome: 0 for outcome in OUTCOMES}
    for field, value in get_redis().hgetall(_key()).items():
        counts[field.decode()] = int(value)
    return counts


register_shared_counter(
    "iot_alert_notifications",
    "Alert notification attempts by outcome, from every worker (delivered, failed and retried, "
    "held by an open circuit breaker, expired undelivered).",
    ["outcome"],
    lambda: {(outcome,): float(count) for outcome, count in notification_outcomes().items()},
)
