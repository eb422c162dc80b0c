"""Staged rollouts through the services, with the update sagas driven in this process (`iot.saga.testing`) and
the rollout's advance called directly, on real Postgres and Redis: stage math, thresholds, skipping, pause,
resume, cancel, and concurrent advances."""

import hashlib
import threading
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from devices.models import Device, DeviceStatus
from devices.services import device_bulk_delete
from devices.testing import devices_bulk_create
from firmware import rollouts, services
from firmware.models import (
    FirmwareRollout,
    FirmwareRolloutStage,
    FirmwareRolloutTarget,
    FirmwareUpdate,
    RolloutStatus,
    UpdateStatus,
)
from firmware.selectors import rollout_list_active, rollout_progress, rollout_update_counts
from firmware.testing import artifact_bytes, release_create, rollout_advance_capture
from iot.saga.testing import saga_drive, saga_queue_capture

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _in_process(settings, redis_namespace):
    """Sagas run here (their tasks recorded, not queued); the rollout's advance requests recorded too."""
    settings.SAGA_RETRY_BASE_SECONDS = 0.001
    settings.SAGA_RETRY_MAX_SECONDS = 0.01
    with saga_queue_capture(), rollout_advance_capture() as requested:
        yield requested


@pytest.fixture
def release():
    return release_create(content=artifact_bytes(2048))


def fleet(count: int, **fields) -> tuple[str, list[Device]]:
    group = f"g-{uuid.uuid4().hex[:8]}"
    return group, devices_bulk_create(count=count, group_id=group, status=DeviceStatus.ACTIVE, **fields)


def start(release, group: str, **options) -> FirmwareRollout:
    return rollouts.firmware_rollout_start(to_version=release.version, group_id=group, **options)


def advance(rollout: FirmwareRollout) -> str:
    return rollouts.firmware_rollout_advance(rollout_id=rollout.pk)


def advance_until_settled_step(rollout: FirmwareRollout) -> list[str]:
    """Advance while it has something to do at once (batches, the next stage); the outcomes, in order."""
    outcomes = [advance(rollout)]
    while outcomes[-1] in (rollouts.CREATED, rollouts.STAGE_STARTED):
        outcomes.append(advance(rollout))
    return outcomes


def fresh(rollout: FirmwareRollout) -> FirmwareRollout:
    return FirmwareRollout.objects.get(pk=rollout.pk)


def updates_of(rollout: FirmwareRollout, **filters) -> list[FirmwareUpdate]:
    return list(FirmwareUpdate.objects.filter(rollout_id=rollout.pk, **filters).order_by("started_at", "id"))


def run_to_feedback(update: FirmwareUpdate) -> None:
    """Drive the update's saga to the point where it waits for the device (the device is in maintenance)."""
    run = saga_drive(run_id=update.saga_run_id)
    assert run.current_step == "await_feedback", run


def finish(update: FirmwareUpdate, *, ok: bool, django_capture_on_commit_callbacks) -> FirmwareUpdate:
    """The device reports its result; the saga ends the update (installed, or failed and compensated)."""
    if FirmwareUpdate.objects.get(pk=update.pk).dispatched_at is None:
        run_to_feedback(update)
    with django_capture_on_commit_callbacks(execute=True):
        if ok:
            services.firmware_update_report(
                update_id=update.pk, device_id=update.device_id, status="installed", version=update.to_version
            )
        else:
            services.firmware_update_report(
                update_id=update.pk, device_id=update.device_id, status="failed", reason="flash error"
            )
    with django_capture_on_commit_callbacks(execute=True):
        run = saga_drive(run_id=update.saga_run_id)
    assert run.status in ("succeeded", "compensated"), run
    return FirmwareUpdate.objects.get(pk=update.pk)


def drive_all(rollout: FirmwareRollout) -> None:
    """Run every update of the rollout still active as far as it goes (cancelled ones to their rollback)."""
    for update in updates_of(rollout, status__in=("pending", "downloading", "downloaded", "installing")):
        saga_drive(run_id=update.saga_run_id)


