"""Exact telemetry rate limits: a per-device sliding window and a global per-second cap.

The old service checked a counter and then incremented it in a second call, so
concurrent requests all saw "under the limit" and all got in. Here one Lua script
does the whole decision, so Redis runs it as a single step that nothing can
interleave with:

* **Per device**: at most `RATE_LIMIT_TELEMETRY_PER_DEVICE` points in any sliding
  window of `RATE_LIMIT_WINDOW_SECONDS`. The window is a log: a ZSET whose members
  are `"<points>:<request id>"` scored by the request's Redis time in
  milliseconds, plus a running total in a second key. Each call first removes the
  entries that left the window and subtracts their points from the total, so an
  entry is added once and removed once: O(log n) amortised per request, however
  large the limit or the batch (a batch of n is one entry, not n). The request id
  comes from Python and keeps members unique.
* **Global**: at most `RATE_LIMIT_GLOBAL_PER_SECOND` points per *fixed* one-second
  window of Redis time (a hash `{s: second, c: count}`); a fixed window is enough
  for a coarse overload guard and costs one key.

Both limits are checked before either is written, then both are consumed, in the
same script: all or nothing, a request the global limit refuses costs the device
nothing and vice versa. The script reads the clock with `redis.call('TIME')`, so
every web process agrees on one clock and no host's drift can widen a window.

`retry_after_seconds` of a device refusal is the time until enough of the oldest
entries expire for *this* request to fit (rounded up, at least 1); of a global
refusal, 1 (the next second). A request with more points than the device limit
can never fit: it is refused with scope "device" and `retry_after_seconds` equal
to the window, and the telemetry endpoint answers it with 422, not 429.

Every key gets a PEXPIRE of the window (plus a second) on each write, so devices
that go quiet leave nothing behind.

The decision is a Lua function (`RATE_LIMIT_LUA`): `rate_limit_consume` runs it alone;
telemetry's ingestion runs it inside `iot.admission`'s script, after the event queue's
backpressure and room checks, so one round trip admits a request (issue 12).

**A lost key is rebuilt from its partner.** Redis must run with
`maxmemory-policy noeviction` (`/health/ready` reports anything else, see
docs/ARCHITECTURE.md), but a `DEL`, a flush of one key or an evicting policy can
still take one key of a device's pair and leave the other. Trusting the survivor
alone failed open: with the total gone and the log kept, a device with a limit of
10 got 20 points admitted in one window. So the script repairs the pair before
deciding, always towards refusing, never towards admitting:

* total missing, log present: the total is summed again from the log's members
  (O(entries in the window), paid only after such a loss);
* log missing, total present: the log's timestamps are gone, but the total's TTL
  was set by the last admitted request, so that request's time is known and no
  point in the total is younger. The log is rebuilt as one entry holding the whole
  total at that time: it frees the points no earlier than the lost entries would
  have (at worst one window after the last admitted request), so the device may
  wait longer than it strictly had to, once, but never gets past its limit.

Both keys lost is a device with a clean slate: nothing is left to rebuild from,
which is why eviction must be off.

Why not the `limits` library (5.x, read before writing this): its Redis
"moving window" timestamps requests with the web host's `time.time()`, not Redis'
clock; it pushes one list element per unit of cost (a batch of n is O(n) and a
device holds up to `limit` elements, unworkable when benchmarks raise limits to
millions); its "sliding window counter" is an approximation, not exact; and each
call consumes a single limit, so a device limit and the global limit cannot be
taken together atomically.
"""

import uuid
from dataclasses import dataclass

from django.conf import settings

from iot.event_queue import HASH_TAG
from iot.redis import redis_tagged_key, register_script

