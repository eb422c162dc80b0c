"""Staged firmware rollouts: the writes that start, advance, pause, resume and cancel them.

A rollout (`firmware.models.FirmwareRollout`) moves a set of devices to one release in stages
of cumulative percentages (default 1% -> 10% -> 100%); reads are in `firmware.selectors`.

**Start** (`firmware_rollout_start`, one transaction): the rollout row, its targets resolved by
ONE `INSERT ... SELECT` over the device table (the filters, not decommissioned, not already on
`to_version`; ordered by md5(rollout id || device id)), and its stage rows with their end
positions (`stage_ends`). No target: 422, nothing stored. The first advance is queued on commit.

**Advance** (`firmware_rollout_advance`, idempotent, any number of concurrent calls): the
rollout row is locked (`FOR UPDATE`), so calls run one after the other and each decides from
the state the previous one committed. One aggregate query counts the rollout's updates by
(stage, status) (an index-only scan, `firmware_update_rollout`). Then, in this order:

1. **error threshold**: once `error_min_finished` updates have finished (installed or failed),
   more than `error_threshold` of them failed -> `stopped`. The minimum keeps a canary stage's
   first failure from stopping a rollout on one data point (default 5; set it to 1 to stop at
   once). `rolled_back` (cancelled by an operator, superseded) is neither success nor failure.
   Checked while `paused` too: updates in flight go on, and may trip it.
2. the current stage still has targets without an update (and the rollout is not `paused`):
   create the next `FIRMWARE_ROLLOUT_BATCH_SIZE` of them (in position order) through
   `firmware.services.firmware_update_start`, each in a savepoint of this transaction, and queue
   the next advance on commit; so a stage of 100 000 devices is 500 short transactions, and a
   pause or a cancel takes effect between two of them. A device that has another active update
   (not this rollout's) is **skipped**, never `force`d: its target records why, and it counts
   in `skipped`; so does one deleted or decommissioned since the start.
3. the stage is handed out: it **passes** when `success_threshold` of its updates (the
   rolled-back ones left out) ended `installed`; the rest may still be running. A stage with no
   update to judge (all skipped) passes. It **fails** as soon as it can no longer pass (even if
   every running update installed, too few would): the rollout stops at once rather than wait.
   Passed: the next stage starts (its updates are created by the next advance); after the last,
   the rollout is `completed` once none of its updates is in flight. While `paused`, a stage is
   still judged (it may pass, recorded as `passed_at`, or fail and stop the rollout), but the
   next stage, or the completion, waits for the resume.

**Stopping** (the error threshold, a stage that can no longer pass, a maintenance window that
closed before every update was created) and **cancelling** set the final status in that
transaction; then, outside the rollout's lock, every update of the rollout still in flight is
cancelled through `firmware.services.firmware_update_cancel`, one transaction each: its saga
compensates, the device gets its status and firmware back, the update ends `rolled_back`. An
update that fails meanwhile ends `failed` (compensated too). `settled_at` is set when none is
in flight any more.

**Who advances.** Every update of a rollout queues an advance after the commit that writes its
final status (`firmware.saga.firmware_update_finished`); the request is debounced in Redis (`SET
NX` of a key the task deletes before it reads), so a stage of many updates ending together
queues one task, not one each, and none is lost: a request that finds a task queued relies on
it, and that task reads after the request's commit. The beat (`firmware-rollouts-advance`, every
`FIRMWARE_ROLLOUT_ADVANCE_INTERVAL_SECONDS`) queues an advance of every rollout not settled, so
a task lost with its worker, or a Redis outage, delays a rollout by one interval at most.

Lock order: the rollout row, then (in `firmware_update_start`) new update and saga rows. The
cancellations run after the rollout's transaction, so no transaction holds a saga run's lock and
waits for a rollout row, or the other way round.
"""

import logging
import math
import uuid
from collections.abc import Sequence
from fractions import Fraction
from functools import partial

import redis
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.db.models import Exists, F, OuterRef
from django.utils import timezone

