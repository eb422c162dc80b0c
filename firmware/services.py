"""Writes of the firmware app: releases and their artifacts, updates, device reports.

**Releases**: registration is one INSERT guarded by the unique `version` (a duplicate is
`409`, under any concurrency). The artifact is streamed to storage with its SHA-256 computed
on the way (`firmware.artifacts`) and attached by one conditional UPDATE on a release that has
none yet, so it is set once.

**Updates** are driven by the durable saga "firmware.update" (`firmware.saga`, on `iot.saga`):
`firmware_update_start` inserts the update and starts its run in ONE transaction, so either
both exist or neither; the first step is queued on commit. One active update per device is a
partial unique index; `force` supersedes the active one in the same transaction (its saga is
cancelled and compensates, it ends `rolled_back`). Cancelling is `saga_cancel` plus a
conditional UPDATE of the update.

Lock order, everywhere: the saga run row, then the update row, then the device row. Every
saga step runs with its run row locked (`iot.saga`) and then touches the update and the device;
so a request that cancels a run calls `saga_cancel` (which takes the run row) BEFORE it
updates the update row, never the other way round, or the two would deadlock.

**Device reports** (`firmware_update_report`) are conditional UPDATEs: a stage report moves the
update forward only (its rank must be higher, or the same stage with more progress), so a
repeated or late report changes nothing and is answered with the current state; the final
report (`installed` / `failed`) is recorded once and wakes the saga after commit. The final
status itself is written by the saga's last transaction, with the device's state.
"""

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import F, ProtectedError, Q, Value
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from devices.models import Device, DeviceStatus
from firmware.artifacts import (
    FirmwareArtifactTooLarge,
    HashedUploadedFile,
    artifact_storage_name,
    sha256_of,
)
from firmware.models import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    STAGE_RANK,
    DeviceResult,
    FirmwareRelease,
    FirmwareUpdate,
    UpdateStatus,
)
from firmware.models.updates import REASON_MAX_LENGTH
from firmware.saga import SAGA_NAME
from iot.errors import ServiceError
from iot.saga import saga_cancel, saga_signal, saga_start

# --- Refusals ----------------------------------------------------------------------------------


class FirmwareVersionExists(ServiceError):
    status_code = 409
    code = "version_exists"
    default_detail = "A release with this version is already registered."


class FirmwareReleaseNotFound(ServiceError):
    status_code = 404
    default_detail = "No release with this version."


class FirmwareReleaseInUse(ServiceError):
    status_code = 409
    code = "release_in_use"
    default_detail = "Updates refer to this release; it is kept as their record."


class FirmwareArtifactExists(ServiceError):
    """A release's artifact is set once: a device may be downloading it (409)."""

    status_code = 409
    code = "artifact_exists"
    default_detail = "This release already has its artifact; register a new version for another file."


class FirmwareArtifactMissing(ServiceError):
    status_code = 404
    code = "no_artifact"
    default_detail = "This release has no artifact yet."


class FirmwareUpdateNotFound(ServiceError):
    status_code = 404
    default_detail = "No firmware update with this id."


class FirmwareUpdateForbidden(ServiceError):
    """A device acting on another device's update (403)."""

    status_code = 403
    default_detail = "A device may only report on its own updates."


class FirmwareUpdateUnknownDevice(ServiceError):
    status_code = 422
    field = "device_id"
    default_detail = "No device with this id."


class FirmwareUpdateUnknownVersion(ServiceError):
    status_code = 422
    field = "to_version"
    default_detail = "No release with this version."


class FirmwareUpdateActive(ServiceError):
    """The device already has an active update (409); its id and status are in the body."""

    status_code = 409
    code = "update_active"


class FirmwareUpdateConflict(ServiceError):
    """What was asked does not fit the update's state (409); `status` says what it is now."""

    status_code = 409
    code = "invalid_transition"


class FirmwareInstallNotAllowed(ServiceError):
    """An `installing` report outside the update's maintenance window (409)."""

    status_code = 409
    code = "outside_maintenance_window"


# --- Releases ----------------------------------------------------------------------------------


