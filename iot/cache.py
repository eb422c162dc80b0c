"""A version-guarded read-through cache in Redis that can never serve stale data.

Plain cache-aside ("delete the key after the write") has a hole: a reader that
fetched the row *before* the write committed can store its old copy *after* the
writer deleted the key, and that stale copy is then served until it expires.

Here every cached object has a monotonically increasing `version` (a column
bumped by every write, in the same UPDATE). A cache entry is a Redis hash
`{v: version, d: payload}`; an entry without `d` is a tombstone that only
remembers the newest version written. Two Lua scripts keep the invariant
"the cache never holds an older version than the newest one invalidated":

* `invalidate(key, version)` replaces the entry with a tombstone for `version`,
  unless the entry already knows a newer version.
* `fill(key, version, payload, read_started_ms)` stores a payload only if no
  entry or tombstone knows a newer version, *and* the database read it comes
  from started less than `CACHE_FILL_MAX_AGE_MS` ago by Redis' clock. The
  tombstone lives longer than that, so a reader that stalls between its read
  and its fill is refused rather than resurrecting old data.

Writers invalidate inside their transaction (so a write cannot commit without
it) and again after commit (so a long transaction cannot outlive the tombstone).
A fill that races a write is simply refused; the next read fills the new version.

Data without a version column (e.g. API tokens) uses the same scripts with time
as the version (`timed_cache_*`): a miss records Redis' clock before the
database read, the invalidation after a change records Redis' clock after the
commit, and a fill is refused if its read started before the last invalidation.
Inside the change's transaction, `timed_cache_hold` first replaces the entry with
a hold that refuses every fill: if Redis can't be told, the change fails instead
of committing while its cache entry stays live; if the after-commit invalidation
then fails, the hold still keeps the stale entry out until it expires.

Entries are tied to the Redis server's epoch (`run_id`): Redis persists the
event stream (append-only file), so a restart could bring back an entry whose
tombstone was written after the last fsync, or a replica promoted by a failover
may never have received it. Only entries and tombstones written by the running
server count, and a fill whose miss was seen by an earlier server is refused.

Under Redis Cluster the epoch is the `run_id` of the node that owns the key's slot,
so the same holds per shard: a failover of one shard makes that shard's entries
miss, and nothing else. The many-key calls (`versioned_cache_get_many`,
`versioned_cache_invalidate_many`) send one script call per hash slot there
(`iot.redis.redis_slot_groups`), since a script may only touch keys of one slot;
keys that must go together are named under one hash tag (`alerts.cache`).
"""

from collections.abc import Mapping
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction

from iot.redis import ScriptCall, redis_slot_groups, register_script

# The running Redis server's identity (`run_id`, new at every start). Every entry and tombstone
# carries the epoch it was written in, and only entries of the current epoch count: a server that
# restarts from its append-only file or a snapshot (or a replica promoted by a failover) may bring
# back an entry whose invalidation it never recorded, and that entry must not be served.
_EPOCH = "local epoch = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')"
_NOW_MS = "local t = redis.call('TIME')\nlocal now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)"

_GET = register_script(
    f"""
{_EPOCH}
local entry = redis.call('HMGET', KEYS[1], 'd', 'e')
if entry[1] and entry[2] == epoch then return {{1, entry[1]}} end
{_NOW_MS}
return {{0, now_ms, epoch}}
"""
)

# `_GET` for several keys in one round trip: per key {1, payload} on a hit, else {0, now_ms};
# the epoch once, last.
_GET_MANY = register_script(
    f"""
{_EPOCH}
{_NOW_MS}
local out = {{}}
for i, key in ipairs(KEYS) do
  local entry = redis.call('HMGET', key, 'd', 'e')
  if entry[1] and entry[2] == epoch then
    out[#out + 1] = 1
    out[#out + 1] = entry[1]
  else
    out[#out + 1] = 0
    out[#out + 1] = now_ms
  end
end
out[#out + 1] = epoch
return out
"""
)

