"""Writes of the alerts app: evaluation of points, alert transitions, rules, silences.

**Evaluation** (`alerts_evaluate`) runs inside the telemetry ingest transaction,
after the points' insert: an accepted point is evaluated exactly when it is
stored, whatever later happens to the derived event or to a worker. It costs no
round trip for the device's rules when it has none or this process holds them at
the version the insert statement read (else one Redis call for both scopes,
`alerts.selectors.alert_rules_for`), comparisons in Python, and, only if some point violates a
rule, ONE statement: a multi-row `INSERT ... ON CONFLICT (rule_id, device_id)
WHERE status IN ('open', 'acknowledged') DO UPDATE` over every violated rule, each
counted once with the number of its violating points. The partial unique index
makes Postgres settle concurrent ingestions of the same (rule, device): one
inserts, the others wait on the index entry and then add their counts to that
row, so there is never a duplicate and never a lost count.

**Transitions** are one conditional `UPDATE` each (`open -> acknowledged`,
`open | acknowledged -> resolved`); the row's status decides, never a read before
the write. A refused transition is `AlertTransitionConflict` (409).

**Rules**: every write bumps its scope's version (`AlertRuleScope`, one
`INSERT ... ON CONFLICT DO UPDATE ... RETURNING`) in its own transaction and
tombstones the scope's cache entry at that version, inside the transaction and
again after commit, so the next evaluation after the commit reads the new rules.
A rule's device or group never changes (its scope would): create another rule.

**Notifications** (the outbox, at the end of this module): an evaluation that opens
alerts, for rules with a channel, writes one `Notification` row per channel in the
same transaction (one more statement, only then) and queues its delivery after
commit; the delivery is claimed by a conditional UPDATE, goes through the channel's
circuit breaker (`iot.circuit_breaker`) and the SSRF-guarded POST (`iot.outbound`),
and is retried with backoff until delivered or expired.

**The operators' feed** (`ws/alerts`, `alerts.consumers`): after the commit that opens,
acknowledges or resolves alerts, one `alerts.changed` event goes to the event queue
(`alert_events_publish`); its handler (`alerts.events`) pushes the alerts, as the API
shows them, to the feed's Channels group. Repeated violations of an open alert are not
pushed one by one (that is an alarm storm on a screen): the feed shows what changed state.
"""

import logging
import operator as op
import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import orjson
import psycopg
import redis
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, connections, transaction
from django.db.models import F
from django.db.models.functions import Least
from django.utils import timezone

from alerts.cache import rules_cache_invalidate
from alerts.delivery import email_recipients, notification_send
from alerts.metrics import notification_outcome_count
from alerts.models import (
    ACTIVE_STATUSES,
    Alert,
    AlertOperator,
    AlertRule,
    AlertRuleChannel,
    AlertRuleScope,
    AlertSeverity,
    AlertStatus,
    Notification,
    NotificationChannel,
    NotificationChannelKind,
    NotificationStatus,
    Silence,
    rule_scope,
)
from alerts.selectors import alert_rules_for
from devices.models import Device, DeviceStatus
from iot.circuit_breaker import breaker_acquire, breaker_forget, breaker_record, breaker_release
from iot.errors import ServiceError
from iot.event_queue import EventQueueFull, event_queue_publish
from iot.outbound import OutboundError, outbound_url_validate

logger = logging.getLogger(__name__)

# --- Refusals ----------------------------------------------------------------------------------


class AlertNotFound(ServiceError):
    status_code = 404
    default_detail = "No alert with this id."


class AlertTransitionConflict(ServiceError):
    """The alert's status does not allow this transition (409); `status` says what it is now."""

    status_code = 409
    code = "invalid_transition"


class AlertRuleNotFound(ServiceError):
    status_code = 404
    default_detail = "No alert rule with this id."


class AlertRuleUnknownDevice(ServiceError):
    status_code = 422
    field = "device_id"
    default_detail = "No device with this id."


class AlertRuleUnknownChannel(ServiceError):
    status_code = 422
    field = "channel_ids"
    default_detail = "No notification channel with this id."


class SilenceNotFound(ServiceError):
    status_code = 404
    default_detail = "No silence with this id."


class SilenceUnknownTarget(ServiceError):
    """The silenced rule or device does not exist (422, on that field)."""

    status_code = 422


# --- Evaluation --------------------------------------------------------------------------------

