"""Saga outcomes, counted in Redis: the Celery workers that run steps serve no `/metrics`, so only a shared
count reaches the web's scrape (`iot_saga_runs_total{name, outcome}`, `iot_saga_step_retries_total{name, phase}`).
Counted after the commit that decided them; a Redis outage loses a count, never a run (its row says what happened).
"""

import logging

import redis

from iot.metrics import register_shared_counter
from iot.redis import get_redis, redis_key

logger = logging.getLogger(__name__)


def _count(kind: str, field: str) -> None:
    try:
        get_redis().hincrby(redis_key("saga", kind), field, 1)
    except (redis.RedisError, OSError) as exc:
        logger.warning("could not count saga %s %s: %s", kind, field, exc)


def _read(kind: str) -> dict[tuple[str, ...], float]:
    """{(label, label): count}; fields are `<label>|<label>` (a saga name may hold dots, never a bar)."""
    return {
        tuple(field.decode().split("|", 1)): float(value)
        for field, value in get_redis().hgetall(redis_key("saga", kind)).items()
    }


def saga_run_outcome_count(*, name: str, outcome: str) -> None:
    """A run ended: succeeded, compensated or cancelled."""
    _count("runs", f"{name}|{outcome}")


def saga_step_retry_count(*, name: str, phase: str) -> None:
    """A step (forward) or compensation failed and was scheduled again."""
    _count("retries", f"{name}|{phase}")


register_shared_counter(
    "iot_saga_runs", "Saga runs ended, by saga and outcome.", ["name", "outcome"], lambda: _read("runs")
)
register_shared_counter(
    "iot_saga_step_retries",
    "Saga step executions that failed and were scheduled again, by saga and phase (forward, compensate).",
    ["name", "phase"],
    lambda: _read("retries"),
)