# --- Stage math ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "stages", "ends"),
    [
        (50, [10, 50, 100], [5, 25, 50]),
        (500, [1, 10, 100], [5, 50, 500]),
        (5, [1, 10, 100], [1, 1, 5]),  # a small rollout: the first stage has one device, the second none
        (3, [33.3, 66.6, 100], [1, 2, 3]),  # exact decimals: 0.999 -> 1, 1.998 -> 2
        (1, [100], [1]),
        (100_000, [0.5, 100], [500, 100_000]),
    ],
)
def test_stage_ends_are_cumulative_and_rounded_up(targets, stages, ends):
    assert rollouts.stage_ends(targets=targets, stages=stages) == ends


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([], "non-empty list"),
        ("10,100", "non-empty list"),
        ([0, 100], "above 0"),
        ([50, 40, 100], "larger than the one before"),
        ([10, 10, 100], "larger than the one before"),
        ([10, 50], "last stage must be 100"),
        ([10, 101], "at most 100"),
        (["10", 100], "must be a number"),
        ([True, 100], "must be a number"),
        ([float("nan"), 100], "must be a number"),
        (list(range(1, 21)) + [100], "At most 20"),
    ],
)
def test_bad_stages_are_named(stages, message):
    assert message in rollouts.rollout_stages_problem(stages)


def test_good_stages_pass():
    assert rollouts.rollout_stages_problem([100]) is None
    assert rollouts.rollout_stages_problem([0.5, 10, 100.0]) is None


# --- Start ---------------------------------------------------------------------------------------


def test_targets_are_resolved_once_in_a_fixed_order_by_the_filters(release):
    group, devices = fleet(12)
    Device.objects.filter(pk=devices[0].pk).update(status=DeviceStatus.DECOMMISSIONED)
    Device.objects.filter(pk=devices[1].pk).update(firmware_version=release.version)  # already there
    Device.objects.filter(pk=devices[2].pk).update(firmware_version="0.9.0")  # filtered out by from_version
    Device.objects.filter(pk=devices[3].pk).update(device_type="gateway")  # filtered out by device_type
    fleet(5)  # another group
    rollout = start(release, group, from_version="1.0.0", device_type="sensor", stages=[10, 50, 100])
    expected = {device.pk for device in devices[4:]}
    targets = list(FirmwareRolloutTarget.objects.filter(rollout=rollout).order_by("position"))
    assert {target.device_id for target in targets} == expected and rollout.target_count == 8
    assert [target.position for target in targets] == list(range(8))
    order = sorted(expected, key=lambda device_id: hashlib.md5(f"{rollout.pk}{device_id}".encode()).hexdigest())
    assert [target.device_id for target in targets] == order
    stages = list(FirmwareRolloutStage.objects.filter(rollout=rollout).order_by("index"))
    assert [(stage.percent, stage.end_position) for stage in stages] == [(10, 1), (50, 4), (100, 8)]
    assert stages[0].started_at is not None and stages[1].started_at is None
    assert rollout.name == f"{release.version} to group {group}, sensor, on 1.0.0"
    # Devices that join the group later are not in this rollout.
    devices_bulk_create(count=3, group_id=group, status=DeviceStatus.ACTIVE)
    assert FirmwareRolloutTarget.objects.filter(rollout=rollout).count() == 8


def test_refusals_store_nothing(release):
    group, _ = fleet(3)
    with pytest.raises(services.FirmwareUpdateUnknownVersion):
        rollouts.firmware_rollout_start(to_version="no-such-version", group_id=group)
    without_artifact = release_create(content=None)
    with pytest.raises(rollouts.RolloutReleaseWithoutArtifact) as refused:
        rollouts.firmware_rollout_start(to_version=without_artifact.version, group_id=group)
    assert refused.value.status_code == 422 and "to_version" in refused.value.body()
    with pytest.raises(rollouts.RolloutNoTargets) as refused:
        rollouts.firmware_rollout_start(to_version=release.version, group_id="no-such-group")
    assert refused.value.status_code == 422 and refused.value.body()["code"] == "no_targets"
    for field, options in (
        ("stages", {"stages": [50, 20, 100]}),
        ("success_threshold", {"success_threshold": 1.5}),
        ("error_threshold", {"error_threshold": -0.1}),
        ("error_min_finished", {"error_min_finished": 0}),
        ("device_status", {"device_status": "decommissioned"}),
    ):
        with pytest.raises(rollouts.RolloutInvalid) as refused:
            start(release, group, **options)
        assert refused.value.status_code == 400 and list(refused.value.body()) == [field]
    assert not FirmwareRollout.objects.exists() and not FirmwareRolloutTarget.objects.exists()


