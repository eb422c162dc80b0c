"""The firmware update saga ("firmware.update"): its steps and compensations, as plain functions.

Run by `iot.saga` (registered in `FirmwareConfig.ready`): each step runs in one transaction with
its step-log row, with the run row locked, so its effects on the update and the device commit
exactly once; a failure runs the compensations of the completed steps in reverse order, each
retried until it succeeds. Steps, in order:

1. `verify_artifact`: the release has an artifact, still in storage, whose SHA-256 (computed by
   the server at upload) is the digest its checksum names, and whose size is the declared one.
   Nothing to undo.
2. `enter_maintenance`: the device goes to `maintenance`; its status and firmware version are
   remembered in the run's context. Undo: give them back, only if the device is still in
   maintenance (a conditional UPDATE: a status an operator set meanwhile is kept).
3. `dispatch`: the update becomes visible to the device (`GET /firmware/device/update`). Undo:
   withdraw it.
4. `await_feedback`: wait for the device's final report (woken by it), up to
   `FIRMWARE_DEVICE_TIMEOUT_SECONDS` after its last sign of life; `failed` or silence fail the saga.
5. `verify_version`: the device runs the version it was sent.
6. `complete`: the device gets the new firmware version and its previous status back.

`firmware_update_finished` (the run's `on_finish`, in its last transaction) writes the update's
final status: `installed`, `failed` (a step failed: checksum, missing artifact, the device's
failure, silence) or `rolled_back` (cancelled or superseded), with `error` and `completed_at`.
So a final status is committed together with the device's settled state, never before it.
For an update of a staged rollout it also queues the rollout's advance after that commit.

Two updates never change one device at the same time: a new update's `enter_maintenance`
waits while an earlier update of the device (cancelled or superseded, still compensating) has
not finished, and that one's `on_finish` wakes it.
"""

import logging
import uuid
from datetime import datetime, timedelta
from functools import partial

import redis
from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from devices.models import DeviceStatus
from devices.selectors import device_state_for_update
from devices.services import DeviceNotFound, device_status_transition, device_update
from firmware.artifacts import checksum_sha256_hex
from firmware.models import ACTIVE_STATUSES, DeviceResult, FirmwareUpdate, UpdateStatus
from iot.event_queue import EventQueueFull, event_queue_publish
from iot.saga import SagaDefinition, SagaRunView, SagaStep, StepFailed, StepWait, saga_signal

logger = logging.getLogger(__name__)

SAGA_NAME = "firmware.update"

# A waiting `enter_maintenance` is woken by the earlier update's end; it also looks again this often, a
# safety net should that wake-up itself fail (the broker down when the earlier run ended, say).
PREDECESSOR_RECHECK_SECONDS = 5.0


def _update(run: SagaRunView) -> FirmwareUpdate:
    update = FirmwareUpdate.objects.select_related("release").filter(pk=uuid.UUID(run.context["update_id"])).first()
    if update is None:
        raise StepFailed("the update no longer exists (its device was deleted)")
    return update


# --- 1. verify_artifact ------------------------------------------------------------------------


def verify_artifact(run: SagaRunView) -> dict:
    """The release's artifact exists and matches its checksum (and declared size); StepFailed otherwise.

    Compares against the SHA-256 the server computed while the upload streamed in, rather than
    reading the whole file again for every device of a rollout; that the file is still in
    storage is checked (a storage error is transient: retried).
    """
    release = _update(run).release
    if not release.artifact_name:
        raise StepFailed(f"release {release.version} has no artifact (upload it before updating devices to it)")
    expected = checksum_sha256_hex(release.checksum)
    if expected is None:
        raise StepFailed(f"release {release.version}: checksum {release.checksum!r} names no SHA-256 digest")
    if expected != release.artifact_sha256:
        raise StepFailed(
            f"release {release.version}: the artifact's SHA-256 is {release.artifact_sha256}, "
            f"its checksum {release.checksum!r} says {expected}"
        )
    if release.size_bytes is not None and release.size_bytes != release.artifact_size:
        raise StepFailed(
            f"release {release.version}: the artifact is {release.artifact_size} bytes, "
            f"the release declares {release.size_bytes}"
        )
    if not default_storage.exists(release.artifact_name):
        raise StepFailed(f"release {release.version}: the artifact file is missing from storage")
    return {"artifact_sha256": release.artifact_sha256}


# --- 2. enter_maintenance ----------------------------------------------------------------------