from devices.models import Device, DeviceStatus
from firmware.models import (
    ACTIVE_STATUSES,
    ROLLOUT_ACTIVE_STATUSES,
    FirmwareRelease,
    FirmwareRollout,
    FirmwareRolloutStage,
    FirmwareRolloutTarget,
    FirmwareUpdate,
    RolloutStatus,
    UpdateStatus,
)
from firmware.models.rollouts import ROLLOUT_NAME_MAX_LENGTH, SKIP_REASON_MAX_LENGTH, STOP_REASON_MAX_LENGTH
from firmware.selectors import rollout_update_counts
from firmware.services import (
    FirmwareUpdateActive,
    FirmwareUpdateConflict,
    FirmwareUpdateNotFound,
    FirmwareUpdateUnknownDevice,
    FirmwareUpdateUnknownVersion,
    MaintenanceWindow,
    firmware_update_cancel,
    firmware_update_start,
)
from iot.errors import ServiceError
from iot.redis import get_redis, redis_key

logger = logging.getLogger(__name__)

DEFAULT_STAGES = (1.0, 10.0, 100.0)
MAX_STAGES = 20
DEFAULT_SUCCESS_THRESHOLD = 0.9
DEFAULT_ERROR_THRESHOLD = 0.2
DEFAULT_ERROR_MIN_FINISHED = 5
# Device statuses a rollout may filter on (a decommissioned device is never a target).
TARGET_DEVICE_STATUSES = tuple(status for status in DeviceStatus.values if status != DeviceStatus.DECOMMISSIONED)
# Updates a stop or a cancel looks up at a time (each is cancelled in its own transaction).
_WIND_DOWN_CHUNK = 500
# Comparisons of a count with threshold * total, which is a float.
_EPSILON = 1e-9

# What an advance did (the task's return value, for logs and tests).
MISSING = "missing"
SETTLED = "settled"
PAUSED = "paused"
CREATED = "created"
STAGE_STARTED = "stage_started"
WAITING = "waiting"
COMPLETED = "completed"
STOPPED = "stopped"
WINDING_DOWN = "winding_down"
# A stage's verdict (`_stage_verdict`): WAITING, or one of these.
STAGE_PASSED = "passed"
STAGE_FAILED = "failed"


# --- Refusals ----------------------------------------------------------------------------------


class RolloutNotFound(ServiceError):
    status_code = 404
    default_detail = "No rollout with this id."


class RolloutConflict(ServiceError):
    """The transition asked for does not fit the rollout's status (409); `status` says what it is."""

    status_code = 409
    code = "invalid_transition"


class RolloutInvalid(ServiceError):
    """A parameter out of its range (400, under the parameter's name, as a validation error)."""

    status_code = 400

    def __init__(self, detail: str, *, field: str) -> None:
        super().__init__(detail)
        self.field = field


class RolloutNoTargets(ServiceError):
    status_code = 422
    code = "no_targets"
    default_detail = "No device matches the rollout's target (not decommissioned, not on the version already)."


class RolloutReleaseWithoutArtifact(ServiceError):
    status_code = 422
    field = "to_version"
    default_detail = "The release has no artifact yet: every update to it would fail. Upload it first."


# --- Stage math --------------------------------------------------------------------------------


def rollout_stages_problem(stages: Sequence) -> str | None:
    """Why `stages` is not a valid list of cumulative percentages, or None.

    Valid: 1 to MAX_STAGES numbers, each above 0 and at most 100, strictly increasing, the last 100.
    """
    if not isinstance(stages, list | tuple) or not stages:
        return "Must be a non-empty list of cumulative percentages ending with 100, e.g. [1, 10, 100]."
    if len(stages) > MAX_STAGES:
        return f"At most {MAX_STAGES} stages."
    for percent in stages:
        if isinstance(percent, bool) or not isinstance(percent, int | float) or not math.isfinite(percent):
            return "Every stage must be a number (a percentage of the targets)."
        if not 0 < percent <= 100:
            return "Every stage must be above 0 and at most 100 (percent)."
    if any(later <= earlier for earlier, later in zip(stages, stages[1:], strict=False)):
        return "Stages are cumulative: each must be larger than the one before."
    if stages[-1] != 100:
        return "The last stage must be 100 (every target)."
    return None


