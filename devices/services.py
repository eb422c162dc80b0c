"""Writes to the device registry. Every function is one atomic database operation.

No check-then-act anywhere: registration is one `INSERT ... ON CONFLICT DO
NOTHING`, updates are one `UPDATE` of only the columns they change (plus the
cache `version`), deletion is one `DELETE ... RETURNING`, so concurrent callers
in any number of processes can never create a duplicate device or overwrite each
other's fields. Every write that changes what a read returns tombstones the
device's cache entry inside its transaction and again after commit.
"""

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from devices.cache import device_cache_invalidate, device_token_cache_key
from devices.models import Device, DeviceStatus
from iot.errors import ServiceError
from iot.redis import get_redis


class DeviceNotFound(ServiceError, Device.DoesNotExist):
    """No device has this id (404).

    Also a `Device.DoesNotExist`, so a caller that catches the ORM's exception (the
    admin) needs no second clause.
    """

    status_code = 404
    default_detail = "No device with this id."

    def __init__(self, device_id: uuid.UUID) -> None:
        super().__init__()
        self.device_id = device_id


@dataclass(frozen=True)
class DeviceRegistration:
    device: Device
    created: bool
    # The plaintext credential, only when `created`: it is shown once and stored hashed.
    device_token: str | None


def device_token_hash(token: str) -> str:
    # The token carries 256 random bits, so a fast hash is enough (no brute force
    # is possible) and lets authentication look the device up by index.
    return hashlib.sha256(token.encode()).hexdigest()


_COLUMNS = [field.column for field in Device._meta.concrete_fields]
_COLUMNS_ATTNAMES = [field.attname for field in Device._meta.concrete_fields]
_INSERT_SQL = """
INSERT INTO devices_device
    (id, serial_number, device_type, firmware_version, status, location, group_id,
     metadata, registered_at, updated_at, version, token_hash)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 1, %s)
ON CONFLICT (serial_number) DO NOTHING
RETURNING {columns}
""".format(columns=", ".join(_COLUMNS))


def device_register(
    *,
    serial_number: str,
    device_type: str,
    firmware_version: str,
    location: str | None = None,
    group_id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> DeviceRegistration:
    """Register a device, or return the existing one with that serial number, unchanged.

    Concurrent calls for one serial number block on the unique index inside
    Postgres until the first commits; exactly one inserts, all get its row.
    """
    token = secrets.token_urlsafe(32)
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            _INSERT_SQL,
            [
                uuid.uuid4(),
                serial_number,
                device_type,
                firmware_version,
                DeviceStatus.REGISTERED,
                location,
                group_id,
                Device._meta.get_field("metadata").get_db_prep_value(metadata or {}, connection),
                now,
                now,
                device_token_hash(token),
            ],
        )
        inserted = cursor.fetchone()
    if inserted is not None:
        # RETURNING gave us the whole row: no second query.
        values = [
            field.from_db_value(value, None, connection) if hasattr(field, "from_db_value") else value
            for field, value in zip(Device._meta.concrete_fields, inserted, strict=True)
        ]
        device = Device.from_db(connection.alias, _COLUMNS_ATTNAMES, values)
        return DeviceRegistration(device=device, created=True, device_token=token)
    # READ COMMITTED: this statement sees the row the conflicting transaction committed.
    return DeviceRegistration(device=Device.objects.get(serial_number=serial_number), created=False, device_token=None)


UPDATABLE_FIELDS = frozenset({"location", "status", "group_id", "metadata", "device_type", "firmware_version"})


@transaction.atomic
def device_update(*, device_id: uuid.UUID, changes: dict[str, Any]) -> Device:
    """Set the given fields (a sent field replaces its value) and return the new row.

    Raises `DeviceNotFound` for an unknown id.
    """
    unknown = set(changes) - UPDATABLE_FIELDS
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    updated = Device.objects.filter(pk=device_id).update(**changes, version=F("version") + 1, updated_at=timezone.now())
    if not updated:
        raise DeviceNotFound(device_id)
    device = Device.objects.get(pk=device_id)
    device_cache_invalidate(device_id=device.pk, version=device.version)
    return device


