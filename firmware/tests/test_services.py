"""Releases, updates and device reports through the services, with the saga driven in this process
(`iot.saga.testing.saga_drive`, as workers would run it) on real Postgres."""

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.db import IntegrityError, transaction
from django.utils import timezone

from devices.models import Device, DeviceStatus
from devices.testing import device_create
from firmware import services
from firmware.models import FirmwareRelease, FirmwareUpdate, UpdateStatus
from firmware.testing import artifact_bytes, new_version, release_create
from iot.saga.testing import saga_drive, saga_queue_capture

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _saga_in_process(settings):
    settings.SAGA_RETRY_BASE_SECONDS = 0.001
    settings.SAGA_RETRY_MAX_SECONDS = 0.01
    with saga_queue_capture() as queued:
        yield queued


def drive(update: FirmwareUpdate):
    return saga_drive(run_id=update.saga_run_id)


def fresh(update: FirmwareUpdate) -> FirmwareUpdate:
    return FirmwareUpdate.objects.get(pk=update.pk)


def device_of(update: FirmwareUpdate) -> Device:
    return Device.objects.get(pk=update.device_id)


def active_device(firmware_version: str = "1.0.0") -> Device:
    device = device_create(firmware_version=firmware_version).device
    Device.objects.filter(pk=device.pk).update(status=DeviceStatus.ACTIVE)
    return Device.objects.get(pk=device.pk)


def start(device: Device, release: FirmwareRelease | None = None, **options) -> FirmwareUpdate:
    release = release or release_create(content=artifact_bytes(2048))
    return services.firmware_update_start(device_id=device.pk, to_version=release.version, **options)


def report(update: FirmwareUpdate, status: str, capture=None, **fields) -> FirmwareUpdate:
    return services.firmware_update_report(update_id=update.pk, device_id=update.device_id, status=status, **fields)


def step_log(run) -> list[tuple[str, str, str]]:
    return [(step.name, step.phase, step.status) for step in run.steps]


def stored_files(media_root: str) -> list[Path]:
    return [path for path in Path(media_root).rglob("*") if path.is_file()]


# --- Releases ----------------------------------------------------------------------------------


def test_a_version_registers_once():
    version = new_version()
    services.firmware_release_register(version=version, checksum="sha256-abc")
    with pytest.raises(services.FirmwareVersionExists) as refused:
        services.firmware_release_register(version=version, checksum="sha256-other")
    assert refused.value.status_code == 409
    assert FirmwareRelease.objects.get(version=version).checksum == "sha256-abc"


def test_an_artifact_is_set_once_and_a_refused_upload_leaves_no_file(_media_root):
    release = release_create(content=b"first image")
    with pytest.raises(services.FirmwareArtifactExists):
        services.firmware_artifact_attach(version=release.version, file=ContentFile(b"second", name="x.bin"))
    assert len(stored_files(_media_root)) == 1
    release.refresh_from_db()
    assert release.artifact_size == len(b"first image")


def test_an_artifact_past_the_limit_is_refused_and_nothing_stored(settings, _media_root):
    settings.FIRMWARE_ARTIFACT_MAX_BYTES = 100
    release = release_create(content=None)
    with pytest.raises(services.FirmwareArtifactTooLarge) as refused:
        services.firmware_artifact_attach(version=release.version, file=ContentFile(b"x" * 101, name="x.bin"))
    assert refused.value.status_code == 413 and refused.value.body()["max_bytes"] == 100
    assert stored_files(_media_root) == []
    assert not FirmwareRelease.objects.get(pk=release.pk).has_artifact


def test_a_release_with_updates_is_kept(_media_root, django_capture_on_commit_callbacks):
    release = release_create(content=b"image")
    start(device_create().device, release)
    with pytest.raises(services.FirmwareReleaseInUse):
        services.firmware_release_delete(version=release.version)
    unused = release_create(content=b"other image")
    with django_capture_on_commit_callbacks(execute=True):
        services.firmware_release_delete(version=unused.version)
    assert not FirmwareRelease.objects.filter(pk=unused.pk).exists()
    assert len(stored_files(_media_root)) == 1


# --- Starting updates ----------------------------------------------------------------------------


def test_an_update_needs_a_known_device_and_version():
    device = device_create().device
    with pytest.raises(services.FirmwareUpdateUnknownVersion):
        services.firmware_update_start(device_id=device.pk, to_version="no-such-version")
    release = release_create(content=b"image")
    with pytest.raises(services.FirmwareUpdateUnknownDevice):
        services.firmware_update_start(device_id=uuid.uuid4(), to_version=release.version)
    Device.objects.filter(pk=device.pk).update(status=DeviceStatus.DECOMMISSIONED)
    with pytest.raises(services.FirmwareUpdateUnknownDevice, match="decommissioned"):
        services.firmware_update_start(device_id=device.pk, to_version=release.version)
    assert not FirmwareUpdate.objects.exists()


