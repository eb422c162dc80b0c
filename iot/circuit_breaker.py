"""Circuit breakers whose state every process shares, one Lua script per transition.

A caller about to use a fragile service (a channel's webhook, say) asks
`breaker_acquire(name=...)`: a `BreakerPermit` means go ahead, then report the
outcome with `breaker_record(permit=..., success=...)`; a `BreakerOpen` means don't
call, reschedule after `retry_after_seconds`. The seed's breaker kept its state in
one process's memory: every other worker went on hammering a dead service, and each
of its calls waited out a 30 s timeout. Here the state lives in Redis and each
decision is one script, so all web and worker processes see one breaker:

* **closed** -> **open** after `CIRCUIT_BREAKER_FAILURE_THRESHOLD` *consecutive*
  failures (a success resets the count). Consecutive, not "n in a window": the
  breaker answers "is the service down right now", and a run of failures with no
  success between them says so whatever their spacing, while a windowed count needs
  a rate to be chosen per service and still opens on a flaky-but-working one. A
  service that fails every other call keeps its breaker closed: the outbox retries
  those deliveries anyway.
* **open** -> **half-open** once `CIRCUIT_BREAKER_TIMEOUT_SECONDS` have passed on
  Redis' clock (`TIME`, so no host's drift shortens or stretches it). The
  transition happens inside the next `breaker_acquire`; until then reads report the
  breaker as half-open already, since that is how the next call will be treated.
* **half-open**: at most `CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS` probes at a time,
  across all processes. Each probe holds a slot in a ZSET, its member a random
  probe id, its score the end of its lease (now + `CIRCUIT_BREAKER_PROBE_LEASE_SECONDS`);
  every acquire first drops the expired leases, so a probe whose worker died (killed
  mid-request, say) frees its slot after the lease instead of blocking the breaker
  half-open for ever. Keep the lease above the longest call (webhooks: connect 2 s +
  read 5 s, so the default of 30 s). A probe's success closes the breaker, its
  failure opens it for another timeout; either empties the probe set. Other callers
  are refused meanwhile, with `retry_after_seconds` up to the oldest lease's end
  (the latest a slot can free; a probe's result usually frees them all sooner).

Outcomes reported late do not steer the breaker. Every trip to open increments a
generation; a closed-state permit counts only in the generation it was issued in and
while the breaker is still closed (the 95 deliveries that were in flight when five
failures opened it must not count against the breaker after it has recovered), and a
probe counts only while its lease holds (its slot is gone otherwise). The calls are
still counted in the metrics.

Keys (under `REDIS_KEY_PREFIX`): `breaker:state:<name>` (hash: `s` state 0/1/2,
`f` consecutive failures, `u` open until, ms of Redis time, `g` generation),
`breaker:probes:<name>` (the probe ZSET), `breaker:registry` (SET of the names ever
acquired, read by the `/metrics` gauge; `breaker_forget` removes a name), `breaker:calls`
(hash `<outcome>:<name>` -> count). The calls are counted in Redis by the scripts, not by
`prometheus_client` in the calling process: the callers are Celery workers, which serve no
`/metrics` and need not share the web's multiprocess directory (or host), so only a shared
count reaches the scrape (`iot_circuit_breaker_calls_total{breaker, outcome}`, via
`iot.metrics.register_shared_counter`).

**Redis unreachable: the breaker fails open.** `breaker_acquire` then returns a
permit marked `degraded` and `breaker_record` does nothing; neither raises (a
`RedisError` or `OSError` is logged, at most every 10 s per process). Refusing instead
would hold every notification while Redis is down although the service may be fine,
and the calls a breaker exists to stop are bounded anyway: the outbox retries with
backoff and every delivery has short connect/read timeouts (`iot.outbound`). The
state readers return "closed" then, which is how the breaker behaves; the `/metrics`
gauge reports nothing rather than a guess. (While Redis is down, Celery, whose broker
it is, delivers nothing either.)

Time can be injected for tests: every function takes `now_ms`, passed to the scripts
instead of Redis' `TIME`. Production code never passes it.

Why not pybreaker (1.4.1) or aiobreaker (1.2.0), read before writing this. By default
their state is in process memory, the seed's flaw. Their optional Redis storage keeps
each field in its own key and each transition is several commands from Python (INCR
the failures, GET them, compare, SET `opened_at` under WATCH, SET the state), so
concurrent processes act on what another is changing; and the open -> half-open check
compares `opened_at` (whole seconds) with the host's clock. Half-open has no limit on
concurrent calls at all: every process that sees the timeout elapsed switches to
half-open and calls through. Measured here, 4
processes calling a pybreaker breaker (Redis storage) whose reset timeout had passed:
4 of 4 reached the service (this module lets exactly `HALF_OPEN_MAX_CALLS` through,
`test_probe_limit_holds_across_processes`). And `CircuitBreaker.call` holds a
process-wide `threading.RLock` for the whole guarded call: 4 threads making 0.3 s
calls through one closed breaker took 1.22 s, serialised, so one hanging webhook would
stall every other delivery in the worker. aiobreaker is the asyncio port of the same
design (same storage) and our deliveries run in synchronous Celery tasks. Neither has
probe leases. (Measured with pybreaker's `CircuitRedisStorage`, fail_max 5, reset_timeout
1 s, 4 `multiprocessing` processes released together on an event after the timeout.)

Cost: one round trip per acquire and per record, about 36 us of Redis CPU per script
call (3,000 acquire + record pairs on a Redis of their own: 1.2 ms per pair seen by
the client on this 2-core machine under a load average of 18); `breaker_states` reads
any number of breakers in one round trip. With Redis refusing connections, acquire
returns its degraded permit in under 5 ms (the shared client does not retry).
"""

