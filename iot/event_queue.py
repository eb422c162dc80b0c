"""A bounded, durable event queue on one Redis Stream, with backpressure built in.

The old service queued events in an in-process `asyncio.Queue`: events vanished
with the process, a full queue silently dropped them, and the backpressure check
only logged. Here the queue is a Redis Stream read by a consumer group, so events
survive any process, are shared by every consumer, and are bounded by refusal
rather than by loss.

**Depth** is the total `weight` of events published and not yet acknowledged
(telemetry publishes one event per request weighted by its number of points, so
depth counts points). It lives in a counter key that only Lua scripts change, in
the same step as the stream itself, which keeps the invariant
"depth == sum of the weights of the entries in the stream":

* publish: refuse (`EventQueueFull`) if depth + reserved + weight > `EVENT_QUEUE_MAX_SIZE`
  (unless it brings a reservation, below), else XADD and INCRBY. Nothing is ever
  trimmed from the stream (no MAXLEN): the bound comes from refusing to publish,
  never from dropping work.
* ack: XACK; only if it returned 1 (the entry was still pending) XDEL the entry
  and DECRBY the weight read from the entry itself, so a duplicate or late ack
  cannot change the count and acknowledged entries do not pile up.
* dead-letter: the same, plus a copy of the entry (and why) appended to a
  separate dead-letter stream capped with MAXLEN ~ (that one is a record for
  operators, not work, so trimming it is fine).
* reconcile (Celery beat, `event_queue_reconcile`): recount the depth from the
  stream and hand out again entries the group delivered that no consumer holds,
  and recount the reservations, in one script; the safety net for what the scripts
  above cannot prevent (a key evicted or deleted, a failover losing the last writes).

**Reservations** (issue 12). A telemetry request is admitted before its points are
stored and publishes its event only after the commit; requests admitted together
used to commit and then find the queue full, and their derived events were lost.
Now admission (`iot.admission`, one script with the backpressure check and the rate
limits) reserves the event's weight: a member "<weight>:<id>" in a ZSET scored by
its expiry (Redis time + `EVENT_QUEUE_RESERVATION_TTL_SECONDS`) and the sum in a
counter, so "depth + reserved <= EVENT_QUEUE_MAX_SIZE" holds whatever is in flight.
The publish that brings the reservation moves its weight from reserved to depth and
cannot be refused; `event_queue_release` gives it back when the request stores
nothing. A request that dies in between leaks its reservation only until it expires:
every script that counts the reservations drops the expired ones first, and the
reconciliation sets the counter to the sum of the members left. The thresholds of
admission compare the depth alone, as before: the weight in flight is not backlog.

Consumers (`manage.py run_event_consumers`, one loop per process) read new
entries with XREADGROUP, call the handler registered for the event type (a batch
handler, `event_batch_handler`, once with all the read's entries of its type), and
ack only after the handlers returned, every entry handled in one script call; a
handler's exception leaves its entries pending. Every few
seconds a consumer XAUTOCLAIMs entries idle longer than `EVENT_QUEUE_CLAIM_IDLE_MS`
(a crashed consumer's, or ones whose handler failed) and runs them again. An
entry delivered more than `EVENT_QUEUE_MAX_DELIVERIES` times, of an unknown type,
or with a payload that does not parse, goes to the dead-letter stream. Delivery
is at least once: handlers must be idempotent.

**Admission** (`event_queue_admission`) is one GET of the counter: "critical" at
`BACKPRESSURE_REJECT_THRESHOLD` (answer 503), "warning" at
`BACKPRESSURE_QUEUE_THRESHOLD` (answer 429), else "ok". Telemetry takes the same
decision inside `iot.admission`'s script, with "full" (503) when the points do not fit.

Keys (all under `REDIS_KEY_PREFIX`, one Redis Cluster hash tag, `HASH_TAG`, so the
scripts may take them together, with the rate limiter's keys): `{events}:stream` (the
work), `{events}:depth` (the counter), `{events}:dead` (dead letters),
`{events}:reservations` and `{events}:reserved`; the consumer group is `GROUP`.
"""

import dataclasses
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module

import orjson
import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import autodiscover_modules

from iot.metrics import register_shared_gauge
from iot.redis import ScriptCall, get_redis, redis_script_calls, redis_tagged_key, register_script