def test_one_active_update_per_device_without_force():
    device = active_device()
    first = start(device)
    with pytest.raises(services.FirmwareUpdateActive) as refused:
        start(device)
    assert refused.value.status_code == 409
    assert refused.value.body()["active_update_id"] == str(first.pk)
    assert FirmwareUpdate.objects.filter(device=device).count() == 1


def test_the_database_itself_refuses_a_second_active_update():
    update = start(active_device())
    with pytest.raises(IntegrityError), transaction.atomic():
        FirmwareUpdate.objects.create(
            device_id=update.device_id, release_id=update.release_id, from_version="1", to_version="2"
        )


# --- Running them ------------------------------------------------------------------------------


def test_the_happy_path_installs_the_version_and_gives_the_status_back(django_capture_on_commit_callbacks):
    device = active_device("1.0.0")
    update = start(device)
    run = drive(update)
    assert run.current_step == "await_feedback" and run.status == "running"
    assert device_of(update).status == DeviceStatus.MAINTENANCE
    assert fresh(update).dispatched_at is not None
    report(update, "downloading", progress=30)
    report(update, "downloaded", progress=100)
    report(update, "installing")
    with django_capture_on_commit_callbacks(execute=True):
        report(update, "installed", version=update.to_version)
    run = drive(update)
    assert run.status == "succeeded"
    done = fresh(update)
    assert (done.status, done.progress, done.error) == (UpdateStatus.INSTALLED, 100, None)
    assert done.completed_at is not None
    after = device_of(update)
    assert (after.status, after.firmware_version) == (DeviceStatus.ACTIVE, update.to_version)


def test_a_device_failure_compensates_in_reverse_order(django_capture_on_commit_callbacks):
    device = active_device("1.0.0")
    update = start(device)
    drive(update)
    report(update, "installing", progress=10)
    with django_capture_on_commit_callbacks(execute=True):
        report(update, "failed", reason="flash write error")
    run = drive(update)
    assert run.status == "compensated"
    assert step_log(run) == [
        ("verify_artifact", "forward", "done"),
        ("enter_maintenance", "forward", "done"),
        ("dispatch", "forward", "done"),
        ("await_feedback", "forward", "failed"),
        ("dispatch", "compensate", "done"),
        ("enter_maintenance", "compensate", "done"),
    ]
    failed = fresh(update)
    assert failed.status == UpdateStatus.FAILED and "flash write error" in failed.error
    assert failed.withdrawn_at is not None
    after = device_of(update)
    assert (after.status, after.firmware_version) == (DeviceStatus.ACTIVE, "1.0.0")


def test_a_bogus_checksum_fails_before_the_device_is_touched():
    device = active_device()
    release = release_create(content=None, checksum="sha256-1a2b3c4d")
    update = start(device, release)
    run = drive(update)
    assert run.status == "compensated" and step_log(run) == [("verify_artifact", "forward", "failed")]
    failed = fresh(update)
    assert failed.status == UpdateStatus.FAILED and "no artifact" in failed.error
    assert device_of(update).status == DeviceStatus.ACTIVE


def test_a_wrong_reported_version_fails_and_restores(django_capture_on_commit_callbacks):
    device = active_device("1.0.0")
    update = start(device)
    drive(update)
    with django_capture_on_commit_callbacks(execute=True):
        report(update, "installed", version="1.0.1-not-it")
    run = drive(update)
    assert run.status == "compensated"
    assert "1.0.1-not-it" in fresh(update).error
    assert (device_of(update).status, device_of(update).firmware_version) == (DeviceStatus.ACTIVE, "1.0.0")


def test_cancel_rolls_back_and_is_refused_once_finished():
    device = active_device("1.0.0")
    update = start(device)
    drive(update)
    cancelled = services.firmware_update_cancel(update_id=update.pk, reason="operator changed their mind")
    assert cancelled.cancelled_at is not None and cancelled.status == UpdateStatus.PENDING
    assert services.firmware_update_cancel(update_id=update.pk).cancelled_at == cancelled.cancelled_at  # idempotent
    run = drive(update)
    assert run.status == "cancelled"
    done = fresh(update)
    assert (done.status, done.error) == (UpdateStatus.ROLLED_BACK, "operator changed their mind")
    assert (device_of(update).status, device_of(update).firmware_version) == (DeviceStatus.ACTIVE, "1.0.0")
    assert services.firmware_update_cancel(update_id=update.pk).status == UpdateStatus.ROLLED_BACK  # a repeat: 200
    failed = start(device, release_create(content=None))
    assert drive(failed).status == "compensated"
    with pytest.raises(services.FirmwareUpdateConflict) as refused:
        services.firmware_update_cancel(update_id=failed.pk)
    assert refused.value.status_code == 409 and refused.value.body()["status"] == "failed"


def test_cancelling_before_any_step_ends_the_update_at_once():
    update = start(active_device())
    cancelled = services.firmware_update_cancel(update_id=update.pk)
    assert cancelled.status == UpdateStatus.ROLLED_BACK and cancelled.completed_at is not None
    with pytest.raises(services.FirmwareUpdateNotFound):
        services.firmware_update_cancel(update_id=uuid.uuid4())