import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import redis
from django.conf import settings

from iot.metrics import register_shared_counter, register_shared_gauge
from iot.redis import get_redis, redis_tagged_key, register_script

logger = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]
_STATES: dict[int, State] = {0: "closed", 1: "open", 2: "half_open"}
_NAME_MAX_LENGTH = 200

_OUTCOMES = ("success", "failure", "rejected")

# The clock every script starts with: ARGV[1] is a test's injected time in ms, or '' for Redis' TIME.
_NOW = """
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function fmt(n) return string.format('%.0f', n) end
"""

# KEYS: state hash, probe ZSET, registry SET, calls hash
# ARGV: now ('' = Redis TIME), name, max probes, lease ms, probe id
# Returns {allowed (1/0), state (0 closed, 1 open, 2 half-open), generation, retry after ms, changed (1/0)}
_ACQUIRE = register_script(
    _NOW
    + """
redis.call('SADD', KEYS[3], ARGV[2])
local h = redis.call('HMGET', KEYS[1], 's', 'u', 'g')
local state = tonumber(h[1]) or 0
local gen = tonumber(h[3]) or 0
if state == 0 then return {1, 0, gen, 0, 0} end
local changed = 0
if state == 1 then
  local open_until = tonumber(h[2]) or 0
  if now < open_until then
    redis.call('HINCRBY', KEYS[4], 'rejected:' .. ARGV[2], 1)
    return {0, 1, gen, open_until - now, 0}
  end
  -- open -> half-open: the timeout has passed; probes start from an empty set.
  redis.call('HSET', KEYS[1], 's', 2)
  redis.call('DEL', KEYS[2])
  changed = 1
end
-- Half-open: drop the leases that ended (their workers died or hung), then take a free slot if any.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(now))
if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[2], fmt(now + tonumber(ARGV[4])), ARGV[5])
  return {1, 2, gen, 0, changed}
end
local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
redis.call('HINCRBY', KEYS[4], 'rejected:' .. ARGV[2], 1)
return {0, 2, gen, math.max(tonumber(oldest[2]) - now, 1), changed}
"""
)

# KEYS: state hash, probe ZSET, calls hash
# ARGV: now ('' = Redis TIME), outcome ('1' success, '0' failure, 'r' release), permit generation,
#       probe id ('' for a closed-state permit), failure threshold, open timeout ms, name
# Returns {state after (0/1/2), changed (1/0)}
_RECORD = register_script(
    _NOW
    + """
local outcome = ARGV[2]
-- Every call the caller made is counted, whether or not it still steers the breaker.
if outcome == '1' then
  redis.call('HINCRBY', KEYS[3], 'success:' .. ARGV[7], 1)
elseif outcome == '0' then
  redis.call('HINCRBY', KEYS[3], 'failure:' .. ARGV[7], 1)
end
local h = redis.call('HMGET', KEYS[1], 's', 'f', 'g')
local state = tonumber(h[1]) or 0
local gen = tonumber(h[3]) or 0
local function trip()
  redis.call('HSET', KEYS[1], 's', 1, 'u', fmt(now + tonumber(ARGV[6])), 'f', 0, 'g', gen + 1)
  redis.call('DEL', KEYS[2])
  return {1, 1}
end

if ARGV[4] ~= '' then
  -- A probe counts only while it holds a live slot: every transition out of half-open empties the
  -- set, and an ended lease means its slot may already have gone to another probe.
  local lease = redis.call('ZSCORE', KEYS[2], ARGV[4])
  redis.call('ZREM', KEYS[2], ARGV[4])
  if state ~= 2 or not lease or tonumber(lease) <= now or outcome == 'r' then return {state, 0} end
  if outcome == '1' then
    -- half-open -> closed
    redis.call('HSET', KEYS[1], 's', 0, 'f', 0)
    redis.call('DEL', KEYS[2])
    return {0, 1}
  end
  -- half-open -> open, for another full timeout
  return trip()
end

-- A closed-state permit counts only in the closed period it was issued in.
if state ~= 0 or tonumber(ARGV[3]) ~= gen or outcome == 'r' then return {state, 0} end
if outcome == '1' then
  if (tonumber(h[2]) or 0) ~= 0 then redis.call('HSET', KEYS[1], 'f', 0) end
  return {0, 0}
end
if redis.call('HINCRBY', KEYS[1], 'f', 1) >= tonumber(ARGV[5]) then
  -- closed -> open
  return trip()
end
return {0, 0}
"""
)

