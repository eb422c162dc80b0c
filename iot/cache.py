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
"""

from dataclasses import dataclass

from django.conf import settings

from iot.redis import register_script

_GET = register_script(
    """
local d = redis.call('HGET', KEYS[1], 'd')
if d then return {1, d} end
local t = redis.call('TIME')
return {0, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
"""
)

_FILL = register_script(
    """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now_ms - tonumber(ARGV[4]) > tonumber(ARGV[5]) then return 0 end
local cur = redis.call('HGET', KEYS[1], 'v')
local version = tonumber(ARGV[1])
if cur and tonumber(cur) > version then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

_INVALIDATE = register_script(
    """
local cur = redis.call('HGET', KEYS[1], 'v')
local version = tonumber(ARGV[1])
if version < 0 then
  -- Time-versioned entries: the tombstone is the next millisecond by Redis' clock,
  -- so a read that began in this same millisecond (maybe before the commit) is refused.
  local t = redis.call('TIME')
  version = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + 1
end
if cur and tonumber(cur) > version then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', version)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)


@dataclass(frozen=True)
class CacheLookup:
    """A cache read: `payload` on a hit; on a miss, Redis' clock for the later fill."""

    payload: bytes | None
    read_started_ms: int = 0

    @property
    def hit(self) -> bool:
        return self.payload is not None


def _tombstone_ttl_ms() -> int:
    return max(60_000, 4 * settings.CACHE_FILL_MAX_AGE_MS)


def versioned_cache_get(*, key: str) -> CacheLookup:
    """One round trip: the payload, or the moment (Redis time) a miss was seen."""
    found, value = _GET(keys=[key])
    if found:
        return CacheLookup(payload=value)
    return CacheLookup(payload=None, read_started_ms=int(value))


def versioned_cache_fill(*, key: str, version: int, payload: bytes, read_started_ms: int, ttl_seconds: int) -> bool:
    """Store `payload` unless a newer version is known or the read is too old; True if stored."""
    stored = _FILL(
        keys=[key],
        args=[version, payload, ttl_seconds * 1000, read_started_ms, settings.CACHE_FILL_MAX_AGE_MS],
    )
    return bool(stored)


def versioned_cache_invalidate(*, key: str, version: int) -> None:
    """Forget any payload older than or equal to `version` and refuse older fills."""
    _INVALIDATE(keys=[key], args=[version, _tombstone_ttl_ms()])


def timed_cache_get(*, key: str) -> CacheLookup:
    """For data without a version column: the read's Redis time is its version."""
    return versioned_cache_get(key=key)


def timed_cache_fill(*, key: str, payload: bytes, lookup: CacheLookup, ttl_seconds: int) -> bool:
    """Store data read from the database after `lookup` missed; refused if invalidated since."""
    return versioned_cache_fill(
        key=key,
        version=lookup.read_started_ms,
        payload=payload,
        read_started_ms=lookup.read_started_ms,
        ttl_seconds=ttl_seconds,
    )


def timed_cache_invalidate(*, key: str) -> None:
    """Call after the change committed: any fill whose read began before now (Redis time) is refused."""
    _INVALIDATE(keys=[key], args=[-1, _tombstone_ttl_ms()])