def test_force_supersedes_and_the_new_update_waits_for_the_rollback():
    device = active_device("1.0.0")
    first = start(device)
    drive(first)
    assert device_of(first).status == DeviceStatus.MAINTENANCE
    second = start(device, force=True)
    superseded = fresh(first)
    assert superseded.cancelled_at is not None and superseded.superseded_by == second.pk
    assert superseded.status in (UpdateStatus.PENDING,)  # still rolling back
    # The new update verifies its artifact, then waits while the device is still the first's.
    run = drive(second)
    assert run.current_step == "enter_maintenance" and run.context["waiting_for"] == str(first.pk)
    assert drive(first).status == "cancelled"
    assert fresh(first).status == UpdateStatus.ROLLED_BACK
    assert f"superseded by update {second.pk}" == fresh(first).error
    assert device_of(first).status == DeviceStatus.ACTIVE
    from iot.saga import saga_signal

    saga_signal(run_id=second.saga_run_id)  # what the first's on_finish queues after its commit
    run = drive(second)
    assert run.current_step == "await_feedback"
    # It remembered the device's own status, not the first update's maintenance.
    assert run.context["previous_status"] == DeviceStatus.ACTIVE
    assert run.context["previous_version"] == "1.0.0"


def test_force_with_nothing_active_just_starts():
    update = start(active_device(), force=True)
    assert update.status == UpdateStatus.PENDING and update.force


# --- Device reports ----------------------------------------------------------------------------


def test_reports_move_forward_only_and_repeat_harmlessly():
    update = start(active_device())
    drive(update)
    assert report(update, "downloading", progress=10).progress == 10
    assert report(update, "downloading", progress=40).progress == 40  # same stage, more progress
    assert report(update, "downloading", progress=20).progress == 40  # less: ignored
    assert report(update, "installing", progress=5).status == UpdateStatus.INSTALLING
    late = report(update, "downloaded", progress=100)  # an earlier stage after a later one
    assert (late.status, late.progress) == (UpdateStatus.INSTALLING, 40)
    again = report(update, "installing", progress=5)
    assert (again.status, again.progress) == (UpdateStatus.INSTALLING, 40)


def test_a_report_before_dispatch_from_another_device_or_unknown_is_refused():
    update = start(active_device())
    with pytest.raises(services.FirmwareUpdateConflict, match="not been dispatched"):
        report(update, "downloading")
    drive(update)
    with pytest.raises(services.FirmwareUpdateForbidden):
        services.firmware_update_report(update_id=update.pk, device_id=uuid.uuid4(), status="downloading")
    with pytest.raises(services.FirmwareUpdateNotFound):
        services.firmware_update_report(update_id=uuid.uuid4(), device_id=update.device_id, status="downloading")


def test_the_result_is_recorded_once(django_capture_on_commit_callbacks):
    update = start(active_device())
    drive(update)
    with django_capture_on_commit_callbacks() as woken:
        report(update, "installed", version=update.to_version)
    assert len(woken) == 1  # the saga is woken after commit
    assert fresh(update).device_result == "installed"
    with django_capture_on_commit_callbacks() as woken:
        report(update, "installed", version=update.to_version)  # repeated: fine, and nothing to wake again
    assert woken == []
    with pytest.raises(services.FirmwareUpdateConflict, match="already reported installed"):
        report(update, "failed", reason="changed my mind")
    assert report(update, "downloading").status == UpdateStatus.PENDING  # a late stage: ignored
    from iot.saga import saga_signal

    saga_signal(run_id=update.saga_run_id)  # what the first report queued after its commit
    assert drive(update).status == "succeeded"
    assert report(update, "installed", version=update.to_version).status == UpdateStatus.INSTALLED  # idempotent
    for status in ("failed", "installing"):
        with pytest.raises(services.FirmwareUpdateConflict, match="finished"):
            report(update, status)


def test_installing_only_inside_the_maintenance_window():
    device = active_device()
    window = services.MaintenanceWindow(start=timezone.now() + timedelta(hours=1), duration_seconds=600)
    update = start(device, maintenance_window=window)
    assert not update.install_allowed()
    drive(update)
    report(update, "downloading")
    assert report(update, "downloaded", progress=100).status == UpdateStatus.DOWNLOADED
    with pytest.raises(services.FirmwareInstallNotAllowed) as refused:
        report(update, "installing")
    assert refused.value.status_code == 409 and refused.value.code == "outside_maintenance_window"
    assert fresh(update).status == UpdateStatus.DOWNLOADED
    FirmwareUpdate.objects.filter(pk=update.pk).update(maintenance_window_start=timezone.now() - timedelta(seconds=1))
    assert fresh(update).install_allowed()
    assert report(update, "installing").status == UpdateStatus.INSTALLING


def test_a_cancelled_update_takes_no_more_reports():
    update = start(active_device())
    drive(update)
    services.firmware_update_cancel(update_id=update.pk)
    with pytest.raises(services.FirmwareUpdateConflict, match="cancelled"):
        report(update, "downloading")
