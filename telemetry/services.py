"""Writes of the telemetry pipeline: ingestion (partition maintenance is `telemetry.partitions`).

Ingestion (`telemetry_points_ingest`) does, in this order and nothing else:

1. admission (`iot.admission.ingest_admit`): ONE Lua script that checks the event
   queue's backpressure thresholds and its room, takes the points from the device's
   sliding window and the global second, and reserves the points' room in the queue,
   all or nothing (no check-then-act);
2. one transaction: a single statement, the multi-row INSERT (arrays bound once and
   `unnest`ed by Postgres, joined to the device row so an unknown device inserts
   nothing; `ON CONFLICT (device_id, metric, ts) DO NOTHING`, so a point stored already
   is not stored again) with the device's mark-seen UPDATE as a data-modifying CTE of
   the same statement (`devices.sql.device_mark_seen_sql`); then the stored-points hooks
   (alert rules) with the points stored now; then the device-cache tombstone if the
   UPDATE changed the row; commit;
3. after commit (`transaction.on_commit`), publish one "telemetry.points" event
   weighted by the number of points stored, consuming the reservation.

**Duplicates.** A point is identified by (device, metric, timestamp) (the unique index of
migration 0003). One stored already (an MQTT QoS 1 redelivery, an HTTP retry without an
Idempotency-Key) or repeated within its batch is skipped by the insert; the request is still
accepted whole (202, `IngestResult.duplicates` says how many were skipped) and the first value
stays. Everything downstream sees only the points stored now: the hooks (a redelivered point is
not evaluated twice), the event (so the live feed and the Redis message counters count each
point once; the reconciliation from Postgres counts rows anyway) and `accepted` in
`iot_telemetry_points_total` (the skipped ones are counted as `duplicate`). A request of
duplicates only publishes nothing and gives its reserved room back. Admission runs before the
insert can tell, so a retry takes its points from the rate limit like any request. Cost
(`bench/telemetry_dedup.py`: the statement on 1M rows, 2 loaded cores, two runs): the unique
index alone costs nothing measurable (0.98-1.01x); the speculative insertion of `ON CONFLICT`
(and returning the stored columns) costs the rest: a single point 0.29-0.33 -> 0.34-0.41 ms
(+0.05-0.08 ms wall, +0.02-0.03 ms of this process's CPU), 100 points 0.66-0.71 -> 0.93-1.05 ms,
1000 points 7.2-8.0 -> 11.1-12.7 ms (+3-5 us per point, 1.4-1.6x). A plain INSERT first, retried
with `ON CONFLICT` only after a unique violation, would cost nothing on fresh points but twice
the work, a rollback and a Postgres ERROR log line per duplicate: not done.

So an accepted point costs two Redis round trips here (admission; after the commit, the
publish, with the device's after-commit cache tombstone in the same round trip; plus the
in-transaction tombstone when the device's row changed, at most once a second per device)
and three Postgres round trips (psycopg's BEGIN, the statement, the commit); before issue 12
it was three to five and four (`bench/ingest_round_trips.py` has the figures). Sending the
BEGIN with the statement in one psycopg pipeline was measured and dropped: one round trip
fewer, but 0.05 ms more CPU and no faster (0.76 against 0.71 ms wall per transaction).

No lock of any kind is taken by the application: a batch touches one device row
(and only when `last_seen` is more than a second old). That row stays locked from the
statement to the commit, i.e. over the hooks too (no round trip in the steady state; one
upsert when rules are violated). A point that a concurrent transaction has inserted and
not committed makes the insert wait for it (then skip the point, or store it if that one
rolled back): a retry racing its original waits for it and never stores twice. Two
concurrent batches of one device holding common points in *different orders* could
deadlock; Postgres then aborts one after `deadlock_timeout` (1 s), answered 503 +
Retry-After (its retry is harmless). Sorting every batch to rule that out cost ~5-10% more
per statement for a case no known client produces (retries and redeliveries repeat the
same bytes), so it is not done.

**Publish after commit**: a 202 means the points are in Postgres. The publish then
cannot be refused for room: admission reserved it (a request that would not fit is
refused with 503 before anything is stored). If Redis is unreachable at that moment
(or the reservation expired, see `EVENT_QUEUE_RESERVATION_TTL_SECONDS`, and the queue
is full), the points stay stored and the request is still answered 202; only the
derived event (live push, fleet counters, alerting) is lost, and
`iot_telemetry_events_lost_total{reason}` counts it. Publishing before the commit
would instead risk events for points that were never stored. A refusal after admission
(unknown device, database error) releases the reservation; a request whose caller's
transaction rolls back after ingesting (an Idempotency-Key request failing later), or
whose process dies before its publish, leaves it to expire.

Points taken by the rate limiter are not given back when a later step refuses
the request (unknown device: 422; Postgres down: 503): the limiter has no refund,
and a refund would reopen the check-then-act window it exists to close.

**The transaction and the hooks.** The hooks run between the statement and the commit
because alerts' evaluation may write (an alert upsert, an outbox row) and its writes
must commit or roll back with the points: no accepted point unevaluated. The statement
alone, autocommitted, is one round trip instead of three (measured 0.13 against 0.20 ms
CPU, 0.61 against 0.73 ms wall). It is safe only when the statement itself can tell that
no hook will write: each hook would give a SQL predicate for "nothing to evaluate" (alerts:
both rule-scope versions 0, no rule for the device or its group), the insert and the
mark-seen UPDATE would be gated on it, and when it fails (nothing inserted) the batch would
go through the transaction as now, four round trips. Not done: a fleet with group rules
pays more, and a wider gate (rules this process holds at the versions the statement sees,
none violated) needs the device's group before the statement.

Every refusal is a `TelemetryRejected` (an `iot.errors.ServiceError`) that
carries its HTTP answer, and is counted here in `iot_telemetry_points_total` by
outcome; points are counted `accepted` after the commit, with the publish.
"""

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import psycopg
import redis
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, connections, transaction
from django.utils import timezone