# --- Advancing -----------------------------------------------------------------------------------


def test_a_happy_rollout_goes_through_every_stage_in_batches(
    release, settings, _in_process, django_capture_on_commit_callbacks
):
    settings.FIRMWARE_ROLLOUT_BATCH_SIZE = 3
    group, devices = fleet(20)
    window = services.MaintenanceWindow(start=timezone.now() - timedelta(minutes=1), duration_seconds=3600)
    with django_capture_on_commit_callbacks(execute=True):
        rollout = start(release, group, stages=[10, 50, 100], success_threshold=1.0, maintenance_window=window)
    assert _in_process == [rollout.pk]  # the first advance is queued on commit

    for stage_index, (created_total, batches) in enumerate([(2, 1), (10, 3), (20, 4)]):
        outcomes = advance_until_settled_step(rollout)
        # The batches of this stage, each queuing the next advance; then it waits for the devices.
        assert outcomes == [rollouts.CREATED] * batches + [rollouts.WAITING], outcomes
        assert len(updates_of(rollout)) == created_total
        assert {update.rollout_stage for update in updates_of(rollout)[created_total - 1 :]} == {stage_index}
        for update in updates_of(rollout, status=UpdateStatus.PENDING):
            assert (update.maintenance_window_start, update.maintenance_window_end) == (window.start, window.end)
            finish(update, ok=True, django_capture_on_commit_callbacks=django_capture_on_commit_callbacks)
        outcome = advance(rollout)
        assert outcome == (rollouts.STAGE_STARTED if stage_index < 2 else rollouts.COMPLETED)

    done = fresh(rollout)
    assert done.status == RolloutStatus.COMPLETED and done.settled_at is not None and done.finished_at is not None
    assert Device.objects.filter(pk__in=[d.pk for d in devices], firmware_version=release.version).count() == 20
    progress = rollout_progress(rollout=done)
    assert progress.counts.as_dict() == {
        "not_started": 0,
        "pending": 0,
        "downloading": 0,
        "downloaded": 0,
        "installing": 0,
        "installed": 20,
        "failed": 0,
        "rolled_back": 0,
        "skipped": 0,
    }
    assert [stage.state for stage in progress.stages] == ["passed", "passed", "passed"]
    assert [stage.counts.targets for stage in progress.stages] == [2, 8, 10]
    assert progress.counts.success_rate == 1.0 and progress.counts.failure_rate == 0.0
    assert advance(rollout) == rollouts.SETTLED  # idempotent once done


