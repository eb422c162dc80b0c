"""Reads of the firmware app: releases, updates, what a device may see and download."""

import uuid

from django.core.files import File
from django.core.files.storage import default_storage
from django.db.models import QuerySet

from firmware.models import ACTIVE_STATUSES, FirmwareRelease, FirmwareUpdate
from iot.saga import SagaRunNotFound, SagaRunView, saga_get


def release_get(*, version: str) -> FirmwareRelease | None:
    return FirmwareRelease.objects.filter(version=version).first()


def release_list() -> QuerySet[FirmwareRelease]:
    return FirmwareRelease.objects.all()


def update_get(*, update_id: uuid.UUID) -> FirmwareUpdate | None:
    return FirmwareUpdate.objects.filter(pk=update_id).first()


def update_list(
    *, device_id: uuid.UUID | None = None, status: str | None = None, active: bool | None = None
) -> QuerySet[FirmwareUpdate]:
    updates = FirmwareUpdate.objects.all()
    if device_id is not None:
        updates = updates.filter(device_id=device_id)
    if status is not None:
        updates = updates.filter(status=status)
    if active is not None:
        updates = updates.filter(status__in=ACTIVE_STATUSES) if active else updates.exclude(status__in=ACTIVE_STATUSES)
    return updates


def update_saga(*, update: FirmwareUpdate) -> SagaRunView | None:
    """The update's saga run with its step log (one query for the run, one for the log)."""
    if update.saga_run_id is None:
        return None
    try:
        return saga_get(run_id=update.saga_run_id)
    except SagaRunNotFound:
        return None


def _offered_to_device(device_id: uuid.UUID) -> QuerySet[FirmwareUpdate]:
    """The device's update that was dispatched to it and is still on offer (not cancelled, not withdrawn)."""
    return FirmwareUpdate.objects.filter(
        device_id=device_id,
        status__in=ACTIVE_STATUSES,
        cancelled_at=None,
        withdrawn_at=None,
        dispatched_at__isnull=False,
    )


def device_pending_update(*, device_id: uuid.UUID) -> FirmwareUpdate | None:
    """What `GET /firmware/device/update` offers the device, with its release; at most one (the unique
    index allows one active, uncancelled update per device). Also offered after the device reported its
    result, until the saga has settled it, so a device that retries its poll sees the same update."""
    return _offered_to_device(device_id).select_related("release").first()


def device_may_download(*, device_id: uuid.UUID, version: str) -> bool:
    """A device downloads the artifact of the release it has on offer, and no other."""
    return _offered_to_device(device_id).filter(to_version=version).exists()


def artifact_open(*, release: FirmwareRelease) -> File:
    """The release's artifact from storage, opened for reading (the caller closes it)."""
    return default_storage.open(release.artifact_name, "rb")


def firmware_update_active_count() -> int:
    """Updates not finished yet (the fleet's pending updates, for analytics): one count query."""
    return FirmwareUpdate.objects.filter(status__in=ACTIVE_STATUSES).count()