from devices.selectors import device_status_get
from devices.services import device_seen_changed
from devices.sql import device_live_sql, device_mark_seen_sql
from iot.admission import ingest_admit
from iot.errors import ServiceError
from iot.event_queue import Admission, EventQueueFull, Reservation, event_queue_publish, event_queue_release
from iot.ratelimit import RateLimitDecision
from iot.redis import ScriptCall, get_redis, redis_script_calls
from telemetry.metrics import EVENTS_LOST, count_points
from telemetry.models import TABLE, DeviceMessageCount, MessageCountWatermark
from telemetry.redis_keys import ERRORS_DAYS, count_window_start, errors_day_key

logger = logging.getLogger(__name__)

EVENT_TYPE = "telemetry.points"


@dataclass(frozen=True)
class PointColumns:
    """A validated batch for one device, column-wise: exactly what the INSERT binds.

    `timestamps` are timezone-aware (UTC); `values` are finite floats; the three
    lists have the same length (at least 1).
    """

    device_id: uuid.UUID
    metrics: list[str]
    timestamps: list[datetime]
    values: list[float]

    def __len__(self) -> int:
        return len(self.metrics)


def rate_limit_headers(decision: RateLimitDecision) -> dict[str, str]:
    """`X-RateLimit-Limit/-Remaining`: on every 202, and on the refusals the limiter decided."""
    return {"X-RateLimit-Limit": str(decision.limit), "X-RateLimit-Remaining": str(decision.remaining)}


@dataclass(frozen=True)
class IngestResult:
    """A request's points, all accepted: `stored` now, `duplicates` stored before (or repeated in it)."""

    count: int
    rate_limit: RateLimitDecision
    stored: int

    @property
    def duplicates(self) -> int:
        return self.count - self.stored

    @property
    def headers(self) -> dict[str, str]:
        return rate_limit_headers(self.rate_limit)


class TelemetryRejected(ServiceError):
    """Base of every refusal of `telemetry_points_ingest`; nothing was stored.

    `outcome` is the label it is counted under in `iot_telemetry_points_total`.
    """

    outcome = "invalid"


class TelemetryBackpressure(TelemetryRejected):
    """The event queue is past its warning (429 `busy`) or critical (503 `overloaded`) threshold,
    or has no room for these points beside what is queued and reserved (503 `overloaded`)."""

    outcome = "backpressure"

    def __init__(self, admission: Admission):
        critical = admission.state in ("critical", "full")
        self.status_code = 503 if critical else 429
        self.code = "overloaded" if critical else "busy"
        super().__init__(
            "The platform is overloaded; retry later." if critical else "The platform is busy; slow down.",
            headers={"Retry-After": str(max(admission.retry_after_seconds, 1))},
        )
        self.admission = admission


