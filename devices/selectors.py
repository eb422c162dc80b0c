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


def device_list(*, group_id: str | None = None, status: str | None = None) -> QuerySet[Device]:
    devices = Device.objects.all()
    if group_id is not None:
        devices = devices.filter(group_id=group_id)
    if status is not None:
        devices = devices.filter(status=status)
    return devices


# A credential belongs to one device for good (tokens are never reassigned), so
# the token -> device id mapping can be cached without invalidation; the
# device's state (decommissioned? deleted?) still comes from the version-guarded
# cache, so a mapping that outlives its device resolves to nothing.
DEVICE_TOKEN_CACHE_TTL_SECONDS = 3600


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
    client.set(key, str(device_id), ex=DEVICE_TOKEN_CACHE_TTL_SECONDS)
    return device_get(device_id=device_id)
