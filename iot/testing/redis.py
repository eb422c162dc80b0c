"""Redis namespaces for tests: every key the platform writes carries `REDIS_KEY_PREFIX` (`iot.redis.redis_key`),
so a test (or a dedicated live platform) that runs under a prefix of its own shares no rate-limit window, event
queue, cache entry or heartbeat with anything else, and emptying that prefix leaves nothing behind."""

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from iot.redis import get_redis

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def redis_prefix_flush(prefix: str) -> int:
    """Delete every key under `prefix:`; returns how many went.

    SCAN + UNLINK in pages of 1 000: the suite's namespace holds tens of thousands of keys after the
    load tests, and a `KEYS` would block the shared server for everyone else using it meanwhile.
    """
    client = get_redis()
    deleted = 0
    page: list[bytes] = []
    pattern = _GLOB_SPECIAL.sub(r"\\\1", prefix) + ":*"
    for key in client.scan_iter(match=pattern, count=1000):
        page.append(key)
        if len(page) == 1000:
            deleted += client.unlink(*page)
            page = []
    if page:
        deleted += client.unlink(*page)
    return deleted


def redis_prefix_new(parent: str, label: str) -> str:
    """A fresh prefix under `parent` (`<parent>:<label>-<10 hex>`), inside the parent's namespace so a
    flush of the parent takes it too."""
    return f"{parent}:{label}-{uuid.uuid4().hex[:10]}"


@contextmanager
def redis_namespace(prefix: str) -> Iterator[str]:
    """`prefix` emptied on entry (a crashed earlier run may have left keys) and on exit."""
    redis_prefix_flush(prefix)
    try:
        yield prefix
    finally:
        redis_prefix_flush(prefix)


@contextmanager
def redis_round_trips() -> Iterator[list[str]]:
    """Count the Redis round trips made inside the block (by any client of this process): yields a list
    that gets one entry per command sent alone and one per pipeline executed."""
    import redis

    calls: list[str] = []
    command, execute = redis.Redis.execute_command, redis.client.Pipeline.execute

    def counted_command(self, *args, **kwargs):
        calls.append(str(args[0]))
        return command(self, *args, **kwargs)

    def counted_execute(self, *args, **kwargs):
        calls.append("pipeline")
        return execute(self, *args, **kwargs)

    redis.Redis.execute_command = counted_command
    redis.client.Pipeline.execute = counted_execute
    try:
        yield calls
    finally:
        redis.Redis.execute_command = command
        redis.client.Pipeline.execute = execute