class TelemetryRateLimited(TelemetryRejected):
    """The device's window or the global second has no room for these points (429 + Retry-After)."""

    outcome = "rate_limited"
    status_code = 429
    code = "rate_limited"

    def __init__(self, decision: RateLimitDecision):
        super().__init__(
            f"Rate limit exceeded (device): at most {decision.limit} points per device per window."
            if decision.scope == "device"
            else "Global telemetry rate limit exceeded; retry in a moment.",
            headers={"Retry-After": str(max(decision.retry_after_seconds, 1)), **rate_limit_headers(decision)},
            scope=decision.scope,
        )
        self.decision = decision


class TelemetryBatchOverLimit(TelemetryRejected):
    """More points in one request than the device may send in a whole window: it can never pass.

    A 429 because the seed's clients expect one for an oversized burst, but with no
    Retry-After: waiting never helps; only a smaller batch (or a higher limit) does.
    Counted as `invalid`, like any request that no retry can make acceptable.
    """

    status_code = 429
    code = "batch_exceeds_limit"

    def __init__(self, decision: RateLimitDecision, points: int):
        super().__init__(
            f"{points} points can never fit the per-device limit of {decision.limit} points per "
            f"{settings.RATE_LIMIT_WINDOW_SECONDS} s; split the batch.",
            headers=rate_limit_headers(decision),
            limit=decision.limit,
            points=points,
        )
        self.decision = decision
        self.points = points


class TelemetryRetryLater(TelemetryRejected):
    """A transient conflict with partition maintenance that a retry resolves (503 + Retry-After)."""

    outcome = "backpressure"
    status_code = 503
    code = "retry_later"
    default_detail = "Telemetry storage is being reorganised; retry shortly."

    def __init__(self, detail: str | None = None):
        super().__init__(detail, headers={"Retry-After": "1"})


class TelemetryUnknownDevice(TelemetryRejected):
    """No device has this id (422, on the `device_id` field)."""

    status_code = 422
    field = "device_id"


class TelemetryDeviceDecommissioned(TelemetryRejected):
    """The device is decommissioned and sends no more telemetry (422, on the `device_id` field)."""

    status_code = 422
    field = "device_id"


# One statement for the whole batch. The device row is joined rather than
# referenced by a foreign key: a foreign key costs a trigger query per inserted
# row, the join costs one primary-key probe per statement and also tells us
# (no row) that the device is unknown or decommissioned. Which devices may
# send is the devices app's to say (`device_live_sql`). Parameters are bound
# server-side in binary (`%b`): Django's client-side cursor would format every
# array element as text in Python, measured at ~1.6 ms of CPU per 100-point batch
# against ~0.45 ms in binary.
#
# A point is identified by (device_id, metric, ts) (the unique index of migration 0003): one
# already stored, or one that repeats an earlier point of the same batch, is skipped by
# `ON CONFLICT DO NOTHING`, so an MQTT redelivery or an HTTP retry without an Idempotency-Key
# stores nothing twice; the first stored value stays. A concurrent insert of the same point
# waits for the other transaction and then skips it (or stores it, if that one rolled back).
_INSERT_SQL = f"""
INSERT INTO {TABLE} (device_id, metric, ts, value)
SELECT d.id, p.metric, p.ts, p.value
FROM {{device}} AS d
CROSS JOIN unnest(%b::varchar[], %b::timestamptz[], %b::float8[]) AS p (metric, ts, value)
ON CONFLICT (device_id, metric, ts) DO NOTHING
"""


# The insert, and the device's group as the same statement saw it, for the stored-points hooks
# (alert rules may be scoped to a group): no second round trip, no other snapshot; and `now()`,
# the points' `received_at` exactly (the column's default), for the derived event: the message
# counters put a point in the same minute as the reconciliation from Postgres will. The device's
# mark-seen UPDATE is a CTE of the same statement (`{seen}`, the devices app's SQL; it updates
# nothing for a missing device), returning the row's new version iff it changed it. Whether the
# device row was found is returned apart from the count: a batch of duplicates inserts nothing
# for a live device too. When fewer rows were inserted than sent (the `%b` after the arrays), the
# stored points come back as three arrays, so the hooks and the event see exactly those; the
# CASE leaves them unevaluated otherwise (Postgres runs a subquery only when its value is
# needed), so a batch without duplicates pays nothing for it. Ordered by (metric, ts), unique
# among the stored rows, the three arrays line up. Hooks may add scalar expressions of their
# own over `d` (see `telemetry_points_stored_hook_register`).
_STORE_SQL = f"""
WITH d AS {{device}}, ins AS ({_INSERT_SQL.format(device="d")} RETURNING metric, ts, value), seen AS ({{seen}})
SELECT (SELECT count(*) FROM ins), EXISTS (SELECT FROM d), (SELECT group_id FROM d), now(),
    (SELECT version FROM seen),
    CASE WHEN (SELECT count(*) FROM ins) < %b THEN (SELECT array_agg(metric ORDER BY metric, ts) FROM ins) END,
    CASE WHEN (SELECT count(*) FROM ins) < %b THEN (SELECT array_agg(ts ORDER BY metric, ts) FROM ins) END,
    CASE WHEN (SELECT count(*) FROM ins) < %b THEN (SELECT array_agg(value ORDER BY metric, ts) FROM ins) END{{extra}}
"""