# KEYS: the state hashes of the breakers to read
# ARGV: now ('' = Redis TIME)
# Returns {state (0/1/2), ...} per key; an open breaker whose timeout has passed reads as half-open.
_STATES_READ = register_script(
    _NOW
    + """
local out = {}
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 's', 'u')
  local state = tonumber(h[1]) or 0
  if state == 1 and now >= (tonumber(h[2]) or 0) then state = 2 end
  out[i] = state
end
return out
"""
)

# KEYS: state hash, probe ZSET, registry SET, calls hash; ARGV: name
_FORGET = register_script(
    """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], 'success:' .. ARGV[1], 'failure:' .. ARGV[1], 'rejected:' .. ARGV[1])
return 1
"""
)


@dataclass(frozen=True)
class BreakerPermit:
    """Go ahead and call the service, then pass this to `breaker_record`."""

    name: str
    generation: int
    probe_id: str | None = None  # set when half-open: this call is one of the probes
    degraded: bool = False  # Redis was unreachable: allowed without a breaker (fail-open)
    allowed = True  # not a field: lets callers branch on either result


@dataclass(frozen=True)
class BreakerOpen:
    """Don't call the service: reschedule after `retry_after_seconds`."""

    name: str
    state: State  # "open", or "half_open" with every probe slot taken
    retry_after_seconds: float
    allowed = False


