import uuid

import pytest
from django.conf import settings

from devices.cache import device_cache_key, device_to_cache, device_token_cache_key
from devices.models import Device, DeviceStatus
from devices.selectors import device_get, device_get_by_token_hash
from devices.services import (
    device_bulk_delete,
    device_bulk_update,
    device_delete,
    device_mark_seen,
    device_register,
    device_token_hash,
    device_update,
)
from devices.testing import device_create
from iot.cache import versioned_cache_fill, versioned_cache_get
from iot.redis import get_redis

pytestmark = pytest.mark.django_db(transaction=True)


def test_register_creates_with_hashed_token():
    registration = device_create(location="Lab", metadata={"k": "v"})
    assert registration.created and registration.device_token
    device = Device.objects.get(pk=registration.device.pk)
    assert device.token_hash == device_token_hash(registration.device_token)
    assert registration.device_token not in device.token_hash
    assert (device.status, device.location, device.metadata, device.version) == ("registered", "Lab", {"k": "v"}, 1)


def test_register_existing_serial_returns_it_unchanged_without_token():
    first = device_create(location="A")
    again = device_register(
        serial_number=first.device.serial_number, device_type="gateway", firmware_version="9", location="B"
    )
    assert not again.created and again.device_token is None
    assert again.device.pk == first.device.pk and again.device.location == "A"


def test_update_bumps_version_and_invalidates_cache():
    device = device_create().device
    assert device_get(device_id=device.pk).location is None  # fills the cache
    assert versioned_cache_get(key=device_cache_key(device.pk)).hit
    updated = device_update(device_id=device.pk, changes={"location": "Roof"})
    assert updated.version == 2
    assert not versioned_cache_get(key=device_cache_key(device.pk)).hit
    assert device_get(device_id=device.pk).location == "Roof"


def test_update_unknown_device_and_unknown_fields():
    with pytest.raises(Device.DoesNotExist):
        device_update(device_id=uuid.uuid4(), changes={"location": "x"})
    with pytest.raises(ValueError):
        device_update(device_id=device_create().device.pk, changes={"serial_number": "x"})


def test_mark_seen_touches_only_its_columns():
    device = device_create(location="Keep me").device
    device_update(device_id=device.pk, changes={"status": DeviceStatus.MAINTENANCE})
    assert device_mark_seen(device_ids=[device.pk]) == 1
    row = Device.objects.get(pk=device.pk)
    # maintenance is an operator decision: telemetry does not override it
    assert (row.status, row.location) == ("maintenance", "Keep me")
    assert row.last_seen is not None


def test_mark_seen_activates_and_is_rate_limited_per_device():
    device = device_create().device
    assert device_mark_seen(device_ids=[device.pk]) == 1
    assert Device.objects.get(pk=device.pk).status == DeviceStatus.ACTIVE
    # within the resolution window a second touch costs no row update
    assert device_mark_seen(device_ids=[device.pk]) == 0


def test_bulk_update_changes_all_and_invalidates():
    devices = [device_create().device for _ in range(3)]
    for device in devices:
        device_get(device_id=device.pk)
    assert device_bulk_update(device_ids=[d.pk for d in devices], changes={"group_id": "g-1"}) == 3
    assert {device_get(device_id=d.pk).group_id for d in devices} == {"g-1"}


def test_cached_read_equals_uncached_read_to_the_microsecond():
    device = device_create(metadata={"nested": {"k": [1, 2.5, None]}}).device
    device_mark_seen(device_ids=[device.pk])
    uncached = device_get(device_id=device.pk)  # miss: from Postgres, fills the cache
    cached = device_get(device_id=device.pk)  # hit
    assert versioned_cache_get(key=device_cache_key(device.pk)).hit
    for field in Device._meta.concrete_fields:
        if field.attname != "token_hash":
            assert getattr(cached, field.attname) == getattr(uncached, field.attname), field.attname


def test_delete_forgets_the_device_and_its_credential_at_once():
    registration = device_create()
    device, token_hash = registration.device, device_token_hash(registration.device_token)
    device_update(device_id=device.pk, changes={"location": "Roof"})  # version 2
    assert device_get_by_token_hash(token_hash=token_hash).location == "Roof"  # caches mapping and device
    device_delete(device_id=device.pk)
    assert device_get(device_id=device.pk) is None
    assert device_get_by_token_hash(token_hash=token_hash) is None
    assert not get_redis().exists(device_token_cache_key(token_hash))  # dropped after commit
    assert not Device.objects.filter(pk=device.pk).exists()


def test_a_reader_that_read_before_the_delete_cannot_fill_the_cache_after_it():
    device = device_create().device
    device_update(device_id=device.pk, changes={"location": "Roof"})
    key = device_cache_key(device.pk)
    lookup = versioned_cache_get(key=key)  # a reader misses...
    stale = Device.objects.get(pk=device.pk)  # ...reads the row (version 2)...
    device_delete(device_id=device.pk)  # ...the delete commits...
    filled = versioned_cache_fill(  # ...and the reader's fill comes late, yet within CACHE_FILL_MAX_AGE_MS
        key=key,
        version=stale.version,
        payload=device_to_cache(stale),
        lookup=lookup,
        ttl_seconds=settings.DEVICE_CACHE_TTL_SECONDS,
    )
    assert not filled
    assert device_get(device_id=device.pk) is None


def test_delete_of_an_unknown_device_raises_and_bulk_delete_counts():
    with pytest.raises(Device.DoesNotExist):
        device_delete(device_id=uuid.uuid4())
    devices = [device_create().device for _ in range(3)]
    for device in devices:
        device_get(device_id=device.pk)
    assert device_bulk_delete(device_ids=[d.pk for d in devices[:2]] + [uuid.uuid4()]) == 2
    assert [device_get(device_id=d.pk) is None for d in devices] == [True, True, False]