def firmware_release_register(
    *,
    version: str,
    checksum: str,
    size_bytes: int | None = None,
    release_notes: str = "",
    min_compatible_version: str | None = None,
    created_at: datetime | None = None,
) -> FirmwareRelease:
    """Register a release (no artifact yet). Raises `FirmwareVersionExists` (409) for a known version.

    The unique index on `version` decides between concurrent registrations of one label.
    """
    now = timezone.now()
    try:
        with transaction.atomic():
            return FirmwareRelease.objects.create(
                version=version,
                checksum=checksum,
                size_bytes=size_bytes,
                release_notes=release_notes or "",
                min_compatible_version=min_compatible_version,
                created_at=created_at or now,
                registered_at=now,
            )
    except IntegrityError as exc:
        if FirmwareRelease.objects.filter(version=version).exists():
            raise FirmwareVersionExists(f"Version {version!r} is already registered.") from exc
        raise


def firmware_artifact_attach(*, version: str, file: File) -> FirmwareRelease:
    """Store `file` as the release's artifact; the server computes its SHA-256 and size.

    A `HashedUploadedFile` (the API's upload handler) brings its digest, computed while it
    streamed in; any other file (the admin's upload) is hashed here, in chunks. The file is
    copied to storage, then attached by one conditional UPDATE on a release with no artifact:
    of two concurrent uploads one wins, the other's file is deleted and it gets `409`.
    Raises `FirmwareReleaseNotFound`, `FirmwareArtifactExists`, `FirmwareArtifactTooLarge`.

    The checksum is not compared here (the release may be registered with a checksum the
    artifact does not match: updates to it then fail their verification, which is what
    the checksum is for). A file stored by an upload whose transaction then fails stays in
    storage under a name nothing refers to (storages have no transactions).
    """
    release = FirmwareRelease.objects.filter(version=version).first()
    if release is None:
        raise FirmwareReleaseNotFound()
    if release.artifact_name:
        raise FirmwareArtifactExists()
    max_bytes = settings.FIRMWARE_ARTIFACT_MAX_BYTES
    if file.size is not None and file.size > max_bytes:
        raise FirmwareArtifactTooLarge(max_bytes)
    if isinstance(file, HashedUploadedFile) and file.sha256:
        digest, size = file.sha256, file.size
        file.seek(0)
    else:
        digest, size = sha256_of(file)
    if size > max_bytes:
        raise FirmwareArtifactTooLarge(max_bytes)
    name = default_storage.save(artifact_storage_name(release_id=release.pk), file)
    attached = FirmwareRelease.objects.filter(pk=release.pk, artifact_name="").update(
        artifact_name=name, artifact_sha256=digest, artifact_size=size, artifact_uploaded_at=timezone.now()
    )
    if not attached:
        default_storage.delete(name)
        raise FirmwareArtifactExists()
    release.refresh_from_db()
    return release


def firmware_release_delete(*, version: str) -> None:
    """Delete a release no update refers to, and its artifact file after commit.

    Raises `FirmwareReleaseNotFound`, `FirmwareReleaseInUse` (409: updates keep their release).
    """
    with transaction.atomic():
        release = FirmwareRelease.objects.filter(version=version).first()
        if release is None:
            raise FirmwareReleaseNotFound()
        try:
            release.delete()
        except ProtectedError as exc:
            raise FirmwareReleaseInUse() from exc
        if release.artifact_name:
            transaction.on_commit(partial(default_storage.delete, release.artifact_name), robust=True)


# --- Updates -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaintenanceWindow:
    """When a device may install: from `start`, for `duration_seconds`."""

    start: datetime
    duration_seconds: int

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.duration_seconds)


def _active_update_of(device_id: uuid.UUID) -> FirmwareUpdate | None:
    """The device's active update that holds the one-per-device slot (the partial unique index)."""
    return FirmwareUpdate.objects.filter(device_id=device_id, status__in=ACTIVE_STATUSES, cancelled_at=None).first()