# The decision as a Lua function, so that another script can take it together with its own checks
# (`iot.admission` runs it after the event queue's backpressure and capacity checks, in one script).
# rate_limit(log key (ZSET), total key (string), global key (hash {s, c}), points, device limit,
#            window ms, global limit, request id, consume (boolean), now ms, now second)
# Returns {allowed (1/0), remaining, retry_after_seconds, scope (0 none, 1 device, 2 global)}
RATE_LIMIT_LUA = """
local function rate_limit(log_key, total_key, global_key, points, limit, window_ms, global_limit, request_id, consume,
                          now, second)
local function fmt(n) return string.format('%.0f', n) end
local function entry_points(member) return tonumber(string.match(member, '^(%d+):')) end

-- Nothing evicts these keys under the required `maxmemory-policy noeviction`, but a DEL or a
-- different policy can take one of the pair and leave the other. Rebuild the missing one from
-- the survivor, erring towards refusing: a device is never admitted past its limit.
local cutoff = fmt(now - window_ms)
local raw = redis.call('GET', total_key)
local stored = raw and tonumber(raw)  -- nil when missing (or not a number)
local has_log = redis.call('EXISTS', log_key) == 1
if raw and not has_log then
  -- The log is gone, its total survives. The total's TTL was set by the last admitted request
  -- (window + 1 s), so that request's time is known and no point in the total is younger:
  -- one entry for the whole total at that time expires it no earlier than the lost log would have.
  if stored and stored > 0 then
    local pttl = redis.call('PTTL', total_key)
    local at = now
    if pttl > 0 then
      at = math.min(now, now - (window_ms + 1000 - pttl))
    else
      pttl = window_ms + 1000
      redis.call('PEXPIRE', total_key, fmt(pttl))
    end
    redis.call('ZADD', log_key, fmt(at), fmt(stored) .. ':rebuilt')
    redis.call('PEXPIRE', log_key, fmt(pttl))
    has_log = true
  else
    redis.call('DEL', total_key)
    stored = nil
  end
end

-- Forget entries that left the window, subtracting their points from the total.
local total = 0
if has_log then
  if stored then
    total = stored
    local expired = redis.call('ZRANGEBYSCORE', log_key, '-inf', cutoff)
    if #expired > 0 then
      for i = 1, #expired do total = total - entry_points(expired[i]) end
      redis.call('ZREMRANGEBYSCORE', log_key, '-inf', cutoff)
      if redis.call('EXISTS', log_key) == 0 then total = 0 end
      if total == 0 then
        redis.call('DEL', total_key)
      else
        redis.call('SET', total_key, total, 'KEEPTTL')
      end
    end
  else
    -- The total is gone, its log survives: sum the log again (O(entries), only after such a loss).
    redis.call('ZREMRANGEBYSCORE', log_key, '-inf', cutoff)
    local start = 0
    while true do
      local chunk = redis.call('ZRANGE', log_key, start, start + 999)
      for i = 1, #chunk do total = total + entry_points(chunk[i]) end
      if #chunk < 1000 then break end
      start = start + 1000
    end
    if total > 0 then
      local pttl = redis.call('PTTL', log_key)
      if pttl <= 0 then pttl = window_ms + 1000 end
      redis.call('SET', total_key, total, 'PX', fmt(pttl))
    end
  end
end

if points > limit then
  return {0, math.max(limit - total, 0), math.floor(window_ms / 1000), 1}
end

if total + points > limit then
  -- Walk the oldest entries until enough points would have expired for this request.
  -- Every entry holds at least one point, so at most `need` entries are read.
  local need = total + points - limit
  local freed = 0
  local retry_ms = window_ms
  local start = 0
  while freed < need do
    local size = math.min(need - freed, 100)
    local chunk = redis.call('ZRANGE', log_key, start, start + size - 1, 'WITHSCORES')
    if #chunk == 0 then break end
    for i = 1, #chunk, 2 do
      freed = freed + entry_points(chunk[i])
      if freed >= need then
        retry_ms = tonumber(chunk[i + 1]) + window_ms - now
        break
      end
    end
    start = start + size
  end
  return {0, limit - total, math.max(1, math.ceil(retry_ms / 1000)), 1}
end

local used = 0
local g = redis.call('HMGET', global_key, 's', 'c')
if g[1] and tonumber(g[1]) == second then used = tonumber(g[2]) end
if used + points > global_limit then
  return {0, limit - total, 1, 2}
end

if not consume then
  return {1, limit - total, 0, 0}
end

local ttl = fmt(window_ms + 1000)
redis.call('ZADD', log_key, fmt(now), fmt(points) .. ':' .. request_id)
redis.call('SET', total_key, total + points, 'PX', ttl)
redis.call('PEXPIRE', log_key, ttl)
redis.call('HSET', global_key, 's', second, 'c', used + points)
redis.call('EXPIRE', global_key, 2)
return {1, limit - total - points, 0, 0}
end
"""