@transaction.atomic
def device_bulk_update(*, device_ids: list[uuid.UUID], changes: dict[str, Any]) -> int:
    """The same change for many devices (admin bulk actions); returns how many changed."""
    unknown = set(changes) - UPDATABLE_FIELDS
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    with connection.cursor() as cursor:
        assignments = ", ".join(f"{connection.ops.quote_name(name)} = %s" for name in changes)
        cursor.execute(
            f"UPDATE devices_device SET {assignments}, version = version + 1, updated_at = now() "
            "WHERE id = ANY(%s) RETURNING id, version",
            [*changes.values(), list(device_ids)],
        )
        rows = cursor.fetchall()
    for device_id, version in rows:
        device_cache_invalidate(device_id=device_id, version=version)
    return len(rows)


_DELETE_SQL = "DELETE FROM devices_device WHERE id = ANY(%s) RETURNING id, version, token_hash"


@transaction.atomic
def device_bulk_delete(*, device_ids: list[uuid.UUID]) -> int:
    """Delete devices; from the commit on, no process reads or authenticates them. Returns how many.

    Without this, a deleted device stayed in the read cache: `GET /devices/{id}`
    answered `200` and its credential authenticated until the entry's TTL
    (`DEVICE_CACHE_TTL_SECONDS`) ran out.

    One `DELETE ... RETURNING` (it waits for a concurrent update of a row, then
    returns its final version), then a tombstone at that version + 1, inside the
    transaction and again after commit (`device_cache_invalidate`). Every fill
    comes from a read of a committed row; before the commit that row is at most
    the returned version (the DELETE holds its lock), after it there is no row to
    read. So no fill of any version can land, whoever read when; an `update`-style
    tombstone at the row's own version would still admit a reader's fill of it.

    The credential -> device id mapping (`device_token_cache_key`) needs no
    tombstone: a mapping to a deleted id resolves to no device. It is dropped after
    commit to free the memory, not for correctness.

    Telemetry points reference a device by id without a foreign key (a partitioned
    table): they stay, unreachable through the device, until retention drops their
    partition; ingestion already refuses points for an id with no device row.
    """
    with connection.cursor() as cursor:
        cursor.execute(_DELETE_SQL, [list(device_ids)])
        rows = cursor.fetchall()
    for device_id, version, _ in rows:
        device_cache_invalidate(device_id=device_id, version=version + 1)
    token_keys = [device_token_cache_key(token_hash) for _, _, token_hash in rows]
    if token_keys:
        transaction.on_commit(lambda: get_redis().delete(*token_keys), robust=True)
    return len(rows)


def device_delete(*, device_id: uuid.UUID) -> None:
    """Delete one device (see `device_bulk_delete`). Raises `DeviceNotFound` for an unknown id."""
    if not device_bulk_delete(device_ids=[device_id]):
        raise DeviceNotFound(device_id)


# Telemetry touches `last_seen` at most this often per device, so a device
# streaming many points a second costs one row update (and one cache refill) a second.
LAST_SEEN_RESOLUTION_MS = 1000

# The statuses a device leaves for `active` when its telemetry arrives; SQL literals made from the enum.
_WAKING_STATUSES = ", ".join(f"'{status.value}'" for status in (DeviceStatus.REGISTERED, DeviceStatus.INACTIVE))

_MARK_SEEN_SQL = f"""
UPDATE devices_device
SET last_seen = now(),
    status = CASE WHEN status IN ({_WAKING_STATUSES}) THEN '{DeviceStatus.ACTIVE.value}' ELSE status END,
    version = version + 1
WHERE id = ANY(%s)
  AND (last_seen IS NULL
       OR last_seen < now() - interval '{LAST_SEEN_RESOLUTION_MS} milliseconds'
       OR status IN ({_WAKING_STATUSES}))
RETURNING id, version
"""


def device_mark_seen(*, device_ids: list[uuid.UUID]) -> int:
    """Telemetry arrived: bump `last_seen` and make a new/inactive device `active`.

    One UPDATE of just those columns (never a read-modify-write of the row, so a
    concurrent PATCH is never overwritten). Returns how many rows changed.
    """
    with connection.cursor() as cursor:
        cursor.execute(_MARK_SEEN_SQL, [list(device_ids)])
        rows = cursor.fetchall()
    for device_id, version in rows:
        device_cache_invalidate(device_id=device_id, version=version)
    return len(rows)
