"""Reads of the device registry."""

import uuid

from django.conf import settings
from django.db.models import QuerySet

from devices.cache import device_cache_key, device_from_cache, device_to_cache, device_token_cache_key
from devices.models import Device
from iot.cache import versioned_cache_fill, versioned_cache_get
from iot.redis import get_redis


def device_get(*, device_id: uuid.UUID) -> Device | None:
    """The device, served from the version-guarded cache when possible.

    Never older than the newest write that has returned (see `iot.cache`).
    """
    key = device_cache_key(device_id)
    lookup = versioned_cache_get(key=key)
    if lookup.hit:
        return device_from_cache(lookup.payload)
    device = Device.objects.filter(pk=device_id).first()
    if device is not None:
        versioned_cache_fill(
            key=key,
            version=device.version,
            payload=device_to_cache(device),
            lookup=lookup,
            ttl_seconds=settings.DEVICE_CACHE_TTL_SECONDS,
        )
    return device


def device_list(
    *, serial_number: str | None = None, group_id: str | None = None, status: str | None = None
) -> QuerySet[Device]:
    devices = Device.objects.all()
    if serial_number is not None:
        devices = devices.filter(serial_number=serial_number)  # the unique index: at most one row
    if group_id is not None:
        devices = devices.filter(group_id=group_id)
    if status is not None:
        devices = devices.filter(status=status)
    return devices


def device_serial_numbers(*, device_ids: set[uuid.UUID]) -> dict[uuid.UUID, str]:
    """Serial numbers by device id, in one query (for lists of other apps' rows that carry only the id)."""
    if not device_ids:
        return {}
    return dict(Device.objects.filter(pk__in=device_ids).values_list("id", "serial_number"))


# A credential belongs to one device for good (tokens are never reassigned), so
# the token -> device id mapping can be cached without invalidation (for
# DEVICE_TOKEN_CACHE_TTL_SECONDS); the device's state (decommissioned? deleted?)
# still comes from the version-guarded cache, so a mapping that outlives its
# device resolves to nothing.
def device_get_by_token_hash(*, token_hash: str) -> Device | None:
    """The device a credential belongs to (two Redis reads on the hot path, no SQL)."""
    client = get_redis()
    key = device_token_cache_key(token_hash)
    cached_id = client.get(key)
    if cached_id is not None:
        return device_get(device_id=uuid.UUID(cached_id.decode()))
    device_id = Device.objects.filter(token_hash=token_hash).values_list("id", flat=True).first()
    if device_id is None:
        return None
    client.set(key, str(device_id), ex=settings.DEVICE_TOKEN_CACHE_TTL_SECONDS)
    return device_get(device_id=device_id)


def device_status_get(*, device_id: uuid.UUID) -> str | None:
    """The device's status from Postgres (not the cache), or None if no device has this id.

    For the error path of a write that found no live device (`devices.sql.device_live_sql`):
    it tells "unknown" from "decommissioned", read in the writer's transaction.
    """
    return Device.objects.filter(pk=device_id).values_list("status", flat=True).first()
