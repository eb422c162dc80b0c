"""Alert rules, the alerts they raise, silences, and the channels notifications go to.

Foreign keys to devices and rules are declared with `db_constraint=False` and
created by migration 0001 as real constraints with `ON DELETE CASCADE` in
Postgres: a device is deleted with one raw `DELETE` (`devices.services.
device_bulk_delete`), which Django's Python-side cascade never sees, so only a
database cascade takes its rules, alerts and silences with it (a Django
constraint, `DEFERRABLE INITIALLY DEFERRED` with no action, would make that
delete fail at commit instead).
"""

import uuid

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q
from django.utils import timezone

from devices.models import Device
from telemetry.models import METRIC_MAX_LENGTH

GROUP_ID_MAX_LENGTH = 128  # as `Device.group_id`


class AlertOperator(models.TextChoices):
    GT = "gt", "greater than"
    LT = "lt", "less than"
    GTE = "gte", "greater than or equal to"
    LTE = "lte", "less than or equal to"
    EQ = "eq", "equal to"
    NE = "ne", "not equal to"


class AlertSeverity(models.TextChoices):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class AlertStatus(models.TextChoices):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


# While an alert is in one of these, further violations of its rule on its device update it
# (the partial unique index below); after `resolved` the next violation opens a new alert.
ACTIVE_STATUSES = (AlertStatus.OPEN, AlertStatus.ACKNOWLEDGED)


class NotificationChannelKind(models.TextChoices):
    WEBHOOK = "webhook"
    EMAIL = "email"


class NotificationChannel(models.Model):
    """Where a rule's notifications go: a webhook URL, or `mailto:` addresses for an email channel.

    Minimal on purpose: delivery (the outbox, the per-channel circuit breaker, the SSRF
    guard) belongs to the notifications part and extends this model.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=128)
    kind = models.CharField(
        max_length=16, choices=NotificationChannelKind.choices, default=NotificationChannelKind.WEBHOOK
    )
    url = models.CharField(max_length=2048, help_text="https://... for a webhook, mailto:a@b,c@d for email.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ("-created_at", "-id")

    def __str__(self) -> str:
        return self.name


class AlertRule(models.Model):
    """ "`metric` `operator` `threshold`" on one device, or on every device of a group.

    Exactly one of `device` and `group_id` is set (a check constraint). A group rule
    follows the group's membership at the time of each point: the device's current
    group is read with the point's insert, so moving a device between groups needs
    no invalidation of anything.

    `version` is bumped by every write, like `Device.version`. The rules are read on
    the ingestion path through a cache keyed by *scope* (`device:<id>`, `group:<g>`),
    guarded by `AlertRuleScope.version`, which every rule write bumps in its own
    transaction (`alerts.services`).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    device = models.ForeignKey(
        Device, on_delete=models.DO_NOTHING, db_constraint=False, null=True, blank=True, related_name="+"
    )
    group_id = models.CharField(max_length=GROUP_ID_MAX_LENGTH, null=True, blank=True, db_index=True)
    metric = models.CharField(max_length=METRIC_MAX_LENGTH)
    operator = models.CharField(max_length=8, choices=AlertOperator.choices)
    threshold = models.FloatField()
    severity = models.CharField(max_length=16, choices=AlertSeverity.choices, default=AlertSeverity.WARNING)
    channels = models.ManyToManyField(NotificationChannel, through="AlertRuleChannel", blank=True, related_name="rules")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now, editable=False)
    version = models.BigIntegerField(default=1, editable=False, help_text="Bumped by every write.")

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = [
            models.CheckConstraint(
                condition=Q(device__isnull=False, group_id__isnull=True)
                | Q(device__isnull=True, group_id__isnull=False),
                name="alertrule_device_xor_group",
            ),
            models.CheckConstraint(condition=Q(operator__in=AlertOperator.values), name="alertrule_operator_known"),
            models.CheckConstraint(condition=Q(severity__in=AlertSeverity.values), name="alertrule_severity_known"),
        ]
        indexes = [models.Index(fields=["-created_at", "-id"], name="alertrule_created_id")]

    def __str__(self) -> str:
        target = f"device {self.device_id}" if self.device_id else f"group {self.group_id}"
        return f"{self.metric} {self.operator} {self.threshold:g} on {target}"

    @property
    def scope(self) -> str:
        return rule_scope(device_id=self.device_id, group_id=self.group_id)