def stage_ends(*, targets: int, stages: Sequence[float]) -> list[int]:
    """Where each stage ends in the targets' order: ceil(targets * percent / 100), cumulative.

    Rounded up, so a rollout's first stage has at least one device; exact (percentages are read as
    the decimals they were written as), so 10% of 50 is 5, not 6. Two stages may end at the same
    place for a small rollout (1% and 2% of 30 are both 1): the later one is then empty and passes.
    """
    return [math.ceil(Fraction(targets) * Fraction(str(float(percent))) / 100) for percent in stages]


def _threshold_problem(name: str, value: float) -> RolloutInvalid | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        return RolloutInvalid("Must be a fraction from 0 to 1.", field=name)
    return None


# --- Start -------------------------------------------------------------------------------------


def _target_description(*, group_id, device_type, from_version, device_status) -> str:
    parts = [
        f"group {group_id}" if group_id is not None else None,
        device_type,
        f"on {from_version}" if from_version is not None else None,
        device_status,
    ]
    return ", ".join(part for part in parts if part) or "every device"


def _targets_insert(
    *,
    rollout_id: uuid.UUID,
    to_version: str,
    group_id: str | None,
    device_type: str | None,
    from_version: str | None,
    device_status: str | None,
) -> int:
    """Insert the rollout's targets with ONE `INSERT ... SELECT`; returns how many.

    The devices are selected by the ORM (the devices app's table, columns and statuses are not
    spelled here); only the numbering is SQL: row_number() over md5(rollout id || device id).
    """
    devices = Device.objects.exclude(status=DeviceStatus.DECOMMISSIONED).exclude(firmware_version=to_version)
    if group_id is not None:
        devices = devices.filter(group_id=group_id)
    if device_type is not None:
        devices = devices.filter(device_type=device_type)
    if from_version is not None:
        devices = devices.filter(firmware_version=from_version)
    if device_status is not None:
        devices = devices.filter(status=device_status)
    select_sql, select_params = devices.order_by().values("id").query.sql_with_params()
    quote = connection.ops.quote_name
    meta = FirmwareRolloutTarget._meta
    columns = ", ".join(
        quote(meta.get_field(name).column) for name in ("rollout", "device", "position", "skipped_reason")
    )
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({columns}) "
        "SELECT %s, d.id, (row_number() OVER (ORDER BY md5(%s || d.id::text), d.id)) - 1, '' "
        f"FROM ({select_sql}) AS d"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [rollout_id, str(rollout_id), *select_params])
        return cursor.rowcount