@dataclass(frozen=True)
class _PointsStoredHook:
    function: Callable[..., object]
    # keyword argument -> scalar SQL expression over `d`, evaluated by the insert statement itself.
    sql: dict[str, str]


# Functions run inside the ingest transaction once a batch is inserted, with
# `device_id, group_id, metrics, values, timestamps` (keyword arguments). Registered by the
# apps built on telemetry (alerts evaluates its rules here, in `AlertsConfig.ready`), so
# telemetry never imports them. An exception from a hook refuses the whole request and
# stores nothing: no point is ever accepted without having been evaluated.
_points_stored_hooks: list[_PointsStoredHook] = []
_store_sql: list[str] = []  # the statement with every hook's expressions, built once hooks are known


def telemetry_points_stored_hook_register(*, hook: Callable[..., object], sql: dict[str, str] | None = None) -> None:
    """Run `hook` for every stored batch, in its transaction (idempotent: a hook is added once).

    `sql` maps extra keyword arguments of the hook to scalar SQL expressions over `d`, the
    device row the insert joins (columns `id`, `group_id`), which the insert statement
    evaluates in its own snapshot and returns: what a hook needs from the database costs
    no round trip of its own (alerts reads its rule versions this way, so a device with no
    rule costs no Redis call either). An expression names only its own app's tables; its
    value is None when the device row is missing (then no hook runs anyway).
    """
    if any(registered.function == hook for registered in _points_stored_hooks):
        return
    _points_stored_hooks.append(_PointsStoredHook(function=hook, sql=dict(sql or {})))
    _store_sql.clear()


def _points_stored_hooks_run(*, points: PointColumns, group_id: str | None, returned: Sequence) -> None:
    """Call every stored-points hook with the points stored and the values its `sql` expressions returned
    (in `returned`, the statement's extra columns, in registration order)."""
    position = 0
    for hook in _points_stored_hooks:
        extra = {}
        for name in hook.sql:
            extra[name] = returned[position]
            position += 1
        hook.function(
            device_id=points.device_id,
            group_id=group_id,
            metrics=points.metrics,
            values=points.values,
            timestamps=points.timestamps,
            **extra,
        )


def _store_statement() -> str:
    if not _store_sql:
        extra = "".join(
            f", (SELECT {expression} FROM d)" for hook in _points_stored_hooks for expression in hook.sql.values()
        )
        seen = device_mark_seen_sql(device_id_sql="(SELECT id FROM d)")

        # Braces in an expression are literal SQL, not placeholders of the later `.format(device=...)`.
        def literal(sql: str) -> str:
            return sql.replace("{", "{{").replace("}", "}}")

        _store_sql.append(_STORE_SQL.replace("{extra}", literal(extra)).replace("{seen}", literal(seen)))
    return _store_sql[0]


def _is_partition_race(exc: IntegrityError) -> bool:
    """An insert routed to DEFAULT while the day's partition was being attached.

    Such an insert waits on the DEFAULT partition's lock (taken by `telemetry.partitions`),
    and when the ATTACH commits the DEFAULT partition's constraint no longer admits that
    day: "new row for relation ... violates partition constraint". Tried again, the row
    is routed to the new partition.
    """
    cause = exc.__cause__
    return isinstance(cause, psycopg.errors.CheckViolation) and "partition constraint" in str(cause)


@dataclass(frozen=True)
class _Stored:
    """What the insert statement saw and what is still due after the commit."""

    received_at: datetime
    group_id: str | None
    device_tombstone: ScriptCall | None  # the device's after-commit cache tombstone, if its row changed
    points: PointColumns  # the points this statement stored: the batch, less what was stored already