# `value <operator> threshold` is a violation.
_COMPARE = {
    AlertOperator.GT.value: op.gt,
    AlertOperator.LT.value: op.lt,
    AlertOperator.GTE.value: op.ge,
    AlertOperator.LTE.value: op.le,
    AlertOperator.EQ.value: op.eq,
    AlertOperator.NE.value: op.ne,
}


@dataclass(frozen=True)
class EvaluationResult:
    """What an evaluation did: the alerts it opened (`created`) and those it counted again (`updated`).

    Notifications are for `created` only: repeated violations of an open alert are
    coalesced into it, not notified one by one.
    """

    created: tuple[uuid.UUID, ...] = ()
    updated: tuple[uuid.UUID, ...] = ()


NOTHING = EvaluationResult()

_ACTIVE_SQL = ", ".join(f"'{status.value}'" for status in ACTIVE_STATUSES)
_DEVICES = connection.ops.quote_name(Device._meta.db_table)
_DEVICE_ID = connection.ops.quote_name(Device._meta.pk.column)

# `live` keeps only the rules that still exist and are enabled, and the device if it still exists,
# and KEY SHARE-locks them: a rule or device deleted concurrently is then waited for and skipped,
# instead of failing this (the ingest's) transaction on a foreign key at commit. Rows are inserted
# in rule order, so two requests for one device take the unique index's entries in the same order
# (no deadlock). `xmax = 0` only on a row this statement inserted.
_UPSERT_SQL = f"""
WITH live AS (
    SELECT r.id FROM {AlertRule._meta.db_table} AS r CROSS JOIN {_DEVICES} AS d
    WHERE r.id = ANY(%b) AND r.enabled AND d.{_DEVICE_ID} = %b
    FOR KEY SHARE
)
INSERT INTO {Alert._meta.db_table} AS a
    (id, rule_id, device_id, status, severity, metric, operator, threshold, occurrences,
     first_value, last_value, first_triggered_at, last_triggered_at, created_at)
SELECT gen_random_uuid(), v.rule_id, %b, '{AlertStatus.OPEN.value}', v.severity, v.metric, v.operator, v.threshold,
       v.occurrences, v.first_value, v.last_value, v.first_at, v.last_at, now()
FROM unnest(%b::uuid[], %b::text[], %b::text[], %b::text[], %b::float8[], %b::int8[], %b::float8[], %b::float8[],
            %b::timestamptz[], %b::timestamptz[])
     AS v (rule_id, severity, metric, operator, threshold, occurrences, first_value, last_value, first_at, last_at)
JOIN live ON live.id = v.rule_id
ORDER BY v.rule_id
ON CONFLICT (rule_id, device_id) WHERE status IN ({_ACTIVE_SQL})
DO UPDATE SET
    occurrences = a.occurrences + EXCLUDED.occurrences,
    first_value = CASE WHEN EXCLUDED.first_triggered_at < a.first_triggered_at
                       THEN EXCLUDED.first_value ELSE a.first_value END,
    first_triggered_at = LEAST(a.first_triggered_at, EXCLUDED.first_triggered_at),
    last_value = CASE WHEN EXCLUDED.last_triggered_at >= a.last_triggered_at
                      THEN EXCLUDED.last_value ELSE a.last_value END,
    last_triggered_at = GREATEST(a.last_triggered_at, EXCLUDED.last_triggered_at)
RETURNING id, (xmax = 0) AS created
"""


def alerts_evaluate(
    *,
    device_id: uuid.UUID,
    group_id: str | None,
    metrics: list[str],
    values: list[float],
    timestamps: list[datetime],
    rule_versions: list[int] | None = None,
) -> EvaluationResult:
    """Evaluate a device's stored points against its rules and open or count alerts.

    Call it in the transaction that stores the points, after their insert, with the
    device's group as that transaction sees it. `metrics`, `values`, `timestamps`
    are the points column-wise (equal lengths). `rule_versions` are the versions of the
    device's rule scopes as the insert statement read them (`RULE_VERSIONS_SQL`, which
    telemetry evaluates for this hook): with them, a device with no rule, or whose rules
    this process holds at that version, costs no round trip at all; without them, one
    Redis round trip. With violations, one SQL statement more, however many points and
    rules are involved. Raises what Redis or Postgres raise (the ingest
    is then refused, never accepted unevaluated).
    """
    rules = alert_rules_for(device_id=device_id, group_id=group_id, versions=rule_versions)
    if not rules:
        return NOTHING
    # rule id -> [rule, count, index of the first violation, index of the last (by timestamp), metric].
    violated: dict[str, list] = {}
    for index, metric in enumerate(metrics):
        candidates = rules.get(metric)
        if candidates is None:
            continue
        value = values[index]
        for rule in candidates:
            if not _COMPARE[rule[1]](value, rule[2]):
                continue
            seen = violated.get(rule[0])
            if seen is None:
                violated[rule[0]] = [rule, 1, index, index, metric]
                continue
            seen[1] += 1
            moment = timestamps[index]
            if moment < timestamps[seen[2]]:
                seen[2] = index
            if moment >= timestamps[seen[3]]:
                seen[3] = index
    if not violated:
        return NOTHING
    result = _alerts_upsert(device_id=device_id, violated=violated, values=values, timestamps=timestamps)
    # Coalescing: only newly opened alerts are notified, in this same transaction (the outbox), and only
    # when one of the violated rules has a channel (an entry cached before that flag existed counts as yes).
    if result.created and any(len(entry[0]) < 5 or entry[0][4] for entry in violated.values()):
        notifications_record(alert_ids=result.created, group_id=group_id)
    if result.created:
        alert_events_publish(event="alert.opened", alert_ids=result.created)
    return result