def test_the_error_threshold_stops_the_rollout_and_rolls_back_what_is_in_flight(
    release, django_capture_on_commit_callbacks
):
    group, devices = fleet(20)
    rollout = start(release, group, stages=[25, 100], success_threshold=0.5, error_threshold=0.2)
    assert advance_until_settled_step(rollout) == [rollouts.CREATED, rollouts.WAITING]
    first = updates_of(rollout)
    assert len(first) == 5
    for update in first:
        run_to_feedback(update)
    # One failure of one finished update: below error_min_finished (5), so no stop.
    finish(first[0], ok=False, django_capture_on_commit_callbacks=django_capture_on_commit_callbacks)
    assert advance(rollout) == rollouts.WAITING
    for update in first[1:4]:
        finish(update, ok=True, django_capture_on_commit_callbacks=django_capture_on_commit_callbacks)
    # 3 of 5 installed >= 50%: the next stage starts while first[4] is still in flight.
    assert advance(rollout) == rollouts.STAGE_STARTED
    assert advance_until_settled_step(rollout) == [rollouts.CREATED, rollouts.WAITING]
    second = updates_of(rollout, rollout_stage=1)
    assert len(second) == 15
    for update in second:
        run_to_feedback(update)
    assert Device.objects.filter(group_id=group, status=DeviceStatus.MAINTENANCE).count() == 16
    finish(second[0], ok=False, django_capture_on_commit_callbacks=django_capture_on_commit_callbacks)
    # 2 failed of 5 finished: 40%, past 20%. Stopped, and the 15 updates in flight are cancelled.
    assert advance(rollout) == rollouts.WINDING_DOWN
    stopped = fresh(rollout)
    assert stopped.status == RolloutStatus.STOPPED and stopped.settled_at is None
    assert "2 of 5 finished updates failed (40%), past the error threshold of 20%" in stopped.stop_reason
    in_flight = updates_of(rollout, status=UpdateStatus.PENDING)
    assert len(in_flight) == 15 and all(update.cancelled_at is not None for update in in_flight)
    with django_capture_on_commit_callbacks(execute=True):
        drive_all(rollout)
    assert advance(rollout) == rollouts.SETTLED
    assert fresh(rollout).settled_at is not None
    statuses = [update.status for update in updates_of(rollout)]
    assert (statuses.count("installed"), statuses.count("failed"), statuses.count("rolled_back")) == (3, 2, 15)
    assert all("rollout stopped: 2 of 5" in update.error for update in updates_of(rollout, status="rolled_back"))
    # Every device is back where it was (status and firmware), or on the new version; none in maintenance.
    assert not Device.objects.filter(group_id=group, status=DeviceStatus.MAINTENANCE).exists()
    assert Device.objects.filter(group_id=group, firmware_version="1.0.0").count() == 17
    assert advance(rollout) == rollouts.SETTLED


def test_a_stage_that_can_no_longer_pass_stops_the_rollout(release, django_capture_on_commit_callbacks):
    group, _ = fleet(10)
    rollout = start(release, group, stages=[50, 100], success_threshold=0.9, error_threshold=1.0)
    advance_until_settled_step(rollout)
    first = updates_of(rollout)
    assert len(first) == 5
    finish(first[0], ok=False, django_capture_on_commit_callbacks=django_capture_on_commit_callbacks)
    # 4 of 5 at most could install: 80% < 90%. It stops now, without waiting for the other four.
    # The four pending ones had done nothing yet: cancelled, they end rolled back at once, so it settles now.
    assert advance(rollout) == rollouts.SETTLED
    stopped = fresh(rollout)
    assert stopped.status == RolloutStatus.STOPPED and "stage 1 can no longer reach" in stopped.stop_reason
    drive_all(rollout)
    assert {update.status for update in updates_of(rollout)} == {UpdateStatus.FAILED, UpdateStatus.ROLLED_BACK}
    assert not Device.objects.filter(group_id=group, status=DeviceStatus.MAINTENANCE).exists()
    assert len(updates_of(rollout)) == 5  # stage 2 never started


def test_busy_devices_are_skipped_never_forced(release, django_capture_on_commit_callbacks):
    group, devices = fleet(6)
    rollout = start(release, group, stages=[100], success_threshold=1.0)
    order = list(FirmwareRolloutTarget.objects.filter(rollout=rollout).order_by("position"))
    busy = services.firmware_update_start(device_id=order[2].device_id, to_version=release_create(content=b"x").version)
    device_bulk_delete(device_ids=[order[4].device_id])  # gone since the start: its target row with it
    assert advance_until_settled_step(rollout) == [rollouts.CREATED, rollouts.WAITING]
    assert FirmwareUpdate.objects.get(pk=busy.pk).cancelled_at is None  # untouched
    assert len(updates_of(rollout)) == 4 and order[2].device_id not in {u.device_id for u in updates_of(rollout)}
    skipped = FirmwareRolloutTarget.objects.get(pk=order[2].pk)
    assert f"another update of the device was active ({busy.pk})" == skipped.skipped_reason
    rollout = fresh(rollout)
    assert rollout.skipped_count == 2 and FirmwareRolloutStage.objects.get(rollout=rollout).skipped == 2
    for update in updates_of(rollout):
        finish(update, ok=True, django_capture_on_commit_callbacks=django_capture_on_commit_callbacks)
    assert advance(rollout) == rollouts.COMPLETED  # 4 of 4 updates installed: the skipped ones don't count
    counts = rollout_progress(rollout=fresh(rollout)).counts
    assert (counts.targets, counts.installed, counts.skipped, counts.not_started) == (6, 4, 2, 0)


