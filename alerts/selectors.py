"""Reads of the alerts app: the rules a device is subject to (the ingestion hot path), alerts, silences."""

import uuid
from datetime import datetime, timedelta

import orjson
from django.conf import settings
from django.db import connection
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from alerts.cache import rules_cache_get_many, rules_cache_key
from alerts.models import (
    ACTIVE_STATUSES,
    Alert,
    AlertRule,
    AlertRuleChannel,
    AlertRuleScope,
    AlertSeverity,
    Notification,
    NotificationChannel,
    NotificationStatus,
    Silence,
    rule_scope,
)
from iot.cache import versioned_cache_fill

# A cached rule, as the evaluation loop reads it: [rule id, operator, threshold, severity, has channels].
# `has channels` lets an evaluation that opens an alert skip the notifications' statement when no rule of
# it notifies anyone (channels are set only by rule writes, which invalidate the scope; a channel's
# deletion leaves it true, which costs one statement that inserts nothing).
CachedRule = list
# The rules of one or more scopes grouped by metric.
RulesByMetric = dict[str, list[CachedRule]]

_EMPTY = b"{}"

_RULES = AlertRule._meta.db_table
_SCOPES = AlertRuleScope._meta.db_table
_RULE_CHANNELS = AlertRuleChannel._meta.db_table

# One statement, so one snapshot: the versions and the rules of both scopes are read together,
# never a version from after a rule write with the rules from before it (READ COMMITTED gives
# each statement its own snapshot). The payload is built by Postgres as the cache stores it.
_SCOPE_RULES = f"""
(SELECT COALESCE(json_object_agg(metric, rules)::text, '{{{{}}}}')
 FROM (SELECT metric, json_agg(json_build_array(
                  id, operator, threshold, severity,
                  EXISTS (SELECT 1 FROM {_RULE_CHANNELS} AS rc WHERE rc.rule_id = {_RULES}.id)
              ) ORDER BY id) AS rules
       FROM {_RULES} WHERE enabled AND {{column}} = %s GROUP BY metric) AS by_metric)
"""
_READ_SCOPES_SQL = f"""
SELECT COALESCE((SELECT version FROM {_SCOPES} WHERE scope = %s), 0),
       {_SCOPE_RULES.format(column="device_id")},
       COALESCE((SELECT version FROM {_SCOPES} WHERE scope = %s), 0),
       {_SCOPE_RULES.format(column="group_id")}
"""


def _scopes_read(*, device_id: uuid.UUID, group_id: str | None) -> list[tuple[int, bytes]]:
    """(version, payload) of the device's scope and, if it has a group, of the group's; from Postgres."""
    device_scope = rule_scope(device_id=device_id, group_id=None)
    group_scope = rule_scope(device_id=None, group_id=group_id) if group_id is not None else ""
    with connection.cursor() as cursor:
        cursor.execute(_READ_SCOPES_SQL, [device_scope, device_id, group_scope, group_id])
        device_version, device_rules, group_version, group_rules = cursor.fetchone()
    read = [(device_version, device_rules.encode())]
    if group_id is not None:
        read.append((group_version, group_rules.encode()))
    return read


# The versions of a device's two rule scopes, as a scalar SQL expression over `d` (the device row
# the telemetry insert joins: columns `id`, `group_id`): the insert statement returns it, in its own
# snapshot, so an evaluation knows the versions without a round trip. Two primary-key probes of a
# small table. 0 = the scope never had a rule (no row), which is what most devices are.
_DEVICE_SCOPE_PREFIX = rule_scope(device_id="", group_id=None)
_GROUP_SCOPE_PREFIX = rule_scope(device_id=None, group_id="")
RULE_VERSIONS_SQL = (
    f"ARRAY[COALESCE((SELECT version FROM {_SCOPES} WHERE scope = '{_DEVICE_SCOPE_PREFIX}' || d.id::text), 0),"
    f" COALESCE((SELECT version FROM {_SCOPES} WHERE scope = '{_GROUP_SCOPE_PREFIX}' || d.group_id), 0)]"
)