def enter_maintenance(run: SagaRunView) -> dict | StepWait:
    """Put the device in maintenance, remembering what to give back; wait for an earlier update first.

    The device row is locked first (the order every writer of it follows), then earlier updates
    of the device are looked for: one still active was cancelled or superseded and is being
    compensated, and its compensation restores the device; this step waits until it has
    finished (its `on_finish` wakes this run). Bounded by `FIRMWARE_DEVICE_TIMEOUT_SECONDS`.
    """
    update = _update(run)
    state = device_state_for_update(device_id=update.device_id)
    if state is None:
        raise StepFailed("the device no longer exists")
    predecessor = (
        FirmwareUpdate.objects.filter(device_id=update.device_id, status__in=ACTIVE_STATUSES)
        .exclude(pk=update.pk)
        .values_list("pk", flat=True)
        .first()
    )
    now = timezone.now()
    if predecessor is not None:
        since = datetime.fromisoformat(run.context["waiting_since"]) if run.context.get("waiting_since") else now
        limit = timedelta(seconds=settings.FIRMWARE_DEVICE_TIMEOUT_SECONDS)
        if now - since >= limit:
            raise StepFailed(f"update {predecessor} of this device was still being rolled back after {limit}")
        return StepWait(
            until=min(now + timedelta(seconds=PREDECESSOR_RECHECK_SECONDS), since + limit),
            context={"waiting_for": str(predecessor), "waiting_since": since.isoformat()},
        )
    status, firmware_version = state
    if status == DeviceStatus.DECOMMISSIONED:
        raise StepFailed("the device is decommissioned")
    if status != DeviceStatus.MAINTENANCE:
        device_status_transition(device_id=update.device_id, from_status=status, to_status=DeviceStatus.MAINTENANCE)
    return {"previous_status": status, "previous_version": firmware_version, "waiting_for": None}


def enter_maintenance_undo(run: SagaRunView) -> None:
    """Give the device back its status and firmware version, if it is still in maintenance.

    One conditional UPDATE: a device an operator moved out of maintenance meanwhile (or
    deleted) is left as it is.
    """
    previous_status = run.context.get("previous_status")
    if previous_status is None:
        return
    device_status_transition(
        device_id=uuid.UUID(run.context["device_id"]),
        from_status=DeviceStatus.MAINTENANCE,
        to_status=previous_status,
        firmware_version=run.context["previous_version"],
    )


# --- 3. dispatch -------------------------------------------------------------------------------


OFFER_CHANGED_EVENT = "firmware.offer_changed"


def _offer_changed_publish(*, device_id: uuid.UUID) -> None:
    """Tell the event queue that what the device is offered changed: an update was dispatched to it, or
    withdrawn (`mqtt.events` pushes the device its current offer, or none, on `devices/{id}/ota`). Best
    effort by design: the device also learns of it by polling `GET /firmware/device/update` and from the
    refusal of its next report, so a full queue or a Redis outage is logged, never a failed step."""
    try:
        event_queue_publish(event_type=OFFER_CHANGED_EVENT, payload={"device_id": str(device_id)})
    except (EventQueueFull, redis.RedisError, OSError) as exc:
        logger.warning("the offer to device %s changed, its push not queued: %s", device_id, exc)


def dispatch(run: SagaRunView) -> dict:
    """Make the update visible to the device; it stays `pending` until the device reports. After the
    commit, the offer is pushed to the device if it listens (MQTT)."""
    update = _update(run)
    now = timezone.now()
    changed = FirmwareUpdate.objects.filter(pk=update.pk, dispatched_at=None).update(dispatched_at=now, updated_at=now)
    if changed:
        transaction.on_commit(partial(_offer_changed_publish, device_id=update.device_id), robust=True)
    return {"dispatched_at": now.isoformat()}


def dispatch_undo(run: SagaRunView) -> None:
    """Withdraw the update: the device no longer gets it, and its reports are refused. After the commit,
    a device that listens (MQTT) is told it has no offer any more."""
    now = timezone.now()
    update_id = uuid.UUID(run.context["update_id"])
    changed = FirmwareUpdate.objects.filter(pk=update_id, withdrawn_at=None).update(withdrawn_at=now, updated_at=now)
    if changed:
        device_id = uuid.UUID(run.context["device_id"])
        transaction.on_commit(partial(_offer_changed_publish, device_id=device_id), robust=True)


# --- 4. await_feedback -------------------------------------------------------------------------


def device_timeout_seconds(run: SagaRunView | None) -> float:
    """The update's device timeout: the one it started with (in its saga's context), else the setting."""
    started_with = run.context.get("device_timeout_seconds") if run is not None else None
    return float(started_with if started_with is not None else settings.FIRMWARE_DEVICE_TIMEOUT_SECONDS)


