"""The admin: releases registered and artifacts uploaded through the services, updates read-only with their saga's
step log, and cancelled by an action that calls the service; rollouts with their progress and stages, paused,
resumed and cancelled by actions that call the services."""

import hashlib
import re
import uuid

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from devices.models import DeviceStatus
from devices.testing import device_create, devices_bulk_create
from firmware.models import FirmwareRelease, FirmwareRollout, FirmwareUpdate
from firmware.rollouts import firmware_rollout_advance, firmware_rollout_start
from firmware.services import firmware_update_start
from firmware.testing import artifact_bytes, new_version, release_create, rollout_advance_capture, sha256_checksum
from iot.saga.testing import saga_drive, saga_queue_capture

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _saga_in_process():
    with saga_queue_capture():
        yield


def test_add_a_release_with_its_artifact(admin_client):
    content = artifact_bytes(5000)
    version = new_version()
    response = admin_client.post(
        "/admin/firmware/firmwarerelease/add/",
        {
            "version": version,
            "checksum": sha256_checksum(content, style="sha256:"),
            "size_bytes": str(len(content)),
            "release_notes": "admin upload",
            "artifact": SimpleUploadedFile("image.bin", content),
        },
    )
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    release = FirmwareRelease.objects.get(version=version)
    assert (release.artifact_sha256, release.artifact_size) == (hashlib.sha256(content).hexdigest(), len(content))
    duplicate = admin_client.post("/admin/firmware/firmwarerelease/add/", {"version": version, "checksum": "sha256-x"})
    assert duplicate.status_code == 200 and b"already exists" in duplicate.content
    bad_label = admin_client.post("/admin/firmware/firmwarerelease/add/", {"version": "a b", "checksum": "sha256-x"})
    assert bad_label.status_code == 200 and FirmwareRelease.objects.count() == 1


def test_upload_a_missing_artifact_from_the_change_page(admin_client):
    release = release_create(content=None, checksum="sha256-" + "0" * 64)
    page = admin_client.get(f"/admin/firmware/firmwarerelease/{release.pk}/change/")
    assert page.status_code == 200 and b'name="artifact"' in page.content
    response = admin_client.post(
        f"/admin/firmware/firmwarerelease/{release.pk}/change/", {"artifact": SimpleUploadedFile("x.bin", b"abc")}
    )
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    release.refresh_from_db()
    assert release.artifact_size == 3 and release.checksum == "sha256-" + "0" * 64  # the rest is immutable
    assert b'name="artifact"' not in admin_client.get(f"/admin/firmware/firmwarerelease/{release.pk}/change/").content


def test_updates_are_read_only_with_their_step_log_and_cancelled_by_the_action(admin_client):
    device = device_create().device
    update = firmware_update_start(device_id=device.pk, to_version=release_create(content=b"image").version)
    saga_drive(run_id=update.saga_run_id)
    assert admin_client.get("/admin/firmware/firmwareupdate/").status_code == 200
    assert (
        admin_client.get("/admin/firmware/firmwareupdate/", {"status__exact": "pending", "q": "x"}).status_code == 200
    )
    page = admin_client.get(f"/admin/firmware/firmwareupdate/{update.pk}/change/")
    assert page.status_code == 200
    for step in (b"verify_artifact", b"enter_maintenance", b"dispatch", b"await_feedback"):
        assert step in page.content
    assert admin_client.get("/admin/firmware/firmwareupdate/add/").status_code == 403
    admin_client.post(f"/admin/firmware/firmwareupdate/{update.pk}/change/", {"status": "installed"})
    assert FirmwareUpdate.objects.get(pk=update.pk).status == "pending"  # never written from a form
    response = admin_client.post(
        "/admin/firmware/firmwareupdate/", {"action": "cancel", "_selected_action": [str(update.pk)]}, follow=True
    )
    assert b"1 update(s) cancelled" in response.content
    assert saga_drive(run_id=update.saga_run_id).status == "cancelled"
    assert FirmwareUpdate.objects.get(pk=update.pk).status == "rolled_back"
    again = admin_client.post(
        "/admin/firmware/firmwareupdate/", {"action": "cancel", "_selected_action": [str(uuid.uuid4())]}, follow=True
    )
    assert again.status_code == 200


def test_a_release_in_use_is_not_deleted(admin_client):
    release = release_create(content=b"image")
    firmware_update_start(device_id=device_create().device.pk, to_version=release.version)
    response = admin_client.post(
        "/admin/firmware/firmwarerelease/",
        {"action": "delete_selected", "_selected_action": [str(release.pk)], "post": "yes"},
        follow=True,
    )
    assert response.status_code == 200
    assert FirmwareRelease.objects.filter(pk=release.pk).exists()


def test_rollouts_show_progress_and_stages_and_are_paused_resumed_cancelled_by_actions(
    admin_client, redis_namespace, django_assert_max_num_queries
):
    group = f"g-{uuid.uuid4().hex[:8]}"
    devices_bulk_create(count=10, group_id=group, status=DeviceStatus.ACTIVE)
    release = release_create(content=b"image")
    with rollout_advance_capture():
        rollout = firmware_rollout_start(to_version=release.version, group_id=group, stages=[20, 100])
        firmware_rollout_advance(rollout_id=rollout.pk)
        for index in range(3):  # more rollouts: the list's queries don't grow with them
            other = f"{group}-{index}"
            devices_bulk_create(count=2, group_id=other, status=DeviceStatus.ACTIVE)
            firmware_rollout_start(to_version=release.version, group_id=other)
    with django_assert_max_num_queries(12):
        listing = admin_client.get("/admin/firmware/firmwarerollout/")
    assert listing.status_code == 200
    html = listing.content.decode()
    assert 'role="progressbar"' in html and "0 of 10 targets: 2 in flight" in html and "1 of 2 (20%)" in html
    page = admin_client.get(f"/admin/firmware/firmwarerollout/{rollout.pk}/change/")
    assert page.status_code == 200
    stages = re.findall(
        r"<tr><td>(\d)</td><td>(\d+)%</td><td>(\w+)</td><td>(\d+)</td><td>(\d+)</td>", page.content.decode()
    )
    assert stages == [("1", "20", "running", "2", "2"), ("2", "100", "waiting", "8", "0")]
    assert admin_client.get("/admin/firmware/firmwarerollout/add/").status_code == 403

    def act(action: str):
        with rollout_advance_capture():
            return admin_client.post(
                "/admin/firmware/firmwarerollout/",
                {"action": action, "_selected_action": [str(rollout.pk)]},
                follow=True,
            )

    assert b"1 rollout(s) paused" in act("pause").content
    assert FirmwareRollout.objects.get(pk=rollout.pk).status == "paused"
    assert b"1 rollout(s) resumed" in act("resume").content
    assert b"1 rollout(s) cancelled" in act("cancel").content
    assert FirmwareRollout.objects.get(pk=rollout.pk).status == "cancelled"
    assert b"1 not resumed: The rollout is cancelled" in act("resume").content
