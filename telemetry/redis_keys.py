"""Names of the Redis keys the telemetry pipeline writes (all under REDIS_KEY_PREFIX).

The key set is bounded: one hash per minute of received telemetry (fields bounded by
the fleet) that expires after `COUNT_WINDOW_TTL_SECONDS`, and one key per second that
expires after `PER_SECOND_TTL_SECONDS` (so at most that many exist).

A minute's hash and the keys of its seconds share one Redis Cluster hash tag
(`{telemetry:messages:<minute start>}`): `telemetry.events.counters_add` writes both in
one MULTI, which a cluster runs only on keys of one slot. It costs nothing: every
point of a minute goes to that minute's one hash anyway, so its node takes that
minute's writes either way, and the next minute's go to another slot.
"""

from iot.redis import redis_key, redis_tagged_key

PER_SECOND_TTL_SECONDS = 300


# The counters of one minute of received points (by `received_at`), a hash: `total`, `latency_ms`
# (sum of received_at - timestamp), and per device `d:<id>` / `l:<id>` and per group `g:<group>`.
# Only the minutes after the reconciliation's watermark are read (`telemetry.selectors`); older
# ones are kept a while for inspection, then expire.
COUNT_WINDOW_SECONDS = 60
COUNT_WINDOW_TTL_SECONDS = 2 * 24 * 3600


def count_window_start(epoch_seconds: float) -> int:
    return int(epoch_seconds // COUNT_WINDOW_SECONDS) * COUNT_WINDOW_SECONDS


def _minute_tag(epoch_seconds: float) -> str:
    return f"telemetry:messages:{count_window_start(epoch_seconds)}"


def count_window_key(window_start: int) -> str:
    return redis_tagged_key(_minute_tag(window_start), "window")


def messages_per_second_key(epoch_second: int) -> str:
    return redis_tagged_key(_minute_tag(epoch_second), "second", epoch_second)


def live_group_name(device_id) -> str:
    """The Channels group of a device's live feed (names must be ASCII, < 100 chars)."""
    return f"telemetry.live.{device_id}"


# Refused submissions per device, one hash per UTC day (fields: device ids), kept `ERRORS_DAYS` + 1 days.
ERRORS_DAYS = 7


def errors_day_key(day: int) -> str:
    """`day`: days since the Unix epoch."""
    return redis_key("telemetry", "errors", day)
