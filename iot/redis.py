"""The process-wide Redis client and key naming.

One connection pool per process (redis-py is thread-safe); every key the
platform writes goes through `redis_key` so it carries `REDIS_KEY_PREFIX`.
"""

from functools import cache

import redis
from django.conf import settings


@cache
def get_redis() -> redis.Redis:
    """The shared client for this process (bytes in, bytes out)."""
    return redis.Redis.from_url(
        settings.REDIS_URL,
        max_connections=settings.REDIS_MAX_CONNECTIONS,
        socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=settings.REDIS_SOCKET_TIMEOUT,
        health_check_interval=30,
    )


def redis_key(*parts: object) -> str:
    """`<prefix>:<part>:<part>...`, the one place keys are named."""
    return ":".join([settings.REDIS_KEY_PREFIX, *map(str, parts)])


def register_script(source: str):
    """A Lua script bound to the shared client (EVALSHA, loaded on first use)."""
    return get_redis().register_script(source)