def test_pause_holds_new_updates_resume_goes_on_cancel_rolls_back(release, django_capture_on_commit_callbacks):
    group, _ = fleet(10)
    rollout = start(release, group, stages=[20, 100], success_threshold=0.5)
    advance_until_settled_step(rollout)
    first = updates_of(rollout)
    paused = rollouts.firmware_rollout_pause(rollout_id=rollout.pk)
    assert paused.status == RolloutStatus.PAUSED
    assert rollouts.firmware_rollout_pause(rollout_id=rollout.pk).status == RolloutStatus.PAUSED  # a repeat
    for update in first:
        finish(update, ok=True, django_capture_on_commit_callbacks=django_capture_on_commit_callbacks)
    assert advance(rollout) == rollouts.PAUSED and len(updates_of(rollout)) == 2  # stage 1 passed, held
    assert [stage.state for stage in rollout_progress(rollout=fresh(rollout)).stages] == ["passed", "waiting"]
    assert advance(rollout) == rollouts.PAUSED and fresh(rollout).current_stage == 0
    assert rollouts.firmware_rollout_resume(rollout_id=rollout.pk).status == RolloutStatus.RUNNING
    assert advance_until_settled_step(rollout) == [rollouts.STAGE_STARTED, rollouts.CREATED, rollouts.WAITING]
    second = updates_of(rollout, rollout_stage=1)
    assert len(second) == 8
    for update in second[:5]:
        run_to_feedback(update)
    with django_capture_on_commit_callbacks(execute=True):
        cancelled = rollouts.firmware_rollout_cancel(rollout_id=rollout.pk, reason="wrong image")
    assert cancelled.status == RolloutStatus.CANCELLED and cancelled.stop_reason == "wrong image"
    assert advance(rollout) == rollouts.WINDING_DOWN  # 3 pending ones ended at once, 5 are compensating
    with django_capture_on_commit_callbacks(execute=True):
        drive_all(rollout)
    assert advance(rollout) == rollouts.SETTLED
    assert {update.status for update in updates_of(rollout, rollout_stage=1)} == {"rolled_back"}
    assert all(u.error == "rollout cancelled: wrong image" for u in updates_of(rollout, rollout_stage=1))
    assert Device.objects.filter(group_id=group, firmware_version=release.version).count() == 2
    assert not Device.objects.filter(group_id=group, status=DeviceStatus.MAINTENANCE).exists()
    assert rollouts.firmware_rollout_cancel(rollout_id=rollout.pk).status == RolloutStatus.CANCELLED  # a repeat
    for transition in (rollouts.firmware_rollout_pause, rollouts.firmware_rollout_resume):
        with pytest.raises(rollouts.RolloutConflict) as refused:
            transition(rollout_id=rollout.pk)
        assert refused.value.status_code == 409 and refused.value.body()["status"] == "cancelled"
    with pytest.raises(rollouts.RolloutNotFound):
        rollouts.firmware_rollout_pause(rollout_id=uuid.uuid4())


def test_a_paused_rollout_still_stops_at_the_error_threshold(release, django_capture_on_commit_callbacks):
    group, _ = fleet(5)
    rollout = start(release, group, stages=[100], error_threshold=0.2, error_min_finished=2)
    advance_until_settled_step(rollout)
    rollouts.firmware_rollout_pause(rollout_id=rollout.pk)
    updates = updates_of(rollout)
    for update in updates[:2]:
        finish(update, ok=False, django_capture_on_commit_callbacks=django_capture_on_commit_callbacks)
    advance(rollout)
    assert fresh(rollout).status == RolloutStatus.STOPPED
    with pytest.raises(rollouts.RolloutConflict):
        rollouts.firmware_rollout_resume(rollout_id=rollout.pk)