_MISSING = object()


def _stored_points(*, batch: PointColumns, metrics: list, timestamps: list, values: list) -> PointColumns:
    """The points of `batch` that the insert stored (given column-wise as the statement returned them),
    in the batch's order and with the values stored: a point repeated within the batch appears once,
    with its first value (the one `ON CONFLICT DO NOTHING` kept)."""
    stored = {(metric, ts): value for metric, ts, value in zip(metrics, timestamps, values, strict=True)}
    kept: tuple[list, list, list] = ([], [], [])
    for metric, ts in zip(batch.metrics, batch.timestamps, strict=True):
        value = stored.pop((metric, ts), _MISSING)
        if value is not _MISSING:
            kept[0].append(metric)
            kept[1].append(ts)
            kept[2].append(value)
    for (metric, ts), value in stored.items():  # none in practice; what Postgres stored is the truth
        kept[0].append(metric)
        kept[1].append(ts)
        kept[2].append(value)
    return PointColumns(device_id=batch.device_id, metrics=kept[0], timestamps=kept[1], values=kept[2])


def _insert_points(*, batch: PointColumns) -> _Stored:
    """Insert the batch (or raise); its `received_at` and the device's group, as the statement saw them."""
    owns_transaction = not connections[DEFAULT_DB_ALIAS].in_atomic_block
    try:
        return _insert_points_once(batch=batch)
    except IntegrityError as exc:
        if not _is_partition_race(exc):
            raise
        # Inside a caller's transaction (an Idempotency-Key request) the failed statement has
        # aborted it: the request is refused with 503 and its retry runs afresh.
        if not owns_transaction:
            raise TelemetryRetryLater() from exc
        logger.info("insert for %s met a partition being attached; retrying once", batch.device_id)
        try:
            return _insert_points_once(batch=batch)
        except IntegrityError as again:
            if _is_partition_race(again):
                raise TelemetryRetryLater() from again
            raise


def _insert_points_once(*, batch: PointColumns) -> _Stored:
    db = connections[DEFAULT_DB_ALIAS]
    # No savepoint when a caller's transaction surrounds this (an Idempotency-Key request): a
    # savepoint costs two round trips, and a database error fails the whole request anyway.
    # The refusals below are raised outside the block, so they leave a caller's transaction usable.
    with transaction.atomic(savepoint=False):
        db.ensure_connection()
        # A plain (server-side binding) psycopg cursor on Django's connection: same transaction,
        # and wrap_database_errors turns psycopg errors into Django's (503 for an outage).
        device_sql, device_params = device_live_sql(device_id=batch.device_id)
        with db.wrap_database_errors, psycopg.Cursor(db.connection) as cursor:
            sent = len(batch)
            cursor.execute(
                _store_statement().format(device=device_sql),
                [*device_params, batch.metrics, batch.timestamps, batch.values, sent, sent, sent],
            )
            row = cursor.fetchone()
        inserted, found, group_id, received_at, seen_version, metrics, timestamps, values, *returned = row
        if found:
            points = batch
            if inserted < sent:
                points = _stored_points(
                    batch=batch, metrics=metrics or [], timestamps=timestamps or [], values=values or []
                )
            # Only the points stored now are evaluated: a redelivered or retried point was evaluated
            # when it was first stored (and the first value stays, so the alert it raised is right).
            if inserted:
                _points_stored_hooks_run(points=points, group_id=group_id, returned=returned)
            tombstone = None
            if seen_version is not None:  # the statement bumped last_seen (or woke the device)
                tombstone = device_seen_changed(device_id=batch.device_id, version=seen_version)
            return _Stored(received_at=received_at, group_id=group_id, device_tombstone=tombstone, points=points)
        # Nothing was inserted (nothing to undo): the join found no (live) device. The error
        # path may cost a second query to say which.
        status = device_status_get(device_id=batch.device_id)
    if status is None:
        raise TelemetryUnknownDevice(f"No device with id {batch.device_id}.")
    raise TelemetryDeviceDecommissioned(f"Device {batch.device_id} is decommissioned.")


