"""Reads of the device registry."""

import uuid

from django.conf import settings
from django.db.models import QuerySet

from devices.cache import device_cache_key, device_from_cache, device_to_cache
from devices.models import Device
from iot.cache import versioned_cache_fill, versioned_cache_get


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
            read_started_ms=lookup.read_started_ms,
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


def device_get_by_token_hash(*, token_hash: str) -> Device | None:
    return Device.objects.filter(token_hash=token_hash).only("id", "status", "serial_number").first()