def rule_scope(*, device_id: uuid.UUID | str | None, group_id: str | None) -> str:
    """The cache scope a rule belongs to: `device:<id>` or `group:<g>`."""
    return f"device:{device_id}" if device_id is not None else f"group:{group_id}"


class AlertRuleChannel(models.Model):
    """A rule notifies a channel. Explicit so its foreign keys cascade in Postgres (see the module docstring):
    a device's deletion takes its rules, and these rows, in the same `DELETE`."""

    rule = models.ForeignKey(AlertRule, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    channel = models.ForeignKey(NotificationChannel, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["rule", "channel"], name="alertrulechannel_unique")]

    def __str__(self) -> str:
        return f"{self.rule_id} -> {self.channel_id}"


class AlertRuleScope(models.Model):
    """The version of the set of rules of one scope (`device:<id>` or `group:<g>`).

    Bumped (`INSERT ... ON CONFLICT DO UPDATE`, to the later of version + 1 and the current time in
    microseconds, so that a version never repeats, even across an emptied table) in the
    transaction of every write to a rule of the scope; it is the guard of that
    scope's entry in the rules cache (`alerts.cache`). A scope that never had a
    rule has no row: version 0. Rows are never deleted (a deleted scope's version
    must keep growing, or a stale fill could match it again).
    """

    scope = models.CharField(max_length=GROUP_ID_MAX_LENGTH + 8, primary_key=True)
    version = models.BigIntegerField()

    def __str__(self) -> str:
        return f"{self.scope} v{self.version}"


class Alert(models.Model):
    """A rule violated on a device: one row per episode, from the first violation until resolved.

    While it is open or acknowledged it is the only one of its (rule, device): a
    partial unique index enforces it, and every later violation updates
    `occurrences`, `last_value` and `last_triggered_at` through `INSERT ... ON
    CONFLICT` on that index (`alerts.services.alerts_evaluate`), so concurrent
    ingestion can neither duplicate it nor lose a count. The rule's metric,
    operator, threshold and severity are copied at creation: the alert says what
    was violated even after the rule changes.

    `*_triggered_at` are the points' own timestamps; `created_at` is when the
    platform opened the alert.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    rule = models.ForeignKey(AlertRule, on_delete=models.DO_NOTHING, db_constraint=False, related_name="alerts")
    device = models.ForeignKey(Device, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    status = models.CharField(max_length=16, choices=AlertStatus.choices, default=AlertStatus.OPEN)
    severity = models.CharField(max_length=16, choices=AlertSeverity.choices)
    metric = models.CharField(max_length=METRIC_MAX_LENGTH)
    operator = models.CharField(max_length=8, choices=AlertOperator.choices)
    threshold = models.FloatField()
    occurrences = models.BigIntegerField(help_text="Violating points counted since the alert opened.")
    first_value = models.FloatField()
    last_value = models.FloatField()
    first_triggered_at = models.DateTimeField()
    last_triggered_at = models.DateTimeField()
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = [
            models.UniqueConstraint(
                fields=["rule", "device"],
                condition=Q(status__in=ACTIVE_STATUSES),
                name="alert_one_active_per_rule_device",
            ),
            models.CheckConstraint(condition=Q(status__in=AlertStatus.values), name="alert_status_known"),
        ]
        indexes = [
            models.Index(fields=["-created_at", "-id"], name="alert_created_id"),
            models.Index(fields=["device", "-created_at"], name="alert_device_created"),
            models.Index(fields=["status", "-created_at"], name="alert_status_created"),
        ]

    def __str__(self) -> str:
        return f"{self.metric} {self.operator} {self.threshold:g} on {self.device_id} ({self.status})"


class Silence(models.Model):
    """Mutes notifications for a rule, a device or a group from `starts_at` until `ends_at`.

    Alerts are still recorded and counted; only their notifications are held back
    (the notifications part asks `alerts.selectors.silence_active_for`). Exactly one
    target is set (a check constraint). Expiring a silence sets `ends_at` to now;
    the row stays, as a record.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    rule = models.ForeignKey(
        AlertRule, on_delete=models.DO_NOTHING, db_constraint=False, null=True, blank=True, related_name="silences"
    )
    device = models.ForeignKey(
        Device, on_delete=models.DO_NOTHING, db_constraint=False, null=True, blank=True, related_name="+"
    )
    group_id = models.CharField(max_length=GROUP_ID_MAX_LENGTH, null=True, blank=True)
    starts_at = models.DateTimeField(default=timezone.now)
    ends_at = models.DateTimeField()
    comment = models.TextField(blank=True, default="")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = [
            models.CheckConstraint(
                condition=Q(rule__isnull=False, device__isnull=True, group_id__isnull=True)
                | Q(rule__isnull=True, device__isnull=False, group_id__isnull=True)
                | Q(rule__isnull=True, device__isnull=True, group_id__isnull=False),
                name="silence_one_target",
            ),
            models.CheckConstraint(condition=Q(ends_at__gte=models.F("starts_at")), name="silence_ends_after_start"),
        ]
        indexes = [
            models.Index(fields=["-created_at", "-id"], name="silence_created_id"),
            models.Index(fields=["ends_at"], name="silence_ends_at"),
        ]

    def __str__(self) -> str:
        if self.rule_id:
            target = f"rule {self.rule_id}"
        elif self.device_id:
            target = f"device {self.device_id}"
        else:
            target = f"group {self.group_id}"
        return f"silence of {target} until {self.ends_at:%Y-%m-%d %H:%M}"


