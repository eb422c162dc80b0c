"""The saga's steps and compensations as plain functions, on real rows (no runner involved)."""

import uuid
from datetime import timedelta

import pytest
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from devices.models import Device, DeviceStatus
from devices.testing import device_create
from firmware import saga
from firmware.models import DeviceResult, FirmwareUpdate, UpdateStatus
from firmware.testing import artifact_bytes, new_version, release_create, sha256_checksum
from iot.saga import SagaRunView, StepFailed, StepWait

pytestmark = pytest.mark.django_db


def run_view(update: FirmwareUpdate, *, status: str = "running", error: str | None = None, **context) -> SagaRunView:
    now = timezone.now()
    return SagaRunView(
        id=uuid.uuid4(),
        name=saga.SAGA_NAME,
        key=str(update.pk),
        status=status,
        context={"update_id": str(update.pk), "device_id": str(update.device_id), **context},
        error=error,
        current_step=None,
        created_at=now,
        updated_at=now,
        finished_at=None,
    )


def update_create(*, content: bytes | None = b"image", checksum: str | None = None, device=None, **fields):
    release = release_create(content=content, checksum=checksum)
    device = device or device_create().device
    return FirmwareUpdate.objects.create(
        device=device, release=release, from_version=device.firmware_version, to_version=release.version, **fields
    )


def device_row(update: FirmwareUpdate) -> Device:
    return Device.objects.get(pk=update.device_id)


# --- verify_artifact ---------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["sha256-", "sha256:", "", "SHA256:", "sha-256:"])
def test_verify_accepts_every_spelling_of_the_matching_digest(style):
    content = artifact_bytes(1000)
    update = update_create(content=content, checksum=sha256_checksum(content, style=style))
    assert saga.verify_artifact(run_view(update)) == {"artifact_sha256": sha256_checksum(content, style="")}


def test_verify_accepts_a_subresource_integrity_base64_checksum():
    import base64
    import hashlib

    content = artifact_bytes(1000)
    integrity = "sha256-" + base64.b64encode(hashlib.sha256(content).digest()).decode()
    update = update_create(content=content, checksum=integrity)
    assert saga.verify_artifact(run_view(update))["artifact_sha256"] == hashlib.sha256(content).hexdigest()


def test_verify_fails_without_an_artifact():
    update = update_create(content=None)
    with pytest.raises(StepFailed, match="has no artifact"):
        saga.verify_artifact(run_view(update))


@pytest.mark.parametrize("checksum", ["sha256-1a2b3c4d", "md5:0123456789abcdef0123456789abcdef", "sha256-" + "0" * 64])
def test_verify_fails_on_a_checksum_that_names_another_or_no_digest(checksum):
    update = update_create(content=artifact_bytes(100), checksum=checksum)
    with pytest.raises(StepFailed, match="checksum"):
        saga.verify_artifact(run_view(update))


def test_verify_fails_when_the_declared_size_differs():
    update = update_create(content=artifact_bytes(100))
    type(update.release).objects.filter(pk=update.release_id).update(size_bytes=99)
    with pytest.raises(StepFailed, match="declares 99"):
        saga.verify_artifact(run_view(update))


def test_verify_fails_when_the_file_is_gone_from_storage():
    update = update_create(content=artifact_bytes(100))
    default_storage.delete(update.release.artifact_name)
    with pytest.raises(StepFailed, match="missing from storage"):
        saga.verify_artifact(run_view(update))


def test_a_step_of_an_update_deleted_with_its_device_fails():
    update = update_create()
    Device.objects.filter(pk=update.device_id).delete()
    assert not FirmwareUpdate.objects.filter(pk=update.pk).exists()  # the database cascade
    with pytest.raises(StepFailed, match="no longer exists"):
        saga.verify_artifact(run_view(update))


# --- enter_maintenance -------------------------------------------------------------------------


