"""Names of the Redis keys the telemetry pipeline writes (all under REDIS_KEY_PREFIX).

The key set is bounded: one total, one hash with a field per device (bounded by
the fleet), and one key per second of received telemetry that expires after
`PER_SECOND_TTL_SECONDS` (so at most that many exist).
"""

from iot.redis import redis_key

PER_SECOND_TTL_SECONDS = 300


def messages_total_key() -> str:
    return redis_key("telemetry", "messages", "total")


def device_messages_key() -> str:
    return redis_key("telemetry", "messages", "by_device")


def messages_per_second_key(epoch_second: int) -> str:
    return redis_key("telemetry", "messages", "second", epoch_second)


def live_group_name(device_id) -> str:
    """The Channels group of a device's live feed (names must be ASCII, < 100 chars)."""
    return f"telemetry.live.{device_id}"