ALERT_EVENT_TYPE = "alerts.changed"


def alert_events_publish(*, event: str, alert_ids: Iterable[uuid.UUID]) -> None:
    """After the surrounding commit (now, outside a transaction), tell the operators' feed that these
    alerts changed state (`event`: `alert.opened`, `alert.acknowledged`, `alert.resolved`).

    Best effort by design: the alerts are committed and the API serves them whatever happens
    here, so a full event queue or a Redis outage is logged and the request still succeeds
    (the feed says so itself: clients re-read `GET /alerts` after a reconnect).
    """
    ids = [str(alert_id) for alert_id in alert_ids]

    def publish() -> None:
        try:
            event_queue_publish(
                event_type=ALERT_EVENT_TYPE, payload={"event_id": uuid.uuid4().hex, "event": event, "alert_ids": ids}
            )
        except (EventQueueFull, redis.RedisError, OSError) as exc:
            logger.warning("alerts feed: %s of %d alert(s) not published: %s", event, len(ids), exc)

    transaction.on_commit(publish)


def _alerts_upsert(
    *, device_id: uuid.UUID, violated: dict[str, list], values: list[float], timestamps: list[datetime]
) -> EvaluationResult:
    entries = list(violated.values())
    rule_ids = [uuid.UUID(rule[0]) for rule, *_ in entries]
    params = [
        rule_ids,
        device_id,
        device_id,
        rule_ids,
        [rule[3] for rule, *_ in entries],
        [metric for *_, metric in entries],
        [rule[1] for rule, *_ in entries],
        [float(rule[2]) for rule, *_ in entries],
        [count for _, count, *_ in entries],
        [float(values[first]) for _, _, first, _, _ in entries],
        [float(values[last]) for _, _, _, last, _ in entries],
        [timestamps[first] for _, _, first, _, _ in entries],
        [timestamps[last] for _, _, _, last, _ in entries],
    ]
    db = connections[DEFAULT_DB_ALIAS]
    db.ensure_connection()
    # Server-side binary binding on Django's connection (same transaction), as the points' insert does.
    with db.wrap_database_errors, psycopg.Cursor(db.connection) as cursor:
        cursor.execute(_UPSERT_SQL, params)
        rows = cursor.fetchall()
    return EvaluationResult(
        created=tuple(alert_id for alert_id, created in rows if created),
        updated=tuple(alert_id for alert_id, created in rows if not created),
    )


# --- Alert transitions -------------------------------------------------------------------------

_ALERT_FIELDS = Alert._meta.concrete_fields
_ALERT_COLUMNS = ", ".join(connection.ops.quote_name(field.column) for field in _ALERT_FIELDS)


def _user_id(by: AbstractBaseUser | None) -> Any:
    return by.pk if by is not None and by.is_authenticated else None