def test_enter_maintenance_remembers_what_to_restore_and_the_undo_restores_it():
    device = device_create(firmware_version="1.4.2").device
    Device.objects.filter(pk=device.pk).update(status=DeviceStatus.ACTIVE)
    update = update_create(device=device)
    with transaction.atomic():
        remembered = saga.enter_maintenance(run_view(update))
    assert remembered == {"previous_status": "active", "previous_version": "1.4.2", "waiting_for": None}
    assert device_row(update).status == DeviceStatus.MAINTENANCE
    Device.objects.filter(pk=device.pk).update(firmware_version="garbage")  # as if changed meanwhile
    saga.enter_maintenance_undo(run_view(update, **remembered))
    restored = device_row(update)
    assert (restored.status, restored.firmware_version) == ("active", "1.4.2")


def test_the_undo_leaves_a_device_someone_moved_out_of_maintenance():
    update = update_create()
    with transaction.atomic():
        remembered = saga.enter_maintenance(run_view(update))
    Device.objects.filter(pk=update.device_id).update(status=DeviceStatus.DECOMMISSIONED)
    saga.enter_maintenance_undo(run_view(update, **remembered))
    assert device_row(update).status == DeviceStatus.DECOMMISSIONED


def test_the_undo_of_a_step_that_never_completed_does_nothing():
    update = update_create()
    Device.objects.filter(pk=update.device_id).update(status=DeviceStatus.MAINTENANCE)
    saga.enter_maintenance_undo(run_view(update))  # no previous_status in the context
    assert device_row(update).status == DeviceStatus.MAINTENANCE


def test_a_decommissioned_device_is_not_updated():
    update = update_create()
    Device.objects.filter(pk=update.device_id).update(status=DeviceStatus.DECOMMISSIONED)
    with transaction.atomic(), pytest.raises(StepFailed, match="decommissioned"):
        saga.enter_maintenance(run_view(update))


def test_enter_maintenance_waits_for_an_earlier_update_still_rolling_back(settings):
    earlier = update_create(cancelled_at=timezone.now())  # cancelled, its compensation not yet run
    update = update_create(device=device_row(earlier))
    with transaction.atomic():
        outcome = saga.enter_maintenance(run_view(update))
    assert isinstance(outcome, StepWait)
    assert outcome.context["waiting_for"] == str(earlier.pk)
    assert timezone.now() < outcome.until <= timezone.now() + timedelta(seconds=saga.PREDECESSOR_RECHECK_SECONDS)
    assert device_row(update).status == DeviceStatus.REGISTERED  # untouched while waiting
    # Past FIRMWARE_DEVICE_TIMEOUT_SECONDS of waiting, the update fails.
    since = (timezone.now() - timedelta(seconds=settings.FIRMWARE_DEVICE_TIMEOUT_SECONDS + 1)).isoformat()
    with transaction.atomic(), pytest.raises(StepFailed, match="still being rolled back"):
        saga.enter_maintenance(run_view(update, waiting_since=since))
    # Once the earlier one has finished, it goes ahead.
    FirmwareUpdate.objects.filter(pk=earlier.pk).update(status=UpdateStatus.ROLLED_BACK)
    with transaction.atomic():
        assert saga.enter_maintenance(run_view(update, waiting_since=since))["previous_status"] == "registered"


# --- dispatch, await_feedback, verify_version, complete --------------------------------------


def test_dispatch_offers_the_update_and_its_undo_withdraws_it():
    update = update_create()
    saga.dispatch(run_view(update))
    update.refresh_from_db()
    assert update.dispatched_at is not None and update.status == UpdateStatus.PENDING
    saga.dispatch_undo(run_view(update))
    update.refresh_from_db()
    assert update.withdrawn_at is not None


def test_await_feedback_waits_until_the_silence_deadline(settings):
    settings.FIRMWARE_DEVICE_TIMEOUT_SECONDS = 30
    dispatched = timezone.now()
    update = update_create(dispatched_at=dispatched)
    outcome = saga.await_feedback(run_view(update))
    assert isinstance(outcome, StepWait) and outcome.until == dispatched + timedelta(seconds=30)
    # A report is a sign of life: the deadline moves.
    FirmwareUpdate.objects.filter(pk=update.pk).update(last_report_at=dispatched + timedelta(seconds=20))
    assert saga.await_feedback(run_view(update)).until == dispatched + timedelta(seconds=50)
    # A window that closes later moves it too: a device waiting for its window is not silent.
    FirmwareUpdate.objects.filter(pk=update.pk).update(
        maintenance_window_start=dispatched, maintenance_window_end=dispatched + timedelta(hours=1)
    )
    later = saga.await_feedback(run_view(update)).until
    assert later == dispatched + timedelta(hours=1, seconds=30)