# This process's copy of the scopes it evaluated lately: scope -> (version, rules by metric). Exact,
# not merely fresh: an entry is used only when its version is at least the one the insert statement
# just read from Postgres, and every rule write bumps that version in its own transaction. Bounded;
# when full, the oldest entry goes (insertion order).
_local_rules: dict[str, tuple[int, RulesByMetric]] = {}


def _local_rules_store(scope: str, version: int, rules: RulesByMetric) -> None:
    if scope not in _local_rules and len(_local_rules) >= settings.ALERT_RULES_LOCAL_CACHE_SIZE:
        try:
            del _local_rules[next(iter(_local_rules))]
        except (KeyError, StopIteration, RuntimeError):  # another thread got there first
            pass
    _local_rules[scope] = (version, rules)


def _merge(parts: list[RulesByMetric]) -> RulesByMetric:
    """The rules of several scopes by metric, in a new dict: cached dicts are shared, never mutated."""
    parts = [part for part in parts if part]
    if len(parts) <= 1:
        return parts[0] if parts else {}
    merged: RulesByMetric = {}
    for part in parts:
        for metric, metric_rules in part.items():
            merged[metric] = merged.get(metric, []) + metric_rules
    return merged


def alert_rules_for(*, device_id: uuid.UUID, group_id: str | None, versions: list[int] | None = None) -> RulesByMetric:
    """The enabled rules a device's points are evaluated against (its own and its group's), by metric.

    `versions` are the scopes' versions (device's, group's) as the caller's insert statement
    read them (`RULE_VERSIONS_SQL`). With them, a scope at version 0 has no rule and costs
    nothing, and a scope this process holds at that version or newer costs nothing either:
    the steady state of ingestion makes no Redis call and no query here. What is left (or
    everything, without `versions`) comes from the shared version-guarded cache in Redis, one
    round trip for both scopes; a miss there reads both scopes in one SQL statement and fills
    the missed entries, each fill refused if a rule write of that scope has been tombstoned
    since (`iot.cache`), so a rule change is seen by the very next evaluation after its commit.
    """
    scopes = [rule_scope(device_id=device_id, group_id=None)]
    if group_id is not None:
        scopes.append(rule_scope(device_id=None, group_id=group_id))
    parts: list[RulesByMetric | None] = [None] * len(scopes)
    if versions is not None:
        for index, scope in enumerate(scopes):
            if versions[index] == 0:
                parts[index] = {}
                continue
            held = _local_rules.get(scope)
            if held is not None and held[0] >= versions[index]:
                parts[index] = held[1]
        if None not in parts:
            return _merge(parts)
    wanted = [index for index, part in enumerate(parts) if part is None]
    keys = [rules_cache_key(scopes[index]) for index in wanted]
    lookups = rules_cache_get_many(keys=keys)
    read = None
    for position, index in enumerate(wanted):
        lookup = lookups[position]
        if lookup.payload is not None:
            payload = lookup.payload
            # A hit is at least the version the statement read: that version's writer tombstoned
            # the entry before committing, and older fills are refused from then on.
            version = versions[index] if versions is not None else None
        else:
            if read is None:
                read = _scopes_read(device_id=device_id, group_id=group_id)
            version, payload = read[index]
            versioned_cache_fill(
                key=keys[position],
                version=version,
                payload=payload,
                lookup=lookup,
                ttl_seconds=settings.DEVICE_CACHE_TTL_SECONDS,
            )
        parts[index] = {} if payload == _EMPTY else orjson.loads(payload)
        if version is not None:
            _local_rules_store(scopes[index], version, parts[index])
    return _merge(parts)


def alert_rule_get(*, rule_id: uuid.UUID) -> AlertRule | None:
    return AlertRule.objects.prefetch_related("channels").filter(pk=rule_id).first()


def alert_rule_list(
    *, device_id: uuid.UUID | None = None, group_id: str | None = None, enabled: bool | None = None
) -> QuerySet[AlertRule]:
    rules = AlertRule.objects.prefetch_related("channels")
    if device_id is not None:
        rules = rules.filter(device_id=device_id)
    if group_id is not None:
        rules = rules.filter(group_id=group_id)
    if enabled is not None:
        rules = rules.filter(enabled=enabled)
    return rules