def _alert_transition(*, alert_id: uuid.UUID, to: AlertStatus, allowed_from: Iterable[AlertStatus], by) -> Alert:
    stamp = "acknowledged" if to == AlertStatus.ACKNOWLEDGED else "resolved"
    allowed = list(allowed_from)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Alert._meta.db_table} SET status = %s, {stamp}_at = now(), {stamp}_by_id = %s "
            f"WHERE id = %s AND status = ANY(%s) RETURNING {_ALERT_COLUMNS}",
            [to.value, _user_id(by), alert_id, [status.value for status in allowed]],
        )
        row = cursor.fetchone()
    if row is not None:
        values = [
            field.from_db_value(v, None, connection) if hasattr(field, "from_db_value") else v
            for field, v in zip(_ALERT_FIELDS, row, strict=True)
        ]
        alert = Alert.from_db(connection.alias, [field.attname for field in _ALERT_FIELDS], values)
        alert_events_publish(event=f"alert.{to.value}", alert_ids=[alert.pk])
        return alert
    # Nothing changed; the error path reads the status to say why (a read after the decision, not before).
    current = Alert.objects.filter(pk=alert_id).values_list("status", flat=True).first()
    if current is None:
        raise AlertNotFound()
    verb = "acknowledged" if to == AlertStatus.ACKNOWLEDGED else "resolved"
    raise AlertTransitionConflict(
        f"The alert is {current}; only an alert that is {' or '.join(s.value for s in allowed)} can be {verb}.",
        status=current,
    )


def alert_acknowledge(*, alert_id: uuid.UUID, by: AbstractBaseUser | None) -> Alert:
    """open -> acknowledged (one conditional UPDATE). Raises `AlertNotFound`, `AlertTransitionConflict`."""
    return _alert_transition(alert_id=alert_id, to=AlertStatus.ACKNOWLEDGED, allowed_from=[AlertStatus.OPEN], by=by)


def alert_resolve(*, alert_id: uuid.UUID, by: AbstractBaseUser | None) -> Alert:
    """open | acknowledged -> resolved (one conditional UPDATE); the next violation opens a new alert.

    Raises `AlertNotFound`, `AlertTransitionConflict`.
    """
    return _alert_transition(alert_id=alert_id, to=AlertStatus.RESOLVED, allowed_from=ACTIVE_STATUSES, by=by)


# --- Rules -------------------------------------------------------------------------------------

# The new version is at least the current time in microseconds, not just the old one plus one, so
# versions never repeat even if the table is emptied or restored from a backup: a cache entry (in
# Redis, or a process's own copy in `alerts.selectors`) made at some version can never be taken for
# a later, different rule set that happens to reach the same number.
_SCOPE_BUMP_SQL = f"""
INSERT INTO {AlertRuleScope._meta.db_table} AS s (scope, version)
VALUES (%s, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
ON CONFLICT (scope) DO UPDATE
SET version = GREATEST(s.version + 1, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)
RETURNING version
"""

_CHANNELS_SET_SQL = f"""
INSERT INTO {AlertRuleChannel._meta.db_table} (rule_id, channel_id)
SELECT %s, c.id FROM {NotificationChannel._meta.db_table} AS c WHERE c.id = ANY(%s)
FOR KEY SHARE
"""


def _scope_bump(*, scope: str) -> int:
    """Bump the scope's version (inside the rule write's transaction); also serializes rule writes of a scope."""
    with connection.cursor() as cursor:
        cursor.execute(_SCOPE_BUMP_SQL, [scope])
        return cursor.fetchone()[0]


def _channels_set(*, rule_id: uuid.UUID, channel_ids: list[uuid.UUID], replace: bool) -> None:
    """Set (or `replace`) the rule's channels; raises `AlertRuleUnknownChannel` for an unknown id, which
    rolls the whole rule write back. The channels are KEY SHARE-locked, so one deleted meanwhile is
    waited for and counted as unknown, not a foreign-key failure at commit."""
    wanted = set(channel_ids)
    if replace:
        AlertRuleChannel.objects.filter(rule_id=rule_id).delete()
    if not wanted:
        return
    with connection.cursor() as cursor:
        cursor.execute(_CHANNELS_SET_SQL, [rule_id, list(wanted)])
        if cursor.rowcount != len(wanted):
            found = set(NotificationChannel.objects.filter(pk__in=wanted).values_list("pk", flat=True))
            missing = sorted(str(channel_id) for channel_id in wanted - found)
            raise AlertRuleUnknownChannel(f"No notification channel with id {', '.join(missing)}.")


def _is_violation_of(exc: IntegrityError, constraint: str) -> bool:
    cause = exc.__cause__
    return isinstance(cause, psycopg.errors.ForeignKeyViolation) and cause.diag.constraint_name == constraint