def test_a_closed_maintenance_window_stops_before_handing_out_more(release):
    group, _ = fleet(4)
    window = services.MaintenanceWindow(start=timezone.now() - timedelta(hours=2), duration_seconds=3600)
    rollout = start(release, group, stages=[100], maintenance_window=window)
    assert advance(rollout) == rollouts.SETTLED  # nothing was created: nothing to roll back
    stopped = fresh(rollout)
    assert stopped.status == RolloutStatus.STOPPED and "maintenance window closed" in stopped.stop_reason
    assert not updates_of(rollout)


def test_an_update_ending_requests_one_advance_until_the_task_claims_it(
    release, _in_process, django_capture_on_commit_callbacks
):
    group, _ = fleet(3)
    rollout = start(release, group, stages=[100])
    advance_until_settled_step(rollout)
    _in_process.clear()
    first, second, third = updates_of(rollout)
    finish(first, ok=True, django_capture_on_commit_callbacks=django_capture_on_commit_callbacks)
    finish(second, ok=True, django_capture_on_commit_callbacks=django_capture_on_commit_callbacks)
    assert _in_process == [rollout.pk]  # the second found one queued (debounced)
    rollouts.rollout_advance_claim(rollout.pk)  # what the task does before it reads
    finish(third, ok=False, django_capture_on_commit_callbacks=django_capture_on_commit_callbacks)
    assert _in_process == [rollout.pk, rollout.pk]


def test_rollout_list_active_is_one_query(release, django_assert_num_queries, django_capture_on_commit_callbacks):
    group, _ = fleet(4)
    running = start(release, group, stages=[50, 100])
    advance_until_settled_step(running)
    finish(updates_of(running)[0], ok=False, django_capture_on_commit_callbacks=django_capture_on_commit_callbacks)
    other_group, _ = fleet(2)
    paused = start(release, other_group)
    rollouts.firmware_rollout_pause(rollout_id=paused.pk)
    done_group, _ = fleet(1)
    rollouts.firmware_rollout_cancel(rollout_id=start(release, done_group).pk)
    with django_assert_num_queries(1):
        summaries = rollout_list_active()
    assert [(s.id, s.status, s.stage_count) for s in summaries] == [
        (paused.pk, "paused", 3),
        (running.pk, "running", 2),
    ]
    counts = summaries[1].counts
    assert (counts.targets, counts.failed, counts.in_flight, counts.not_started, counts.done) == (4, 1, 1, 2, 1)
    assert rollout_update_counts(rollout_id=running.pk) == {0: {"failed": 1, "pending": 1}}


@pytest.mark.django_db(transaction=True)
def test_concurrent_advances_hand_out_each_target_once(release, settings):
    """Two threads (two connections) advance one rollout at once, through every batch and a stage change:
    the row lock serializes them, so each target gets exactly one update and each stage starts once."""
    settings.FIRMWARE_ROLLOUT_BATCH_SIZE = 4
    group, devices = fleet(30)
    rollout = start(release, group, stages=[40, 100], success_threshold=0.0)  # stage 1 passes once handed out
    barrier = threading.Barrier(2)
    outcomes: list[list[str]] = [[], []]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for _ in range(40):
                outcomes[index].append(advance(rollout))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    updates = updates_of(rollout)
    assert len(updates) == 30 and len({update.device_id for update in updates}) == 30
    assert [sum(1 for u in updates if u.rollout_stage == stage) for stage in (0, 1)] == [12, 18]
    all_outcomes = outcomes[0] + outcomes[1]
    assert all_outcomes.count(rollouts.STAGE_STARTED) == 1
    assert all_outcomes.count(rollouts.CREATED) == 3 + 5  # ceil(12 / 4) + ceil(18 / 4) batches, once each
    assert fresh(rollout).next_position == 30