def feedback_deadline(update: FirmwareUpdate, *, timeout_seconds: float | None = None) -> datetime:
    """When a device that has not reported its result counts as silent.

    `timeout_seconds` (the update's device timeout, `FIRMWARE_DEVICE_TIMEOUT_SECONDS` when it
    started) after its last sign of life (the dispatch or its last report), or after its
    maintenance window closes: a device waiting for its window to install is not silent.
    """
    moments = [update.dispatched_at, update.last_report_at, update.maintenance_window_end]
    last = max(moment for moment in moments if moment is not None)
    seconds = settings.FIRMWARE_DEVICE_TIMEOUT_SECONDS if timeout_seconds is None else timeout_seconds
    return last + timedelta(seconds=seconds)


def await_feedback(run: SagaRunView) -> dict | StepWait:
    """Done when the device reports `installed`; StepFailed when it reports `failed` or goes silent."""
    update = _update(run)
    if update.device_result == DeviceResult.FAILED:
        raise StepFailed(f"the device reported a failure: {update.device_reason or 'no reason given'}")
    if update.device_result == DeviceResult.INSTALLED:
        return {"reported_version": update.reported_version}
    timeout = device_timeout_seconds(run)
    deadline = feedback_deadline(update, timeout_seconds=timeout)
    now = timezone.now()
    if now >= deadline:
        last = update.last_report_at or update.dispatched_at
        raise StepFailed(
            f"device silent: no result reported {timeout:g} s after its last sign of life ({last.isoformat()})"
        )
    return StepWait(until=deadline)


# --- 5. verify_version -------------------------------------------------------------------------


def verify_version(run: SagaRunView) -> None:
    update = _update(run)
    if update.reported_version != update.to_version:
        raise StepFailed(
            f"the device reports version {update.reported_version!r} after installing, expected {update.to_version!r}"
        )


# --- 6. complete -------------------------------------------------------------------------------


def complete(run: SagaRunView) -> None:
    """The device runs the new version and gets its previous status back.

    If someone moved the device out of maintenance meanwhile, their status stays and only
    the firmware version is recorded (the device did install it).
    """
    update = _update(run)
    previous_status = run.context.get("previous_status") or DeviceStatus.ACTIVE
    moved = device_status_transition(
        device_id=update.device_id,
        from_status=DeviceStatus.MAINTENANCE,
        to_status=previous_status,
        firmware_version=update.to_version,
    )
    if not moved:
        try:
            device_update(device_id=update.device_id, changes={"firmware_version": update.to_version})
        except DeviceNotFound:
            raise StepFailed("the device no longer exists") from None


# --- The end -----------------------------------------------------------------------------------

_FINAL_STATUS = {"succeeded": UpdateStatus.INSTALLED, "cancelled": UpdateStatus.ROLLED_BACK}


def firmware_update_finished(run: SagaRunView) -> None:
    """Write the update's final status in the run's last transaction; wake the device's next update.

    `succeeded` -> `installed` (progress 100); `cancelled` -> `rolled_back`; a failure
    (compensated) -> `failed`; `error` is the run's reason.
    """
    update_id = uuid.UUID(run.context["update_id"])
    now = timezone.now()
    status = _FINAL_STATUS.get(run.status, UpdateStatus.FAILED)
    changes = {"status": status, "completed_at": now, "updated_at": now}
    if status == UpdateStatus.INSTALLED:
        changes.update(progress=100, error=None)
    elif run.error:
        changes["error"] = run.error
    FirmwareUpdate.objects.filter(pk=update_id, status__in=ACTIVE_STATUSES).update(**changes)
    waiting = (
        FirmwareUpdate.objects.filter(device_id=uuid.UUID(run.context["device_id"]), status__in=ACTIVE_STATUSES)
        .exclude(pk=update_id)
        .exclude(saga_run_id=None)
        .values_list("saga_run_id", flat=True)
    )
    for run_id in waiting:
        transaction.on_commit(partial(saga_signal, run_id=run_id), robust=True)
    if run.context.get("rollout_id"):
        # The rollout may pass a threshold now: its advance is queued after this commit (debounced, so a stage
        # of many updates ending together queues one advance, not one each; the beat covers a lost one).
        from firmware.rollouts import rollout_advance_request  # imports this module

        transaction.on_commit(partial(rollout_advance_request, uuid.UUID(run.context["rollout_id"])), robust=True)


FIRMWARE_UPDATE_SAGA = SagaDefinition(
    name=SAGA_NAME,
    steps=[
        SagaStep(name="verify_artifact", action=verify_artifact, compensate=None, max_attempts=3),
        SagaStep(name="enter_maintenance", action=enter_maintenance, compensate=enter_maintenance_undo),
        SagaStep(name="dispatch", action=dispatch, compensate=dispatch_undo),
        SagaStep(name="await_feedback", action=await_feedback, compensate=None),
        SagaStep(name="verify_version", action=verify_version, compensate=None),
        SagaStep(name="complete", action=complete, compensate=None),
    ],
    on_finish=firmware_update_finished,
)