def alert_rule_create(
    *,
    device_id: uuid.UUID | None = None,
    group_id: str | None = None,
    metric: str,
    operator: str,
    threshold: float,
    severity: str = AlertSeverity.WARNING,
    channel_ids: list[uuid.UUID] | None = None,
    enabled: bool = True,
) -> AlertRule:
    """Create a rule on a device or a group (exactly one). Raises `AlertRuleUnknownDevice`,
    `AlertRuleUnknownChannel`; nothing is stored then."""
    if (device_id is None) == (group_id is None):
        raise ValueError("exactly one of device_id and group_id")
    try:
        return _alert_rule_create(
            device_id=device_id,
            group_id=group_id,
            metric=metric,
            operator=operator,
            threshold=threshold,
            severity=severity,
            channel_ids=channel_ids or [],
            enabled=enabled,
        )
    except IntegrityError as exc:
        # The immediate foreign key (migration 0001) decided, atomically with the insert.
        if _is_violation_of(exc, "alerts_alertrule_device_fk"):
            raise AlertRuleUnknownDevice(f"No device with id {device_id}.") from exc
        raise


@transaction.atomic
def _alert_rule_create(*, channel_ids: list[uuid.UUID], **fields) -> AlertRule:
    scope = rule_scope(device_id=fields["device_id"], group_id=fields["group_id"])
    version = _scope_bump(scope=scope)
    rule = AlertRule.objects.create(**fields)
    _channels_set(rule_id=rule.pk, channel_ids=channel_ids, replace=False)
    rules_cache_invalidate(scope=scope, version=version)
    return rule


ALERT_RULE_UPDATABLE = frozenset({"metric", "operator", "threshold", "severity", "enabled", "channel_ids"})


@transaction.atomic
def alert_rule_update(*, rule_id: uuid.UUID, changes: dict[str, Any]) -> AlertRule:
    """Change some of a rule's fields (not its device or group); the next evaluation sees the change.

    Raises `AlertRuleNotFound`, `AlertRuleUnknownChannel` (nothing changed then).
    """
    unknown = set(changes) - ALERT_RULE_UPDATABLE
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    changes = dict(changes)
    channel_ids = changes.pop("channel_ids", None)
    # A rule's target never changes, so its scope can be read before the scope's lock is taken:
    # every rule write then locks scope first, rule second (one order: no deadlock between them).
    target = AlertRule.objects.filter(pk=rule_id).values_list("device_id", "group_id").first()
    if target is None:
        raise AlertRuleNotFound()
    scope = rule_scope(device_id=target[0], group_id=target[1])
    version = _scope_bump(scope=scope)
    if not AlertRule.objects.filter(pk=rule_id).update(**changes, version=F("version") + 1, updated_at=timezone.now()):
        raise AlertRuleNotFound()  # deleted meanwhile: the scope bump rolls back with this
    if channel_ids is not None:
        _channels_set(rule_id=rule_id, channel_ids=channel_ids, replace=True)
    rules_cache_invalidate(scope=scope, version=version)
    return AlertRule.objects.prefetch_related("channels").get(pk=rule_id)


@transaction.atomic
def alert_rule_delete(*, rule_id: uuid.UUID) -> None:
    """Delete a rule, and (cascading in Postgres) its alerts and silences. Raises `AlertRuleNotFound`.

    To stop a rule but keep its alerts, disable it (`enabled: false`).
    """
    target = AlertRule.objects.filter(pk=rule_id).values_list("device_id", "group_id").first()
    if target is None:
        raise AlertRuleNotFound()
    scope = rule_scope(device_id=target[0], group_id=target[1])
    version = _scope_bump(scope=scope)
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {AlertRule._meta.db_table} WHERE id = %s", [rule_id])
        if not cursor.rowcount:
            raise AlertRuleNotFound()
    rules_cache_invalidate(scope=scope, version=version)


# --- Silences ----------------------------------------------------------------------------------

_SILENCE_FKS = {"alerts_silence_rule_fk": "rule_id", "alerts_silence_device_fk": "device_id"}


def silence_create(
    *,
    rule_id: uuid.UUID | None = None,
    device_id: uuid.UUID | None = None,
    group_id: str | None = None,
    ends_at: datetime,
    starts_at: datetime | None = None,
    comment: str = "",
    created_by: AbstractBaseUser | None = None,
) -> Silence:
    """Mute notifications for one target (a rule, a device or a group) from `starts_at` (default now)
    until `ends_at`. Raises `SilenceUnknownTarget` for an unknown rule or device."""
    if sum(target is not None for target in (rule_id, device_id, group_id)) != 1:
        raise ValueError("exactly one of rule_id, device_id and group_id")
    try:
        with transaction.atomic():
            return Silence.objects.create(
                rule_id=rule_id,
                device_id=device_id,
                group_id=group_id,
                starts_at=starts_at or timezone.now(),
                ends_at=ends_at,
                comment=comment,
                created_by_id=_user_id(created_by),
            )
    except IntegrityError as exc:
        for constraint, field in _SILENCE_FKS.items():
            if _is_violation_of(exc, constraint):
                what = "alert rule" if field == "rule_id" else "device"
                error = SilenceUnknownTarget(f"No {what} with this id.")
                error.field = field
                raise error from exc
        raise


