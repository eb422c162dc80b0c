"""Admission of an ingest request in ONE Redis script: backpressure, room in the event queue, rate limits.

Issue 12: a point paid two round trips for this (a GET of the event queue's depth, then the
rate-limit script), and the publish after the commit could still be refused for a full queue
(requests that passed admission together all committed), which lost the derived event (live
push, counters, alerting) of points already stored. Here `ingest_admit` is one script that
Redis runs as one step, in this order:

1. backpressure from the queue's depth, exactly as `iot.event_queue.event_queue_admission`:
   "critical" (503) at `BACKPRESSURE_REJECT_THRESHOLD`, "warning" (429) at
   `BACKPRESSURE_QUEUE_THRESHOLD`; in-flight reservations do not count here, so the
   thresholds mean what they meant;
2. room: "full" (503) when depth + the weight others hold reserved + this request's points
   would pass `EVENT_QUEUE_MAX_SIZE`: the same bound the publish enforced, decided before
   anything is stored rather than after the commit;
3. the rate limits: `iot.ratelimit`'s decision (the same Lua function, `RATE_LIMIT_LUA`),
   consumed only if both the device's window and the global second allow;
4. a reservation of the request's points in the queue (`iot.event_queue`, "Reservations").

Every check comes before any write, so a refusal takes nothing: no rate-limit points, no room.
The reservation is consumed by the publish after the commit, which can then not be refused for
room, or released when the request is refused later (unknown device, database error). One whose
request died in between expires after `EVENT_QUEUE_RESERVATION_TTL_SECONDS`, and the queue's
reconciliation recounts the reservations' counter.

Measured (`bench/ingest_round_trips.py`): one round trip and one script instead of two calls;
see the bench's docstring for the figures of the whole pipeline.

All the script's keys carry the event queue's hash tag (`iot.event_queue.HASH_TAG`, which the
rate limiter's keys use too), so it runs under Redis Cluster.
"""

from dataclasses import dataclass

from django.conf import settings

from iot.event_queue import (
    ADMISSION_STATES,
    RESERVATIONS_LUA,
    Admission,
    Reservation,
    admission_keys,
    admission_of,
    reservation_ttl_ms,
)
from iot.ratelimit import (
    RATE_LIMIT_LUA,
    REDIS_NOW_LUA,
    RateLimitDecision,
    rate_limit_args,
    rate_limit_decision,
    rate_limit_keys,
)
from iot.redis import register_script

# KEYS: depth, reserved, reservations (iot.event_queue), device log, device total, global (iot.ratelimit)
# ARGV: warning threshold, critical threshold, max size, reservation member, reservation ttl ms,
#       points, device limit, window seconds, global limit, request id
# Returns {state (0 ok, 1 warning, 2 critical, 3 full), depth} when refused before the rate limit,
# else {0, depth, allowed, remaining, retry after seconds, scope}; a reservation is held iff allowed.
_ADMIT = register_script(
    RESERVATIONS_LUA
    + RATE_LIMIT_LUA
    + REDIS_NOW_LUA
    + """
local depth = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if depth >= tonumber(ARGV[2]) then return {2, depth} end
if depth >= tonumber(ARGV[1]) then return {1, depth} end
local points = tonumber(ARGV[6])
if depth + reservations_held(KEYS[3], KEYS[2], now) + points > tonumber(ARGV[3]) then return {3, depth} end
local decision = rate_limit(KEYS[4], KEYS[5], KEYS[6], points, tonumber(ARGV[7]), tonumber(ARGV[8]) * 1000,
                            tonumber(ARGV[9]), ARGV[10], true, now, second)
if decision[1] == 1 then
  local ttl = tonumber(ARGV[5])
  reservation_take(KEYS[3], KEYS[2], ARGV[4], points, now + ttl, ttl + 1000)
end
return {0, depth, decision[1], decision[2], decision[3], decision[4]}
"""
)


@dataclass(frozen=True)
class IngestAdmission:
    """What `ingest_admit` decided. Admitted iff `reservation` is set."""

    admission: Admission  # the queue's state: "ok", or why it refused ("warning", "critical", "full")
    rate_limit: RateLimitDecision | None  # None when the queue refused before the limits were asked
    reservation: Reservation | None  # the room held for the request's event, to publish or release


def ingest_admit(*, device_id: str, points: int) -> IngestAdmission:
    """Admit `points` for `device_id` or refuse them, taking rate-limit points and queue room together.

    One round trip (see the module docstring). The caller publishes its event with the
    returned reservation after its commit (`event_queue_publish(..., reservation=...)`), or
    releases it (`event_queue_release`) if it stores nothing.
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"points must be a positive integer, got {points!r}")
    reservation = Reservation.new(weight=points)
    result = _ADMIT(
        keys=[*admission_keys(), *rate_limit_keys(device_id)],
        args=[
            settings.BACKPRESSURE_QUEUE_THRESHOLD,
            settings.BACKPRESSURE_REJECT_THRESHOLD,
            settings.EVENT_QUEUE_MAX_SIZE,
            reservation.member,
            reservation_ttl_ms(),
            *rate_limit_args(points=points),
        ],
    )
    admission = admission_of(state=ADMISSION_STATES[int(result[0])], depth=max(int(result[1]), 0))
    if admission.state != "ok":
        return IngestAdmission(admission=admission, rate_limit=None, reservation=None)
    decision = rate_limit_decision(result[2:])
    return IngestAdmission(
        admission=admission, rate_limit=decision, reservation=reservation if decision.allowed else None
    )