@transaction.atomic
def firmware_rollout_start(
    *,
    to_version: str,
    name: str | None = None,
    group_id: str | None = None,
    device_type: str | None = None,
    from_version: str | None = None,
    device_status: str | None = None,
    stages: Sequence[float] | None = None,
    success_threshold: float = DEFAULT_SUCCESS_THRESHOLD,
    error_threshold: float = DEFAULT_ERROR_THRESHOLD,
    error_min_finished: int = DEFAULT_ERROR_MIN_FINISHED,
    maintenance_window: MaintenanceWindow | None = None,
    requested_by: AbstractBaseUser | None = None,
) -> FirmwareRollout:
    """Start a staged rollout of release `to_version` (see the module docstring); returns it.

    Targets: the devices not decommissioned matching every filter given (none: the whole fleet),
    minus those already on `to_version`. Raises `RolloutInvalid` (400, naming the parameter),
    `FirmwareUpdateUnknownVersion` / `RolloutReleaseWithoutArtifact` / `RolloutNoTargets` (422).
    """
    stages = list(stages) if stages is not None else list(DEFAULT_STAGES)
    problem = rollout_stages_problem(stages)
    if problem is not None:
        raise RolloutInvalid(problem, field="stages")
    for field, value in (("success_threshold", success_threshold), ("error_threshold", error_threshold)):
        refusal = _threshold_problem(field, value)
        if refusal is not None:
            raise refusal
    if isinstance(error_min_finished, bool) or not isinstance(error_min_finished, int) or error_min_finished < 1:
        raise RolloutInvalid("Must be an integer of at least 1.", field="error_min_finished")
    if device_status is not None and device_status not in TARGET_DEVICE_STATUSES:
        raise RolloutInvalid(f"Must be one of: {', '.join(TARGET_DEVICE_STATUSES)}.", field="device_status")
    release = FirmwareRelease.objects.filter(version=to_version).first()
    if release is None:
        raise FirmwareUpdateUnknownVersion(f"No release with version {to_version!r}.")
    if not release.has_artifact:
        raise RolloutReleaseWithoutArtifact()
    filters = {"group_id": group_id, "device_type": device_type, "from_version": from_version}
    filters["device_status"] = device_status
    now = timezone.now()
    rollout = FirmwareRollout.objects.create(
        name=(name or f"{release.version} to {_target_description(**filters)}")[:ROLLOUT_NAME_MAX_LENGTH],
        release=release,
        to_version=release.version,
        **filters,
        success_threshold=float(success_threshold),
        error_threshold=float(error_threshold),
        error_min_finished=error_min_finished,
        maintenance_window_start=maintenance_window.start if maintenance_window else None,
        maintenance_window_end=maintenance_window.end if maintenance_window else None,
        requested_by_id=requested_by.pk if requested_by is not None and requested_by.is_authenticated else None,
        created_at=now,
        updated_at=now,
    )
    targets = _targets_insert(rollout_id=rollout.pk, to_version=release.version, **filters)
    if targets == 0:
        raise RolloutNoTargets()  # rolls the rollout row back
    ends = stage_ends(targets=targets, stages=stages)
    FirmwareRolloutStage.objects.bulk_create(
        FirmwareRolloutStage(
            rollout=rollout,
            index=index,
            percent=float(percent),
            end_position=end,
            started_at=now if index == 0 else None,
        )
        for index, (percent, end) in enumerate(zip(stages, ends, strict=True))
    )
    FirmwareRollout.objects.filter(pk=rollout.pk).update(target_count=targets)
    rollout.target_count = targets
    _advance_on_commit(rollout.pk)
    logger.info("rollout %s of %s started: %d targets, stages %s", rollout.pk, release.version, targets, stages)
    return rollout


# --- Advance -----------------------------------------------------------------------------------


def firmware_rollout_advance(*, rollout_id: uuid.UUID) -> str:
    """Do whatever the rollout needs now (see the module docstring); idempotent. Returns what it did."""
    with transaction.atomic():
        rollout = FirmwareRollout.objects.select_for_update().filter(pk=rollout_id).first()
        if rollout is None:
            return MISSING
        if rollout.settled_at is not None:
            return SETTLED
        if rollout.status in ROLLOUT_ACTIVE_STATUSES:
            outcome = _advance_locked(rollout)
            if outcome in (CREATED, STAGE_STARTED):
                _advance_on_commit(rollout.pk)
            if rollout.status != RolloutStatus.STOPPED:
                return outcome
    return _wind_down(rollout)


