"""SQL of the device registry that other apps may embed in their own statements.

Another app's raw SQL never names `devices_device` or a status literal: it asks
here, so a renamed table, column or status changes one place, owned by this app.
Fragments come with their parameters (`%s` placeholders: they work in Django's
cursor and in a plain psycopg one).
"""

import uuid

from django.db import connection

from devices.models import Device, DeviceStatus

_quote = connection.ops.quote_name
_TABLE = _quote(Device._meta.db_table)
_ID = _quote(Device._meta.pk.column)
_STATUS = _quote(Device._meta.get_field("status").column)
_GROUP = _quote(Device._meta.get_field("group_id").column)

# A subquery in FROM, which Postgres pulls up into the statement that embeds it: in the
# telemetry insert, EXPLAIN shows the same plan as the join it replaced (one index scan
# of the primary key, the status as its filter), and 1-point and 100-point inserts took
# the same time within noise (0.24 against 0.25 ms median per single-point statement).
_LIVE_DEVICE_SQL = f"(SELECT {_ID} AS id, {_GROUP} AS group_id FROM {_TABLE} WHERE {_ID} = %s AND {_STATUS} <> %s)"


def device_live_sql(*, device_id: uuid.UUID) -> tuple[str, list]:
    """A FROM item with the columns `id` and `group_id`: one row if the device exists and
    may still send data (is not decommissioned), else none; and its parameters, in order.

    For a statement that must write only for a live device, in one round trip:
    joined to it, the statement does nothing for an unknown or decommissioned
    device (`devices.selectors.device_status_get` then says which).
    """
    return _LIVE_DEVICE_SQL, [device_id, DeviceStatus.DECOMMISSIONED.value]


# Telemetry touches `last_seen` at most this often per device, so a device
# streaming many points a second costs one row update (and one cache refill) a second.
LAST_SEEN_RESOLUTION_MS = 1000

_LAST_SEEN = _quote(Device._meta.get_field("last_seen").column)
_VERSION = _quote(Device._meta.get_field("version").column)
# The statuses a device leaves for `active` when its telemetry arrives; SQL literals made from the enum.
_WAKING_STATUSES = ", ".join(f"'{status.value}'" for status in (DeviceStatus.REGISTERED, DeviceStatus.INACTIVE))
# What telemetry arriving does to a device row, and when it is due: `last_seen` more than
# LAST_SEEN_RESOLUTION_MS old (or never set), or a status that telemetry wakes up.
MARK_SEEN_SET_SQL = f"""{_LAST_SEEN} = now(),
    {_STATUS} = CASE WHEN {_STATUS} IN ({_WAKING_STATUSES}) THEN '{DeviceStatus.ACTIVE.value}' ELSE {_STATUS} END,
    {_VERSION} = {_VERSION} + 1"""
MARK_SEEN_DUE_SQL = f"""({_LAST_SEEN} IS NULL
       OR {_LAST_SEEN} < now() - interval '{LAST_SEEN_RESOLUTION_MS} milliseconds'
       OR {_STATUS} IN ({_WAKING_STATUSES}))"""


def device_mark_seen_sql(*, device_id_sql: str) -> str:
    """`devices.services.device_mark_seen`'s UPDATE for the one device whose id is the SQL
    expression `device_id_sql` (no parameters of its own), `RETURNING version`: one row iff it
    changed the row, i.e. bumped `last_seen` and/or woke the status.

    For a data-modifying CTE of another app's statement (telemetry's insert), so the points and
    the device's `last_seen` are written in one round trip. Whoever embeds it must then do what
    `device_mark_seen` does with a returned version: `devices.services.device_seen_changed`.
    A NULL `device_id_sql` (no such device) updates nothing.
    """
    return (
        f"UPDATE {_TABLE} SET {MARK_SEEN_SET_SQL} WHERE {_ID} = {device_id_sql} AND {MARK_SEEN_DUE_SQL} "
        f"RETURNING {_VERSION}"
    )


_IN_GROUP_SQL = f"(SELECT {_ID} FROM {_TABLE} WHERE {_GROUP} = %s)"


def device_group_member_ids_sql(*, group_id: str) -> tuple[str, list]:
    """A subquery of the ids of the devices now in `group_id` (for `... IN <it>`), and its parameters."""
    return _IN_GROUP_SQL, [group_id]