def _cancel_in_transaction(*, update: FirmwareUpdate, reason: str, superseded_by: uuid.UUID | None = None) -> bool:
    """Cancel an update's saga and mark the update cancelled, in the caller's transaction; returns
    whether the saga was cancelled now.

    `saga_cancel` first: it takes the run row lock, the first lock of every step (see the module
    docstring). A run with no completed step to undo ends inside it (its `on_finish` writes
    `rolled_back` here and now); otherwise it compensates in the workers, queued when the caller
    commits. A run that had already ended leaves the update as it is; one compensating after a
    failure is marked too (it leaves the one-active slot to a successor, and still ends `failed`).
    """
    cancelled = False
    if update.saga_run_id is not None:
        cancelled = saga_cancel(run_id=update.saga_run_id, reason=reason)
    now = timezone.now()
    marks = {"cancelled_at": now, "updated_at": now, "error": Coalesce(F("error"), Value(reason))}
    if superseded_by is not None:
        marks["superseded_by"] = superseded_by
    rows = FirmwareUpdate.objects.filter(pk=update.pk, cancelled_at=None)
    if not cancelled:
        rows = rows.filter(status__in=ACTIVE_STATUSES)
    rows.update(**marks)
    return cancelled


def _user_id(user: AbstractBaseUser | None):
    return user.pk if user is not None and user.is_authenticated else None


# How often a forced start retries when another request made the device's active update between its
# supersede and its insert (each retry supersedes that one too: the last force wins).
_FORCE_ATTEMPTS = 5


@transaction.atomic
def firmware_update_start(
    *,
    device_id: uuid.UUID,
    to_version: str,
    force: bool = False,
    maintenance_window: MaintenanceWindow | None = None,
    requested_by: AbstractBaseUser | None = None,
    rollout_id: uuid.UUID | None = None,
    rollout_stage: int | None = None,
) -> FirmwareUpdate:
    """Create a pending update of a device to a release and start its saga, in one transaction.

    Raises `FirmwareUpdateUnknownDevice` / `FirmwareUpdateUnknownVersion` (422), and, for a
    device with an active update, `FirmwareUpdateActive` (409, naming it) unless `force`:
    then that update is cancelled (its saga compensates; it ends `rolled_back` with
    "superseded by <new id>") and the new one created, in this same transaction.
    A decommissioned device is refused (422): it takes no more updates. `rollout_id`/`rollout_stage`:
    the staged rollout creating it (`firmware.rollouts`); its saga's end then wakes the rollout.
    """
    release = FirmwareRelease.objects.filter(version=to_version).first()
    if release is None:
        raise FirmwareUpdateUnknownVersion(f"No release with version {to_version!r}.")
    device = Device.objects.filter(pk=device_id).values("firmware_version", "status").first()
    if device is None:
        raise FirmwareUpdateUnknownDevice()
    if device["status"] == DeviceStatus.DECOMMISSIONED:
        raise FirmwareUpdateUnknownDevice("The device is decommissioned.")
    update_id = uuid.uuid4()
    run_id = None
    for _ in range(_FORCE_ATTEMPTS):
        if force:
            active = _active_update_of(device_id)
            if active is not None:
                _cancel_in_transaction(
                    update=active, reason=f"superseded by update {update_id}", superseded_by=update_id
                )
        try:
            with transaction.atomic():
                update = FirmwareUpdate.objects.create(
                    id=update_id,
                    device_id=device_id,
                    release=release,
                    from_version=device["firmware_version"],
                    to_version=release.version,
                    force=force,
                    maintenance_window_start=maintenance_window.start if maintenance_window else None,
                    maintenance_window_end=maintenance_window.end if maintenance_window else None,
                    requested_by_id=_user_id(requested_by),
                    rollout_id=rollout_id,
                    rollout_stage=rollout_stage,
                )
        except IntegrityError:
            active = _active_update_of(device_id)
            if active is None:
                if not Device.objects.filter(pk=device_id).exists():
                    raise FirmwareUpdateUnknownDevice() from None  # deleted meanwhile: the foreign key refused
                # The update that held the slot ended between our insert and this read (a release with no
                # artifact fails within milliseconds): the slot is free now, try again.
                continue
            if not force:
                raise FirmwareUpdateActive(
                    f"The device already has an active update ({active.pk}, {active.status}); "
                    "send force=true to supersede it, or cancel it.",
                    active_update_id=str(active.pk),
                    active_status=active.status,
                ) from None
            continue
        # The device timeout the update runs with is the one it started with: every worker that takes a step
        # judges silence alike, whatever its own settings (a deployment changing them mid-update, or two
        # server sets on one database during a rolling upgrade).
        context = {
            "update_id": str(update_id),
            "device_id": str(device_id),
            "device_timeout_seconds": settings.FIRMWARE_DEVICE_TIMEOUT_SECONDS,
        }
        if rollout_id is not None:
            context["rollout_id"] = str(rollout_id)
        run_id = saga_start(name=SAGA_NAME, key=str(update_id), context=context)
        FirmwareUpdate.objects.filter(pk=update_id).update(saga_run_id=run_id)
        update.saga_run_id = run_id
        return update
    raise FirmwareUpdateActive("Other updates of this device kept being created concurrently; retry.")