# ARGV: version, payload, ttl ms, read started (ms, Redis time), max read age ms, epoch of the miss
_FILL = register_script(
    f"""
{_EPOCH}
-- A miss seen by another server process (before a restart or failover) may predate an
-- invalidation this one never heard of: refuse it.
if ARGV[6] ~= epoch then return 0 end
{_NOW_MS}
if now_ms - tonumber(ARGV[4]) > tonumber(ARGV[5]) then return 0 end
local cur = redis.call('HMGET', KEYS[1], 'v', 'e')
local version = tonumber(ARGV[1])
if cur[1] and cur[2] == epoch and tonumber(cur[1]) > version then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2], 'e', epoch)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# ARGV: version, tombstone ttl ms. Version -1: time-versioned, the tombstone is the next
# millisecond by Redis' clock, so a read that began in this same millisecond (maybe before the
# commit) is refused; it replaces any tombstone, a pending one included. Version -2: pending, a
# change in an open transaction: no fill of any read may land until that change's after-commit
# invalidation replaces it, or it expires.
_PENDING = 9007199254740991
_INVALIDATE = register_script(
    f"""
{_EPOCH}
local version = tonumber(ARGV[1])
if version == -2 then
  version = {_PENDING}
elseif version == -1 then
  {_NOW_MS}
  version = now_ms + 1
else
  local cur = redis.call('HMGET', KEYS[1], 'v', 'e')
  if cur[1] and cur[2] == epoch and tonumber(cur[1]) > version then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', version, 'e', epoch)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)

# `_INVALIDATE` of row versions (no -1/-2) for many keys in one call. ARGV: tombstone ttl ms, then
# the version of each key in KEYS' order. The epoch is read once (`INFO` is most of what one
# `_INVALIDATE` costs Redis). 1000 keys took 5-11 ms, against 15-31 ms pipelined one `_INVALIDATE` per
# key and 89-117 ms one call each (`bench/device_liveness.py`, loaded 2-core machine).
_INVALIDATE_MANY = register_script(
    f"""
{_EPOCH}
for i, key in ipairs(KEYS) do
  local version = tonumber(ARGV[i + 1])
  local cur = redis.call('HMGET', key, 'v', 'e')
  if not (cur[1] and cur[2] == epoch and tonumber(cur[1]) > version) then
    redis.call('DEL', key)
    redis.call('HSET', key, 'v', version, 'e', epoch)
    redis.call('PEXPIRE', key, ARGV[1])
  end
end
return 1
"""
)


@dataclass(frozen=True)
class CacheLookup:
    """A cache read: `payload` on a hit; on a miss, Redis' clock and epoch for the later fill."""

    payload: bytes | None
    read_started_ms: int = 0
    epoch: bytes = b""

    @property
    def hit(self) -> bool:
        return self.payload is not None


def _tombstone_ttl_ms() -> int:
    return max(60_000, 4 * settings.CACHE_FILL_MAX_AGE_MS)


def versioned_cache_get(*, key: str) -> CacheLookup:
    """One round trip: the payload, or the moment (Redis time) and epoch a miss was seen."""
    found, *value = _GET(keys=[key])
    if found:
        return CacheLookup(payload=value[0])
    return CacheLookup(payload=None, read_started_ms=int(value[0]), epoch=value[1])


def versioned_cache_get_many(*, keys: list[str]) -> list[CacheLookup]:
    """`versioned_cache_get` for several keys in one round trip (one per hash slot under Redis Cluster,
    so name keys read together under one tag), in the order of `keys`."""
    lookups: list[CacheLookup | None] = [None] * len(keys)
    for group in redis_slot_groups(keys):
        flat = _GET_MANY(keys=[keys[i] for i in group])
        epoch = flat[-1]
        for n, i in enumerate(group):
            lookups[i] = (
                CacheLookup(payload=flat[2 * n + 1])
                if flat[2 * n]
                else CacheLookup(payload=None, read_started_ms=int(flat[2 * n + 1]), epoch=epoch)
            )
    return lookups


def versioned_cache_fill(*, key: str, version: int, payload: bytes, lookup: CacheLookup, ttl_seconds: int) -> bool:
    """Store `payload` read after `lookup` missed, unless a newer version is known, the read is
    too old, or Redis restarted since the miss; True if stored."""
    stored = _FILL(
        keys=[key],
        args=[
            version,
            payload,
            ttl_seconds * 1000,
            lookup.read_started_ms,
            settings.CACHE_FILL_MAX_AGE_MS,
            lookup.epoch,
        ],
    )
    return bool(stored)


def versioned_cache_invalidate(*, key: str, version: int) -> None:
    """Forget any payload older than or equal to `version` and refuse older fills."""
    _INVALIDATE(keys=[key], args=[version, _tombstone_ttl_ms()])


def versioned_cache_invalidate_call(*, key: str, version: int) -> ScriptCall:
    """`versioned_cache_invalidate` as a call to send later, with other script calls in one round
    trip (`iot.redis.redis_script_calls`)."""
    return ScriptCall(script=_INVALIDATE, keys=[key], args=[version, _tombstone_ttl_ms()])


def versioned_cache_invalidate_with_commit(*, key: str, version: int) -> None:
    """What a writer calls: tombstone now and, inside a transaction, again after commit.

    The in-transaction call makes a write fail (and roll back) rather than commit while
    Redis can't be told; the after-commit call covers a transaction that outlives the
    tombstone.
    """
    versioned_cache_invalidate(key=key, version=version)
    if connection.in_atomic_block:
        transaction.on_commit(lambda: versioned_cache_invalidate(key=key, version=version), robust=True)


# Keys per script call in `versioned_cache_invalidate_many`: bounds how long one call holds Redis
# (a few ms for 1000 keys) and the size of its arguments, whatever the number of keys.
INVALIDATE_MANY_CHUNK = 1000


def versioned_cache_invalidate_many(*, versions: Mapping[str, int]) -> None:
    """`versioned_cache_invalidate` for many keys (key -> row version, never negative): one script
    call, one round trip, per `INVALIDATE_MANY_CHUNK` keys. Under Redis Cluster, one call per hash slot
    instead: device keys are spread over the slots, so a sweep's 1000 tombstones cost up to 1000 calls there.

    For set-based writes (one UPDATE ... RETURNING of many rows), where a round trip per key cost
    more than the UPDATE. Each chunk is atomic; if a later chunk fails, the earlier keys stay
    tombstoned while the caller's write rolls back, as with `versioned_cache_invalidate` inside a
    transaction that then fails: harmless, those reads go to Postgres until the tombstones expire.
    """
    items = list(versions.items())
    ttl_ms = _tombstone_ttl_ms()
    for group in redis_slot_groups([key for key, _ in items]):  # one group unless Redis Cluster
        for start in range(0, len(group), INVALIDATE_MANY_CHUNK):
            chunk = [items[i] for i in group[start : start + INVALIDATE_MANY_CHUNK]]
            _INVALIDATE_MANY(keys=[key for key, _ in chunk], args=[ttl_ms, *(version for _, version in chunk)])


def versioned_cache_invalidate_many_with_commit(*, versions: Mapping[str, int]) -> None:
    """`versioned_cache_invalidate_with_commit` for many keys (see `versioned_cache_invalidate_many`)."""
    if not versions:
        return
    versions = dict(versions)
    versioned_cache_invalidate_many(versions=versions)
    if connection.in_atomic_block:
        transaction.on_commit(lambda: versioned_cache_invalidate_many(versions=versions), robust=True)


def timed_cache_get(*, key: str) -> CacheLookup:
    """For data without a version column: the read's Redis time is its version."""
    return versioned_cache_get(key=key)


def timed_cache_fill(*, key: str, payload: bytes, lookup: CacheLookup, ttl_seconds: int) -> bool:
    """Store data read from the database after `lookup` missed; refused if invalidated since."""
    return versioned_cache_fill(
        key=key, version=lookup.read_started_ms, payload=payload, lookup=lookup, ttl_seconds=ttl_seconds
    )


def timed_cache_invalidate(*, key: str) -> None:
    """Call after the change committed: any fill whose read began before now (Redis time) is refused."""
    _INVALIDATE(keys=[key], args=[-1, _tombstone_ttl_ms()])


def timed_cache_hold(*, key: str, ttl_ms: int) -> None:
    """Call inside the transaction of a change: refuse every fill until `timed_cache_invalidate`
    (after the commit) replaces this hold, or for `ttl_ms`.

    Raises if Redis can't be told, so the change fails rather than commits with its
    cache entry still live: a revocation takes effect everywhere or fails loudly.
    """
    _INVALIDATE(keys=[key], args=[-2, ttl_ms])
