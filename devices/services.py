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

from devices.cache import (
    device_cache_invalidate,
    device_cache_invalidate_call,
    device_cache_invalidate_many,
    device_cache_invalidate_now,
    device_token_cache_key,
)
from devices.models import Device, DeviceStatus
from devices.sql import MARK_SEEN_DUE_SQL, MARK_SEEN_SET_SQL
from iot.errors import ServiceError
from iot.redis import ScriptCall, get_redis


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
    device_cache_invalidate_many(versions=rows)
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
    device_cache_invalidate_many(versions=[(device_id, version + 1) for device_id, version, _ in rows])
    token_keys = [device_token_cache_key(token_hash) for _, _, token_hash in rows]
    if token_keys:
        transaction.on_commit(lambda: get_redis().delete(*token_keys), robust=True)
    return len(rows)


def device_delete(*, device_id: uuid.UUID) -> None:
    """Delete one device (see `device_bulk_delete`). Raises `DeviceNotFound` for an unknown id."""
    if not device_bulk_delete(device_ids=[device_id]):
        raise DeviceNotFound(device_id)


_MARK_SEEN_SQL = f"""
UPDATE devices_device
SET {MARK_SEEN_SET_SQL}
WHERE id = ANY(%s)
  AND {MARK_SEEN_DUE_SQL}
RETURNING id, version
"""


def device_mark_seen(*, device_ids: list[uuid.UUID]) -> int:
    """Telemetry arrived: bump `last_seen` and make a new/inactive device `active`.

    One UPDATE of just those columns (never a read-modify-write of the row, so a
    concurrent PATCH is never overwritten), at most once every `LAST_SEEN_RESOLUTION_MS`
    per device. Returns how many rows changed. Telemetry's ingestion runs the same UPDATE
    inside its insert statement instead (`devices.sql.device_mark_seen_sql`).
    """
    with connection.cursor() as cursor:
        cursor.execute(_MARK_SEEN_SQL, [list(device_ids)])
        rows = cursor.fetchall()
    for device_id, version in rows:
        device_cache_invalidate(device_id=device_id, version=version)
    return len(rows)


def device_seen_changed(*, device_id: uuid.UUID, version: int) -> ScriptCall:
    """The mark-seen UPDATE changed the device's row, now at `version`: tombstone its cache entry
    now (inside the transaction, so the write fails rather than commits if Redis can't be told),
    and return the after-commit tombstone, which the caller MUST send once its transaction has
    committed (as `device_mark_seen` does through `device_cache_invalidate`).

    For a statement that embeds `devices.sql.device_mark_seen_sql`; only a returned version (the
    row really changed) needs it: an UPDATE that matched nothing changed nothing cached. The
    after-commit call is handed back so that it can travel with the caller's own after-commit
    Redis write (telemetry's publish: one round trip for both, `iot.redis.redis_script_calls`).
    """
    device_cache_invalidate_now(device_id=device_id, version=version)
    return device_cache_invalidate_call(device_id=device_id, version=version)


_STATUS_TRANSITION_SQL = """
UPDATE devices_device
SET status = %s, firmware_version = COALESCE(%s, firmware_version), version = version + 1, updated_at = now()
WHERE id = %s AND status = %s
RETURNING version
"""


def device_status_transition(
    *, device_id: uuid.UUID, from_status: str, to_status: str, firmware_version: str | None = None
) -> bool:
    """Move the device from `from_status` to `to_status` (and set `firmware_version` if given), only if
    it is in `from_status` now. Returns whether it changed.

    For a workflow that holds a device in a status for a while and hands it back (a firmware
    update's maintenance): one conditional UPDATE with the version bump, so a change someone made
    meanwhile (an operator decommissioning the device) is never overwritten, and a caller that
    read the status earlier cannot act on a stale read. The cache is tombstoned as by every write.
    """
    with connection.cursor() as cursor:
        cursor.execute(_STATUS_TRANSITION_SQL, [to_status, firmware_version, device_id, from_status])
        row = cursor.fetchone()
    if row is None:
        return False
    device_cache_invalidate(device_id=device_id, version=row[0])
    return True


# --- liveness ----------------------------------------------------------------------------------

# Devices made inactive per statement (one short transaction each): a fleet that went silent at once
# (a network outage, the platform itself down) is swept in bounded steps, each holding its row locks
# briefly (about a quarter of a second for 5000, measured), rather than one UPDATE of the whole fleet.
LIVENESS_BATCH_SIZE = 5000

_ACTIVE = DeviceStatus.ACTIVE.value
_SILENT_SINCE = "now() - %(silent_seconds)s * interval '1 second'"
_MARK_INACTIVE_SQL = f"""
UPDATE devices_device
SET status = '{DeviceStatus.INACTIVE.value}', version = version + 1
WHERE id IN (
        SELECT id FROM devices_device
        WHERE status = '{_ACTIVE}' AND last_seen < {_SILENT_SINCE}
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
  AND status = '{_ACTIVE}' AND last_seen < {_SILENT_SINCE}
RETURNING id, version
"""


def device_mark_inactive(*, silent_seconds: float, batch_size: int = LIVENESS_BATCH_SIZE) -> int:
    """Make every `active` device not seen for `silent_seconds` `inactive`; returns how many.

    The counterpart of `device_mark_seen`, whose next UPDATE for such a device makes it `active`
    again. Only `active` devices change: `registered` (never sent anything), `maintenance` and
    `decommissioned` are an operator's or a workflow's to change, never the clock's. `updated_at`
    is left alone, as by `device_mark_seen`: these are the device's own comings and goings.

    Set-based, never a query per device: per batch, ONE `UPDATE ... RETURNING id, version` and one
    Redis script call per 1000 rows (`device_cache_invalidate_many`) that tombstones each at its new
    version, inside the batch's transaction and again after commit, so `GET /devices/{id}` says `inactive` from the
    commit on. Rows another transaction holds (a point arriving for that device right now, an
    operator's PATCH) are skipped (`SKIP LOCKED`), not waited for: the next sweep sees them, if they
    are still silent. A concurrent `device_mark_seen` that commits first wins: Postgres rechecks
    `last_seen` on the row it locks, so a device that just spoke is never made inactive.

    There is deliberately no index on `last_seen`: the sweep scans the table once per run instead.
    Measured on 100 000 active devices (`bench/device_liveness.py`, 2 loaded cores, Postgres 15): the
    statement takes 13.5 ms with none stale (against 0.03 ms with a partial index on `last_seen`
    WHERE active), 40 ms when 1000 are (25 ms); end to end (UPDATE, tombstones, commit) 44 ms for 1000
    stale, 4.9 s for a whole fleet gone silent at once (20 batches). Every `DEVICE_LIVENESS_INTERVAL_SECONDS`
    (30 s), that scan is under 0.05% of a core. The index would be paid by ingestion instead: with
    `last_seen` indexed no `device_mark_seen` UPDATE is HOT any more (98% are without it), so each writes
    an entry in every index of the table: 0.25 ms against 0.20 ms per UPDATE and about 7 times the WAL
    (~2 kB against ~0.3 kB), up to once a second per device (`LAST_SEEN_RESOLUTION_MS`).
    """
    total = 0
    params = {"silent_seconds": silent_seconds, "limit": batch_size}
    while True:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(_MARK_INACTIVE_SQL, params)
                rows = cursor.fetchall()
            device_cache_invalidate_many(versions=rows)
        total += len(rows)
        if len(rows) < batch_size:
            return total