class NotificationStatus(models.TextChoices):
    PENDING = "pending"
    DELIVERED = "delivered"
    EXPIRED = "expired"


class Notification(models.Model):
    """One message to one channel about a batch of newly opened alerts: the outbox row.

    Written in the transaction that opens the alerts (`alerts.services.notifications_record`),
    so a notification exists exactly when its alerts do, whatever happens to the broker or
    a worker afterwards. Delivered by `alerts.tasks.notification_deliver`, which claims the
    row with a conditional UPDATE (`status = pending AND next_attempt_at <= now()`, moving
    `next_attempt_at` a lease ahead), so two workers never send it at the same time; the
    periodic sweeper re-queues rows whose task was lost. A row ends `delivered`, or
    `expired` once `expires_at` passes (logged and counted, never silently dropped).
    `alert_ids` is an array, not a foreign key: the alerts may be deleted with their
    device, and the row still says what it was about. The channel's deletion takes its
    rows (a cascading foreign key, migration 0002).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    channel = models.ForeignKey(
        NotificationChannel, on_delete=models.DO_NOTHING, db_constraint=False, related_name="notifications"
    )
    alert_ids = ArrayField(models.UUIDField())
    status = models.CharField(max_length=16, choices=NotificationStatus.choices, default=NotificationStatus.PENDING)
    attempts = models.IntegerField(default=0, help_text="Calls made to the channel (held by an open breaker: none).")
    next_attempt_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    last_error = models.TextField(blank=True, default="")
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = [
            models.CheckConstraint(condition=Q(status__in=NotificationStatus.values), name="notification_status_known"),
        ]
        indexes = [
            # The sweeper's and the claim's question: which pending rows are due.
            models.Index(fields=["next_attempt_at"], condition=Q(status="pending"), name="notification_pending_due"),
            models.Index(fields=["channel", "-created_at"], name="notification_channel_created"),
        ]

    def __str__(self) -> str:
        return f"notification {self.id} to {self.channel_id} ({self.status})"
