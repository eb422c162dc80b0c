"""Liveness and readiness, and the worker heartbeat readiness relies on.

Each Celery worker records itself in a Redis sorted set (score = Redis time)
every `WORKER_HEARTBEAT_SECONDS`; the platform is ready when Postgres and Redis
answer and at least one worker beat within three intervals.
"""

from django.conf import settings
from django.db import connection
from django.http import JsonResponse

from iot.redis import get_redis, redis_key, register_script

_WORKERS_KEY = "workers:heartbeat"

_RECORD = register_script(
    """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(t[1]) - 3600)
return 1
"""
)

_COUNT_ALIVE = register_script(
    """
local t = redis.call('TIME')
return redis.call('ZCOUNT', KEYS[1], tonumber(t[1]) - tonumber(ARGV[1]), '+inf')
"""
)


def worker_heartbeat_record(*, worker_name: str) -> None:
    _RECORD(keys=[redis_key(_WORKERS_KEY)], args=[worker_name])


def workers_alive_count() -> int:
    window = max(1, int(3 * settings.WORKER_HEARTBEAT_SECONDS))
    return int(_COUNT_ALIVE(keys=[redis_key(_WORKERS_KEY)], args=[window]))


def live(request):
    return JsonResponse({"status": "ok"})


def ready(request):
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {exc.__class__.__name__}"
    try:
        get_redis().ping()
        checks["redis"] = "ok"
        checks["workers"] = "ok" if workers_alive_count() > 0 else "unavailable: no worker heartbeat"
    except Exception as exc:
        checks["redis"] = f"unavailable: {exc.__class__.__name__}"
        checks["workers"] = "unknown: redis unavailable"
    healthy = all(value == "ok" for value in checks.values())
    return JsonResponse(
        {"status": "ok" if healthy else "unavailable", "checks": checks}, status=200 if healthy else 503
    )