def _alerts() -> QuerySet[Alert]:
    return Alert.objects.select_related("acknowledged_by", "resolved_by")


def alert_get(*, alert_id: uuid.UUID) -> Alert | None:
    return _alerts().filter(pk=alert_id).first()


def alert_list_by_ids(*, alert_ids: list[str]) -> QuerySet[Alert]:
    return _alerts().select_related("device").filter(pk__in=alert_ids).order_by("created_at", "id")


def alert_list(
    *,
    device_id: uuid.UUID | None = None,
    status: str | None = None,
    rule_id: uuid.UUID | None = None,
    severity: str | None = None,
) -> QuerySet[Alert]:
    alerts = _alerts()
    if device_id is not None:
        alerts = alerts.filter(device_id=device_id)
    if status is not None:
        alerts = alerts.filter(status=status)
    if rule_id is not None:
        alerts = alerts.filter(rule_id=rule_id)
    if severity is not None:
        alerts = alerts.filter(severity=severity)
    return alerts


def silence_get(*, silence_id: uuid.UUID) -> Silence | None:
    return Silence.objects.select_related("created_by").filter(pk=silence_id).first()


def silence_list(*, active: bool | None = None) -> QuerySet[Silence]:
    silences = Silence.objects.select_related("created_by")
    if active is not None:
        now = timezone.now()
        in_force = Q(starts_at__lte=now, ends_at__gt=now)
        silences = silences.filter(in_force) if active else silences.exclude(in_force)
    return silences


def silence_active_for(
    *, rule_id: uuid.UUID, device_id: uuid.UUID, group_id: str | None, at: datetime | None = None
) -> bool:
    """Whether a notification about `rule_id` on `device_id` (in `group_id`) is muted at `at` (default now).

    One indexed query: a silence of the rule, of the device or of the group, in force.
    For the notifications part, which asks it before delivering; the alert itself is
    recorded and counted whatever this says.
    """
    at = at or timezone.now()
    target = Q(rule_id=rule_id) | Q(device_id=device_id)
    if group_id is not None:
        target |= Q(group_id=group_id)
    return Silence.objects.filter(target, starts_at__lte=at, ends_at__gt=at).exists()


def notifications_due(*, overdue_seconds: float, limit: int) -> list[uuid.UUID]:
    """Pending notifications due for more than `overdue_seconds` (their task was lost), oldest due first.

    The grace keeps the sweeper from duplicating the tasks that are about to run anyway
    (duplicates would be harmless: the claim lets one through). Uses the partial index
    on pending rows.
    """
    cutoff = timezone.now() - timedelta(seconds=overdue_seconds)
    return list(
        Notification.objects.filter(status=NotificationStatus.PENDING, next_attempt_at__lte=cutoff)
        .order_by("next_attempt_at")
        .values_list("pk", flat=True)[:limit]
    )


def notification_channel_get(*, channel_id: uuid.UUID) -> NotificationChannel | None:
    return NotificationChannel.objects.filter(pk=channel_id).first()


def notification_channel_list() -> QuerySet[NotificationChannel]:
    return NotificationChannel.objects.all()


def alert_active_count(*, group_id: str | None = None) -> int:
    """Open or acknowledged alerts, of the whole fleet or of the devices now in a group: one count query."""
    alerts = Alert.objects.filter(status__in=ACTIVE_STATUSES)
    if group_id is not None:
        alerts = alerts.filter(device__group_id=group_id)
    return alerts.count()


def alert_active_counts_by_severity() -> dict[str, int]:
    """Open or acknowledged alerts by severity (every severity present, 0 if none): one query."""
    counts = dict(
        Alert.objects.filter(status__in=ACTIVE_STATUSES).values_list("severity").annotate(n=Count("pk")).order_by()
    )
    return {severity: counts.get(severity, 0) for severity in AlertSeverity.values}