def silence_expire(*, silence_id: uuid.UUID) -> Silence:
    """End a silence now (one conditional UPDATE; a pending one ends before it starts). An already
    ended silence is returned unchanged, so expiring is idempotent. Raises `SilenceNotFound`."""
    now = timezone.now()
    Silence.objects.filter(pk=silence_id, ends_at__gt=now).update(ends_at=now, starts_at=Least(F("starts_at"), now))
    silence = Silence.objects.select_related("created_by").filter(pk=silence_id).first()
    if silence is None:
        raise SilenceNotFound()
    return silence


# --- Notifications (the outbox) ----------------------------------------------------------------
#
# A notification is a row written in the transaction that opens its alerts (`notifications_record`,
# called by `alerts_evaluate`), and a Celery task queued after commit delivers it
# (`notification_deliver_attempt`). The row is the truth: a lost task, a killed worker or a broker
# outage delays a delivery (the sweeper re-queues due rows), never loses it. Delivery is at least
# once: a worker killed after the channel answered but before the row was marked delivered sends it
# again after the lease; each POST carries the notification id as `Idempotency-Key` for receivers
# that deduplicate.


class NotificationChannelNotFound(ServiceError):
    status_code = 404
    default_detail = "No notification channel with this id."


class NotificationChannelInvalidUrl(ServiceError):
    status_code = 400
    field = "url"


def channel_breaker_name(channel_id: uuid.UUID | str) -> str:
    """The circuit breaker of a channel, shared by every process (`iot.circuit_breaker`)."""
    return f"channel:{channel_id}"


def notification_channel_create(*, name: str, kind: str, url: str) -> NotificationChannel:
    """Create a channel after its address was checked: a webhook URL by the SSRF guard (resolved now;
    checked again at each delivery), an email channel's `mailto:` addresses by Django's validator.

    Raises `NotificationChannelInvalidUrl` (400, nothing stored) with the reason.
    """
    if kind == NotificationChannelKind.EMAIL:
        recipients = email_recipients(url)
        if not recipients:
            raise NotificationChannelInvalidUrl("An email channel's url is mailto: and one or more addresses.")
        for address in recipients:
            try:
                validate_email(address)
            except ValidationError:
                raise NotificationChannelInvalidUrl(f"Not an email address: {address[:100]!r}.") from None
    else:
        try:
            outbound_url_validate(url)
        except ValueError as exc:
            raise NotificationChannelInvalidUrl(str(exc)) from None
    return NotificationChannel.objects.create(name=name, kind=kind, url=url)


def notification_channel_delete(*, channel_id: uuid.UUID) -> None:
    """Delete a channel; Postgres cascades to its rules' links and its outbox rows. Forgets its breaker."""
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {NotificationChannel._meta.db_table} WHERE id = %s", [channel_id])
        if not cursor.rowcount:
            raise NotificationChannelNotFound()
    name = channel_breaker_name(channel_id)
    if connection.in_atomic_block:
        transaction.on_commit(lambda: breaker_forget(name=name), robust=True)
    else:
        breaker_forget(name=name)


_NOTIFICATIONS = Notification._meta.db_table
_CHANNELS = NotificationChannel._meta.db_table
_RULE_CHANNELS = AlertRuleChannel._meta.db_table
_MAINTENANCE = DeviceStatus.MAINTENANCE.value

# One statement for every channel of every new alert: one row per channel, naming all the new alerts
# of this batch that go to it. Nothing for a device in maintenance, nor for an alert whose rule, device
# or group has a silence in force. The channels are KEY SHARE-locked first (`live`), so a channel
# deleted concurrently is waited for and skipped instead of failing the ingest on a foreign key.
_NOTIFY_SQL = f"""
WITH wanted AS (
    SELECT a.id AS alert_id, rc.channel_id
    FROM {Alert._meta.db_table} AS a
    JOIN {_RULE_CHANNELS} AS rc ON rc.rule_id = a.rule_id
    JOIN {_DEVICES} AS d ON d.{_DEVICE_ID} = a.device_id
    WHERE a.id = ANY(%s) AND d.status <> '{_MAINTENANCE}'
      AND NOT EXISTS (
        SELECT 1 FROM {Silence._meta.db_table} AS s
        WHERE (s.rule_id = a.rule_id OR s.device_id = a.device_id OR s.group_id = %s)
          AND s.starts_at <= now() AND s.ends_at > now()
      )
), live AS (
    SELECT c.id FROM {_CHANNELS} AS c WHERE c.id IN (SELECT channel_id FROM wanted) ORDER BY c.id FOR KEY SHARE
)
INSERT INTO {_NOTIFICATIONS}
    (id, channel_id, alert_ids, status, attempts, next_attempt_at, expires_at, last_error, created_at)
SELECT gen_random_uuid(), w.channel_id, array_agg(w.alert_id ORDER BY w.alert_id), 'pending', 0, now(),
       now() + make_interval(secs => %s), '', now()
FROM wanted AS w JOIN live ON live.id = w.channel_id
GROUP BY w.channel_id
RETURNING id
"""