def firmware_update_cancel(*, update_id: uuid.UUID, reason: str = "cancelled by an operator") -> FirmwareUpdate:
    """Cancel an active update: its saga compensates the steps it completed (in reverse order) and
    the update ends `rolled_back` with `error` = `reason`. Returns the update: `rolled_back` already if
    nothing had to be undone, else still active (with `cancelled_at`) until the compensation has run.
    Cancelling a cancelled update changes nothing.

    Raises `FirmwareUpdateNotFound`, or `FirmwareUpdateConflict` (409) for an update that has
    finished, or failed and is being rolled back already.
    """
    with transaction.atomic():
        update = FirmwareUpdate.objects.filter(pk=update_id).first()
        if update is None:
            raise FirmwareUpdateNotFound()
        if update.cancelled_at is not None:
            return update
        if update.status in FINAL_STATUSES:
            raise FirmwareUpdateConflict(
                f"The update is {update.status}; only an active update can be cancelled.", status=update.status
            )
        if not _cancel_in_transaction(update=update, reason=reason):
            update.refresh_from_db()
            detail = (
                f"The update is {update.status}; only an active update can be cancelled."
                if update.status in FINAL_STATUSES
                else "The update has failed and is being rolled back already."
            )
            raise FirmwareUpdateConflict(detail, status=update.status)  # rolls the marks back
        update.refresh_from_db()
        return update


# --- Device reports ----------------------------------------------------------------------------

STAGE_REPORTS = (UpdateStatus.DOWNLOADING, UpdateStatus.DOWNLOADED, UpdateStatus.INSTALLING)
FINAL_REPORTS = tuple(DeviceResult.values)
REPORT_STATUSES = (*[status.value for status in STAGE_REPORTS], *FINAL_REPORTS)

# The device may act on an update that was dispatched to it and is neither withdrawn nor cancelled
# nor already reported on; whether it has finished is in `status` itself.
_REPORTABLE = Q(
    status__in=ACTIVE_STATUSES,
    cancelled_at=None,
    withdrawn_at=None,
    dispatched_at__isnull=False,
    device_result=None,
)


def _signal_saga(run_id: uuid.UUID | None) -> None:
    if run_id is not None:
        # After the commit: the step that reads the report must see it. `saga_signal` waits for a step in
        # progress, so a report that lands while `await_feedback` runs still wakes it when it waits.
        transaction.on_commit(partial(saga_signal, run_id=run_id), robust=True)


def _reported_update(*, update_id: uuid.UUID, device_id: uuid.UUID) -> FirmwareUpdate:
    update = FirmwareUpdate.objects.filter(pk=update_id).first()
    if update is None:
        raise FirmwareUpdateNotFound()
    if update.device_id != device_id:
        raise FirmwareUpdateForbidden()
    return update