logger = logging.getLogger(__name__)

GROUP = "iot-consumers"

# Suggested Retry-After (seconds) for clients refused by backpressure.
WARNING_RETRY_AFTER_SECONDS = 1
CRITICAL_RETRY_AFTER_SECONDS = 5

# Reservations (see the module docstring): a ZSET of "<weight>:<id>" members scored by their expiry
# (ms, Redis time), and the sum of their weights in a counter, as Lua functions for the scripts that
# take, consume, release or count them (`iot.admission` takes them).
RESERVATIONS_LUA = """
local function reservation_weight(member) return tonumber(string.match(member, '^(%d+):')) or 0 end

-- The weight reserved and neither published nor released yet. Expired reservations (their request
-- died between admission and publish) are dropped first; a counter that was lost, or that no longer
-- agrees with the set, is summed again from the set (O(reservations), only after such a loss).
local function reservations_held(zset, counter, now_ms)
  local raw = redis.call('GET', counter)
  local held = tonumber(raw or '0') or 0
  local cutoff = string.format('%.0f', now_ms)
  local expired = redis.call('ZRANGEBYSCORE', zset, '-inf', cutoff)
  if #expired > 0 then
    for i = 1, #expired do held = held - reservation_weight(expired[i]) end
    redis.call('ZREMRANGEBYSCORE', zset, '-inf', cutoff)
  end
  if redis.call('ZCARD', zset) == 0 then
    if raw then redis.call('DEL', counter) end
    return 0
  end
  if raw == false or held <= 0 then
    held = 0
    for _, member in ipairs(redis.call('ZRANGE', zset, 0, -1)) do held = held + reservation_weight(member) end
    redis.call('SET', counter, held)
    local pttl = redis.call('PTTL', zset)
    if pttl > 0 then redis.call('PEXPIRE', counter, pttl) end
  elseif #expired > 0 then
    redis.call('SET', counter, held, 'KEEPTTL')
  end
  return held
end

-- Both keys expire after the newest reservation, so nothing stays behind once traffic stops.
local function reservation_take(zset, counter, member, weight, expires_at_ms, key_ttl_ms)
  redis.call('ZADD', zset, string.format('%.0f', expires_at_ms), member)
  redis.call('INCRBY', counter, weight)
  redis.call('PEXPIRE', zset, key_ttl_ms)
  redis.call('PEXPIRE', counter, key_ttl_ms)
end

-- The reservation's weight if it was still held (now it is not), else 0.
local function reservation_drop(zset, counter, member)
  if redis.call('ZREM', zset, member) == 0 then return 0 end
  local weight = reservation_weight(member)
  if redis.call('DECRBY', counter, weight) <= 0 then redis.call('DEL', counter) end
  return weight
end
"""

_NOW_MS_LUA = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: stream, depth, reserved (counter), reservations (ZSET)
# ARGV: max depth, weight, event type, payload, reservation member ('' for none)
# Returns {1, new depth} when stored, {0, current depth} when refused.
# With a reservation still held, the room was taken at admission: it moves from the reservations
# to the depth, and the publish cannot be refused. Without one (or once it expired), the event
# needs room beside everything published and everything others hold reserved.
_PUBLISH = register_script(
    RESERVATIONS_LUA
    + """
local depth = tonumber(redis.call('GET', KEYS[2]) or '0')
local weight = tonumber(ARGV[2])
if ARGV[5] == '' or reservation_drop(KEYS[4], KEYS[3], ARGV[5]) == 0 then
"""
    + _NOW_MS_LUA
    + """
  if depth + reservations_held(KEYS[4], KEYS[3], now_ms) + weight > tonumber(ARGV[1]) then return {0, depth} end
end
redis.call('XADD', KEYS[1], '*', 't', ARGV[3], 'w', ARGV[2], 'p', ARGV[4])
return {1, redis.call('INCRBY', KEYS[2], weight)}
"""
)

# KEYS: reserved (counter), reservations (ZSET); ARGV: reservation member
# Returns the weight released (0 if the reservation was no longer held: consumed or expired).
_RELEASE = register_script(
    RESERVATIONS_LUA
    + """
return reservation_drop(KEYS[2], KEYS[1], ARGV[1])
"""
)