def test_a_silent_device_fails_the_update(settings):
    settings.FIRMWARE_DEVICE_TIMEOUT_SECONDS = 5
    update = update_create(dispatched_at=timezone.now() - timedelta(seconds=6))
    with pytest.raises(StepFailed, match="device silent"):
        saga.await_feedback(run_view(update))


def test_the_device_result_ends_the_wait():
    update = update_create(dispatched_at=timezone.now(), device_result=DeviceResult.FAILED, device_reason="flash full")
    with pytest.raises(StepFailed, match="flash full"):
        saga.await_feedback(run_view(update))
    FirmwareUpdate.objects.filter(pk=update.pk).update(device_result=DeviceResult.INSTALLED, reported_version="9")
    assert saga.await_feedback(run_view(update)) == {"reported_version": "9"}


def test_verify_version_compares_the_reported_version():
    update = update_create(reported_version="something-else")
    with pytest.raises(StepFailed, match="expected"):
        saga.verify_version(run_view(update))
    FirmwareUpdate.objects.filter(pk=update.pk).update(reported_version=update.to_version)
    assert saga.verify_version(run_view(update)) is None


def test_complete_sets_the_new_version_and_gives_the_previous_status_back():
    update = update_create()
    with transaction.atomic():
        remembered = saga.enter_maintenance(run_view(update))
    saga.complete(run_view(update, **remembered))
    device = device_row(update)
    assert (device.status, device.firmware_version) == ("registered", update.to_version)


def test_complete_keeps_a_status_someone_set_meanwhile():
    update = update_create()
    with transaction.atomic():
        remembered = saga.enter_maintenance(run_view(update))
    Device.objects.filter(pk=update.device_id).update(status=DeviceStatus.INACTIVE)
    saga.complete(run_view(update, **remembered))
    device = device_row(update)
    assert (device.status, device.firmware_version) == ("inactive", update.to_version)


# --- on_finish -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run_status", "error", "final", "final_error"),
    [
        ("succeeded", None, UpdateStatus.INSTALLED, None),
        ("compensated", "device silent", UpdateStatus.FAILED, "device silent"),
        ("cancelled", "superseded by update x", UpdateStatus.ROLLED_BACK, "superseded by update x"),
    ],
)
def test_the_run_outcome_becomes_the_final_status(run_status, error, final, final_error):
    update = update_create(status=UpdateStatus.INSTALLING)
    saga.firmware_update_finished(run_view(update, status=run_status, error=error))
    update.refresh_from_db()
    assert (update.status, update.error) == (final, final_error)
    assert update.completed_at is not None
    assert update.progress == (100 if final == UpdateStatus.INSTALLED else 0)


def test_on_finish_never_rewrites_a_final_status():
    update = update_create(status=UpdateStatus.FAILED, error="first")
    saga.firmware_update_finished(run_view(update, status="succeeded"))
    update.refresh_from_db()
    assert (update.status, update.error) == (UpdateStatus.FAILED, "first")


def test_version_helper_makes_distinct_labels():
    assert new_version() != new_version()


def test_an_update_keeps_the_device_timeout_it_started_with(settings):
    """A worker with another FIRMWARE_DEVICE_TIMEOUT_SECONDS (a settings change mid-update, two server sets on one
    database) judges silence by the update's own timeout, not its setting: it once waited 600 s instead of 4."""
    from types import SimpleNamespace

    from firmware.saga import device_timeout_seconds

    settings.FIRMWARE_DEVICE_TIMEOUT_SECONDS = 600
    assert device_timeout_seconds(SimpleNamespace(context={"device_timeout_seconds": 4})) == 4.0
    assert device_timeout_seconds(SimpleNamespace(context={})) == 600.0  # an update started before the change