def _advance_locked(rollout: FirmwareRollout) -> str:
    stages = list(FirmwareRolloutStage.objects.filter(rollout_id=rollout.pk).order_by("index"))
    counts = rollout_update_counts(rollout_id=rollout.pk)
    totals: dict[str, int] = {}
    for by_status in counts.values():
        for status, n in by_status.items():
            totals[status] = totals.get(status, 0) + n
    installed, failed = totals.get(UpdateStatus.INSTALLED, 0), totals.get(UpdateStatus.FAILED, 0)
    finished = installed + failed
    if finished >= rollout.error_min_finished and failed > rollout.error_threshold * finished + _EPSILON:
        return _stop(
            rollout,
            f"{failed} of {finished} finished updates failed ({failed / finished:.0%}), past the error threshold "
            f"of {rollout.error_threshold:.0%}",
        )
    paused = rollout.status == RolloutStatus.PAUSED
    stage = stages[rollout.current_stage]
    now = timezone.now()
    if rollout.next_position < stage.end_position:
        if paused:
            return PAUSED
        if rollout.maintenance_window_end is not None and rollout.maintenance_window_end <= now:
            return _stop(
                rollout,
                f"the maintenance window closed at {rollout.maintenance_window_end.isoformat()} before stage "
                f"{stage.index + 1} was handed out (its devices could not install)",
            )
        _hand_out_batch(rollout, stage)
        return CREATED
    verdict = _stage_verdict(counts.get(stage.index, {}), rollout.success_threshold)
    if verdict == WAITING:
        return WAITING
    if verdict == STAGE_FAILED:
        stage_counts = counts.get(stage.index, {})
        judged = sum(stage_counts.values()) - stage_counts.get(UpdateStatus.ROLLED_BACK, 0)
        return _stop(
            rollout,
            f"stage {stage.index + 1} can no longer reach its success threshold of {rollout.success_threshold:.0%} "
            f"({stage_counts.get(UpdateStatus.FAILED, 0)} of its {judged} updates failed)",
        )
    if stage.passed_at is None:
        FirmwareRolloutStage.objects.filter(pk=stage.pk).update(passed_at=now)
    if paused:
        return PAUSED  # the stage passed; the next one (or the completion) waits for the resume
    if stage.index + 1 < len(stages):
        FirmwareRolloutStage.objects.filter(pk=stages[stage.index + 1].pk).update(started_at=now)
        FirmwareRollout.objects.filter(pk=rollout.pk).update(current_stage=stage.index + 1, updated_at=now)
        logger.info("rollout %s: stage %d passed, stage %d starts", rollout.pk, stage.index + 1, stage.index + 2)
        return STAGE_STARTED
    if any(totals.get(status, 0) for status in ACTIVE_STATUSES):
        return WAITING  # the last stage passed; the stragglers of every stage may still fail it
    FirmwareRollout.objects.filter(pk=rollout.pk).update(
        status=RolloutStatus.COMPLETED, finished_at=now, settled_at=now, updated_at=now
    )
    rollout.status = RolloutStatus.COMPLETED
    logger.info("rollout %s completed: %d installed, %d failed", rollout.pk, installed, failed)
    return COMPLETED


def _stage_verdict(by_status: dict[str, int], success_threshold: float) -> str:
    """STAGE_PASSED, STAGE_FAILED (it can no longer pass) or WAITING, from the stage's update counts by status.
    Rolled-back updates are left out of the stage's figures."""
    judged = sum(by_status.values()) - by_status.get(UpdateStatus.ROLLED_BACK, 0)
    installed = by_status.get(UpdateStatus.INSTALLED, 0)
    active = sum(by_status.get(status, 0) for status in ACTIVE_STATUSES)
    needed = success_threshold * judged
    if judged == 0 or installed >= needed - _EPSILON:
        return STAGE_PASSED
    if installed + active < needed - _EPSILON:
        return STAGE_FAILED
    return WAITING