# KEYS: stream, depth; ARGV: group, id...
# Returns how many of the ids were still pending (and are now acknowledged and gone).
_ACK = register_script(
    """
local done = 0
for i = 2, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    done = done + 1
    local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
    if #entry > 0 then
      local f = entry[1][2]
      local weight = 0
      for j = 1, #f, 2 do
        if f[j] == 'w' then weight = tonumber(f[j + 1]) or 0 end
      end
      redis.call('XDEL', KEYS[1], ARGV[i])
      if weight ~= 0 then redis.call('DECRBY', KEYS[2], weight) end
    end
  end
end
return done
"""
)

# KEYS: stream, depth, dead-letter stream; ARGV: group, id, reason, consumer, dead-letter max length
# Returns 1 if the entry was still pending (and is now a dead letter), else 0.
_DEAD_LETTER = register_script(
    """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #entry == 0 then return 1 end
local f = entry[1][2]
local weight = 0
for j = 1, #f, 2 do
  if f[j] == 'w' then weight = tonumber(f[j + 1]) or 0 end
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*',
  'id', ARGV[2], 'reason', ARGV[3], 'consumer', ARGV[4], unpack(f))
redis.call('XDEL', KEYS[1], ARGV[2])
if weight ~= 0 then redis.call('DECRBY', KEYS[2], weight) end
return 1
"""
)


# KEYS: stream; ARGV: group, idle ms
# Returns the names of the consumers removed: idle longer than the given time and holding nothing.
# The check and the delete are one step: XGROUP DELCONSUMER drops the consumer's pending entries,
# so a consumer that read between a separate check and the delete would lose them for good.
_PRUNE = register_script(
    """
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if consumers.err then return {} end
local idle_ms = tonumber(ARGV[2])
local removed = {}
for _, c in ipairs(consumers) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if tonumber(info['pending']) == 0 and tonumber(info['idle']) > idle_ms then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed[#removed + 1] = info['name']
  end
end
return removed
"""
)

# KEYS: stream, depth, reserved (counter), reservations (ZSET); ARGV: group, max entries
# Returns {0, depth, stream length, reserved before, reserved after} when the stream is longer than
# max entries (its depth left alone), else
# {1, depth before, depth after, stream length, reserved before, reserved after, requeued id...}.
_RECONCILE = register_script(
    RESERVATIONS_LUA
    + _NOW_MS_LUA
    + """
-- Reservations first (O(reservations): at most the requests in flight): expired ones dropped,
-- the counter set to the sum of the rest.
local reserved_before = tonumber(redis.call('GET', KEYS[3]) or '0') or -1
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', string.format('%.0f', now_ms))
local reserved = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do reserved = reserved + reservation_weight(member) end
if reserved == 0 then
  redis.call('DEL', KEYS[3])
else
  redis.call('SET', KEYS[3], reserved)
  local pttl = redis.call('PTTL', KEYS[4])
  if pttl > 0 then redis.call('PEXPIRE', KEYS[3], pttl) end
end

local length = redis.call('XLEN', KEYS[1])
local before = tonumber(redis.call('GET', KEYS[2]) or '0') or -1
if length > tonumber(ARGV[2]) then return {0, before, length, reserved_before, reserved} end

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function at_or_before(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as <= bs)
end

-- The group's delivery cursor, and the entries its consumers hold.
local last = nil
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if not groups.err then
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == ARGV[1] then last = info['last-delivered-id'] end
  end
end
local held = {}
if last then
  local from = '-'
  while true do
    local rows = redis.call('XPENDING', KEYS[1], ARGV[1], from, '+', 1000)
    for _, row in ipairs(rows) do held[row[1]] = true end
    if #rows < 1000 then break end
    from = '(' .. rows[#rows][1]
  end
end

-- Depth is the sum of the weights in the stream. An entry at or before the cursor that no
-- consumer holds was lost (its consumer deleted, the group moved): nobody will ever be handed it.
local total = 0
local lost = {}
local from = '-'
while true do
  local chunk = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', 1000)
  for _, entry in ipairs(chunk) do
    local f = entry[2]
    for j = 1, #f, 2 do
      if f[j] == 'w' then total = total + (tonumber(f[j + 1]) or 0) end
    end
    if last and not held[entry[1]] and at_or_before(entry[1], last) then lost[#lost + 1] = entry end
  end
  if #chunk < 1000 then break end
  from = '(' .. chunk[#chunk][1]
end

-- Lost entries go to the end of the stream again (same fields, so the same weight, counted once).
local requeued = {1, before, total, length, reserved_before, reserved}
for _, entry in ipairs(lost) do
  redis.call('XADD', KEYS[1], '*', unpack(entry[2]))
  redis.call('XDEL', KEYS[1], entry[1])
  requeued[#requeued + 1] = entry[1]
end
redis.call('SET', KEYS[2], total)
return requeued
"""
)