def _event_payload(*, batch: PointColumns, received_at: datetime, group_id: str | None) -> dict:
    """The "telemetry.points" event: the points column-wise, as the request carried them.

    `{"event_id", "device_id", "group_id", "received_at", "metrics": [...], "timestamps": [...], "values": [...]}`,
    timestamps as ISO 8601 UTC strings. Columns cost nothing to build here (they are the
    validated lists, datetimes serialized by orjson in C); a dict per point was ~6% of
    a 100-point request's CPU.
    """
    return {
        "event_id": uuid.uuid4().hex,
        "device_id": str(batch.device_id),
        "group_id": group_id,
        "received_at": received_at,
        "metrics": batch.metrics,
        "timestamps": batch.timestamps,
        "values": batch.values,
    }


def _after_commit(*, batch: PointColumns, stored: _Stored, reservation: Reservation | None) -> None:
    """Count the points accepted, and publish the event of those stored in the room reserved for it (see
    the module docstring), with the device's after-commit cache tombstone in the same round trip.

    Points that were stored already (duplicates) are counted apart and have no event: their first
    delivery had one, so the live feed and the message counters see each point once. A request of
    duplicates only publishes nothing: its reservation is released and the tombstone sent alone.
    """
    points = stored.points
    duplicates = len(batch) - len(points)
    if duplicates:
        count_points(outcome="duplicate", points=duplicates)
    alongside = [stored.device_tombstone] if stored.device_tombstone is not None else []
    if not len(points):
        if reservation is not None:
            _release(reservation)
        others: list = []
        try:
            others = redis_script_calls(alongside) if alongside else []
        except redis.RedisError as exc:
            others = [exc] * len(alongside)
        _log_tombstone_failures(device_id=batch.device_id, results=others)
        return
    count_points(outcome="accepted", points=len(points))
    others = []
    try:
        others = event_queue_publish(
            event_type=EVENT_TYPE,
            payload=_event_payload(batch=points, received_at=stored.received_at, group_id=stored.group_id),
            weight=len(points),
            reservation=reservation,
            alongside=alongside,
        )
    except EventQueueFull as exc:
        others = exc.alongside
        EVENTS_LOST.labels(reason="queue_full").inc()
        logger.warning("telemetry event for %s lost: event queue full (points are stored)", batch.device_id)
    except redis.RedisError as exc:
        others = [exc] * len(alongside)
        EVENTS_LOST.labels(reason="redis_error").inc()
        logger.warning("telemetry event for %s lost: %s (points are stored)", batch.device_id, exc)
    _log_tombstone_failures(device_id=batch.device_id, results=others)


def _log_tombstone_failures(*, device_id: uuid.UUID, results: list) -> None:
    for result in results or ():
        if isinstance(result, Exception):
            # As `device_cache_invalidate`'s own after-commit call (robust): the tombstone written
            # inside the transaction still refuses older fills until it expires.
            logger.warning("after-commit cache tombstone of device %s failed: %s", device_id, result)