def _hand_out_batch(rollout: FirmwareRollout, stage: FirmwareRolloutStage) -> None:
    """Create the updates of the stage's next targets (at most FIRMWARE_ROLLOUT_BATCH_SIZE), in the caller's
    transaction (the rollout row locked); skip the devices that cannot take one now."""
    batch = settings.FIRMWARE_ROLLOUT_BATCH_SIZE
    targets = list(
        FirmwareRolloutTarget.objects.filter(
            rollout_id=rollout.pk, position__gte=rollout.next_position, position__lt=stage.end_position
        )
        .order_by("position")
        .values_list("pk", "device_id", "position")[:batch]
    )
    window = None
    if rollout.maintenance_window_start is not None:
        seconds = (rollout.maintenance_window_end - rollout.maintenance_window_start).total_seconds()
        window = MaintenanceWindow(start=rollout.maintenance_window_start, duration_seconds=round(seconds))
    requested_by = rollout.requested_by if rollout.requested_by_id is not None else None
    skipped: dict[int, str] = {}
    for target_id, device_id, _position in targets:
        try:
            firmware_update_start(
                device_id=device_id,
                to_version=rollout.to_version,
                maintenance_window=window,
                requested_by=requested_by,
                rollout_id=rollout.pk,
                rollout_stage=stage.index,
            )
        except FirmwareUpdateActive as exc:
            skipped[target_id] = f"another update of the device was active ({exc.fields.get('active_update_id')})"
        except FirmwareUpdateUnknownDevice as exc:
            skipped[target_id] = exc.detail
    for target_id, reason in skipped.items():
        FirmwareRolloutTarget.objects.filter(pk=target_id).update(skipped_reason=reason[:SKIP_REASON_MAX_LENGTH])
    # Fewer targets than a batch: the stage has no more. Positions passed over without a row were devices
    # deleted since the start (their target rows went with them): counted as skipped, so the counts add up.
    next_position = targets[-1][2] + 1 if len(targets) == batch else stage.end_position
    passed_over = len(skipped) + (next_position - rollout.next_position - len(targets))
    if passed_over:
        FirmwareRolloutStage.objects.filter(pk=stage.pk).update(skipped=F("skipped") + passed_over)
    FirmwareRollout.objects.filter(pk=rollout.pk).update(
        next_position=next_position, skipped_count=F("skipped_count") + passed_over, updated_at=timezone.now()
    )


def _stop(rollout: FirmwareRollout, reason: str) -> str:
    """Make the (locked) rollout `stopped`; its updates in flight are cancelled after the commit."""
    now = timezone.now()
    reason = reason[:STOP_REASON_MAX_LENGTH]
    FirmwareRollout.objects.filter(pk=rollout.pk).update(
        status=RolloutStatus.STOPPED, stop_reason=reason, finished_at=now, updated_at=now
    )
    rollout.status, rollout.stop_reason = RolloutStatus.STOPPED, reason
    logger.warning("rollout %s stopped: %s", rollout.pk, reason)
    return STOPPED


def _wind_down(rollout: FirmwareRollout) -> str:
    """Cancel every update of a stopped or cancelled rollout still in flight (one transaction each, through
    the update cancel service: its saga compensates); then mark the rollout settled if none is left.

    An update failing already (compensating) cannot be cancelled and is left to end `failed`; the next
    advance (the beat, or its own end) settles the rollout then.
    """
    reason = f"rollout {rollout.status}: {rollout.stop_reason}"[:STOP_REASON_MAX_LENGTH]
    in_flight = FirmwareUpdate.objects.filter(rollout_id=rollout.pk, status__in=ACTIVE_STATUSES, cancelled_at=None)
    after = None
    while True:
        chunk = in_flight if after is None else in_flight.filter(pk__gt=after)
        update_ids = list(chunk.order_by("pk").values_list("pk", flat=True)[:_WIND_DOWN_CHUNK])
        if not update_ids:
            break
        for update_id in update_ids:
            try:
                firmware_update_cancel(update_id=update_id, reason=reason)
            except (FirmwareUpdateConflict, FirmwareUpdateNotFound):
                pass  # it ended meanwhile, or is failing and being rolled back already
        after = update_ids[-1]
    active = FirmwareUpdate.objects.filter(rollout_id=OuterRef("pk"), status__in=ACTIVE_STATUSES)
    settled = (
        FirmwareRollout.objects.filter(pk=rollout.pk, settled_at=None)
        .filter(~Exists(active))
        .update(settled_at=timezone.now())
    )
    return SETTLED if settled else WINDING_DOWN


# --- Pause, resume, cancel ---------------------------------------------------------------------