def _report_refusal(update: FirmwareUpdate, status: str) -> FirmwareUpdateConflict | None:
    """Why a report that changed nothing is refused (409), or None: it was a repeat or came late (200)."""
    if update.status in FINAL_STATUSES:
        if update.status == status:  # the device repeats the outcome it reported: idempotent
            return None
        return FirmwareUpdateConflict(f"The update has finished ({update.status}).", status=update.status)
    if update.cancelled_at is not None:
        return FirmwareUpdateConflict("The update was cancelled; it is being rolled back.", status=update.status)
    if update.withdrawn_at is not None:
        return FirmwareUpdateConflict("The update was withdrawn; it is being rolled back.", status=update.status)
    if update.dispatched_at is None:
        return FirmwareUpdateConflict("The update has not been dispatched to the device yet.", status=update.status)
    if update.device_result is not None and status in FINAL_REPORTS and status != update.device_result:
        return FirmwareUpdateConflict(
            f"The device already reported {update.device_result}; that report stands.", status=update.status
        )
    return None


def firmware_update_report(
    *,
    update_id: uuid.UUID,
    device_id: uuid.UUID,
    status: str,
    progress: int | None = None,
    version: str | None = None,
    reason: str | None = None,
) -> FirmwareUpdate:
    """Record a device's report on its update; returns the update as it is now.

    `status` is a stage (`downloading`, `downloaded`, `installing`) or a final report
    (`installed` with the `version` now running, `failed` with an optional `reason`).

    * A stage moves the update forward only: one UPDATE conditioned on the update's stage
      being earlier (or the same with less progress). A repeated or late report changes
      nothing and is not an error: the answer carries the current state.
    * `installing` is refused outside the maintenance window (`FirmwareInstallNotAllowed`).
    * A final report is recorded once (conditioned on none being recorded); the saga is
      woken after commit and writes the final status. The same report again is answered
      with the current state; a different one is 409.
    * An update that is finished (unless the report repeats its outcome), cancelled,
      withdrawn or not yet dispatched: `FirmwareUpdateConflict` (409).

    Raises `FirmwareUpdateNotFound`, `FirmwareUpdateForbidden` (another device's update).
    """
    _reported_update(update_id=update_id, device_id=device_id)
    now = timezone.now()
    updates = FirmwareUpdate.objects.filter(pk=update_id)
    with transaction.atomic():
        if status in FINAL_REPORTS:
            changes = {
                "device_result": status,
                "reported_version": version if status == DeviceResult.INSTALLED else None,
                "device_reason": (reason or "")[:REASON_MAX_LENGTH] if status == DeviceResult.FAILED else "",
                "last_report_at": now,
                "updated_at": now,
            }
            if status == DeviceResult.INSTALLED:
                changes["progress"] = 100
            changed = updates.filter(_REPORTABLE).update(**changes)
        else:
            rank = STAGE_RANK[UpdateStatus(status)]
            earlier = [stage for stage, stage_rank in STAGE_RANK.items() if stage_rank < rank]
            target = progress if progress is not None else 0
            forward = Q(status__in=earlier) | Q(status=status, progress__lt=target)
            reportable = updates.filter(_REPORTABLE, forward)
            if status == UpdateStatus.INSTALLING:
                inside = Q(maintenance_window_start__lte=now, maintenance_window_end__gt=now)
                reportable = reportable.filter(Q(maintenance_window_start=None) | inside)
            changed = reportable.update(
                status=status, progress=Greatest(F("progress"), target), last_report_at=now, updated_at=now
            )
        update = FirmwareUpdate.objects.get(pk=update_id)
        if changed:
            if status in FINAL_REPORTS:
                _signal_saga(update.saga_run_id)
            return update
        refusal = _report_refusal(update, status)
        if refusal is not None:
            raise refusal
        if (
            status == UpdateStatus.INSTALLING
            and update.device_result is None
            and STAGE_RANK.get(UpdateStatus(update.status), 99) < STAGE_RANK[UpdateStatus.INSTALLING]
            and not update.install_allowed(now=now)
        ):
            raise FirmwareInstallNotAllowed(
                "Installing is allowed only inside the update's maintenance window "
                f"({update.maintenance_window_start.isoformat()} to {update.maintenance_window_end.isoformat()}).",
                window_start=update.maintenance_window_start.isoformat(),
                window_end=update.maintenance_window_end.isoformat(),
            )
        return update