def _validate_name(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > _NAME_MAX_LENGTH:
        raise ValueError(f"a breaker name is a non-empty string of at most {_NAME_MAX_LENGTH} characters, got {name!r}")
    return name


# One Redis Cluster hash tag for every breaker key: a transition takes a breaker's state, its probes,
# the registry and the call counts in one script, and `breaker_states` reads many states in one call.
def _state_key(name: str) -> str:
    return redis_tagged_key("breaker", "state", name)


def _probes_key(name: str) -> str:
    return redis_tagged_key("breaker", "probes", name)


def _registry_key() -> str:
    return redis_tagged_key("breaker", "registry")


def _calls_key() -> str:
    return redis_tagged_key("breaker", "calls")


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _now_arg(now_ms: int | None) -> str:
    return "" if now_ms is None else str(int(now_ms))


_LOG_EVERY_SECONDS = 10.0
_last_outage_log = 0.0


def _log_outage(action: str, name: str, exc: Exception) -> None:
    """Warn that Redis is unreachable, at most every 10 s per process (every delivery would otherwise log)."""
    global _last_outage_log
    now = time.monotonic()
    if now - _last_outage_log >= _LOG_EVERY_SECONDS:
        _last_outage_log = now
        logger.warning("circuit breaker %s: Redis unreachable on %s, failing open: %s", name, action, exc)


def breaker_acquire(*, name: str, now_ms: int | None = None) -> BreakerPermit | BreakerOpen:
    """May the caller use the service behind breaker `name` now? Never raises for Redis trouble."""
    _validate_name(name)
    probe_id = uuid.uuid4().hex
    try:
        allowed, state, generation, retry_ms, changed = _ACQUIRE(
            keys=[_state_key(name), _probes_key(name), _registry_key(), _calls_key()],
            args=[
                _now_arg(now_ms),
                name,
                settings.CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS,
                _ms(settings.CIRCUIT_BREAKER_PROBE_LEASE_SECONDS),
                probe_id,
            ],
            client=get_redis(),
        )
    except (redis.RedisError, OSError) as exc:
        _log_outage("acquire", name, exc)
        return BreakerPermit(name=name, generation=-1, degraded=True)
    if changed:
        logger.info("circuit breaker %s: open -> half_open", name)
    if not allowed:
        return BreakerOpen(name=name, state=_STATES[int(state)], retry_after_seconds=int(retry_ms) / 1000)
    return BreakerPermit(name=name, generation=int(generation), probe_id=probe_id if int(state) == 2 else None)


def _record(*, permit: BreakerPermit, outcome: str, now_ms: int | None) -> State | None:
    try:
        state, changed = _RECORD(
            keys=[_state_key(permit.name), _probes_key(permit.name), _calls_key()],
            args=[
                _now_arg(now_ms),
                outcome,
                permit.generation,
                permit.probe_id or "",
                settings.CIRCUIT_BREAKER_FAILURE_THRESHOLD,
                _ms(settings.CIRCUIT_BREAKER_TIMEOUT_SECONDS),
                permit.name,
            ],
            client=get_redis(),
        )
    except (redis.RedisError, OSError) as exc:
        _log_outage("record", permit.name, exc)
        return None
    after = _STATES[int(state)]
    if changed:
        if after == "open":
            logger.warning("circuit breaker %s opened for %ss", permit.name, settings.CIRCUIT_BREAKER_TIMEOUT_SECONDS)
        else:
            logger.info("circuit breaker %s: half_open -> closed", permit.name)
    return after


def breaker_record(*, permit: BreakerPermit, success: bool, now_ms: int | None = None) -> State | None:
    """Report how the call went; returns the breaker's state after it (None when Redis was unreachable).

    What counts as a failure is the caller's call: for a webhook, a timeout, a refused
    connection or a 5xx says the service is unwell, a 4xx says it answered.
    """
    if permit.degraded:
        return None
    return _record(permit=permit, outcome="1" if success else "0", now_ms=now_ms)


def breaker_release(*, permit: BreakerPermit, now_ms: int | None = None) -> None:
    """The permit went unused (nothing to send after all): free its probe slot without a verdict."""
    if permit.probe_id and not permit.degraded:
        _record(permit=permit, outcome="r", now_ms=now_ms)


def _read_codes(names: list[str], now_ms: int | None) -> list[int]:
    if not names:
        return []
    codes = _STATES_READ(keys=[_state_key(n) for n in names], args=[_now_arg(now_ms)], client=get_redis())
    return [int(c) for c in codes]


def breaker_states(*, names: Iterable[str], now_ms: int | None = None) -> dict[str, State]:
    """The states of several breakers in one round trip (for listings); unknown names are closed."""
    names = [_validate_name(n) for n in dict.fromkeys(names)]
    try:
        codes = _read_codes(names, now_ms)
    except (redis.RedisError, OSError) as exc:
        _log_outage("state read", ",".join(names[:3]), exc)
        return dict.fromkeys(names, "closed")
    return {name: _STATES[code] for name, code in zip(names, codes, strict=True)}


def breaker_state(*, name: str, now_ms: int | None = None) -> State:
    """`"closed"`, `"open"` or `"half_open"` (an open breaker past its timeout reads as half-open)."""
    return breaker_states(names=[name], now_ms=now_ms)[name]


def breaker_forget(*, name: str) -> None:
    """Remove a breaker's state and its name from the registry (its channel was deleted)."""
    _validate_name(name)
    _FORGET(keys=[_state_key(name), _probes_key(name), _registry_key(), _calls_key()], args=[name], client=get_redis())


def _gauge_values() -> dict[tuple[str, ...], float]:
    names = sorted(n.decode() for n in get_redis().smembers(_registry_key()))
    return {(name,): float(code) for name, code in zip(names, _read_codes(names, None), strict=True)}


def _counter_values() -> dict[tuple[str, ...], float]:
    client = get_redis()
    values = {(name.decode(), outcome): 0.0 for name in client.smembers(_registry_key()) for outcome in _OUTCOMES}
    for field, count in client.hgetall(_calls_key()).items():
        outcome, name = field.decode().split(":", 1)
        values[(name, outcome)] = float(count)
    return dict(sorted(values.items()))


register_shared_gauge(
    "iot_circuit_breaker_state",
    "Circuit breaker state, shared by all processes: 0 closed, 1 open, 2 half-open.",
    ["breaker"],
    _gauge_values,
)
register_shared_counter(
    "iot_circuit_breaker_calls",
    "Calls through a circuit breaker, from every process: success/failure as the caller recorded them, "
    "rejected = refused while open (calls made while Redis was unreachable are not counted).",
    ["breaker", "outcome"],
    _counter_values,
)
