import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from devices.models import Device
from firmware.models.releases import VERSION_MAX_LENGTH, FirmwareRelease

ROLLOUT_NAME_MAX_LENGTH = 200
STOP_REASON_MAX_LENGTH = 2000
SKIP_REASON_MAX_LENGTH = 500


class RolloutStatus(models.TextChoices):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    STOPPED = "stopped"  # the error threshold tripped, a stage could no longer pass, or its window closed
    CANCELLED = "cancelled"


# A rollout in one of these may still start updates; the others are final (their in-flight updates are being,
# or have been, cancelled and compensated: `settled_at` says when the last one ended).
ROLLOUT_ACTIVE_STATUSES = (RolloutStatus.RUNNING, RolloutStatus.PAUSED)
ROLLOUT_FINAL_STATUSES = (RolloutStatus.COMPLETED, RolloutStatus.STOPPED, RolloutStatus.CANCELLED)


class FirmwareRollout(models.Model):
    """One release rolled out to a set of devices in stages (e.g. 1% -> 10% -> 100%), as hawkBit's rollouts.

    **Targets** are resolved once, at start (`firmware.rollouts.firmware_rollout_start`), into
    `FirmwareRolloutTarget` rows by ONE `INSERT ... SELECT`: the devices not decommissioned that
    match every filter given (`group_id`, `device_type`, `from_version` = their current firmware,
    `device_status`), minus those already running `to_version`. A device registered later is not
    in the rollout; one deleted meanwhile leaves it (its target row cascades).

    **Stages** (`FirmwareRolloutStage`) are cumulative percentages of the targets. Stage k's
    updates are created when stage k-1 has *passed*: `success_threshold` of its updates ended
    `installed` (the rest may still be running). The whole rollout **stops** when more than
    `error_threshold` of its finished updates failed, once at least `error_min_finished` have
    finished (so the first failure of a 1-device canary stage alone does not stop it), or when a
    stage can no longer pass. Stopping or cancelling cancels every update of the rollout still in
    flight: their sagas compensate and the devices get their status and firmware back.

    `next_position`: targets (in position order) already handed an update or skipped; the
    rollout row is locked while it moves, so no target gets two updates (also a partial unique
    index on `firmware_update (rollout, device)`). `skipped_count`: targets whose device had
    another active update when its stage came (never `force`d) or was gone.

    `maintenance_window_*` is passed to every update: devices download at any time but install
    only inside it. `settled_at`: when the rollout had ended (`completed`, `stopped`,
    `cancelled`) and no update of it was in flight any more.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=ROLLOUT_NAME_MAX_LENGTH)
    release = models.ForeignKey(FirmwareRelease, on_delete=models.PROTECT, related_name="rollouts")
    to_version = models.CharField(max_length=VERSION_MAX_LENGTH)
    group_id = models.CharField(max_length=128, null=True, blank=True, help_text="Target filter: the device group.")
    device_type = models.CharField(max_length=64, null=True, blank=True, help_text="Target filter.")
    from_version = models.CharField(
        max_length=VERSION_MAX_LENGTH, null=True, blank=True, help_text="Target filter: the devices' current firmware."
    )
    device_status = models.CharField(max_length=16, null=True, blank=True, help_text="Target filter.")
    success_threshold = models.FloatField(help_text="Fraction of a stage's updates that must end installed.")
    error_threshold = models.FloatField(help_text="Fraction of the finished updates that may fail before it stops.")
    error_min_finished = models.PositiveIntegerField(help_text="Finished updates before the error threshold counts.")
    maintenance_window_start = models.DateTimeField(null=True, blank=True)
    maintenance_window_end = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=RolloutStatus.choices, default=RolloutStatus.RUNNING)
    current_stage = models.PositiveSmallIntegerField(default=0, help_text="Index of the stage being rolled out.")
    target_count = models.PositiveIntegerField(default=0)
    next_position = models.PositiveIntegerField(default=0, editable=False)
    skipped_count = models.PositiveIntegerField(default=0)
    stop_reason = models.TextField(blank=True, default="")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now, editable=False)
    finished_at = models.DateTimeField(null=True, blank=True, help_text="When it completed, stopped or was cancelled.")
    settled_at = models.DateTimeField(null=True, blank=True, help_text="When its last update in flight ended.")

    class Meta:
        db_table = "firmware_rollout"
        ordering = ("-created_at", "-id")
        constraints = [
            models.CheckConstraint(condition=Q(status__in=RolloutStatus.values), name="firmware_rollout_status_known"),
            models.CheckConstraint(
                condition=Q(success_threshold__gte=0, success_threshold__lte=1)
                & Q(error_threshold__gte=0, error_threshold__lte=1),
                name="firmware_rollout_thresholds_fractions",
            ),
            models.CheckConstraint(
                condition=Q(maintenance_window_start__isnull=True, maintenance_window_end__isnull=True)
                | Q(maintenance_window_end__gt=models.F("maintenance_window_start")),
                name="firmware_rollout_window_valid",
            ),
        ]
        indexes = [
            models.Index(fields=["-created_at", "-id"], name="firmware_rollout_created"),
            # The beat's scan: rollouts with work left (running, paused, or updates still being rolled back).
            models.Index(
                fields=["created_at"], condition=Q(settled_at__isnull=True), name="firmware_rollout_unsettled"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in ROLLOUT_ACTIVE_STATUSES


class FirmwareRolloutStage(models.Model):
    """One stage of a rollout: its cumulative percentage and the targets it covers.

    The stage covers target positions [previous stage's `end_position`, `end_position`):
    `end_position` = ceil(targets * percent / 100) (`firmware.rollouts.stage_ends`), computed once
    the targets are known. `started_at`: its first updates were created; `passed_at`: it reached
    the rollout's success threshold (and the next stage could start).
    """

    rollout = models.ForeignKey(FirmwareRollout, on_delete=models.CASCADE, related_name="stages")
    index = models.PositiveSmallIntegerField()
    percent = models.FloatField()
    end_position = models.PositiveIntegerField()
    skipped = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField(null=True, blank=True)
    passed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "firmware_rollout_stage"
        ordering = ("rollout", "index")
        constraints = [
            models.UniqueConstraint(fields=["rollout", "index"], name="firmware_rollout_stage_unique"),
            models.CheckConstraint(condition=Q(percent__gt=0, percent__lte=100), name="firmware_rollout_stage_percent"),
        ]

    def __str__(self) -> str:
        return f"stage {self.index + 1} ({self.percent:g}%)"


class FirmwareRolloutTarget(models.Model):
    """A device of a rollout and its place in the rollout's order (`position`, from 0).

    The order is by md5(rollout id || device id): deterministic for a rollout (a resumed or
    re-run advance hands out the same devices), uncorrelated with serial numbers or
    registration order, and different between rollouts, so the canary stage is not always
    the same few devices. `skipped_reason` is set when the device was passed over (another
    active update, gone); its update, if it got one, is `FirmwareUpdate(rollout, device)`.

    The device foreign key cascades in Postgres (migration 0002), as the updates' does.
    """

    id = models.BigAutoField(primary_key=True)
    rollout = models.ForeignKey(FirmwareRollout, on_delete=models.CASCADE, related_name="targets")
    device = models.ForeignKey(Device, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    position = models.PositiveIntegerField()
    skipped_reason = models.CharField(max_length=SKIP_REASON_MAX_LENGTH, blank=True, default="")

    class Meta:
        db_table = "firmware_rollout_target"
        constraints = [
            models.UniqueConstraint(fields=["rollout", "position"], name="firmware_rollout_target_position"),
            models.UniqueConstraint(fields=["rollout", "device"], name="firmware_rollout_target_device"),
        ]

    def __str__(self) -> str:
        return f"{self.device_id} #{self.position}"