class EventQueueFull(Exception):
    """The queue holds `EVENT_QUEUE_MAX_SIZE` weight already; nothing was stored.

    `alongside`: the results of the script calls sent with the publish (they ran anyway).
    """

    def __init__(self, message: str, *, alongside: list | None = None):
        super().__init__(message)
        self.alongside = alongside or []


@dataclass(frozen=True)
class Admission:
    state: str  # "ok" | "warning" | "critical" | "full" (no room for the points; `iot.admission` only)
    depth: int
    retry_after_seconds: int  # suggestion for 429/503 responses, >= 1 unless ok


@dataclass(frozen=True)
class Reservation:
    """Room in the queue held for one event that is published later (see the module docstring)."""

    member: str  # "<weight>:<id>", its member in the reservations set
    weight: int

    @classmethod
    def new(cls, *, weight: int) -> "Reservation":
        return cls(member=f"{weight}:{uuid.uuid4().hex}", weight=weight)


@dataclass(frozen=True)
class ConsumeReport:
    """What one consumer pass did (for logs and tests)."""

    handled: int = 0
    failed: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    ids: tuple[str, ...] = ()  # the entries handled and acknowledged
    next_id: str = "0-0"  # reclaim only: where the next XAUTOCLAIM scan continues


@dataclass(frozen=True)
class Reconciliation:
    """What one `event_queue_reconcile` did."""

    checked: bool  # False: the stream was longer than EVENT_QUEUE_RECONCILE_MAX_ENTRIES and was left alone
    depth_before: int
    depth_after: int  # the sum of the weights in the stream (unchanged when not checked)
    stream_length: int
    requeued: tuple[str, ...] = ()  # ids of lost entries appended to the stream again
    reserved_before: int = 0  # the reservations' counter as found
    reserved_after: int = 0  # the weight of the reservations still held (expired ones dropped)


# Every key of the queue carries this Redis Cluster hash tag (one slot, so one script may take them
# together); so do the rate limiter's (`iot.ratelimit`), which `iot.admission` takes with them.
HASH_TAG = "events"


def _stream_key() -> str:
    return redis_tagged_key(HASH_TAG, "stream")


def _depth_key() -> str:
    return redis_tagged_key(HASH_TAG, "depth")


def _dead_key() -> str:
    return redis_tagged_key(HASH_TAG, "dead")


def _reserved_key() -> str:
    return redis_tagged_key(HASH_TAG, "reserved")


def _reservations_key() -> str:
    return redis_tagged_key(HASH_TAG, "reservations")


def admission_keys() -> list[str]:
    """The keys a script that admits and reserves takes, in this order: depth, reserved, reservations."""
    return [_depth_key(), _reserved_key(), _reservations_key()]


def reservation_ttl_ms() -> int:
    return int(settings.EVENT_QUEUE_RESERVATION_TTL_SECONDS * 1000)


def claim_idle_ms() -> int:
    return settings.EVENT_QUEUE_CLAIM_IDLE_MS


def max_deliveries() -> int:
    return settings.EVENT_QUEUE_MAX_DELIVERIES


def _dead_letter_max_len() -> int:
    return settings.EVENT_QUEUE_DEAD_LETTER_MAX_LEN


def _reconcile_max_entries() -> int:
    return settings.EVENT_QUEUE_RECONCILE_MAX_ENTRIES


# --- producers -----------------------------------------------------------------


def event_queue_depth() -> int:
    """Total weight published and not yet acknowledged (one GET)."""
    value = get_redis().get(_depth_key())
    return max(int(value), 0) if value is not None else 0


