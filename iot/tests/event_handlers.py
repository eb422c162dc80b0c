"""Event handlers used only by the event-queue tests (loaded with --handler-module or imported).

Every key a handler touches comes in the payload, so each test picks its own.
"""

import os
import time

from iot.event_queue import event_handler
from iot.redis import get_redis


@event_handler("test.record")
def record(payload: dict) -> None:
    """Count the event and remember its number; optionally block once (to crash or stop mid-batch)."""
    client = get_redis()
    block_key = payload.get("block_key")
    if block_key and client.set(block_key, os.getpid(), nx=True):
        # First delivery only: wait until the test releases us (or kills the process).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not client.blpop([f"{block_key}:release"], timeout=1):
            pass
    client.incr(payload["counter"])
    client.sadd(payload["seen"], payload["n"])


@event_handler("test.fail")
def fail(payload: dict) -> None:
    """Count the attempt, then fail: a poison message."""
    get_redis().incr(payload["attempts"])
    raise RuntimeError("poison")
