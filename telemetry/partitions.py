"""Partition DDL of `telemetry_point`: the daily partitions made ahead and dropped past retention.

The table is partitioned by day (`telemetry/migrations/0001_initial.py`) so that
retention is a `DROP TABLE` of whole days rather than a `DELETE` of billions of
rows, and so that a query for recent points touches only recent partitions. This
module creates the partitions of the retention window plus
`TELEMETRY_PARTITION_PREMAKE_DAYS` ahead, and drops those past
`TELEMETRY_RETENTION_SECONDS`. It runs from `telemetry.tasks` (beat, and whenever a
worker starts) and after every `migrate` (`telemetry.apps`), never on a request:
its locks are bounded by `lock_timeout`, and a run that times out is retried.

Kept apart from ingestion (`telemetry.services`), which only has to know that an
insert may meet an ATTACH in progress (see `_create_partition`).
"""

import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.utils import timezone

from telemetry.models import DEFAULT_PARTITION, TABLE

logger = logging.getLogger(__name__)

_PARTITION_NAME = re.compile(rf"^{TABLE}_p(\d{{8}})$")


def partition_name(day: date) -> str:
    return f"{TABLE}_p{day:%Y%m%d}"


def _day_bound(day: date) -> str:
    # A literal built from a date object (never from input), UTC midnight.
    return f"'{day.isoformat()} 00:00:00+00'"


@dataclass(frozen=True)
class PartitionWindow:
    """The days that must have a partition: from the oldest retained one to `ahead` days from today."""

    first: date
    last: date


def telemetry_partition_window(*, now: datetime | None = None) -> PartitionWindow:
    now = now or timezone.now()
    oldest = now - timedelta(seconds=settings.TELEMETRY_RETENTION_SECONDS)
    return PartitionWindow(
        first=oldest.astimezone(UTC).date(),
        last=now.astimezone(UTC).date() + timedelta(days=settings.TELEMETRY_PARTITION_PREMAKE_DAYS),
    )


def telemetry_partitions_list(*, using: str = DEFAULT_DB_ALIAS) -> dict[date, str]:
    """The daily partitions that exist, by day (the DEFAULT partition and foreign names excluded)."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass",
            [TABLE],
        )
        names = [row[0] for row in cursor.fetchall()]
    days = {}
    for name in names:
        match = _PARTITION_NAME.match(name)
        if match:
            days[datetime.strptime(match.group(1), "%Y%m%d").date()] = name
    return days


def _create_partition(*, day: date, using: str) -> bool:
    """Create the partition for `day` online; False if another process just did.

    `CREATE TABLE ... PARTITION OF` would hold an ACCESS EXCLUSIVE lock on the
    parent (stalling every insert and read) while it scans the DEFAULT partition.
    Instead: lock only the (small) DEFAULT partition, create a standalone table,
    move into it any rows of that day that landed in DEFAULT meanwhile, and
    ATTACH it, which needs only SHARE UPDATE EXCLUSIVE on the parent (inserts
    and reads go on). `lock_timeout` keeps a busy table from queueing traffic
    behind us: we fail and the next run retries.
    """
    name = partition_name(day)
    quoted = connections[using].ops.quote_name(name)
    low, high = _day_bound(day), _day_bound(day + timedelta(days=1))
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute("SET LOCAL lock_timeout = '5s'")
        cursor.execute(f"LOCK TABLE {DEFAULT_PARTITION} IN ACCESS EXCLUSIVE MODE")
        cursor.execute("SELECT to_regclass(%s)", [name])
        if cursor.fetchone()[0] is not None:
            return False
        cursor.execute(f"CREATE TABLE {quoted} (LIKE {TABLE} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        cursor.execute(
            f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE ts >= {low} AND ts < {high} RETURNING *) "
            f"INSERT INTO {quoted} SELECT * FROM moved"
        )
        moved = cursor.rowcount
        cursor.execute(f"ALTER TABLE {TABLE} ATTACH PARTITION {quoted} FOR VALUES FROM ({low}) TO ({high})")
    if moved:
        logger.info("partition %s created; %d points moved into it from %s", name, moved, DEFAULT_PARTITION)
    return True


def telemetry_partitions_ensure(*, now: datetime | None = None, using: str = DEFAULT_DB_ALIAS) -> list[str]:
    """Create the missing daily partitions of the retention window and the days ahead; return their names.

    Idempotent and safe to run from several processes at once.
    """
    window = telemetry_partition_window(now=now)
    existing = telemetry_partitions_list(using=using)
    created = []
    day = window.first
    while day <= window.last:
        if day not in existing and _create_partition(day=day, using=using):
            created.append(partition_name(day))
        day += timedelta(days=1)
    return created


def telemetry_partitions_drop_expired(*, now: datetime | None = None, using: str = DEFAULT_DB_ALIAS) -> list[str]:
    """Drop every daily partition entirely older than the retention; purge such rows from DEFAULT.

    A partition is dropped only when its upper bound is at or before
    `now - TELEMETRY_RETENTION_SECONDS`, so it holds nothing the API would still
    accept (ingestion refuses older timestamps). Dropping a partition needs a
    brief ACCESS EXCLUSIVE lock on the parent, bounded by a 1 s `lock_timeout`
    (on timeout the task fails and its retry, or the next run, tries again).
    (`DETACH PARTITION CONCURRENTLY` would avoid that lock but is not allowed
    on a table with a DEFAULT partition.)
    """
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.TELEMETRY_RETENTION_SECONDS)
    dropped = []
    for day, name in sorted(telemetry_partitions_list(using=using).items()):
        upper = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
        if upper > cutoff:
            break
        with transaction.atomic(using=using), connections[using].cursor() as cursor:
            # Short: while this waits for the parent's lock, every insert queues behind it.
            cursor.execute("SET LOCAL lock_timeout = '1s'")
            cursor.execute(f"DROP TABLE IF EXISTS {connections[using].ops.quote_name(name)}")
        dropped.append(name)
    with connections[using].cursor() as cursor:
        cursor.execute(f"DELETE FROM {DEFAULT_PARTITION} WHERE ts < %s", [cutoff])
        purged = cursor.rowcount
    if dropped or purged:
        logger.info("telemetry retention: dropped %s; %d old points purged from DEFAULT", dropped, purged)
    return dropped


@dataclass(frozen=True)
class MaintenanceReport:
    created: list[str]
    dropped: list[str]


def telemetry_partitions_maintain(*, now: datetime | None = None, using: str = DEFAULT_DB_ALIAS) -> MaintenanceReport:
    """Both halves of partition maintenance (what the beat task and the worker start-up run)."""
    return MaintenanceReport(
        created=telemetry_partitions_ensure(now=now, using=using),
        dropped=telemetry_partitions_drop_expired(now=now, using=using),
    )