def event_queue_reserved() -> int:
    """Weight reserved by admitted requests and not yet published or released (one GET; expired
    reservations count until the next script that looks at them drops them)."""
    value = get_redis().get(_reserved_key())
    return max(int(value), 0) if value is not None else 0


# The admission states by code, as `iot.admission`'s script returns them.
ADMISSION_STATES = {0: "ok", 1: "warning", 2: "critical", 3: "full"}


def admission_of(*, state: str, depth: int) -> Admission:
    """The `Admission` of a state decided from the depth (and, for "full", the reservations)."""
    retry_after = {
        "ok": 0,
        "warning": WARNING_RETRY_AFTER_SECONDS,
        "critical": CRITICAL_RETRY_AFTER_SECONDS,
        # Room comes back as soon as requests in flight publish (milliseconds) or consumers ack.
        "full": WARNING_RETRY_AFTER_SECONDS,
    }[state]
    return Admission(state=state, depth=depth, retry_after_seconds=retry_after)


def event_queue_admission() -> Admission:
    """Backpressure state from the shared depth: one GET, no scan, no lock."""
    depth = event_queue_depth()
    if depth >= settings.BACKPRESSURE_REJECT_THRESHOLD:
        return admission_of(state="critical", depth=depth)
    if depth >= settings.BACKPRESSURE_QUEUE_THRESHOLD:
        return admission_of(state="warning", depth=depth)
    return admission_of(state="ok", depth=depth)


def event_queue_publish(
    *,
    event_type: str,
    payload: dict,
    weight: int = 1,
    reservation: Reservation | None = None,
    alongside: Sequence[ScriptCall] = (),
) -> list:
    """Append an event durably, or raise `EventQueueFull` (and store nothing).

    With a `reservation` still held (taken by `iot.admission` for this event), the room is already
    the event's: it is consumed and the publish is never refused. The event may weigh less than
    its reservation (telemetry publishes only the points a batch stored, not those it had stored
    already); the rest of the room is given back with it. An expired one (or none) publishes only
    if there is room beside what others hold reserved.

    `alongside`: other script calls to send in the same round trip (`iot.redis.redis_script_calls`;
    not atomic with the publish), e.g. a cache tombstone due after the same commit. Returns their
    results (or the exceptions they raised), in order.
    """
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ValueError(f"weight must be a positive integer, got {weight!r}")
    if not event_type:
        raise ValueError("event_type must not be empty")
    if reservation is not None and reservation.weight < weight:
        raise ValueError(f"reservation of weight {reservation.weight} for an event of weight {weight}")
    publish = ScriptCall(
        script=_PUBLISH,
        keys=[_stream_key(), _depth_key(), _reserved_key(), _reservations_key()],
        args=[
            settings.EVENT_QUEUE_MAX_SIZE,
            weight,
            event_type,
            orjson.dumps(payload),
            "" if reservation is None else reservation.member,
        ],
    )
    if alongside:
        published, *others = redis_script_calls([publish, *alongside])
        if isinstance(published, Exception):
            raise published
    else:
        published, others = publish.script(keys=publish.keys, args=publish.args), []
    stored, depth = published
    if not stored:
        raise EventQueueFull(
            f"event queue full: depth {int(depth)} + weight {weight} + reserved > {settings.EVENT_QUEUE_MAX_SIZE}",
            alongside=others,
        )
    return others


def event_queue_release(*, reservation: Reservation) -> bool:
    """Give back a reservation whose event will not be published (its request was refused or failed).

    Returns whether it was still held (False: already consumed or expired). One round trip, on
    failure paths only.
    """
    return bool(_RELEASE(keys=[_reserved_key(), _reservations_key()], args=[reservation.member]))


# --- handlers ------------------------------------------------------------------

EventHandler = Callable[[dict], None]
# Gets the payloads of one read (stream order) and returns, for each, None (handled) or the exception
# that failed it (that entry stays pending); raising fails them all.
EventBatchHandler = Callable[[list[dict]], Sequence[BaseException | None]]
_handlers: dict[str, EventHandler] = {}
_batch_handlers: dict[str, EventBatchHandler] = {}