def notifications_record(*, alert_ids: Iterable[uuid.UUID], group_id: str | None) -> list[uuid.UUID]:
    """Write the outbox rows for newly opened alerts (in the caller's transaction); queue them after commit.

    One statement (only called when an evaluation opened an alert). Returns the new
    notifications' ids. A failure to queue after commit is logged, not raised (the
    sweeper re-queues the rows).
    """
    with connection.cursor() as cursor:
        cursor.execute(_NOTIFY_SQL, [list(alert_ids), group_id, settings.ALERT_NOTIFICATION_TTL_SECONDS])
        ids = [row[0] for row in cursor.fetchall()]
    if ids:
        transaction.on_commit(partial(_notifications_queue, ids), robust=True)
    return ids


def _notifications_queue(notification_ids: list[uuid.UUID]) -> None:
    from alerts.tasks import notification_deliver  # the tasks module imports this one

    for notification_id in notification_ids:
        notification_deliver.delay(str(notification_id))


@dataclass(frozen=True)
class DeliveryResult:
    """What one delivery attempt did; `retry_in_seconds` is set when the row is due again later."""

    outcome: str  # delivered, failed, held, expired, skipped (not due, claimed elsewhere, or final)
    retry_in_seconds: float | None = None


_CLAIM_SQL = f"""
UPDATE {_NOTIFICATIONS} AS n SET next_attempt_at = now() + make_interval(secs => %s)
FROM {_CHANNELS} AS c
WHERE n.id = %s AND c.id = n.channel_id
  AND n.status = 'pending' AND n.next_attempt_at <= now() AND n.expires_at > now()
RETURNING c.id, c.kind, c.url, n.alert_ids, n.attempts
"""

# Only a row nobody holds (its lease over) expires: a delivery in flight is left to finish.
_EXPIRE_SQL = f"""
UPDATE {_NOTIFICATIONS} SET status = 'expired',
    last_error = CASE WHEN last_error = '' THEN %s ELSE last_error END
WHERE id = %s AND status = 'pending' AND expires_at <= now() AND next_attempt_at <= now()
RETURNING channel_id, attempts, last_error, array_length(alert_ids, 1)
"""

_DELIVERED_SQL = f"""
UPDATE {_NOTIFICATIONS} SET status = 'delivered', delivered_at = now(), attempts = attempts + 1, last_error = ''
WHERE id = %s AND status = 'pending'
"""

# The next attempt is never after `expires_at`: an undeliverable row is expired on time.
_RESCHEDULE_SQL = f"""
UPDATE {_NOTIFICATIONS} SET next_attempt_at = LEAST(now() + make_interval(secs => %s), expires_at),
    attempts = attempts + %s, last_error = %s
WHERE id = %s AND status = 'pending'
RETURNING EXTRACT(EPOCH FROM next_attempt_at - now())
"""

_ERROR_MAX_LENGTH = 1000


