"""Liveness and readiness, and the worker heartbeat readiness relies on.

Liveness and metrics need no database; readiness asks Postgres with a bound of
`HEALTH_DATABASE_TIMEOUT_SECONDS`. All three run on the web server's own ops
threads (`iot.asgi_bridge`), never queued behind request threads.

Each Celery worker records itself in a Redis sorted set (score = Redis time)
every `WORKER_HEARTBEAT_SECONDS`; the platform is ready when Postgres and Redis
answer and at least one worker beat within three intervals.

Readiness also reads Redis' `maxmemory-policy` (`redis_policy`). Only
`noeviction` keeps the guarantees that live in Redis: an evicted rate-limit key
frees a device's quota, an evicted cache tombstone lets a stale fill back in, an
evicted stream or depth counter loses queued events or miscounts backpressure,
an evicted Celery message loses a task. Under `noeviction` a full Redis refuses
writes with an `OOM` error instead: loud, where eviction is silent. `volatile-*`
policies are no safer: they evict keys with a TTL, which every rate-limit,
tombstone and cache key has. So an evicting policy makes readiness fail (`503`):
it is a configuration error that no retry fixes, it breaks guarantees silently
(nothing errors when a key is evicted, the limit simply stops holding), and a
failing readiness stops a rollout before traffic reaches a misconfigured
deployment instead of after the first eviction. The web and worker processes
also log it loudly at start (`redis_policy_warn`). Managed Redis services that
refuse `CONFIG GET` get `"unknown: ..."`, which does not fail readiness: the
operator has to check the policy in the service's own console.

The verdict is cached per process for `_POLICY_CHECK_SECONDS` (30 s), so
readiness probes cost one extra round trip at most every 30 s per process, and a
policy changed at runtime shows within 30 s.
"""

import logging
import time

from django.conf import settings
from django.http import JsonResponse
from psycopg import OperationalError
from redis import ResponseError

from iot.db.postgresql.base import database_ping
from iot.redis import get_redis, redis_key, register_script

logger = logging.getLogger(__name__)

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


# --- Redis eviction policy ------------------------------------------------------

_POLICY_CHECK_SECONDS = 30.0
_POLICY_CHECK = "redis_policy"
_policy_cached: tuple[float, str] | None = None  # (time.monotonic() it is valid until, verdict)


def _policy_verdict(policy: str) -> str:
    if policy == "noeviction":
        return "ok"
    if policy.startswith("volatile-"):
        return (
            f"unsafe: maxmemory-policy {policy} evicts keys with a TTL: rate limits, cache tombstones "
            "and cache entries (noeviction required)"
        )
    return (
        f"unsafe: maxmemory-policy {policy} evicts rate limits, cache tombstones and queued events "
        "(noeviction required)"
    )


def redis_policy_check() -> str:
    """`"ok"`, `"unsafe: ..."` or `"unknown: ..."` for Redis' `maxmemory-policy`, cached per process.

    A Redis that refuses `CONFIG GET` (renamed or ACL-denied, as on many managed
    services) answers "unknown"; a connection error is raised, for the caller's
    "redis" check to report, and is not cached.
    """
    global _policy_cached
    cached = _policy_cached
    if cached is not None and time.monotonic() < cached[0]:
        return cached[1]
    try:
        reply = get_redis().config_get("maxmemory-policy")
    except ResponseError as exc:
        verdict = f"unknown: CONFIG GET refused ({exc})"
    else:
        policy = reply.get(b"maxmemory-policy", reply.get("maxmemory-policy"))
        if policy is None:
            verdict = "unknown: CONFIG GET returned no maxmemory-policy"
        else:
            verdict = _policy_verdict(policy.decode() if isinstance(policy, bytes) else str(policy))
    # Two threads racing here both ask Redis once; the cache only saves round trips.
    _policy_cached = (time.monotonic() + _POLICY_CHECK_SECONDS, verdict)
    return verdict


def redis_policy_check_reset() -> None:
    """Forget the cached verdict (tests, or after changing the policy)."""
    global _policy_cached
    _policy_cached = None


def redis_policy_warn(*, process: str) -> str:
    """Log the eviction policy loudly at process start; never raises (Redis may not be up yet)."""
    try:
        verdict = redis_policy_check()
    except Exception as exc:
        logger.warning("%s: could not read Redis' maxmemory-policy at start: %r", process, exc)
        return f"unknown: {exc.__class__.__name__}"
    if verdict.startswith("unsafe"):
        logger.error(
            "%s: REDIS IS MISCONFIGURED: %s. Rate limits, cache invalidations and queued events are not "
            "guaranteed until it is `CONFIG SET maxmemory-policy noeviction` (and in redis.conf); "
            '/health/ready answers 503 meanwhile. See docs/ARCHITECTURE.md, "Redis requirements".',
            process,
            verdict,
        )
    elif verdict.startswith("unknown"):
        logger.warning(
            "%s: %s; make sure the Redis service runs with maxmemory-policy noeviction (docs/ARCHITECTURE.md)",
            process,
            verdict,
        )
    return verdict


def live(request):
    return JsonResponse({"status": "ok"})


def ready(request):
    checks: dict[str, str] = {}
    try:
        # Bounded: an outage is reported within HEALTH_DATABASE_TIMEOUT_SECONDS, never a hang.
        database_ping(timeout=settings.HEALTH_DATABASE_TIMEOUT_SECONDS)
        checks["database"] = "ok"
    except OperationalError as exc:
        checks["database"] = f"unavailable: {exc.__class__.__name__}"
    try:
        get_redis().ping()
        checks["redis"] = "ok"
        checks["workers"] = "ok" if workers_alive_count() > 0 else "unavailable: no worker heartbeat"
        checks[_POLICY_CHECK] = redis_policy_check()
    except Exception as exc:
        checks["redis"] = f"unavailable: {exc.__class__.__name__}"
        checks["workers"] = "unknown: redis unavailable"
        checks[_POLICY_CHECK] = "unknown: redis unavailable"
    # A policy Redis will not disclose does not fail readiness; an evicting one does (see above).
    healthy = all(
        value == "ok" or (name == _POLICY_CHECK and value.startswith("unknown")) for name, value in checks.items()
    )
    return JsonResponse(
        {"status": "ok" if healthy else "unavailable", "checks": checks}, status=200 if healthy else 503
    )
