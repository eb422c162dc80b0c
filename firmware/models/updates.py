import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from devices.models import Device
from firmware.models.releases import VERSION_MAX_LENGTH, FirmwareRelease
from firmware.models.rollouts import FirmwareRollout

REASON_MAX_LENGTH = 1000


class UpdateStatus(models.TextChoices):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    INSTALLING = "installing"
    INSTALLED = "installed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


# While an update is in one of these it may still change the device; the final status is written
# by the saga's last transaction (`firmware.saga.firmware_update_finished`), together with the
# device's restored (or new) state, so a final status always means the device is settled.
ACTIVE_STATUSES = (UpdateStatus.PENDING, UpdateStatus.DOWNLOADING, UpdateStatus.DOWNLOADED, UpdateStatus.INSTALLING)
FINAL_STATUSES = (UpdateStatus.INSTALLED, UpdateStatus.FAILED, UpdateStatus.ROLLED_BACK)

# The order of the stages a device reports; a report never moves an update to an earlier stage
# (a late or repeated report is answered with the current state and changes nothing).
STAGE_RANK = {status: rank for rank, status in enumerate(ACTIVE_STATUSES)}


class DeviceResult(models.TextChoices):
    """The device's own verdict, recorded by its report; the saga turns it into the final status."""

    INSTALLED = "installed"
    FAILED = "failed"


class FirmwareUpdate(models.Model):
    """One device being moved to one release, driven by a durable saga (`iot.saga`, "firmware.update").

    The saga's steps (`firmware.saga`) verify the artifact, put the device in maintenance,
    dispatch the update to it, wait for its report, check the version it reports and
    complete; a failure compensates the completed steps in reverse order and the device gets
    back its previous status and firmware version. `saga_run_id` is that run.

    **One active update per device**, in the database: a partial unique index on `device`
    over the active statuses, for updates not cancelled. A cancelled (or superseded, by
    `force`) update leaves the index at once, in the request that cancels it, so a new one
    can be created in the same request; it keeps its active status until its compensation
    has run (then `rolled_back`), and the next update of the device waits for it before
    touching the device (`firmware.saga.enter_maintenance`), so two updates never change one
    device at the same time.

    Device-facing columns: `dispatched_at` (the device may see and report on it; `withdrawn_at`
    when a compensation takes it back), `device_result` / `reported_version` / `device_reason`
    (its final report, recorded once), `last_report_at` (silence is measured from here).
    `maintenance_window_*`: the device may download at any time but install only inside it.
    `rollout` / `rollout_stage`: the staged rollout (and its stage) that created the update, if any;
    at most one update per (rollout, device), a partial unique index.

    The device foreign key cascades in Postgres (migration 0001): a device's raw `DELETE`
    (`devices.services.device_bulk_delete`) takes its updates; a saga whose update is gone
    fails and its compensations find nothing to restore.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    device = models.ForeignKey(Device, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    release = models.ForeignKey(FirmwareRelease, on_delete=models.PROTECT, related_name="updates")
    from_version = models.CharField(max_length=VERSION_MAX_LENGTH)
    to_version = models.CharField(max_length=VERSION_MAX_LENGTH)
    status = models.CharField(max_length=16, choices=UpdateStatus.choices, default=UpdateStatus.PENDING)
    progress = models.PositiveSmallIntegerField(default=0)
    force = models.BooleanField(default=False)
    maintenance_window_start = models.DateTimeField(null=True, blank=True)
    maintenance_window_end = models.DateTimeField(null=True, blank=True)
    saga_run_id = models.UUIDField(null=True, blank=True, unique=True, editable=False)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    withdrawn_at = models.DateTimeField(null=True, blank=True)
    device_result = models.CharField(max_length=16, choices=DeviceResult.choices, null=True, blank=True)
    reported_version = models.CharField(max_length=VERSION_MAX_LENGTH, null=True, blank=True)
    device_reason = models.CharField(max_length=REASON_MAX_LENGTH, blank=True, default="")
    last_report_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    superseded_by = models.UUIDField(null=True, blank=True, help_text="The update that superseded this one (force).")
    error = models.TextField(null=True, blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    rollout = models.ForeignKey(
        FirmwareRollout, on_delete=models.PROTECT, null=True, blank=True, related_name="updates", editable=False
    )
    rollout_stage = models.PositiveSmallIntegerField(null=True, blank=True, editable=False)
    started_at = models.DateTimeField(default=timezone.now, editable=False)
    completed_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        db_table = "firmware_update"
        ordering = ("-started_at", "-id")
        constraints = [
            models.UniqueConstraint(
                fields=["device"],
                condition=Q(status__in=ACTIVE_STATUSES, cancelled_at__isnull=True),
                name="firmware_update_one_active_per_device",
            ),
            models.CheckConstraint(condition=Q(status__in=UpdateStatus.values), name="firmware_update_status_known"),
            models.CheckConstraint(condition=Q(progress__lte=100), name="firmware_update_progress_percent"),
            models.CheckConstraint(
                condition=Q(maintenance_window_start__isnull=True, maintenance_window_end__isnull=True)
                | Q(maintenance_window_end__gt=models.F("maintenance_window_start")),
                name="firmware_update_window_valid",
            ),
            models.CheckConstraint(
                condition=Q(device_result__isnull=True) | Q(device_result__in=DeviceResult.values),
                name="firmware_update_device_result_known",
            ),
            models.UniqueConstraint(
                fields=["rollout", "device"],
                condition=Q(rollout__isnull=False),
                name="firmware_update_one_per_rollout_device",
            ),
        ]
        indexes = [
            models.Index(fields=["-started_at", "-id"], name="firmware_update_started"),
            models.Index(fields=["device", "-started_at"], name="firmware_update_device"),
            models.Index(fields=["status", "-started_at"], name="firmware_update_status"),
            # A rollout's progress: counts by (stage, status), an index-only scan of the rollout's updates.
            models.Index(
                fields=["rollout", "rollout_stage", "status"],
                condition=Q(rollout__isnull=False),
                name="firmware_update_rollout",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.from_version} -> {self.to_version} on {self.device_id} ({self.status})"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def install_allowed(self, *, now=None) -> bool:
        """Inside the maintenance window (or always, without one)."""
        if self.maintenance_window_start is None:
            return True
        now = now or timezone.now()
        return self.maintenance_window_start <= now < self.maintenance_window_end