def _qualified(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _register(event_type: str, fn: Callable, registry: dict) -> None:
    existing = _handlers.get(event_type) or _batch_handlers.get(event_type)
    if existing is not None and _qualified(existing) != _qualified(fn):
        raise ImproperlyConfigured(
            f"event type {event_type!r} already handled by {_qualified(existing)}, not {_qualified(fn)}"
        )
    registry[event_type] = fn


def event_handler(event_type: str) -> Callable[[EventHandler], EventHandler]:
    """Register `fn(payload: dict) -> None` as the one handler for `event_type`."""

    def register(fn: EventHandler) -> EventHandler:
        _register(event_type, fn, _handlers)
        return fn

    return register


def event_batch_handler(event_type: str) -> Callable[[EventBatchHandler], EventBatchHandler]:
    """Register `fn(payloads: list[dict]) -> [None | exception, ...]` as the one handler for `event_type`,
    called once per read with all its entries of that type: for handlers whose work batches (one
    pipeline of Redis writes for many events instead of one each). See `EventBatchHandler`."""

    def register(fn: EventBatchHandler) -> EventBatchHandler:
        _register(event_type, fn, _batch_handlers)
        return fn

    return register


def registered_event_types() -> list[str]:
    return sorted({*_handlers, *_batch_handlers})


# --- consumers -----------------------------------------------------------------


def consumer_name() -> str:
    """Unique per process: hostname-pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def ensure_consumer_group() -> None:
    """Create the stream and group if missing; from id 0, so nothing published earlier is skipped."""
    try:
        get_redis().xgroup_create(_stream_key(), GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def event_queue_ack(*, ids: list[str]) -> int:
    """Acknowledge and delete entries; returns how many were still pending (the rest were already acked)."""
    if not ids:
        return 0
    return int(_ACK(keys=[_stream_key(), _depth_key()], args=[GROUP, *ids]))


def _dead_letter(*, entry_id: str, reason: str, consumer: str) -> bool:
    moved = _DEAD_LETTER(
        keys=[_stream_key(), _depth_key(), _dead_key()],
        args=[GROUP, entry_id, reason, consumer, _dead_letter_max_len()],
    )
    if moved:
        logger.warning("event %s moved to the dead-letter stream: %s", entry_id, reason)
    return bool(moved)


def _decode(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _process(*, entries: list, consumer: str, deliveries: dict[str, int]) -> ConsumeReport:
    """Dispatch the entries to their handlers (a batch handler gets all of its type at once), then
    acknowledge every entry handled, in one script call once all handlers returned."""
    failed = dead = skipped = 0
    limit = max_deliveries()
    ready: dict[str, list[tuple[str, dict]]] = {}  # event type -> [(entry id, payload)], in stream order
    for raw_id, fields in entries:
        if raw_id is None:  # Redis 6.2 XAUTOCLAIM reports an entry deleted under it as nil
            skipped += 1
            continue
        entry_id = _decode(raw_id)
        if entry_id not in deliveries:  # acknowledged by another consumer meanwhile
            skipped += 1
            continue
        if deliveries[entry_id] > limit:
            dead += _dead_letter(entry_id=entry_id, reason=f"delivered {deliveries[entry_id]} times", consumer=consumer)
            continue
        event_type = _decode(fields.get(b"t", b""))
        if event_type not in _handlers and event_type not in _batch_handlers:
            dead += _dead_letter(entry_id=entry_id, reason=f"no handler for {event_type!r}", consumer=consumer)
            continue
        try:
            payload = orjson.loads(fields.get(b"p", b""))
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            dead += _dead_letter(entry_id=entry_id, reason="payload is not a JSON object", consumer=consumer)
            continue
        ready.setdefault(event_type, []).append((entry_id, payload))
    ids: list[str] = []
    for event_type, items in ready.items():
        batch_handler = _batch_handlers.get(event_type)
        if batch_handler is not None:
            try:
                outcomes = list(batch_handler([payload for _, payload in items]))
                if len(outcomes) != len(items):
                    raise RuntimeError(f"{len(outcomes)} outcomes for {len(items)} events")
            except Exception as exc:
                logger.exception("batch handler for %s failed on %d events; they stay pending", event_type, len(items))
                outcomes = [exc] * len(items)
            for (entry_id, _), outcome in zip(items, outcomes, strict=True):
                if outcome is None:
                    ids.append(entry_id)
                else:
                    logger.warning(
                        "handler for %s failed on event %s (%r); it stays pending", event_type, entry_id, outcome
                    )
                    failed += 1
            continue
        handler = _handlers[event_type]
        for entry_id, payload in items:
            try:
                handler(payload)
            except Exception:
                logger.exception("handler for %s failed on event %s; it stays pending", event_type, entry_id)
                failed += 1
                continue
            ids.append(entry_id)
    event_queue_ack(ids=ids)
    return ConsumeReport(handled=len(ids), failed=failed, dead_lettered=dead, skipped=skipped, ids=tuple(ids))


def event_queue_consume(*, consumer: str, count: int = 100, block_ms: int = 1000) -> ConsumeReport:
    """Read up to `count` new entries (waiting at most `block_ms`) and process them."""
    client = get_redis()
    # A block longer than the client's socket timeout would surface as a TimeoutError.
    block_ms = max(1, min(block_ms, int(settings.REDIS_SOCKET_TIMEOUT * 800)))
    try:
        response = client.xreadgroup(GROUP, consumer, {_stream_key(): ">"}, count=count, block=block_ms)
    except redis.ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        ensure_consumer_group()  # the stream was deleted under us (e.g. a flush)
        return ConsumeReport()
    if not response:
        return ConsumeReport()
    entries = response[0][1]
    # `>` only hands out entries never delivered before: this is their first delivery.
    deliveries = {_decode(entry_id): 1 for entry_id, _ in entries}
    return _process(entries=entries, consumer=consumer, deliveries=deliveries)


def event_queue_reclaim(
    *, consumer: str, min_idle_ms: int | None = None, count: int = 100, start_id: str = "0-0"
) -> ConsumeReport:
    """XAUTOCLAIM up to `count` entries pending longer than `min_idle_ms` (any consumer's) and process them.

    `report.next_id` is the cursor to continue the scan from ("0-0" once the whole
    pending list has been looked at).
    """
    client = get_redis()
    idle = claim_idle_ms() if min_idle_ms is None else min_idle_ms
    try:
        response = client.xautoclaim(_stream_key(), GROUP, consumer, min_idle_time=idle, start_id=start_id, count=count)
    except redis.ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        ensure_consumer_group()
        return ConsumeReport()
    next_id = _decode(response[0])
    entries = response[1]
    ids = [_decode(entry_id) for entry_id, _ in entries if entry_id is not None]
    # XAUTOCLAIM counted this delivery; read each claimed entry's count (one round trip).
    pipe = client.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xpending_range(_stream_key(), GROUP, min=entry_id, max=entry_id, count=1, consumername=consumer)
    deliveries = {_decode(rows[0]["message_id"]): int(rows[0]["times_delivered"]) for rows in pipe.execute() if rows}
    report = _process(entries=entries, consumer=consumer, deliveries=deliveries)
    return dataclasses.replace(report, next_id=next_id)


def prune_idle_consumers(*, idle_ms: int = 3_600_000) -> int:
    """Forget group consumers with nothing pending, idle for `idle_ms` (processes that are gone).

    Each process joins the group under a new name, so without this the group's
    consumer list would grow with every restart. Removing a live consumer with
    nothing pending is harmless: its next read re-creates it.

    The check and the delete are one Lua script (`_PRUNE`). They used to be two
    calls, and `XGROUP DELCONSUMER` drops whatever the consumer holds: a consumer
    that read between them (its name reused, or a process that was only slow) lost
    those entries for good (forced, that left depth 7, stream length 1, pending 0).
    A consumer that still holds entries is never removed here, not even by moving
    them elsewhere first: `event_queue_reclaim` already takes over the entries of a
    consumer that is gone (counting deliveries, dead-lettering poison), after which
    it holds nothing and a later pass removes it.
    """
    try:
        removed = _PRUNE(keys=[_stream_key()], args=[GROUP, idle_ms])
    except redis.ResponseError:
        return 0
    if removed:
        logger.info("pruned idle event consumers: %s", ", ".join(_decode(name) for name in removed))
    return len(removed)


def event_queue_reconcile() -> Reconciliation:
    """Set the depth counter from the stream itself, and hand lost entries out again; one Lua script.

    Publish, ack and dead-letter keep depth equal to the sum of the stream's
    weights in the same step as they change the stream, so the two drift apart
    only when something outside them intervenes: a key evicted or deleted, a
    Redis failover that lost the last writes of one but not the other, a bug. A
    drifted depth stays wrong forever (too high: requests refused with 429/503
    for a queue that is empty; too low: the bound no longer holds). This recounts
    it, and is run every `EVENT_QUEUE_RECONCILE_INTERVAL_SECONDS` by Celery beat
    (`iot.tasks.event_queue_reconciliation`).

    It also finds entries the group handed out that no consumer holds (at or
    before the group's last-delivered id, not in its pending list): lost to a
    deleted consumer or a moved group id, they would never be delivered again and
    would count in the depth forever. They are appended to the stream again, with
    the same fields, and delivered anew (handlers are idempotent: delivery is at
    least once).

    The script is one atomic step, so a publish or ack running meanwhile is
    either wholly before it or wholly after it: no race, no lock. It reads every
    entry and the whole pending list, during which Redis serves nobody else:
    3.6 ms for 1,000 entries, 34 ms for 10,000 (half of them pending; Redis 7.0,
    10-point events). A stream longer than `EVENT_QUEUE_RECONCILE_MAX_ENTRIES`
    (default 10,000, which the default `EVENT_QUEUE_MAX_SIZE` never exceeds, every
    entry weighing at least 1) is left alone and reported (`checked=False`): it
    is a backlog being worked off, and the first run after it shrinks does the check.

    The reservations are reconciled either way (O(reservations), at most the requests in
    flight): expired ones dropped, the counter set to the sum of the weights still held.
    """
    result = _RECONCILE(
        keys=[_stream_key(), _depth_key(), _reserved_key(), _reservations_key()],
        args=[GROUP, _reconcile_max_entries()],
    )
    if not result[0]:
        report = Reconciliation(
            checked=False,
            depth_before=int(result[1]),
            depth_after=int(result[1]),
            stream_length=int(result[2]),
            reserved_before=int(result[3]),
            reserved_after=int(result[4]),
        )
        logger.warning(
            "event queue depth not reconciled: the stream holds %d entries (> EVENT_QUEUE_RECONCILE_MAX_ENTRIES)",
            report.stream_length,
        )
        return report
    requeued = tuple(_decode(entry_id) for entry_id in result[6:])
    report = Reconciliation(
        checked=True,
        depth_before=int(result[1]),
        depth_after=int(result[2]),
        stream_length=int(result[3]),
        requeued=requeued,
        reserved_before=int(result[4]),
        reserved_after=int(result[5]),
    )
    if report.depth_before != report.depth_after:
        logger.warning(
            "event queue depth was %d, the stream holds %d: corrected", report.depth_before, report.depth_after
        )
    if requeued:
        logger.warning("event queue: %d lost entries handed out again: %s", len(requeued), ", ".join(requeued[:20]))
    if report.reserved_before != report.reserved_after:
        logger.info(
            "event queue reservations were %d, %d are held: corrected", report.reserved_before, report.reserved_after
        )
    return report


def event_queue_dead_letters() -> int:
    """Entries in the dead-letter stream (capped at about EVENT_QUEUE_DEAD_LETTER_MAX_LEN)."""
    return int(get_redis().xlen(_dead_key()))


def load_event_handlers(*, extra_modules: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Import every app's `events` module, plus `EVENT_HANDLER_MODULES` and `extra_modules`; return the types."""
    autodiscover_modules("events")
    for module in [*settings.EVENT_HANDLER_MODULES, *extra_modules]:
        import_module(module)
    return registered_event_types()


# --- metrics -------------------------------------------------------------------

register_shared_gauge(
    "iot_event_queue_depth",
    "Weight (telemetry points) published to the event queue and not yet acknowledged.",
    [],
    lambda: {(): float(event_queue_depth())},
)
register_shared_gauge(
    "iot_event_queue_reserved",
    "Weight (telemetry points) admitted and reserved in the event queue, not yet published or released.",
    [],
    lambda: {(): float(event_queue_reserved())},
)
register_shared_gauge(
    "iot_event_queue_dead_letters",
    "Entries in the event queue's dead-letter stream (capped).",
    [],
    lambda: {(): float(event_queue_dead_letters())},
)