def _transition(
    *, rollout_id: uuid.UUID, from_statuses: tuple, to_status: str, verb: str, changes: dict | None = None
) -> FirmwareRollout:
    """One conditional UPDATE from `from_statuses` to `to_status` (it waits for an advance holding the row);
    a rollout already in `to_status` is returned unchanged (a retried request succeeds); else 404/409."""
    now = timezone.now()
    with transaction.atomic():
        moved = FirmwareRollout.objects.filter(pk=rollout_id, status__in=from_statuses).update(
            status=to_status, updated_at=now, **(changes or {})
        )
        rollout = FirmwareRollout.objects.filter(pk=rollout_id).first()
        if rollout is None:
            raise RolloutNotFound()
        if not moved and rollout.status != to_status:
            allowed = " or ".join(from_statuses)
            raise RolloutConflict(
                f"The rollout is {rollout.status}; only a {allowed} rollout can be {verb}.", status=rollout.status
            )
        if moved:
            _advance_on_commit(rollout.pk)
            logger.info("rollout %s %s", rollout.pk, verb)
    return rollout


def firmware_rollout_pause(*, rollout_id: uuid.UUID) -> FirmwareRollout:
    """No new update is created until it is resumed; those in flight go on (and may still trip the error
    threshold). Pausing a paused rollout changes nothing; a finished one is 409."""
    return _transition(
        rollout_id=rollout_id, from_statuses=(RolloutStatus.RUNNING,), to_status=RolloutStatus.PAUSED, verb="paused"
    )


def firmware_rollout_resume(*, rollout_id: uuid.UUID) -> FirmwareRollout:
    """Go on where it paused (the current stage's remaining updates, or the next stage)."""
    return _transition(
        rollout_id=rollout_id, from_statuses=(RolloutStatus.PAUSED,), to_status=RolloutStatus.RUNNING, verb="resumed"
    )


def firmware_rollout_cancel(*, rollout_id: uuid.UUID, reason: str = "cancelled by an operator") -> FirmwareRollout:
    """Stop for good: no new update, and every update in flight is cancelled (compensated, `rolled_back`) by
    the advance queued on commit. Cancelling a cancelled rollout changes nothing; a completed or stopped one
    is 409."""
    return _transition(
        rollout_id=rollout_id,
        from_statuses=ROLLOUT_ACTIVE_STATUSES,
        to_status=RolloutStatus.CANCELLED,
        verb="cancelled",
        changes={"stop_reason": reason[:STOP_REASON_MAX_LENGTH], "finished_at": timezone.now()},
    )


# --- Queuing the advance -----------------------------------------------------------------------


def _queued_key(rollout_id: uuid.UUID) -> str:
    return redis_key("firmware", "rollout", "advance-queued", rollout_id)


def _advance_task_queue(rollout_id: uuid.UUID) -> None:
    from firmware.tasks import rollout_advance  # the tasks module imports this one

    rollout_advance.delay(str(rollout_id))


def rollout_advance_request(rollout_id: uuid.UUID) -> None:
    """Queue the rollout's advance unless one is queued and has not started reading yet (call after commit).

    `SET NX` of a key with a TTL of two beat intervals (a task lost with the key set blocks requests that
    long at most; the beat queues advances regardless). The task deletes the key before it reads.
    """
    ttl_ms = max(1, round(2000 * settings.FIRMWARE_ROLLOUT_ADVANCE_INTERVAL_SECONDS))
    if get_redis().set(_queued_key(rollout_id), b"1", nx=True, px=ttl_ms):
        _advance_task_queue(rollout_id)


def rollout_advance_claim(rollout_id: uuid.UUID) -> None:
    """The advance task is about to read: a request from now on queues another task."""
    try:
        get_redis().delete(_queued_key(rollout_id))
    except redis.RedisError:
        logger.warning("rollout %s: could not clear its advance-queued mark; the beat covers", rollout_id)


def _advance_on_commit(rollout_id: uuid.UUID) -> None:
    # robust: a Redis or broker outage must not fail the caller's commit; the beat queues it later.
    transaction.on_commit(partial(rollout_advance_request, rollout_id), robust=True)