def notification_backoff_seconds(*, attempts: int, retry_after: float | None = None) -> float:
    """Exponential backoff with "equal jitter" after `attempts` failed calls: half the delay is fixed, half
    random, so the retries of one outage's notifications spread out instead of arriving together."""
    base = settings.ALERT_NOTIFICATION_RETRY_BASE_SECONDS
    cap = settings.ALERT_NOTIFICATION_RETRY_MAX_SECONDS
    delay = min(cap, base * 2 ** max(attempts - 1, 0))
    delay = delay / 2 + random.uniform(0, delay / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


def _reschedule(*, notification_id: uuid.UUID, delay: float, attempted: bool, error: str) -> float | None:
    with connection.cursor() as cursor:
        cursor.execute(_RESCHEDULE_SQL, [delay, 1 if attempted else 0, error[:_ERROR_MAX_LENGTH], notification_id])
        row = cursor.fetchone()
    return max(float(row[0]), 0.0) if row is not None else None


def _notification_expire(*, notification_id: uuid.UUID, reason: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(_EXPIRE_SQL, [reason, notification_id])
        row = cursor.fetchone()
    if row is None:
        return False
    channel_id, attempts, last_error, alert_count = row
    logger.error(
        "notification %s to channel %s expired undelivered after %d attempts (%s alerts): %s",
        notification_id,
        channel_id,
        attempts,
        alert_count,
        last_error,
    )
    notification_outcome_count("expired")
    return True


def _notification_body(*, notification_id: uuid.UUID, channel_id: uuid.UUID, alert_ids: list) -> bytes | None:
    fields = ("id", "rule_id", "device_id", "metric", "severity", "status", "last_value", "occurrences")
    alerts = list(Alert.objects.filter(pk__in=alert_ids).order_by("id").values(*fields, "first_triggered_at"))
    if not alerts:
        return None
    return orjson.dumps({"notification": notification_id, "channel": channel_id, "alerts": alerts})


def notification_deliver_attempt(*, notification_id: uuid.UUID) -> DeliveryResult:
    """Try to deliver one outbox row now, if it is due and nobody else holds it.

    1. Claim: one conditional UPDATE moves `next_attempt_at` a lease ahead, so a second
       worker (a duplicate task, the sweeper's) finds nothing to do until the lease ends.
    2. The channel's breaker: open -> rescheduled at its `retry_after`, no call (`held`).
    3. POST the alerts as JSON (`iot.outbound`: SSRF guard after DNS, short timeouts, no
       redirect). 2xx -> `delivered`. Anything else -> `failed`, retried with backoff
       until `expires_at`, even a 4xx (a receiver fixed meanwhile gets it; nothing is
       dropped before the expiry, which is logged and counted). Only a retryable
       failure (connection, timeout, 5xx, 408/429) counts against the breaker: a 4xx or
       a refused address says nothing about the service's health.
    """
    with connection.cursor() as cursor:
        cursor.execute(_CLAIM_SQL, [settings.ALERT_NOTIFICATION_LEASE_SECONDS, notification_id])
        claimed = cursor.fetchone()
    if claimed is None:
        if _notification_expire(notification_id=notification_id, reason="expired before any attempt"):
            return DeliveryResult("expired")
        return DeliveryResult("skipped")
    channel_id, kind, url, alert_ids, attempts = claimed
    body = _notification_body(notification_id=notification_id, channel_id=channel_id, alert_ids=alert_ids)
    if body is None:
        # Its alerts were deleted (with their device or rule): nothing left to report.
        Notification.objects.filter(pk=notification_id, status=NotificationStatus.PENDING).update(
            status=NotificationStatus.EXPIRED, last_error="its alerts were deleted before delivery"
        )
        notification_outcome_count("expired")
        return DeliveryResult("expired")
    name = channel_breaker_name(channel_id)
    permit = breaker_acquire(name=name)
    if not permit.allowed:
        delay = permit.retry_after_seconds + random.uniform(0, 1)
        retry_in = _reschedule(
            notification_id=notification_id, delay=delay, attempted=False, error=f"circuit breaker {permit.state}"
        )
        notification_outcome_count("held")
        return DeliveryResult("held", retry_in)
    try:
        notification_send(kind=kind, url=url, body=body, notification_id=notification_id)
    except OutboundError as exc:
        if exc.retryable:
            breaker_record(permit=permit, success=False)
        else:
            breaker_release(permit=permit)
        retry_after = getattr(exc, "retry_after_seconds", None)
        delay = notification_backoff_seconds(attempts=attempts + 1, retry_after=retry_after)
        error = f"{type(exc).__name__}: {exc}"
        log = logger.info if exc.retryable else logger.warning
        log("notification %s to channel %s failed (attempt %d): %s", notification_id, channel_id, attempts + 1, error)
        retry_in = _reschedule(notification_id=notification_id, delay=delay, attempted=True, error=error)
        notification_outcome_count("failed")
        return DeliveryResult("failed", retry_in)
    except BaseException:
        breaker_release(permit=permit)  # an unexpected error is not a verdict on the service
        raise
    breaker_record(permit=permit, success=True)
    with connection.cursor() as cursor:
        cursor.execute(_DELIVERED_SQL, [notification_id])
    notification_outcome_count("delivered")
    return DeliveryResult("delivered")