def telemetry_errors_count(*, device_id: uuid.UUID | str, points: int) -> None:
    """Count a refused submission (invalid, rate limited, backpressure) against the device, for its analytics.

    One Redis call, on refusals only; a Redis failure loses the count, never the answer.
    Keys are per day and expire, so ids that name no device (an operator's typo) do not stay.
    """
    day = int(time.time() // 86400)
    key = errors_day_key(day)
    try:
        pipe = get_redis().pipeline(transaction=False)
        pipe.hincrby(key, str(device_id), max(points, 1))
        pipe.expire(key, (ERRORS_DAYS + 1) * 86400)
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning("could not count a refused submission of %s: %s", device_id, exc)


def telemetry_points_ingest(*, batch: PointColumns) -> IngestResult:
    """Store a validated batch durably, or refuse it whole (a `TelemetryRejected`).

    Returns once the points are committed (or, inside a caller's transaction, will be
    with it); see the module docstring for the order of checks and what happens when
    the after-commit publish fails. A refusal is counted under its `outcome` and raised.
    """
    try:
        return _ingest(batch=batch)
    except TelemetryRejected as exc:
        count_points(outcome=exc.outcome, points=len(batch))
        if not isinstance(exc, TelemetryUnknownDevice):  # no device to count it against
            telemetry_errors_count(device_id=batch.device_id, points=len(batch))
        raise


def _release(reservation: Reservation) -> None:
    """Give the room back for a request that stores nothing; on failure it expires by itself."""
    try:
        event_queue_release(reservation=reservation)
    except redis.RedisError as exc:
        logger.warning("event queue reservation not released (it expires): %s", exc)


def _ingest(*, batch: PointColumns) -> IngestResult:
    points = len(batch)
    admitted = ingest_admit(device_id=str(batch.device_id), points=points)
    if admitted.rate_limit is None:
        raise TelemetryBackpressure(admitted.admission)
    decision = admitted.rate_limit
    if not decision.allowed:
        if decision.scope == "device" and points > decision.limit:
            raise TelemetryBatchOverLimit(decision, points)
        raise TelemetryRateLimited(decision)
    try:
        stored = _insert_points(batch=batch)
    except BaseException:
        _release(admitted.reservation)
        raise
    # After the commit by construction: a caller that wraps ingestion in its own transaction
    # (an `Idempotency-Key` request does) counts and publishes only once everything it wrote
    # is committed, and never for points that were rolled back. Outside a transaction this
    # runs at once.
    transaction.on_commit(partial(_after_commit, batch=batch, stored=stored, reservation=admitted.reservation))
    return IngestResult(count=points, rate_limit=decision, stored=len(stored.points))


# --- message counts: the reconciliation from Postgres --------------------------------------------

_COUNTS_TABLE = DeviceMessageCount._meta.db_table
_WATERMARK_TABLE = MessageCountWatermark._meta.db_table

# One statement: count the closed minutes' points by device (`received_at` in [from, until); the
# BRIN index on received_at keeps this to the blocks written since the last run), add them to
# the per-device rows, and move the watermark with the fleet's totals. It runs in the transaction
# that locked the watermark row, so two reconciliations never count one minute twice.
_RECONCILE_SQL = f"""
WITH counted AS (
    SELECT device_id, count(*) AS messages,
           COALESCE(sum(extract(epoch FROM received_at - ts)) * 1000, 0) AS latency
    FROM {TABLE}
    WHERE received_at >= %(from)s AND received_at < %(until)s
    GROUP BY device_id
), added AS (
    INSERT INTO {_COUNTS_TABLE} AS c (device_id, messages, latency_ms_sum)
    SELECT device_id, messages, latency FROM counted
    ON CONFLICT (device_id) DO UPDATE
    SET messages = c.messages + EXCLUDED.messages, latency_ms_sum = c.latency_ms_sum + EXCLUDED.latency_ms_sum
    RETURNING 1
)
UPDATE {_WATERMARK_TABLE}
SET reconciled_until = %(until)s,
    messages = messages + (SELECT COALESCE(sum(messages), 0) FROM counted),
    latency_ms_sum = latency_ms_sum + (SELECT COALESCE(sum(latency), 0) FROM counted)
WHERE id = 1
RETURNING (SELECT count(*) FROM added), (SELECT COALESCE(sum(messages), 0) FROM counted)
"""


@dataclass(frozen=True)
class Reconciliation:
    reconciled_until: datetime | None
    devices: int = 0
    messages: int = 0


def telemetry_message_counts_reconcile() -> Reconciliation:
    """Count every closed minute since the watermark from Postgres, exactly once; move the watermark.

    A minute is closed when it ended `TELEMETRY_COUNT_RECONCILE_GRACE_SECONDS` ago: a point's
    `received_at` is its transaction's start, so a transaction still open when its minute is
    counted would be missed; the grace must outlast the longest ingest transaction (they take
    milliseconds; a request waiting on an `Idempotency-Key` holds one a few seconds at most).
    From then on the Redis counters of that minute, whatever drift they have (an event counted
    twice after a consumer crash, one never published), are no longer read. Idempotent; safe to
    run concurrently (the watermark row is locked).
    """
    with transaction.atomic():
        MessageCountWatermark.objects.get_or_create(pk=1)
        watermark = MessageCountWatermark.objects.select_for_update().get(pk=1)
        now = timezone.now()
        grace = settings.TELEMETRY_COUNT_RECONCILE_GRACE_SECONDS
        until = datetime.fromtimestamp(count_window_start(now.timestamp() - grace), tz=UTC)
        if watermark.reconciled_until is not None and until <= watermark.reconciled_until:
            return Reconciliation(reconciled_until=watermark.reconciled_until)
        since = watermark.reconciled_until or datetime(1970, 1, 1, tzinfo=UTC)
        with connection.cursor() as cursor:
            cursor.execute(_RECONCILE_SQL, {"from": since, "until": until})
            devices, messages = cursor.fetchone()
    return Reconciliation(reconciled_until=until, devices=devices, messages=int(messages))
