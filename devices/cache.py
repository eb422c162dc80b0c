"""The device read cache: how a Device is keyed, stored and invalidated in Redis.

Built on the version-guarded cache in `iot.cache`; the `version` column is the guard.
"""

from collections.abc import Iterable
from uuid import UUID

import orjson

from devices.models import Device
from iot.cache import (
    versioned_cache_invalidate,
    versioned_cache_invalidate_call,
    versioned_cache_invalidate_many_with_commit,
    versioned_cache_invalidate_with_commit,
)
from iot.redis import ScriptCall, redis_key

# The credential hash never leaves Postgres.
_CACHED_FIELDS = [f for f in Device._meta.concrete_fields if f.attname != "token_hash"]


def device_cache_key(device_id: UUID | str) -> str:
    return redis_key("cache", "device", device_id)


def device_token_cache_key(token_hash: str) -> str:
    """Credential hash -> device id (see `devices.selectors.device_get_by_token_hash`)."""
    return redis_key("cache", "device-token", token_hash)


def device_to_cache(device: Device) -> bytes:
    # orjson keeps datetimes to the microsecond (DjangoJSONEncoder would cut them to
    # milliseconds, so a cached read would differ from an uncached one).
    return orjson.dumps({f.attname: getattr(device, f.attname) for f in _CACHED_FIELDS})


def device_from_cache(payload: bytes) -> Device:
    raw = orjson.loads(payload)
    device = Device(**{f.attname: f.to_python(raw[f.attname]) for f in _CACHED_FIELDS})
    device._state.adding = False
    return device


def device_cache_invalidate(*, device_id: UUID | str, version: int) -> None:
    """Tombstone the cached device now and, if inside a transaction, again after commit."""
    versioned_cache_invalidate_with_commit(key=device_cache_key(device_id), version=version)


def device_cache_invalidate_now(*, device_id: UUID | str, version: int) -> None:
    """Only the tombstone now: for a writer that sends the after-commit one itself
    (`device_cache_invalidate_call`)."""
    versioned_cache_invalidate(key=device_cache_key(device_id), version=version)


def device_cache_invalidate_call(*, device_id: UUID | str, version: int) -> ScriptCall:
    """The tombstone of `device_cache_invalidate` as a script call, for a writer that sends its
    after-commit tombstone together with other Redis writes (one round trip)."""
    return versioned_cache_invalidate_call(key=device_cache_key(device_id), version=version)


def device_cache_invalidate_many(*, versions: Iterable[tuple[UUID | str, int]]) -> None:
    """`device_cache_invalidate` for many (device id, version) pairs, pipelined: what a set-based write
    (one UPDATE ... RETURNING id, version) calls, instead of one Redis round trip per row."""
    versioned_cache_invalidate_many_with_commit(
        versions={device_cache_key(device_id): version for device_id, version in versions}
    )