# Redis' clock, as the Lua locals `now` (ms) and `second`, for scripts that call `rate_limit`.
REDIS_NOW_LUA = """
local t = redis.call('TIME')
local second = tonumber(t[1])
local now = second * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: device log (ZSET), device total (string), global counter (hash {s, c})
# ARGV: points, device limit, window seconds, global limit, request id, consume (1/0)
# Returns {allowed (1/0), remaining, retry_after_seconds, scope (0 none, 1 device, 2 global)}
_CONSUME = register_script(
    RATE_LIMIT_LUA
    + REDIS_NOW_LUA
    + """
return rate_limit(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]) * 1000,
                  tonumber(ARGV[4]), ARGV[5], ARGV[6] == '1', now, second)
"""
)

_SCOPES = {0: "", 1: "device", 2: "global"}


@dataclass(frozen=True)
class RateLimitDecision:
    """The outcome of one rate-limit check, with what the response headers need."""

    allowed: bool
    limit: int  # the per-device limit (for X-RateLimit-Limit)
    remaining: int  # points the device may still send in the current window (after this request if allowed)
    retry_after_seconds: int  # >= 1 when not allowed, 0 when allowed
    scope: str  # "device" or "global": which limit refused it ("" when allowed)


# The rate limiter's keys carry the event queue's hash tag: `iot.admission` takes a device's pair, the
# global second and the queue's counters in ONE script, and Redis Cluster runs a script only on keys of
# one slot. So the rate limits live on the event queue's node; an exact global limit needs one place
# anyway, and that node's calls per request stay two (admission, publish), as they were before the
# admission GET and the rate-limit script became one script (docs/SCALING.md).
def rate_limit_keys(device_id: str) -> list[str]:
    """KEYS of `rate_limit` in order: the device's log and total, the global second."""
    return [
        redis_tagged_key(HASH_TAG, "ratelimit", "device", device_id, "log"),
        redis_tagged_key(HASH_TAG, "ratelimit", "device", device_id, "total"),
        redis_tagged_key(HASH_TAG, "ratelimit", "global"),
    ]


def rate_limit_args(*, points: int) -> list:
    """The settings' part of `rate_limit`'s arguments: device limit, window seconds, global limit, request id."""
    return [
        points,
        settings.RATE_LIMIT_TELEMETRY_PER_DEVICE,
        settings.RATE_LIMIT_WINDOW_SECONDS,
        settings.RATE_LIMIT_GLOBAL_PER_SECOND,
        uuid.uuid4().hex,
    ]


def rate_limit_decision(raw: list) -> RateLimitDecision:
    """`rate_limit`'s answer ({allowed, remaining, retry after, scope}) as a decision."""
    allowed, remaining, retry_after, scope = raw
    return RateLimitDecision(
        allowed=bool(allowed),
        limit=settings.RATE_LIMIT_TELEMETRY_PER_DEVICE,
        remaining=max(int(remaining), 0),
        retry_after_seconds=int(retry_after),
        scope=_SCOPES[int(scope)],
    )


def _decide(*, device_id: str, points: int, consume: bool) -> RateLimitDecision:
    raw = _CONSUME(keys=rate_limit_keys(device_id), args=[*rate_limit_args(points=points), 1 if consume else 0])
    return rate_limit_decision(raw)


def rate_limit_consume(*, device_id: str, points: int) -> RateLimitDecision:
    """Take `points` from the device's window and the global second, both or neither.

    `points` greater than the device limit is refused for good (scope "device",
    retry after one window): the caller should answer 422, not 429.
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"points must be a positive integer, got {points!r}")
    return _decide(device_id=device_id, points=points, consume=True)


def rate_limit_peek(*, device_id: str) -> RateLimitDecision:
    """Would a one-point request be allowed now? Consumes nothing (headers, diagnostics)."""
    return _decide(device_id=device_id, points=1, consume=False)
